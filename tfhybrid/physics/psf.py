"""Point-spread functions: band-wise FFT convolution, analytic PSF images, PSF matching.

Implements the operator ``P`` of Lanusse, Melchior & Moolekamp 2019 (file ``000_*`` of the
papers), eq. 6: "a band-wise 2D convolution by a Point Spread Function", block-diagonal over
bands, and the PSF-matching ("difference") kernel of SCARLET (Melchior et al. 2018) that maps a
narrow model-frame PSF to each observed band's PSF, so that a scene is modelled at one common
resolution and blurred per band: ``observed_psf[b] = difference_kernel[b] * model_psf``.

Conventions
-----------
* Images are ``(batch, bands, ny, nx)`` with axis order ``(y, x)`` (row, column).
* PSF images are ``(bands, py, px)`` (one PSF per band, shared by the batch) or
  ``(batch, bands, py, px)`` (one per image and band). Their sizes must be ODD: the PSF centre
  is the centre of the central pixel ``(py // 2, px // 2)``. An even-sized PSF has its centre
  on a pixel corner, and the ``'same'`` crop then shifts the result by half a pixel in a
  direction that depends on a convention; we reject it rather than shift images silently.
* Convolution output has the image's size (``'same'``) and is exactly
  ``scipy.signal.fftconvolve(image, psf, mode='same')``: zero padding outside the image, no
  wrap-around. PSF images are normalised to unit sum by default (``normalize_psf=True``), so
  convolution conserves flux; pass ``normalize_psf=False`` to use them as given.
* Angles in arcsec (floats, or ``astropy`` quantities where stated); ``pixel_scale_arcsec`` is
  the pixel side.

Speed
-----
Fits call the convolution thousands of times with the same PSF, so :class:`FFTConvolution`
precomputes the padded PSF transform (the optical transfer function, OTF) once per image size;
:func:`convolve_fft` is the one-shot functional form. FFT sizes are padded to
``>= n + p - 1`` with only factors 2, 3, 5, 7 (fast for pocketfft/ducc on CPU).
:func:`convolve` can dispatch small PSFs to a direct ``tf.nn.depthwise_conv2d``; on the 2-core
CPU we measured (``benchmarks/bench_psf.py``) the FFT was faster at every PSF size from 5 to 41
px, so the default threshold is 0 (always FFT). XLA (``jit_compile=True``) gave no consistent
gain for the FFT path on CPU (within ±40 %, run-to-run noise on a shared machine), so it is off
by default.

Validation
----------
Public functions check shapes always (ranks, bands, odd sizes) and values (finite, PSF sum > 0)
when called eagerly; inside ``tf.function`` the values are symbolic and are not checked
(validate once outside the compiled loop). Private ``_*_core`` functions never check.

dtype: float32 by default; float64 inputs are kept in float64 (used for finite-difference
gradient checks). Everything is differentiable with respect to images and PSFs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfhybrid.physics.xla import nestable_function
from tfhybrid.validation import TfhybridInputError, as_arcsec, check_range

__all__ = [
    "FWHM_PER_SIGMA",
    "psf_fwhm_to_sigma",
    "psf_sigma_to_fwhm",
    "moffat_fwhm_to_scale_radius",
    "gaussian_psf",
    "moffat_psf",
    "gaussian_psf_image",
    "moffat_psf_image",
    "bin_psf_image",
    "fast_fft_size",
    "convolve_fft",
    "convolve_direct",
    "convolve",
    "psf_transfer_function",
    "FFTConvolution",
    "difference_kernel",
    "PSFConvolution",
    "DIRECT_CONV_MAX_PSF_SIZE",
]

#: FWHM = 2 sqrt(2 ln 2) sigma for a Gaussian.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: :func:`convolve` uses direct convolution for PSFs at most this many pixels on a side and
#: FFT above. 0 = always FFT: on the 2-core CPU of ``benchmarks/bench_psf.py`` the FFT won at
#: every PSF size measured (5 to 41 px), by 3x (5 px) to >100x (41 px) against
#: ``depthwise_conv2d``. Raise it on hardware where direct convolution wins for small PSFs.
DIRECT_CONV_MAX_PSF_SIZE = 0


# --------------------------------------------------------------------------------------------
# Width conversions
# --------------------------------------------------------------------------------------------
def psf_fwhm_to_sigma(fwhm):
    """Gaussian standard deviation from FWHM: ``sigma = fwhm / (2 sqrt(2 ln 2))`` (same units)."""
    return fwhm / FWHM_PER_SIGMA


def psf_sigma_to_fwhm(sigma):
    """Gaussian FWHM from standard deviation: ``fwhm = 2 sqrt(2 ln 2) sigma`` (same units)."""
    return sigma * FWHM_PER_SIGMA


def moffat_fwhm_to_scale_radius(fwhm, beta):
    """Moffat scale radius ``r_d`` from FWHM: ``fwhm = 2 r_d sqrt(2**(1/beta) - 1)``.

    For the profile ``I(r) ∝ (1 + (r / r_d)**2) ** (-beta)`` (GalSim's ``Moffat``).
    """
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


# --------------------------------------------------------------------------------------------
# Analytic PSF images (pixel-integrated, like GalSim's drawImage(method='auto'))
# --------------------------------------------------------------------------------------------
def _pixel_edges(size: int, dtype) -> tf.Tensor:
    """Pixel edges in pixels relative to the central pixel's centre: ``-size/2 .. size/2``."""
    half = size / 2.0
    return tf.linspace(tf.constant(-half, dtype), tf.constant(half, dtype), size + 1)


def gaussian_psf_image(fwhm_pixels, size: int, normalize: bool = True) -> tf.Tensor:
    """Pixel-integrated circular Gaussian of unit flux, centred on the central pixel.

    Pure, differentiable in ``fwhm_pixels``. Each pixel holds the integral of the unit-flux
    profile over its area (what GalSim's ``drawImage(method='auto')`` computes by convolving
    with the pixel), which is exact and separable for a Gaussian:
    ``[Phi(x_hi / s) - Phi(x_lo / s)] * [Phi(y_hi / s) - Phi(y_lo / s)]``.

    Parameters
    ----------
    fwhm_pixels : scalar tensor (float32 or float64)
        FWHM in pixels.
    size : int
        Odd image side in pixels.
    normalize : bool
        Divide by the image sum (unit sum inside the stamp) instead of keeping the unit-flux
        profile's pixel values (whose sum is < 1 by the flux outside the stamp).

    Returns
    -------
    tf.Tensor of shape ``(size, size)``, dtype of ``fwhm_pixels`` (float32 if not a float).
    """
    fwhm_pixels = tf.convert_to_tensor(fwhm_pixels)
    if not fwhm_pixels.dtype.is_floating:
        fwhm_pixels = tf.cast(fwhm_pixels, tf.float32)
    dtype = fwhm_pixels.dtype
    sigma = fwhm_pixels / FWHM_PER_SIGMA
    edges = _pixel_edges(size, dtype)
    # 0.5 * erf(t / sqrt 2) is the Gaussian CDF up to a constant that cancels in the difference.
    cdf = 0.5 * tf.math.erf(edges / (sigma * math.sqrt(2.0)))
    profile_1d = cdf[1:] - cdf[:-1]
    image = profile_1d[:, None] * profile_1d[None, :]
    if normalize:
        image = image / tf.reduce_sum(image)
    return image


def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on [-1/2, 1/2] (weights sum to 1)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * x, 0.5 * w


def moffat_psf_image(
    fwhm_pixels, beta, size: int, normalize: bool = True, nodes_per_pixel: int = 12
) -> tf.Tensor:
    """Pixel-integrated circular Moffat of unit flux (untruncated), centred on the central pixel.

    ``I(r) = (beta - 1) / (pi r_d**2) * (1 + (r / r_d)**2) ** (-beta)`` with
    ``r_d = fwhm / (2 sqrt(2**(1/beta) - 1))`` (GalSim's ``Moffat(beta, fwhm=)`` with
    ``trunc=0``). Each pixel is integrated with an ``nodes_per_pixel``² Gauss–Legendre rule;
    the profile is analytic, so the rule converges geometrically (12 nodes give < 1e-9 relative
    error for ``r_d >= 0.5`` pixel). Pure, differentiable in ``fwhm_pixels`` and ``beta``.

    Parameters
    ----------
    fwhm_pixels, beta : scalar tensors
        FWHM in pixels and Moffat index (``beta > 1``).
    size : int
        Odd image side in pixels.
    normalize : bool
        Divide by the image sum (see :func:`gaussian_psf_image`).

    Returns
    -------
    tf.Tensor of shape ``(size, size)`` in the dtype of ``fwhm_pixels``.
    """
    fwhm_pixels = tf.convert_to_tensor(fwhm_pixels)
    if not fwhm_pixels.dtype.is_floating:
        fwhm_pixels = tf.cast(fwhm_pixels, tf.float32)
    dtype = fwhm_pixels.dtype
    beta = tf.cast(beta, dtype)
    r_d = fwhm_pixels / (2.0 * tf.sqrt(tf.pow(tf.constant(2.0, dtype), 1.0 / beta) - 1.0))
    nodes, weights = _gauss_legendre(nodes_per_pixel)
    centres = np.arange(size, dtype=np.float64) - size // 2
    # Sample positions (size * n,) along one axis, and the matching 1-D weights.
    pos = tf.constant((centres[:, None] + nodes[None, :]).ravel(), dtype)
    wts = tf.constant(np.tile(weights, size), dtype)
    r2 = (pos[:, None] ** 2 + pos[None, :] ** 2) / r_d**2
    surface = (beta - 1.0) / (math.pi * r_d**2) * tf.pow(1.0 + r2, -beta)
    weighted = surface * wts[:, None] * wts[None, :]
    image = tf.reduce_sum(
        tf.reshape(weighted, (size, nodes_per_pixel, size, nodes_per_pixel)), axis=(1, 3)
    )
    if normalize:
        image = image / tf.reduce_sum(image)
    return image


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TfhybridInputError(f"size must be an odd integer number of pixels; got {size!r}")
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise TfhybridInputError(
            f"size must be an odd positive number of pixels (the PSF centre is the centre of "
            f"the central pixel); got {size}"
        )
    return size


def _fwhm_and_scale_arcsec(fwhm_arcsec, pixel_scale_arcsec) -> tuple[float, float]:
    """Both arguments as positive floats in arcsec (numbers or astropy Quantities)."""
    fwhm = as_arcsec("fwhm_arcsec", fwhm_arcsec, low=0.0)
    scale = as_arcsec("pixel_scale_arcsec", pixel_scale_arcsec, low=0.0)
    check_range("fwhm_arcsec", fwhm, low=0.0, low_inclusive=False, unit="arcsec")
    check_range("pixel_scale_arcsec", scale, low=0.0, low_inclusive=False, unit="arcsec")
    return fwhm, scale


def gaussian_psf(fwhm_arcsec, pixel_scale_arcsec, size: int, normalize: bool = True) -> np.ndarray:
    """Image of a circular Gaussian PSF, pixel-integrated, as GalSim draws it.

    Equals ``galsim.Gaussian(fwhm=fwhm_arcsec).drawImage(nx=size, ny=size,
    scale=pixel_scale_arcsec, method='auto').array`` (divided by its sum when ``normalize``)
    to float32 rounding (see ``tests/physics/test_psf.py``).

    Parameters
    ----------
    fwhm_arcsec : float or astropy Quantity
        Full width at half maximum (arcsec, > 0).
    pixel_scale_arcsec : float or astropy Quantity
        Pixel side (arcsec, > 0).
    size : int
        Odd image side in pixels.
    normalize : bool, default True
        Unit sum over the stamp. With False, pixel values of the unit-flux profile.

    Returns
    -------
    np.ndarray ``(size, size)`` float32, centred on pixel ``(size // 2, size // 2)``.
    """
    fwhm, scale = _fwhm_and_scale_arcsec(fwhm_arcsec, pixel_scale_arcsec)
    size = _check_size(size)
    image = gaussian_psf_image(tf.constant(fwhm / scale, tf.float64), size, normalize)
    return image.numpy().astype(np.float32)


def moffat_psf(
    fwhm_arcsec, beta: float, pixel_scale_arcsec, size: int, normalize: bool = True
) -> np.ndarray:
    """Image of a circular (untruncated) Moffat PSF, pixel-integrated, as GalSim draws it.

    Equals ``galsim.Moffat(beta=beta, fwhm=fwhm_arcsec).drawImage(nx=size, ny=size,
    scale=pixel_scale_arcsec, method='auto').array`` (divided by its sum when ``normalize``)
    to the accuracy stated in ``tests/physics/test_psf.py`` (GalSim's own FFT drawing is the
    limiting factor, ~1e-5 of the peak).

    Parameters
    ----------
    fwhm_arcsec : float or astropy Quantity
        Full width at half maximum (arcsec, > 0).
    beta : float
        Moffat index, > 1 (HSC-like PSFs: ~2.5-4.5).
    pixel_scale_arcsec : float or astropy Quantity
        Pixel side (arcsec, > 0).
    size : int
        Odd image side in pixels.
    normalize : bool, default True
        Unit sum over the stamp. With False, pixel values of the unit-flux profile.

    Returns
    -------
    np.ndarray ``(size, size)`` float32.
    """
    fwhm, scale = _fwhm_and_scale_arcsec(fwhm_arcsec, pixel_scale_arcsec)
    check_range("beta", beta, low=1.0, low_inclusive=False)
    size = _check_size(size)
    fwhm_pix = fwhm / scale
    # Resolve a very narrow core (r_d < 1 pixel) with more nodes: keeps the rule's error tiny.
    r_d_pix = float(moffat_fwhm_to_scale_radius(fwhm_pix, float(beta)))
    nodes = 12 if r_d_pix >= 0.5 else int(min(64, math.ceil(12 * 0.5 / r_d_pix)))
    image = moffat_psf_image(
        tf.constant(fwhm_pix, tf.float64), float(beta), size, normalize, nodes_per_pixel=nodes
    )
    return image.numpy().astype(np.float32)


def bin_psf_image(psf_image, factor: int) -> np.ndarray:
    """The PSF of a grid ``factor`` times coarser, for images averaged over ``factor × factor``
    blocks of pixels (the coarse grid of :func:`tfhybrid.lens.fit.coarse_posterior`).

    A PSF image holds the profile integrated over each pixel (the effective PSF), so the
    coarse pixel centred ``f k`` fine pixels from the PSF's centre receives the sum of the fine
    pixels it covers: ``P_c[k] = Σ_j w(j - f k) P[j]``, exact for odd ``f``. For even ``f`` the
    coarse pixel's edge halves a fine pixel; its inner half is taken as ``b / 2 + (a - c) / 16``
    (``a, b, c``: the inner neighbour's, the pixel's and the outer neighbour's values), the
    integral of the quadratic with those three pixel integrals, in each axis. Against a Gaussian
    integrated over the coarse pixels: 1e-8 for odd ``f``; for σ = 1.25 fine pixels (the
    paper's 0.05" at 0.04") 0.5 % of the peak at ``f = 4`` and 3.6 % at ``f = 2``
    (``tests/physics/test_psf.py``).

    Parameters
    ----------
    psf_image : array ``(py, px)``
        The fine PSF, odd sides, finite, positive sum (normalised here).
    factor : int
        Positive; 1 returns the normalised PSF.

    Returns
    -------
    np.ndarray ``(qy, qx)`` float64, unit sum, odd sides covering the fine PSF's extent.
    """
    arr = np.asarray(psf_image, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] % 2 == 0 or arr.shape[1] % 2 == 0:
        raise TfhybridInputError(
            f"psf_image must be one (py, px) image with odd sides; got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or not arr.sum() > 0:
        raise TfhybridInputError("psf_image must be finite with a positive sum")
    if isinstance(factor, bool) or not isinstance(factor, int | np.integer) or factor < 1:
        raise TfhybridInputError(f"factor must be a positive integer; got {factor!r}")
    arr = arr / arr.sum()
    if factor == 1:
        return arr
    half = factor // 2
    if factor % 2:
        weights = np.ones(factor)
    else:
        # the coarse pixel's edge halves a fine pixel: its inner half is b / 2 + (a - c) / 16
        # (a, b, c: the inner neighbour's, its own and the outer neighbour's values), the
        # integral of the quadratic with those three pixel integrals
        weights = np.ones(factor + 3)
        weights[[0, -1]] = -1.0 / 16.0
        weights[[1, -2]] = 0.5
        weights[[2, -3]] += 1.0 / 16.0
        half += 1
    # separable box: rows, then columns ('full', so every coarse pixel's share is kept)
    smoothed = np.apply_along_axis(np.convolve, 0, arr, weights)
    smoothed = np.apply_along_axis(np.convolve, 1, smoothed, weights)
    centres = [(n - 1) // 2 + half for n in arr.shape]
    index = [c + factor * np.arange(-(c // factor), c // factor + 1) for c in centres]
    coarse = smoothed[np.ix_(index[0], index[1])]
    return coarse / coarse.sum()


# --------------------------------------------------------------------------------------------
# FFT convolution
# --------------------------------------------------------------------------------------------
def fast_fft_size(n: int) -> int:
    """Smallest integer ``>= n`` whose prime factors are all in {2, 3, 5, 7}."""
    n = max(int(n), 1)
    best = None
    p2 = 1
    while p2 < 2 * n:
        p3 = p2
        while p3 < 2 * n:
            p5 = p3
            while p5 < 2 * n:
                p7 = p5
                while p7 < n:
                    p7 *= 7
                if best is None or p7 < best:
                    best = p7
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return best


def _fft_shape(image_shape: Sequence[int], psf_shape: Sequence[int]) -> tuple[int, int]:
    """Padded FFT shape that holds the full linear convolution without wrap-around."""
    return (
        fast_fft_size(image_shape[0] + psf_shape[0] - 1),
        fast_fft_size(image_shape[1] + psf_shape[1] - 1),
    )


def _complex_dtype(dtype: tf.DType) -> tf.DType:
    return tf.complex128 if dtype == tf.float64 else tf.complex64


def _otf_core(psfs: tf.Tensor, fft_shape: tuple[int, int], normalize: bool) -> tf.Tensor:
    """Real FFT of the PSF zero-padded (top-left) to ``fft_shape``: ``(..., Ny, Nx // 2 + 1)``."""
    if normalize:
        psfs = psfs / tf.reduce_sum(psfs, axis=(-2, -1), keepdims=True)
    return tf.signal.rfft2d(psfs, fft_length=fft_shape)


def _apply_otf_core(
    images: tf.Tensor, otf: tf.Tensor, fft_shape: tuple[int, int], offset: tuple[int, int]
) -> tf.Tensor:
    """Linear convolution by multiplication with a precomputed OTF, then the 'same' crop.

    The full linear convolution of an ``n``-pixel image with a ``p``-pixel PSF occupies indices
    ``0 .. n + p - 2`` of the padded grid; ``'same'`` keeps ``n`` of them starting at
    ``(p - 1) // 2`` (scipy.signal.fftconvolve's centring).
    """
    ny, nx = images.shape[-2], images.shape[-1]
    spectrum = tf.signal.rfft2d(images, fft_length=fft_shape) * otf
    full = tf.signal.irfft2d(spectrum, fft_length=fft_shape)
    return full[..., offset[0] : offset[0] + ny, offset[1] : offset[1] + nx]


def _convolve_fft_core(
    images: tf.Tensor, psfs: tf.Tensor, fft_shape: tuple[int, int], normalize: bool
) -> tf.Tensor:
    """Band-wise 'same' FFT convolution; shapes already validated (see :func:`convolve_fft`)."""
    offset = ((psfs.shape[-2] - 1) // 2, (psfs.shape[-1] - 1) // 2)
    otf = _otf_core(psfs, fft_shape, normalize)
    return _apply_otf_core(images, otf, fft_shape, offset)


# nestable: inlined inside a caller's XLA graph, where a nested call (its gradient: the crop's
# and the FFTs') made the caller recompile on every call (see tfhybrid.physics.xla)
_convolve_fft_graph = nestable_function(_convolve_fft_core, reduce_retracing=False)
_convolve_fft_xla = nestable_function(_convolve_fft_core, jit_compile=True,
                                      reduce_retracing=False)
_apply_otf_graph = nestable_function(_apply_otf_core)
_apply_otf_xla = nestable_function(_apply_otf_core, jit_compile=True)
_otf_graph = nestable_function(_otf_core)


def _float_tensor(name: str, value, dtype: tf.DType | None = None) -> tf.Tensor:
    """Convert to a float tensor: keep float32/float64, cast anything else to float32."""
    try:
        tensor = tf.convert_to_tensor(value)
    except (TypeError, ValueError) as err:
        raise TfhybridInputError(
            f"{name} must be a numeric array or tensor; got {value!r}"
        ) from err
    if tensor.dtype.is_complex or tensor.dtype in (tf.string, tf.bool):
        raise TfhybridInputError(f"{name} must be real numbers; got dtype {tensor.dtype.name}")
    if dtype is not None:
        if tensor.dtype != dtype:
            tensor = tf.cast(tensor, dtype)
    elif tensor.dtype not in (tf.float32, tf.float64):
        tensor = tf.cast(tensor, tf.float32)
    return tensor


def _is_concrete(tensor: tf.Tensor) -> bool:
    """True when the tensor holds values we can check (eager), False when symbolic (traced)."""
    return tf.executing_eagerly() and hasattr(tensor, "numpy")


def _check_values(name: str, tensor: tf.Tensor) -> None:
    if _is_concrete(tensor):
        arr = tensor.numpy()
        if not np.all(np.isfinite(arr)):
            n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise TfhybridInputError(
                f"{name} contains {n_bad} non-finite value(s) (NaN or inf); expected finite numbers"
            )


def _check_psf_sums(name: str, psfs: tf.Tensor) -> None:
    if _is_concrete(psfs):
        sums = np.sum(psfs.numpy(), axis=(-2, -1))
        if np.any(~(sums > 0)):
            bad = tuple(int(i) for i in np.argwhere(~(sums > 0))[0])
            raise TfhybridInputError(
                f"{name} must sum to a positive number in every band (a PSF is a positive "
                f"response of unit total by convention); the PSF at index {bad} sums to "
                f"{sums[bad]:g}"
            )


def _check_psf_shape(name: str, psfs: tf.Tensor, ranks: Sequence[int], axes: str) -> None:
    if psfs.shape.rank not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise TfhybridInputError(
            f"{name} must have rank {want} {axes}; got shape {tuple(psfs.shape)} "
            f"(rank {psfs.shape.rank})"
        )
    py, px = psfs.shape[-2], psfs.shape[-1]
    if py is None or px is None:
        raise TfhybridInputError(f"{name} must have a static spatial size; got {psfs.shape}")
    if py % 2 == 0 or px % 2 == 0:
        raise TfhybridInputError(
            f"{name} must have odd sizes (the PSF centre is the centre of the central pixel); "
            f"got {py}x{px}. An even-sized PSF is centred on a pixel corner, so a 'same' "
            "convolution would shift the image by half a pixel; resample or re-draw the PSF on "
            "an odd grid (e.g. gaussian_psf(..., size=odd)), or pad one zero row/column only "
            "if the PSF's true centre is the centre of pixel (py // 2, px // 2)"
        )


def _validate_images_psfs(images, psfs, normalize_psf: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """Shared public-boundary validation of ``(images, psfs)``; returns float tensors."""
    images = _float_tensor("images", images)
    psfs = _float_tensor("psfs", psfs, images.dtype)
    if images.shape.rank != 4:
        raise TfhybridInputError(
            f"images must have rank 4 (batch, bands, ny, nx); got shape {tuple(images.shape)} "
            f"(rank {images.shape.rank})"
        )
    if images.shape[-2] is None or images.shape[-1] is None:
        raise TfhybridInputError(
            f"images must have a static spatial size (ny, nx); got {images.shape}"
        )
    _check_psf_shape("psfs", psfs, (3, 4), "(bands, py, px) or (batch, bands, py, px)")
    if psfs.shape[-3] is not None and images.shape[1] is not None:
        if psfs.shape[-3] != images.shape[1]:
            raise TfhybridInputError(
                f"psf has {psfs.shape[-3]} bands but images have {images.shape[1]}; expected "
                "one PSF per band, psfs of shape (bands, py, px) or (batch, bands, py, px)"
            )
    if psfs.shape.rank == 4 and psfs.shape[0] is not None and images.shape[0] is not None:
        if psfs.shape[0] not in (1, images.shape[0]):
            raise TfhybridInputError(
                f"psfs of rank 4 must have batch size 1 or the images' batch size "
                f"{images.shape[0]}; got {psfs.shape[0]}"
            )
    _check_values("images", images)
    _check_values("psfs", psfs)
    _check_psf_sums("psfs", psfs)
    del normalize_psf  # the positive-sum check applies either way: such a PSF is not a PSF
    return images, psfs


def convolve_fft(images, psfs, normalize_psf: bool = True, jit_compile: bool = False) -> tf.Tensor:
    """Band-wise 'same' convolution of images by PSFs via zero-padded FFTs (eq. 6's ``P``).

    Equals ``scipy.signal.fftconvolve(images[i, b], psfs[b], mode='same')`` for every image
    ``i`` and band ``b`` (zero padding, no wrap-around), to float32 rounding (< 1e-6 of the
    result's maximum; see ``tests/physics/test_psf.py``). Differentiable with respect to images
    and PSFs.

    Parameters
    ----------
    images : array or tensor ``(batch, bands, ny, nx)``
        float32 (default) or float64; other dtypes are cast to float32.
    psfs : array or tensor ``(bands, py, px)`` or ``(batch, bands, py, px)``
        PSF images with odd ``py``, ``px`` (centre = centre of pixel ``(py // 2, px // 2)``),
        each summing to a positive number. A rank-4 batch size of 1 broadcasts.
    normalize_psf : bool, default True
        Divide each PSF by its sum (flux-conserving convolution). False uses them as given.
    jit_compile : bool, default False
        Run the compiled kernel through XLA. Off by default: on CPU it is not faster for FFTs
        (``benchmarks/bench_psf.py``).

    Returns
    -------
    tf.Tensor ``(batch, bands, ny, nx)`` in the images' dtype.

    Raises
    ------
    TfhybridInputError
        Wrong ranks, band mismatch, even PSF sizes, non-finite values, PSF sum <= 0.

    Notes
    -----
    Each call transforms the PSF again; when the same PSF is applied many times (fits), build an
    :class:`FFTConvolution` once and call it instead.
    """
    images, psfs = _validate_images_psfs(images, psfs, normalize_psf)
    fft_shape = _fft_shape(images.shape[-2:], psfs.shape[-2:])
    kernel = _convolve_fft_xla if jit_compile else _convolve_fft_graph
    return kernel(images, psfs, fft_shape, bool(normalize_psf))


def psf_transfer_function(
    psfs, image_shape: Sequence[int], normalize_psf: bool = True, dtype=tf.float32
) -> tf.Tensor:
    """Real FFT of the zero-padded PSF, ready for repeated convolutions of ``image_shape`` images.

    Parameters
    ----------
    psfs : ``(bands, py, px)`` or ``(batch, bands, py, px)``, odd sizes.
    image_shape : (ny, nx)
        Spatial shape of the images that will be convolved.
    normalize_psf : bool
        Divide each PSF by its sum first.
    dtype : float32 or float64

    Returns
    -------
    complex tensor ``(..., Ny, Nx // 2 + 1)`` with ``(Ny, Nx) = _fft_shape(image_shape, psf)``
    (complex64 for float32). Use through :class:`FFTConvolution`, which keeps the shapes.
    """
    psfs = _float_tensor("psfs", psfs, tf.as_dtype(dtype))
    _check_psf_shape("psfs", psfs, (3, 4), "(bands, py, px) or (batch, bands, py, px)")
    _check_values("psfs", psfs)
    _check_psf_sums("psfs", psfs)
    fft_shape = _fft_shape(tuple(image_shape), psfs.shape[-2:])
    return _otf_graph(psfs, fft_shape, bool(normalize_psf))


class FFTConvolution:
    """Band-wise 'same' FFT convolution by fixed PSFs, transform precomputed once.

    ``FFTConvolution(psfs, image_shape)(images)`` equals ``convolve_fft(images, psfs)`` but
    transforms the PSFs only once, at construction: the per-call cost is one forward and one
    inverse FFT of the images. Call it inside your own ``tf.function``; the call does only a
    static shape check.

    Parameters
    ----------
    psfs : ``(bands, py, px)`` or ``(batch, bands, py, px)``
        Odd-sized PSF images, each with a positive sum.
    image_shape : (ny, nx)
        Spatial shape of the images to convolve.
    normalize_psf : bool, default True
        Divide each PSF by its sum.
    dtype : float32 (default) or float64
    jit_compile : bool, default False
        Compile the per-call kernel with XLA.

    Attributes
    ----------
    otf : complex tensor, the PSFs' padded real FFT. ``adjoint(images)`` applies the transpose
    operator (correlation with the PSF, 'same' crop), useful for Lipschitz estimates.
    """

    def __init__(
        self,
        psfs,
        image_shape: Sequence[int],
        normalize_psf: bool = True,
        dtype=tf.float32,
        jit_compile: bool = False,
    ):
        dtype = tf.as_dtype(dtype)
        if dtype not in (tf.float32, tf.float64):
            raise TfhybridInputError(f"dtype must be float32 or float64; got {dtype.name}")
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 2 or min(image_shape) < 1:
            raise TfhybridInputError(f"image_shape must be (ny, nx) > 0; got {image_shape}")
        psfs = _float_tensor("psfs", psfs, dtype)
        _check_psf_shape("psfs", psfs, (3, 4), "(bands, py, px) or (batch, bands, py, px)")
        _check_values("psfs", psfs)
        _check_psf_sums("psfs", psfs)
        self.dtype = dtype
        self.image_shape = image_shape
        self.psf_shape = (int(psfs.shape[-2]), int(psfs.shape[-1]))
        self.bands = int(psfs.shape[-3])
        self.fft_shape = _fft_shape(image_shape, self.psf_shape)
        self.offset = ((self.psf_shape[0] - 1) // 2, (self.psf_shape[1] - 1) // 2)
        # The transpose of a 'same' convolution by an odd kernel is the 'same' convolution by
        # the kernel flipped in both axes: same offset, conjugate-free via an explicit flip.
        self.otf = _otf_graph(psfs, self.fft_shape, bool(normalize_psf))
        self.adjoint_otf = _otf_graph(
            tf.reverse(psfs, axis=(-2, -1)), self.fft_shape, bool(normalize_psf)
        )
        self._kernel = _apply_otf_xla if jit_compile else _apply_otf_graph

    def _check(self, images) -> tf.Tensor:
        images = tf.convert_to_tensor(images)
        if images.dtype != self.dtype:
            images = tf.cast(images, self.dtype)
        if images.shape.rank != 4 or tuple(images.shape[-2:]) != self.image_shape:
            raise TfhybridInputError(
                f"images must be (batch, bands, {self.image_shape[0]}, {self.image_shape[1]}) "
                f"for this FFTConvolution; got shape {tuple(images.shape)}"
            )
        if images.shape[1] is not None and images.shape[1] != self.bands:
            raise TfhybridInputError(
                f"psf has {self.bands} bands but images have {images.shape[1]}"
            )
        return images

    def __call__(self, images) -> tf.Tensor:
        """Convolve ``(batch, bands, ny, nx)`` images; returns the same shape."""
        return self._kernel(self._check(images), self.otf, self.fft_shape, self.offset)

    def adjoint(self, images) -> tf.Tensor:
        """Apply the transpose operator (correlation by the PSFs, 'same' crop)."""
        return self._kernel(self._check(images), self.adjoint_otf, self.fft_shape, self.offset)


# --------------------------------------------------------------------------------------------
# Direct convolution (small PSFs) and the size dispatch
# --------------------------------------------------------------------------------------------
def _convolve_direct_core(images: tf.Tensor, psfs: tf.Tensor, normalize: bool) -> tf.Tensor:
    """'same' convolution of (batch, bands, ny, nx) by shared (bands, py, px) with depthwise conv.

    ``depthwise_conv2d`` computes a correlation, so the PSF is flipped to make it a convolution;
    'SAME' padding on an odd kernel centres it like fftconvolve(mode='same').
    """
    if normalize:
        psfs = psfs / tf.reduce_sum(psfs, axis=(-2, -1), keepdims=True)
    kernel = tf.transpose(tf.reverse(psfs, axis=(-2, -1)), (1, 2, 0))[..., None]
    nhwc = tf.transpose(images, (0, 2, 3, 1))
    out = tf.nn.depthwise_conv2d(nhwc, kernel, strides=(1, 1, 1, 1), padding="SAME")
    return tf.transpose(out, (0, 3, 1, 2))


_convolve_direct_graph = nestable_function(_convolve_direct_core)
_convolve_direct_xla = nestable_function(_convolve_direct_core, jit_compile=True)


def convolve_direct(
    images, psfs, normalize_psf: bool = True, jit_compile: bool = False
) -> tf.Tensor:
    """Same result as :func:`convolve_fft` by direct ``tf.nn.depthwise_conv2d`` (shared PSFs).

    Only ``psfs`` of shape ``(bands, py, px)`` (one PSF per band for the whole batch). Faster
    than FFT for small PSFs on CPU (see ``benchmarks/bench_psf.py``). float32 or float64.
    """
    images, psfs = _validate_images_psfs(images, psfs, normalize_psf)
    if psfs.shape.rank != 3:
        raise TfhybridInputError(
            f"convolve_direct needs psfs of shape (bands, py, px); got {tuple(psfs.shape)}; "
            "use convolve_fft for per-image PSFs"
        )
    kernel = _convolve_direct_xla if jit_compile else _convolve_direct_graph
    return kernel(images, psfs, bool(normalize_psf))


def convolve(
    images, psfs, normalize_psf: bool = True, direct_max_psf_size: int | None = None
) -> tf.Tensor:
    """Band-wise 'same' PSF convolution, choosing the faster method by PSF size.

    Direct depthwise convolution when both PSF sides are at most ``direct_max_psf_size``
    (default :data:`DIRECT_CONV_MAX_PSF_SIZE`, i.e. always FFT on CPU) and the PSFs are shared
    by the batch, FFT otherwise. Same contract and result as :func:`convolve_fft`.
    """
    if direct_max_psf_size is None:
        direct_max_psf_size = DIRECT_CONV_MAX_PSF_SIZE
    psf_tensor = tf.convert_to_tensor(psfs)
    small = (
        psf_tensor.shape.rank == 3
        and psf_tensor.shape[-2] is not None
        and max(psf_tensor.shape[-2], psf_tensor.shape[-1]) <= direct_max_psf_size
    )
    if small:
        return convolve_direct(images, psf_tensor, normalize_psf)
    return convolve_fft(images, psf_tensor, normalize_psf)


# --------------------------------------------------------------------------------------------
# PSF matching (difference kernel)
# --------------------------------------------------------------------------------------------
def _centre_on_origin(psfs: tf.Tensor, grid: tuple[int, int]) -> tf.Tensor:
    """Zero-pad odd PSFs to ``grid`` and roll their central pixel to index (0, 0)."""
    py, px = psfs.shape[-2], psfs.shape[-1]
    rank = psfs.shape.rank
    paddings = [[0, 0]] * (rank - 2) + [[0, grid[0] - py], [0, grid[1] - px]]
    padded = tf.pad(psfs, paddings)
    return tf.roll(padded, shift=(-(py // 2), -(px // 2)), axis=(-2, -1))


def _difference_kernel_core(
    model_psf: tf.Tensor,
    observed_psfs: tf.Tensor,
    kernel_shape: tuple[int, int],
    grid: tuple[int, int],
    regularization: float,
    normalize: bool,
) -> tf.Tensor:
    """Wiener-regularised Fourier ratio ``K = O M* / (|M|^2 + eps |M(0)|^2)``, centred crop."""
    if normalize:
        model_psf = model_psf / tf.reduce_sum(model_psf)
        observed_psfs = observed_psfs / tf.reduce_sum(observed_psfs, axis=(-2, -1), keepdims=True)
    m_hat = tf.signal.rfft2d(_centre_on_origin(model_psf, grid))
    o_hat = tf.signal.rfft2d(_centre_on_origin(observed_psfs, grid))
    power = tf.math.real(m_hat * tf.math.conj(m_hat))
    # |M(0)|^2 = (sum of the model PSF)^2 sets the scale of the regulariser.
    floor = regularization * tf.math.real(m_hat[0, 0] * tf.math.conj(m_hat[0, 0]))
    ratio = o_hat * tf.math.conj(m_hat) / tf.cast(power + floor, m_hat.dtype)
    kernel = tf.signal.irfft2d(ratio, fft_length=grid)
    ky, kx = kernel_shape
    # Bring the origin to the centre of a (ky, kx) stamp: roll by half the kernel, then crop.
    centred = tf.roll(kernel, shift=(ky // 2, kx // 2), axis=(-2, -1))
    return centred[..., :ky, :kx]


_difference_kernel_graph = nestable_function(_difference_kernel_core)


def _second_moment(psf: np.ndarray) -> float:
    """Isotropic second moment <r^2> / 2 of a PSF image about its centre pixel (pixels^2)."""
    py, px = psf.shape[-2:]
    y, x = np.mgrid[:py, :px]
    r2 = (y - py // 2) ** 2 + (x - px // 2) ** 2
    return float(np.sum(psf * r2) / np.sum(psf) / 2.0)


def difference_kernel(
    model_psf,
    observed_psfs,
    kernel_shape: Sequence[int] | None = None,
    regularization: float = 1e-8,
    normalize: bool = True,
) -> tf.Tensor:
    """PSF-matching kernels from a narrow model-frame PSF to each observed band's PSF.

    SCARLET's PSF matching (Melchior et al. 2018; Lanusse et al. 2019 model the scene at a
    common resolution this way): find ``K_b`` with ``observed_psf[b] = K_b * model_psf``, so a
    scene ``S`` rendered with the model PSF is observed in band ``b`` as ``K_b * S``. Computed in
    Fourier space as a Wiener-regularised ratio,

        K_b = F^-1[ O_b conj(M) / (|M|^2 + regularization |M(0)|^2) ],

    on a zero-padded grid large enough that nothing wraps, then cropped to ``kernel_shape``
    centred on the central pixel. The regulariser only matters where the model PSF's transfer
    function is tiny (model PSF wider than the observed one at some frequency): there the kernel
    tends to zero instead of amplifying noise. Differentiable with respect to both PSFs.

    Parameters
    ----------
    model_psf : ``(py, px)`` odd-sized image, positive sum. Should be NARROWER than every
        observed PSF (a warning is issued otherwise: the kernel would have to deconvolve).
    observed_psfs : ``(bands, oy, ox)`` odd-sized images, positive sums.
    kernel_shape : (ky, kx) odd, default ``(oy, ox)`` (the kernel is narrower than the observed
        PSF, so this holds it).
    regularization : float >= 0, default 1e-8
        Wiener floor relative to ``|M(0)|^2``.
    normalize : bool, default True
        Normalise both PSFs to unit sum first (the kernels then sum to 1).

    Returns
    -------
    tf.Tensor ``(bands, ky, kx)`` in the observed PSFs' dtype (float32 default).
    Convolving the model PSF with it (``convolve_fft(model_psf[None, None], kernel,
    normalize_psf=False)``) reproduces each observed PSF; for Gaussian/Moffat PSFs at HSC
    resolution the residual is < 1e-6 of the peak (tests/physics/test_psf.py).
    """
    observed = _float_tensor("observed_psfs", observed_psfs)
    model = _float_tensor("model_psf", model_psf, observed.dtype)
    _check_psf_shape("model_psf", model, (2,), "(py, px)")
    _check_psf_shape("observed_psfs", observed, (3,), "(bands, oy, ox)")
    for name, value in (("model_psf", model), ("observed_psfs", observed)):
        _check_values(name, value)
        _check_psf_sums(name, value)
    check_range("regularization", regularization, low=0.0)
    if kernel_shape is None:
        kernel_shape = (int(observed.shape[-2]), int(observed.shape[-1]))
    kernel_shape = tuple(int(s) for s in kernel_shape)
    if len(kernel_shape) != 2 or any(s < 1 or s % 2 == 0 for s in kernel_shape):
        raise TfhybridInputError(f"kernel_shape must be two odd positive sizes; got {kernel_shape}")
    if _is_concrete(model) and _is_concrete(observed):
        m2 = _second_moment(model.numpy())
        too_narrow = [
            b for b in range(observed.shape[0]) if _second_moment(observed[b].numpy()) < m2
        ]
        if too_narrow:
            warnings.warn(
                f"observed PSF(s) in band(s) {too_narrow} are narrower than the model PSF; the "
                "difference kernel then deconvolves and is dominated by the regulariser. Use a "
                "narrower model PSF.",
                stacklevel=2,
            )
    size_y = max(kernel_shape[0], observed.shape[-2]) + model.shape[-2] - 1
    size_x = max(kernel_shape[1], observed.shape[-1]) + model.shape[-1] - 1
    grid = (fast_fft_size(size_y), fast_fft_size(size_x))
    return _difference_kernel_graph(
        model, observed, kernel_shape, grid, float(regularization), bool(normalize)
    )


# --------------------------------------------------------------------------------------------
# Keras layer
# --------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tfhybrid")
class PSFConvolution(keras.layers.Layer):
    """Keras 3 layer: band-wise 'same' FFT convolution of ``(batch, bands, ny, nx)`` inputs.

    Holds the PSF images ``(bands, py, px)`` as a weight (non-trainable by default; set
    ``trainable_psf=True`` to fit the PSF too) and calls the same compiled kernel as
    :func:`convolve_fft`. Serialisable (``get_config``) and SavedModel-exportable.

    Parameters
    ----------
    psfs : array ``(bands, py, px)``, odd sizes, positive sums.
    normalize_psf : bool, default True
        Normalise each PSF to unit sum at every call (stays normalised while being trained).
    trainable_psf : bool, default False
    """

    def __init__(self, psfs, normalize_psf: bool = True, trainable_psf: bool = False, **kwargs):
        super().__init__(**kwargs)
        psfs_np = np.asarray(psfs, dtype=np.float32)
        psf_tensor = tf.constant(psfs_np)
        _check_psf_shape("psfs", psf_tensor, (3,), "(bands, py, px)")
        _check_values("psfs", psf_tensor)
        _check_psf_sums("psfs", psf_tensor)
        self.normalize_psf = bool(normalize_psf)
        self.trainable_psf = bool(trainable_psf)
        self._psf_init = psfs_np
        self.psfs = self.add_weight(
            shape=psfs_np.shape,
            initializer=keras.initializers.Constant(psfs_np),
            trainable=self.trainable_psf,
            name="psfs",
            dtype="float32",
        )

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise TfhybridInputError(
                f"PSFConvolution expects inputs (batch, bands, ny, nx); got {input_shape}"
            )
        if input_shape[1] is not None and input_shape[1] != self._psf_init.shape[0]:
            raise TfhybridInputError(
                f"psf has {self._psf_init.shape[0]} bands but images have {input_shape[1]}"
            )

    def call(self, inputs):
        inputs = tf.cast(inputs, tf.float32)
        # Keras builds once; check every call so a later mismatched batch still fails clearly.
        self.build(tuple(inputs.shape))
        psfs = tf.convert_to_tensor(self.psfs)
        fft_shape = _fft_shape(inputs.shape[-2:], psfs.shape[-2:])
        return _convolve_fft_core(inputs, psfs, fft_shape, self.normalize_psf)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            psfs=self._psf_init.tolist(),
            normalize_psf=self.normalize_psf,
            trainable_psf=self.trainable_psf,
        )
        return config

"""Training-set preprocessing of the two papers: lensing (VAE) and deblending (PixelCNN).

Lensing paper, section 2.2 ("Training")
---------------------------------------
From the COSMOS real-galaxy images: discard galaxies whose Sérsic fits failed or are
unphysical (:func:`select_valid_sersic_fits`), drop stamps smaller than 64 × 64 pixels, crop the
rest to squares (:func:`crop_to_square`), downscale to 64 × 64 (:func:`downscale`), keep only
images with ``15 <= max(I_1/4) / sigma_noise <= 50`` (:func:`snr_quarter`,
:func:`snr_cut_mask`), split into 15 500 / 500 / 1 543 training / test / validation images
(:func:`split_indices`) and divide each image by its maximum (:func:`preprocess_lensing`).
:func:`make_lensing_training_set` applies the same chain to the simulated default galaxies
(and, with ``noiseless=True``, keeps each one's noise-free version too).
:func:`rescale_to_central_third` zooms a source to fill the central third of its stamp, as the
lensing paper's mocks place their sources (section 5.1).

Deblending paper
----------------
Training stamps for the PixelCNN prior are HST galaxies reconvolved to a ground-based survey
(HSC: 0.168″ pixels, one reference PSF): :func:`reconvolve_to_survey` deconvolves the HST PSF
and convolves with the survey PSF with GalSim, with random rotations and flips as augmentation;
:func:`make_survey_stamps` does it for the simulated default galaxies.

Conventions: images have axis order (y, x); ``x`` is the column index, ``y`` the row index, as
in GalSim (whose +y is row index increasing). A stamp's centre is pixel ``(ny // 2, nx // 2)``
(GalSim's ``image.center``; the convention of ``tfhybrid.data.simulate``). Fluxes are in the
input's units (e-/s per pixel for COSMOS and the simulated set).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from tfhybrid.data.simulate import (
    CHUNK_SIZE,
    COSMOS_NOISE_SIGMA,
    HST_PIXEL_SCALE_ARCSEC,
    _run_tasks,
    draw_psf_image,
    make_psf,
    simulate_galaxy_stamps,
)
from tfhybrid.validation import (
    TfhybridInputError,
    as_arcsec,
    check_finite,
    check_range,
    check_rank,
)

#: Training / test / validation sizes of the lensing paper (section 2.2), in that order.
LENSING_SPLIT = (15500, 500, 1543)

#: Names of the splits, in the order of ``split_indices``'s ``fractions``.
SPLIT_NAMES = ("train", "test", "validation")

#: Side (pixels) of the lensing paper's training images.
LENSING_IMAGE_SIZE = 64

#: S/N window of the lensing paper: 15 <= max(I_1/4) / sigma_noise <= 50.
LENSING_SNR_RANGE = (15.0, 50.0)

#: Block size of the S/N statistic: ``I_1/4`` is the image downscaled by 4 (4 × 4 block means).
SNR_BLOCK = 4

#: Survey of the deblending paper: HSC pixel side (arcsec) and reference PSF FWHM (arcsec).
SURVEY_PIXEL_SCALE_ARCSEC = 0.168
SURVEY_PSF_FWHM_ARCSEC = 0.6

#: Acceptance of the S/N cut on 128 × 128 simulated default stamps (measured: ~15 %); only the
#: first batch size of ``make_lensing_training_set`` uses it, later ones use the observed rate.
_SIMULATED_SNR_ACCEPTANCE = 0.15

#: Most stamps simulated per round of ``make_lensing_training_set`` (128² float32: 64 KiB each).
_MAX_BATCH = 4096


# ---------------------------------------------------------------------------------------------
# Lensing paper, section 2.2
# ---------------------------------------------------------------------------------------------


def estimate_noise_sigma(images: np.ndarray, mask_sources: bool = False) -> np.ndarray:
    """Noise σ of each image of ``images`` (..., ny, nx) from its neighbouring pixels'
    differences (NaN pixels ignored): shape ``images.shape[:-2]``.

    Differences of horizontally adjacent pixels remove smooth light; for white noise their
    spread is ``√2 σ``. The spread is the median absolute deviation (``astropy.stats.mad_std``)
    after 3σ clipping (``astropy.stats.sigma_clip``), so the steep edges of bright sources
    and arcs barely bias it: for an arc 50σ bright over ~3 % of the pixels it came out 1.6–3.5 %
    high, against 7–8 % without the clipping (tests/lens/test_observations.py).

    ``mask_sources``: then, three times, the pixels where the 3 × 3 box mean exceeds 3σ
    (its own noise is σ/3), dilated by 2 pixels, are left out and σ re-estimated from the
    rest: for high-S/N lensed arcs sampled finely enough that their edges are steep from
    pixel to pixel. On the lens mocks (high and low S/N, 3 seeds) it gave σ within 1 % at
    the paper's 256 × 256, 0.04″ sampling, and 0.95–1.07 × σ at 64 × 64, 0.16″ (the
    unmasked estimate: up to 1.17 × σ). The deblender uses the plain estimate per band when
    neither weights nor σ are given, the lens fit the masked one for ``--noise-sigma auto``.
    """
    from astropy.stats import mad_std, sigma_clip

    images = np.asarray(images, dtype=np.float64)
    d = np.diff(images, axis=-1).reshape(images.shape[:-2] + (-1,))
    d = np.ma.masked_invalid(d)  # NaN pixels: masked, not clipped with a warning
    kept = sigma_clip(d, sigma=3.0, maxiters=10, stdfunc="mad_std", cenfunc="median",
                      axis=-1, masked=True)
    spread = mad_std(kept.filled(np.nan), axis=-1, ignore_nan=True)
    sigma = (np.asarray(spread) / np.sqrt(2.0)).astype(np.float64)
    if mask_sources:
        smooth = ndimage.uniform_filter(images, size=3, axes=(-2, -1))
        struct = np.zeros((1,) * (images.ndim - 2) + (3, 3), bool)  # a cross, per image
        struct[..., 1, :] = struct[..., :, 1] = True
        for _ in range(3):
            lit = smooth > np.asarray(sigma)[..., None, None]
            lit = ndimage.binary_dilation(lit, structure=struct, iterations=2)
            sigma = estimate_noise_sigma(np.where(lit, np.nan, images))
    return sigma


def select_valid_sersic_fits(
    parametric_table,
    *,
    n_range: tuple[float, float] = (0.2, 6.2),
    q_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Mask of galaxies whose single-Sérsic fit succeeded and is physical (paper 1, sec. 2.2).

    Uses the columns of GalSim's ``real_galaxy_catalog_*_fits.fits`` (the conventions of
    ``galsim.COSMOSCatalog``):

    * ``fit_status`` (n, 5): MPFIT status of the fits; column 4 is the Sérsic fit. Statuses
      1–4 are converged fits; 0 (bad input) and 5 (iteration limit reached) and any other value
      are failures — GalSim's ``exclusion_level="bad_fits"`` uses the same ``0 < s < 5`` test.
    * ``viable_sersic`` (if present) must be 1.
    * ``sersicfit`` (n, 8) = (I_hlr, hlr_pix along the major axis, n, q, boxiness, x0, y0, phi)
      must be finite; Sérsic index ``n`` within ``n_range`` (default [0.2, 6.2]: the fitter's
      lower bound, where GalSim notes the fits occasionally end, to the upper limit of
      ``galsim.Sersic``); axis ratio ``q`` in ``(q_range[0], q_range[1]]``.
    * ``hlr`` (n, 3) column 0 (circularised Sérsic half-light radius, arcsec) and ``flux``
      (n, 4) column 0 (Sérsic flux) must be finite and > 0.

    On GalSim's 100-galaxy example release every fit passes; on the 25.2 sample this removes
    the small number of failed fits the paper mentions.

    Parameters
    ----------
    parametric_table : astropy Table, NumPy structured array or mapping of columns
        The parametric-fit catalog (e.g. ``COSMOSCatalog.parametric``).
    n_range : (float, float)
        Inclusive range of acceptable Sérsic indices.
    q_range : (float, float)
        Acceptable axis ratios ``q_range[0] < q <= q_range[1]``.

    Returns
    -------
    np.ndarray
        (n,) bool, True for galaxies to keep.
    """
    names = _column_names(parametric_table)
    missing = [c for c in ("fit_status", "sersicfit", "hlr", "flux") if c not in names]
    if missing:
        raise TfhybridInputError(
            f"parametric_table lacks column(s) {missing} of GalSim's *_fits.fits catalog; "
            f"it has {sorted(names)}"
        )
    status = np.asarray(parametric_table["fit_status"])
    sersic = np.asarray(parametric_table["sersicfit"], dtype=np.float64)
    hlr = np.asarray(parametric_table["hlr"], dtype=np.float64)
    flux = np.asarray(parametric_table["flux"], dtype=np.float64)
    if status.ndim != 2 or status.shape[1] < 5 or sersic.ndim != 2 or sersic.shape[1] < 8:
        raise TfhybridInputError(
            "fit_status must be (n, 5) and sersicfit (n, 8) as in GalSim's *_fits.fits; got "
            f"{status.shape} and {sersic.shape}"
        )
    sersic_status = status[:, 4]
    ok = (sersic_status > 0) & (sersic_status < 5)
    if "viable_sersic" in names:
        ok &= np.asarray(parametric_table["viable_sersic"]) == 1
    ok &= np.all(np.isfinite(sersic), axis=1)
    with np.errstate(invalid="ignore"):
        n_sersic, q = sersic[:, 2], sersic[:, 3]
        ok &= (n_sersic >= n_range[0]) & (n_sersic <= n_range[1])
        ok &= (q > q_range[0]) & (q <= q_range[1])
        hlr0 = hlr[:, 0] if hlr.ndim == 2 else hlr
        flux0 = flux[:, 0] if flux.ndim == 2 else flux
        ok &= np.isfinite(hlr0) & (hlr0 > 0) & np.isfinite(flux0) & (flux0 > 0)
    return ok


def _column_names(table) -> set[str]:
    if hasattr(table, "colnames"):
        return set(table.colnames)
    if getattr(table, "dtype", None) is not None and table.dtype.names:
        return set(table.dtype.names)
    if isinstance(table, Mapping):
        return set(table.keys())
    raise TfhybridInputError(
        f"parametric_table must be an astropy Table, structured array or mapping; got "
        f"{type(table).__name__}"
    )


def crop_to_square(image) -> np.ndarray:
    """Central square of side ``min(ny, nx)`` of an image (or a batch, cropped alike).

    The crop starts at row ``ny // 2 - s // 2`` and column ``nx // 2 - s // 2``, so the centre
    pixel ``(ny // 2, nx // 2)`` of the input (GalSim's convention) is the centre pixel
    ``(s // 2, s // 2)`` of the output, whatever the parities of the sides.

    Parameters
    ----------
    image : array_like
        (..., ny, nx), axis order (y, x).

    Returns
    -------
    np.ndarray
        (..., s, s) view of the input with ``s = min(ny, nx)``; pixel values unchanged.
    """
    arr = np.asarray(image)
    if arr.ndim < 2:
        raise TfhybridInputError(f"image must have rank >= 2 (..., ny, nx); got shape {arr.shape}")
    ny, nx = arr.shape[-2:]
    s = min(ny, nx)
    y0 = ny // 2 - s // 2
    x0 = nx // 2 - s // 2
    return arr[..., y0 : y0 + s, x0 : x0 + s]


def _overlap_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) fraction of input pixel j that falls in output pixel i (columns sum to 1)."""
    f = n_in / n_out
    edges_out = np.arange(n_out + 1) * f
    lo = np.maximum(edges_out[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges_out[1:, None], np.arange(1, n_in + 1)[None, :])
    return np.clip(hi - lo, 0.0, None)


def downscale(image, size: int = LENSING_IMAGE_SIZE, preserve: str = "flux") -> np.ndarray:
    """Area-weighted downscaling of a square image to ``size`` × ``size`` pixels.

    Each input pixel is split among the output pixels it overlaps in proportion to the overlap
    area (exact pixel integration, no interpolation). For an integer factor ``f = n / size``
    this is the ``f × f`` block sum (``preserve="flux"``) or block mean
    (``preserve="surface_brightness"``).

    Parameters
    ----------
    image : array_like
        (..., n, n) square image(s), axis order (y, x), ``n >= size``.
    size : int
        Output side in pixels.
    preserve : {"flux", "surface_brightness"}
        ``"flux"``: the total (sum over pixels) is conserved exactly; ``"surface_brightness"``:
        values are divided by ``f**2``, so the mean pixel value is conserved instead.

    Returns
    -------
    np.ndarray
        (..., size, size), float64 for float64 input, float32 otherwise.
    """
    arr = check_finite("image", image)
    size = _check_int("size", size, minimum=1)
    if arr.ndim < 2:
        raise TfhybridInputError(f"image must have rank >= 2 (..., n, n); got shape {arr.shape}")
    ny, nx = arr.shape[-2:]
    if ny != nx:
        raise TfhybridInputError(
            f"downscale needs a square image; got (ny, nx) = ({ny}, {nx}): crop_to_square first"
        )
    if ny < size:
        raise TfhybridInputError(
            f"image of {ny} × {nx} pixels is smaller than the requested {size} × {size}: "
            "downscale does not upsample"
        )
    if preserve not in ("flux", "surface_brightness"):
        raise TfhybridInputError(
            f"preserve must be 'flux' or 'surface_brightness'; got {preserve!r}"
        )
    dtype = np.float64 if arr.dtype == np.float64 else np.float32
    w = _overlap_matrix(ny, size)
    # W X Wᵀ as two matrix products: O(n_out n_in²) instead of the O(n_out² n_in²) of a naive
    # three-operand einsum (48 ms -> ~1 ms for one 128 -> 64 stamp)
    out = w @ arr.astype(np.float64) @ w.T
    if preserve == "surface_brightness":
        out = out / (ny / size) ** 2
    return out.astype(dtype)


def downscaled_noise_sigma(
    noise_sigma, n: int, size: int = LENSING_IMAGE_SIZE, preserve: str = "flux"
):
    """RMS per-pixel noise sigma after :func:`downscale` of an ``n × n`` white-noise image.

    Output pixel (i, j) has sigma ``noise_sigma * ||W_i|| ||W_j||`` with W the overlap matrix;
    this returns the root-mean-square over output pixels (exact, and uniform, for integer
    factors: ``f * sigma`` for ``"flux"``, ``sigma / f`` for ``"surface_brightness"``).
    """
    w = _overlap_matrix(int(n), int(size))
    row = np.sqrt(np.mean(np.sum(w**2, axis=1)))
    factor = row * row
    if preserve == "surface_brightness":
        factor = factor / (n / size) ** 2
    return np.asarray(noise_sigma, dtype=np.float64) * factor


def _as_image_list(images) -> list[np.ndarray]:
    """A batch as a list of 2-d arrays: (m, ny, nx) array, one (ny, nx) image, or a sequence."""
    if isinstance(images, np.ndarray):
        if images.ndim == 2:
            return [images]
        if images.ndim == 3:
            return list(images)
        raise TfhybridInputError(
            f"images must be (ny, nx), (m, ny, nx) or a sequence of 2-d arrays; got shape "
            f"{images.shape}"
        )
    if isinstance(images, Sequence) and len(images) > 0 and np.ndim(images[0]) == 2:
        out = [np.asarray(im) for im in images]
        for k, im in enumerate(out):
            check_rank(f"images[{k}]", im, 2, "(ny, nx)")
        return out
    return _as_image_list(np.asarray(images))


def _noise_per_image(noise_sigma, m: int) -> np.ndarray:
    sigma = np.asarray(check_finite("noise_sigma", noise_sigma), dtype=np.float64)
    if sigma.ndim == 0:
        sigma = np.full(m, float(sigma))
    if sigma.shape != (m,):
        raise TfhybridInputError(
            f"noise_sigma must be a number or one value per image ({m}); got shape {sigma.shape}"
        )
    if np.any(sigma <= 0):
        raise TfhybridInputError(
            f"noise_sigma must be > 0 (pixel-noise standard deviation); got minimum "
            f"{sigma.min():g}"
        )
    return sigma


def _block_mean(image: np.ndarray, block: int) -> np.ndarray:
    """Mean over ``block × block`` blocks; a remainder of rows/columns is cut evenly (centred)."""
    ny, nx = image.shape
    my, mx = ny // block, nx // block
    y0, x0 = (ny - my * block) // 2, (nx - mx * block) // 2
    core = image[y0 : y0 + my * block, x0 : x0 + mx * block]
    return core.reshape(my, block, mx, block).mean(axis=(1, 3))


def snr_quarter(images, noise_sigma) -> np.ndarray:
    """The lensing paper's S/N statistic ``max(I_1/4) / sigma_noise`` (section 2.2).

    ``I_1/4`` is the image downscaled by a factor of 4 as 4 × 4 block *means* (a remainder of
    ``ny % 4`` rows / ``nx % 4`` columns is cut, half on each side); ``sigma_noise`` is, literally
    as in the paper, the standard deviation of the *stamp's own* pixel noise — not the noise of
    the block means, which is ``sigma_noise / 4`` for white noise.

    Parameters
    ----------
    images : array_like or sequence of arrays
        (ny, nx), (m, ny, nx), or a sequence of m 2-d images of any sizes (>= 4 × 4), axis order
        (y, x), at the resolution at which ``noise_sigma`` is measured.
    noise_sigma : float or array_like
        Pixel-noise standard deviation (> 0), one number or (m,).

    Returns
    -------
    np.ndarray
        (m,) float64 S/N values.
    """
    imgs = _as_image_list(images)
    sigma = _noise_per_image(noise_sigma, len(imgs))
    out = np.empty(len(imgs))
    for k, im in enumerate(imgs):
        im = check_finite(f"images[{k}]", im)
        if min(im.shape) < SNR_BLOCK:
            raise TfhybridInputError(
                f"images[{k}] of shape {im.shape} is too small for the S/N statistic: it needs "
                f"at least {SNR_BLOCK} × {SNR_BLOCK} pixels"
            )
        out[k] = _block_mean(im.astype(np.float64), SNR_BLOCK).max() / sigma[k]
    return out


def matched_filter_snr(noiseless: np.ndarray, noise_sigma) -> np.ndarray:
    """Matched-filter S/N of noiseless stamps in white noise.

    ``snr = sqrt(sum(noiseless**2)) / sigma`` over the (y, x) axes: the S/N of the optimal
    (profile-weighted) flux estimate. ``noiseless`` is (n, ny, nx), ``noise_sigma`` scalar or
    (n,); inf where sigma = 0.
    """
    power = np.sqrt(np.sum(np.asarray(noiseless, np.float64) ** 2, axis=(-2, -1)))
    sigma = np.broadcast_to(np.asarray(noise_sigma, np.float64), power.shape)
    with np.errstate(divide="ignore"):
        return np.where(sigma > 0, power / np.where(sigma > 0, sigma, 1.0), np.inf)


def snr_cut_mask(images, noise_sigma, low: float = 15.0, high: float = 50.0) -> np.ndarray:
    """(m,) bool: ``low <= snr_quarter(images, noise_sigma) <= high`` (bounds included)."""
    low, high = _snr_window((low, high))
    snr = snr_quarter(images, noise_sigma)
    return (snr >= low) & (snr <= high)


def split_indices(n: int, fractions=LENSING_SPLIT, seed: int = 0) -> dict[str, np.ndarray]:
    """Random, disjoint train / test / validation index sets covering ``range(n)``.

    Parameters
    ----------
    n : int
        Number of items.
    fractions : (float, float, float)
        Relative sizes of (train, test, validation) — the paper's order and default
        (15 500, 500, 1 543). Split sizes are ``n * fractions / sum(fractions)`` rounded by the
        largest-remainder method, so they sum to ``n`` (exactly the given numbers when ``n``
        equals their sum).
    seed : int
        Seed of the permutation; same ``(n, fractions, seed)``, same split.

    Returns
    -------
    dict
        ``{"train", "test", "validation"}`` -> sorted int64 index arrays.
    """
    n = _check_int("n", n, minimum=0)
    seed = _check_int("seed", seed, minimum=0)
    counts = _split_counts(n, fractions)
    perm = np.random.default_rng(np.random.SeedSequence(seed)).permutation(n)
    out = {}
    start = 0
    for name, c in zip(SPLIT_NAMES, counts, strict=True):
        out[name] = np.sort(perm[start : start + c]).astype(np.int64)
        start += c
    return out


def _split_counts(n: int, fractions) -> list[int]:
    frac = np.asarray(check_finite("fractions", fractions), dtype=np.float64)
    if frac.shape != (3,):
        raise TfhybridInputError(
            f"fractions must be 3 numbers (train, test, validation); got shape {frac.shape}"
        )
    check_range("fractions", frac, low=0.0)
    if frac.sum() <= 0:
        raise TfhybridInputError(f"fractions must not all be zero; got {tuple(frac)}")
    exact = n * frac / frac.sum()
    counts = np.floor(exact).astype(int)
    # Largest remainder; ties go to the earlier split.
    for k in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    return [int(c) for c in counts]


def preprocess_lensing(
    images,
    noise_sigma,
    size: int = LENSING_IMAGE_SIZE,
    snr_range: tuple[float, float] = LENSING_SNR_RANGE,
    min_size: int = LENSING_IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """The lensing paper's image preprocessing (section 2.2), minus the Sérsic-fit selection.

    For each stamp, in order: drop it if smaller than ``min_size`` pixels on either side; crop
    it to its central square (:func:`crop_to_square`); drop it unless
    ``snr_range[0] <= max(I_1/4) / sigma <= snr_range[1]`` (:func:`snr_quarter`, computed on the
    square crop at the native resolution, where ``sigma`` is the pixel noise); downscale it to
    ``size`` × ``size`` (:func:`downscale`, flux-conserving); divide it by its maximum pixel.

    Parameters
    ----------
    images : array_like or sequence of arrays
        (m, ny, nx) or a sequence of m 2-d stamps of varying sizes, axis order (y, x).
    noise_sigma : float or array_like
        Pixel-noise standard deviation of each stamp (> 0), one number or (m,).
    size : int
        Output side in pixels (paper: 64).
    snr_range : (float, float)
        Inclusive S/N window (paper: 15–50).
    min_size : int
        Smallest accepted stamp side (paper: 64); must be >= ``size``.

    Returns
    -------
    images : np.ndarray
        (k, size, size) float32, each with maximum 1.
    kept_indices : np.ndarray
        (k,) int64 positions in the input of the kept stamps.
    """
    imgs = _as_image_list(images)
    sigma = _noise_per_image(noise_sigma, len(imgs))
    size = _check_int("size", size, minimum=SNR_BLOCK)
    min_size = _check_int("min_size", min_size, minimum=1)
    if min_size < size:
        raise TfhybridInputError(
            f"min_size ({min_size}) must be >= size ({size}): stamps are only downscaled"
        )
    low, high = _snr_window(snr_range)
    for k, im in enumerate(imgs):
        check_finite(f"images[{k}]", im)
    out, kept, _, _ = _preprocess_lensing(imgs, sigma, size, low, high, min_size)
    return out, kept


def _snr_window(snr_range) -> tuple[float, float]:
    arr = np.asarray(check_finite("snr_range", snr_range), dtype=np.float64)
    if arr.shape != (2,) or arr[0] > arr[1]:
        raise TfhybridInputError(f"snr_range must be (low, high) with low <= high; got {snr_range}")
    return float(arr[0]), float(arr[1])


def _preprocess_lensing(imgs, sigma, size, low, high, min_size, noiseless=None):
    """Inner loop of ``preprocess_lensing`` (valid input); also returns the (k,) noise sigma of
    each normalised image (the stamp's sigma through ``downscale``, divided by its peak).

    The 4th output is None, or with ``noiseless`` (the stamps without noise, same order) the
    kept stamps' noise-free versions, cropped and downscaled alike and divided by their own
    peak.
    """
    out, kept, noise, clean = [], [], [], []
    for k, im in enumerate(imgs):
        if min(im.shape) < min_size:
            continue
        square = crop_to_square(im).astype(np.float64)
        snr = _block_mean(square, SNR_BLOCK).max() / sigma[k]
        if not low <= snr <= high:
            continue
        small = downscale(square, size, preserve="flux")
        peak = small.max()
        if peak <= 0:  # cannot normalise; impossible after a positive S/N cut, kept as a guard
            continue
        if noiseless is not None:
            free = downscale(crop_to_square(noiseless[k]).astype(np.float64), size,
                             preserve="flux")
            free_peak = free.max()
            clean.append((free / free_peak if free_peak > 0 else free).astype(np.float32))
        out.append((small / peak).astype(np.float32))
        kept.append(k)
        noise.append(downscaled_noise_sigma(sigma[k], square.shape[0], size, "flux") / peak)
    images_out = np.stack(out) if out else np.zeros((0, size, size), np.float32)
    clean_out = None if noiseless is None else (
        np.stack(clean) if clean else np.zeros((0, size, size), np.float32))
    return (images_out, np.asarray(kept, dtype=np.int64), np.asarray(noise, dtype=np.float32),
            clean_out)


def rescale_to_central_third(image: np.ndarray, zoom_range=(0.5, 2.0)) -> np.ndarray:
    """Zoom a source image about its centroid so its 90 %-flux radius is 1/6 of the side.

    Linear (order-1) resampling with scipy; the output has the input's shape, is clipped at 0
    and peak-normalised. The zoom factor is clipped to ``zoom_range``.
    """
    img = np.clip(np.asarray(image, dtype=np.float64), 0.0, None)
    n = img.shape[-1]
    total = img.sum()
    if not total > 0:
        raise TfhybridInputError("source image has no positive flux; cannot rescale it")
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    cy, cx = (img * yy).sum() / total, (img * xx).sum() / total
    r = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(r)
    cum = np.cumsum(img.ravel()[order])
    r90 = r[order][np.searchsorted(cum, 0.9 * total)]
    zoom = float(np.clip((n / 6.0) / max(r90, 0.5), *zoom_range))
    # output pixel (i, j) samples the input at centroid + (i - c_out) / zoom
    c_out = 0.5 * (n - 1)
    out_y, out_x = np.mgrid[: img.shape[0], : img.shape[1]].astype(np.float64)
    coords = np.stack([cy + (out_y - c_out) / zoom, cx + (out_x - c_out) / zoom])
    out = ndimage.map_coordinates(img, coords, order=1, mode="constant", cval=0.0)
    out = np.clip(out, 0.0, None)
    return (out / out.max()).astype(np.float32)


def make_lensing_training_set(
    n: int,
    seed: int,
    *,
    fractions=LENSING_SPLIT,
    stamp_size: int = 128,
    size: int = LENSING_IMAGE_SIZE,
    snr_range: tuple[float, float] = LENSING_SNR_RANGE,
    max_oversampling: float = 40.0,
    num_workers: int | None = None,
    progress: bool = False,
    noiseless: bool = False,
) -> dict[str, np.ndarray]:
    """``n`` preprocessed 64 × 64 images of the simulated default galaxies, split 3 ways.

    Simulated COSMOS-like stamps (``simulate_galaxy_stamps``: HST 0.03″ pixels, ACS-like PSF,
    COSMOS noise) of ``stamp_size`` pixels go through :func:`preprocess_lensing` (S/N cut on
    the native 0.03″ stamp, downscaling by ``stamp_size / size`` — 2 by default — and peak
    normalisation). Stamps are simulated in seeded rounds until ``n`` pass the S/N cut (about
    15 % do at the defaults), then split with :func:`split_indices`.

    Parameters
    ----------
    n : int
        Number of images over all splits.
    seed : int
        Seed; round ``r`` simulates with seed ``SeedSequence([seed, r])``, the split uses
        ``seed`` too. Same arguments, same arrays (whatever ``num_workers``).
    fractions : (float, float, float)
        Relative (train, test, validation) sizes (default the paper's 15 500 / 500 / 1 543).
    stamp_size : int
        Side of the simulated stamps at 0.03″ (>= ``size``).
    size : int
        Side of the output images.
    snr_range : (float, float)
        Inclusive window of ``max(I_1/4) / sigma_noise``.
    max_oversampling : float
        Give up (``TfhybridInputError``) once more than ``max_oversampling * n`` stamps were
        simulated without reaching ``n``.
    num_workers, progress
        Passed to ``simulate_galaxy_stamps``.
    noiseless : bool
        Also return each kept galaxy without noise (``train_noiseless``, …): the noise-free
        stamp, cropped and downscaled alike, divided by its own peak. Selection, order and the
        noisy images are the same as without it. A simulation-only luxury: a source prior
        trained on these learns galaxies rather than galaxies blurred by the noise (the
        lensing paper's VAE, trained on noisy COSMOS stamps, reconstructs "slightly blurred
        and hazy" sources, its section 5.3).

    Returns
    -------
    dict
        ``train``, ``validation``, ``test``: (k, size, size) float32 images (maximum 1);
        ``train_noise_sigma``, ``validation_noise_sigma``, ``test_noise_sigma``: (k,) float32
        per-pixel noise sigma of each normalised image (the stamp's sigma propagated through the
        downscaling, divided by the same peak); with ``noiseless``, ``train_noiseless``,
        ``validation_noiseless``, ``test_noiseless``: (k, size, size) float32, maximum 1.
    """
    n = _check_int("n", n, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    size = _check_int("size", size, minimum=SNR_BLOCK)
    stamp_size = _check_int("stamp_size", stamp_size, minimum=size)
    check_range("max_oversampling", max_oversampling, low=1.0)
    low, high = _snr_window(snr_range)
    _split_counts(n, fractions)  # validate before the expensive part
    images, sigmas, cleans = [], [], []
    n_kept = n_simulated = 0
    rate = _SIMULATED_SNR_ACCEPTANCE
    round_index = 0
    while n_kept < n:
        budget = int(max_oversampling * n) - n_simulated
        if budget <= 0:
            raise TfhybridInputError(
                f"only {n_kept} of {n} simulated stamps passed the S/N cut {snr_range} after "
                f"{n_simulated} were simulated in {round_index} rounds (acceptance "
                f"{n_kept / max(n_simulated, 1):.1%}); widen snr_range or raise max_oversampling"
            )
        batch = int(min(_MAX_BATCH, budget, math.ceil(1.15 * (n - n_kept) / rate) + 16))
        round_seed = int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0])
        stamps = simulate_galaxy_stamps(
            batch, round_seed, stamp_size=stamp_size, num_workers=num_workers,
            progress=progress, keep_noiseless=noiseless,
        )
        imgs, kept, noise, clean = _preprocess_lensing(
            list(stamps.images), _noise_per_image(stamps.noise_sigma, batch), size,
            low, high, size, noiseless=stamps.noiseless if noiseless else None,
        )
        take = min(len(kept), n - n_kept)
        images.append(imgs[:take])
        sigmas.append(noise[:take])
        if noiseless:
            cleans.append(clean[:take])
        n_kept += take
        n_simulated += batch
        round_index += 1
        rate = max(n_kept / n_simulated, 0.01)
    all_images = np.concatenate(images)
    all_sigma = np.concatenate(sigmas)
    split = split_indices(n, fractions, seed)
    out: dict[str, np.ndarray] = {}
    for name in ("train", "validation", "test"):
        out[name] = all_images[split[name]]
        out[f"{name}_noise_sigma"] = all_sigma[split[name]]
        if noiseless:
            out[f"{name}_noiseless"] = np.concatenate(cleans)[split[name]]
    return out


# ---------------------------------------------------------------------------------------------
# Deblending paper: HST -> survey reconvolution
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TfhybridInputError(f"{name} must be an integer; got {value!r}")
    if value < minimum:
        raise TfhybridInputError(f"{name} must be >= {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise TfhybridInputError(f"{name} must be <= {maximum}; got {value}")
    return int(value)


def _adaptive_sigma_arcsec(image: np.ndarray, pixel_scale: float, what: str) -> float:
    """Adaptive-moment sigma (``galsim.hsm.FindAdaptiveMom``) of an image, in arcsec."""
    import galsim

    try:
        img = galsim.Image(np.asarray(image, np.float64), scale=pixel_scale)
        mom = galsim.hsm.FindAdaptiveMom(img)
    except galsim.errors.GalSimError as err:
        raise TfhybridInputError(
            f"could not measure the size of the {what} with adaptive moments ({err}); is it a "
            "centred, positive PSF image?"
        ) from err
    return float(mom.moments_sigma) * pixel_scale


def _target_psf(target_psf, target_psf_fwhm_arcsec):
    import galsim

    if target_psf is None:
        fwhm = as_arcsec("target_psf_fwhm_arcsec", target_psf_fwhm_arcsec, low=0.01, high=10.0)
        return make_psf(fwhm)
    if not isinstance(target_psf, galsim.GSObject):
        raise TfhybridInputError(
            f"target_psf must be None or a galsim.GSObject; got {type(target_psf).__name__}"
        )
    return target_psf


def _psf_interpolated_image(psf_image: np.ndarray, pixel_scale: float):
    import galsim

    psf = np.asarray(psf_image, np.float64)
    return galsim.InterpolatedImage(
        galsim.Image(psf / psf.sum(), scale=pixel_scale), use_true_center=False
    )


def _check_psf_widths(psf_image, pixel_scale: float, target, includes_pixel: bool) -> None:
    """Raise unless the target PSF is at least as wide as the source PSF (adaptive moments).

    Both are compared at the source pixel scale: the source PSF image as given (pixel response
    included), the target profile drawn with the source pixel (or without, if it already has
    the survey pixel).
    """
    src = _adaptive_sigma_arcsec(psf_image, pixel_scale, "source PSF image")
    method = "no_pixel" if includes_pixel else "auto"
    tgt_img = target.drawImage(scale=pixel_scale, method=method).array
    tgt = _adaptive_sigma_arcsec(tgt_img, pixel_scale, "target PSF")
    if tgt < src:
        raise TfhybridInputError(
            f"target PSF (adaptive-moment sigma {tgt:.4g}″) is narrower than the source PSF "
            f"({src:.4g}″): reconvolution can only make images blurrier; choose a wider target PSF"
        )


def _validate_stamp(image, psf_image, pixel_scale_arcsec):
    img = check_rank("image", check_finite("image", image), 2, "(ny, nx)")
    psf = check_rank("psf_image", check_finite("psf_image", psf_image), 2, "(py, px)")
    if min(img.shape) < 4:
        raise TfhybridInputError(f"image must be at least 4 × 4 pixels; got {img.shape}")
    if min(psf.shape) < 3:
        raise TfhybridInputError(f"psf_image must be at least 3 × 3 pixels; got {psf.shape}")
    if psf.sum() <= 0:
        raise TfhybridInputError(f"psf_image must have a positive sum; got {psf.sum():g}")
    scale = as_arcsec("pixel_scale_arcsec", pixel_scale_arcsec, low=1e-3, high=1.0)
    if scale <= 1e-3:
        raise TfhybridInputError(f"pixel_scale_arcsec must be > 0.001 arcsec; got {scale}")
    return img, psf, scale


def _reconvolve(image, pixel_scale, psf_inverse, target, target_scale, stamp_size, rotation_rad,
                flip, method) -> np.ndarray:
    """Inner reconvolution (inputs assumed valid); returns (stamp_size, stamp_size) float32."""
    import galsim

    gal = galsim.InterpolatedImage(
        galsim.Image(np.asarray(image, np.float64), scale=pixel_scale),
        use_true_center=False,
        calculate_stepk=False,
        calculate_maxk=False,
    )
    intrinsic = galsim.Convolve(gal, psf_inverse)
    if flip:
        intrinsic = intrinsic.transform(-1.0, 0.0, 0.0, 1.0)
    if rotation_rad:
        intrinsic = intrinsic.rotate(float(rotation_rad) * galsim.radians)
    out = galsim.Convolve(intrinsic, target).drawImage(
        nx=stamp_size, ny=stamp_size, scale=target_scale, method=method, use_true_center=False
    )
    return out.array.astype(np.float32)


def reconvolve_to_survey(
    image,
    psf_image,
    pixel_scale_arcsec,
    target_psf=None,
    target_psf_fwhm_arcsec=SURVEY_PSF_FWHM_ARCSEC,
    target_pixel_scale_arcsec=SURVEY_PIXEL_SCALE_ARCSEC,
    stamp_size: int = 32,
    rotation_rad: float = 0.0,
    flip: bool = False,
    *,
    target_psf_includes_pixel: bool = False,
) -> np.ndarray:
    """An HST galaxy stamp as the survey would see it: new PSF, new pixels (deblending paper).

    GalSim's real-galaxy recipe: the stamp and its PSF become ``galsim.InterpolatedImage``
    profiles (quintic interpolant; the PSF image is taken to include the HST pixel response,
    as COSMOS and ``draw_psf_image`` PSFs do, so deconvolving it removes pixel and PSF); the
    intrinsic galaxy ``Convolve(galaxy, Deconvolve(psf))`` is mirrored (``flip``: x -> -x),
    then rotated counter-clockwise by ``rotation_rad``, convolved with the target PSF and
    drawn at the target pixel scale. The target PSF is a profile *without* pixel response by
    default, so the survey pixel is added when drawing (``method="auto"``); pass
    ``target_psf_includes_pixel=True`` for an effective PSF (e.g. an ``InterpolatedImage`` of
    a survey PSF image) to draw with ``method="no_pixel"``. The flux (sum of pixels) of the
    stamp is conserved, up to light falling outside the output stamp.

    Parameters
    ----------
    image : array_like
        (ny, nx) galaxy stamp, axis order (y, x), galaxy centre at pixel (ny // 2, nx // 2).
    psf_image : array_like
        (py, px) PSF of the stamp at the same pixel scale, centred at (py // 2, px // 2); any
        normalisation (it is scaled to unit sum).
    pixel_scale_arcsec : float or astropy Quantity
        Pixel side of ``image`` and ``psf_image`` (arcsec if a number), in (0.001, 1]″.
    target_psf : galsim.GSObject or None
        Survey PSF; None: a Gaussian of FWHM ``target_psf_fwhm_arcsec``. Must be at least as
        wide (adaptive-moment sigma) as the source PSF.
    target_psf_fwhm_arcsec : float or Quantity
        FWHM of the default Gaussian survey PSF (HSC-like 0.6″).
    target_pixel_scale_arcsec : float or Quantity
        Survey pixel side, in (0.001, 5]″ (HSC: 0.168″).
    stamp_size : int
        Output side in pixels (8..1024); galaxy centre at pixel (stamp_size // 2,
        stamp_size // 2).
    rotation_rad : float
        Counter-clockwise rotation (radians; x = column, y = row axis).
    flip : bool
        Mirror x -> -x before the rotation.
    target_psf_includes_pixel : bool
        Whether ``target_psf`` already contains the survey pixel response.

    Returns
    -------
    np.ndarray
        (stamp_size, stamp_size) float32, same flux units as ``image`` (per survey pixel).
    """
    img, psf, scale = _validate_stamp(image, psf_image, pixel_scale_arcsec)
    target_scale = as_arcsec("target_pixel_scale_arcsec", target_pixel_scale_arcsec, low=1e-3,
                             high=5.0)
    if target_scale <= 1e-3:
        raise TfhybridInputError(
            f"target_pixel_scale_arcsec must be > 0.001 arcsec; got {target_scale}"
        )
    stamp_size = _check_int("stamp_size", stamp_size, minimum=8, maximum=1024)
    rotation = float(check_finite("rotation_rad", float(rotation_rad)))
    target = _target_psf(target_psf, target_psf_fwhm_arcsec)
    _check_psf_widths(psf, scale, target, target_psf_includes_pixel)
    import galsim

    psf_inverse = galsim.Deconvolve(_psf_interpolated_image(psf, scale))
    method = "no_pixel" if target_psf_includes_pixel else "auto"
    return _reconvolve(img, scale, psf_inverse, target, target_scale, stamp_size, rotation,
                       bool(flip), method)


def _reconvolve_chunk(task):
    """Worker: reconvolve a chunk of HST stamps sharing one PSF."""
    images, psf, scale, fwhm, target_scale, stamp_size, angles, flips = task
    import galsim

    psf_inverse = galsim.Deconvolve(_psf_interpolated_image(psf, scale))
    target = make_psf(fwhm)
    return np.stack([
        _reconvolve(im, scale, psf_inverse, target, target_scale, stamp_size, a, f, "auto")
        for im, a, f in zip(images, angles, flips, strict=True)
    ])


def hst_stamp_size_for(stamp_size: int, pixel_scale_arcsec: float) -> int:
    """Side (0.03″ pixels) of the HST stamps behind a survey stamp of ``stamp_size`` pixels.

    70 % of the survey stamp's extent, rounded up to a multiple of 16, between 64 and 256: the
    galaxies (half-light radius <= 20 % of the HST stamp) fit in it, while the FFT sizes of the
    simulation stay small.
    """
    side = 0.7 * stamp_size * pixel_scale_arcsec / HST_PIXEL_SCALE_ARCSEC
    return int(min(256, max(64, 16 * math.ceil(side / 16))))


def make_survey_stamps(
    n: int,
    seed: int,
    stamp_size: int = 32,
    pixel_scale_arcsec=SURVEY_PIXEL_SCALE_ARCSEC,
    psf_fwhm_arcsec=SURVEY_PSF_FWHM_ARCSEC,
    augment: bool = True,
    noiseless: bool = True,
    num_workers: int | None = None,
    progress: bool = False,
    *,
    noise_sigma: float | None = None,
    hst_stamp_size: int | None = None,
) -> np.ndarray:
    """Simulated default galaxies as seen by a ground-based survey (deblending paper).

    Noise-free HST-resolution stamps of the default population (``simulate_galaxy_stamps``:
    0.03″ pixels, ACS-like PSF, ``hst_stamp_size`` pixels, half-light radius <= 20 % of it) are
    reconvolved to a Gaussian PSF of FWHM ``psf_fwhm_arcsec`` at ``pixel_scale_arcsec`` with
    :func:`reconvolve_to_survey`. With ``augment`` each galaxy is mirrored (probability 1/2)
    and rotated by an angle uniform in [0, 2π). With ``noiseless=False`` white Gaussian noise
    is added at the survey pixel scale.

    Parameters
    ----------
    n : int
        Number of stamps.
    seed : int
        Seed (>= 0): galaxies, augmentation and noise depend only on it (not on
        ``num_workers``).
    stamp_size : int
        Survey stamp side (8..256 pixels); galaxy centre at pixel (stamp_size // 2,) * 2.
    pixel_scale_arcsec : float or Quantity
        Survey pixel side (default HSC 0.168″).
    psf_fwhm_arcsec : float or Quantity
        FWHM of the Gaussian survey PSF (default 0.6″).
    augment : bool
        Random flips and rotations.
    noiseless : bool
        False: add Gaussian noise of standard deviation ``noise_sigma``.
    num_workers : int or None
        Processes for simulation and reconvolution (None: up to the CPU count).
    progress : bool
        tqdm progress bars.
    noise_sigma : float or None
        Per-pixel noise sigma (e-/s) when ``noiseless=False``; None: the COSMOS depth per unit
        area at the survey pixel (``COSMOS_NOISE_SIGMA * pixel_scale / 0.03``).
    hst_stamp_size : int or None
        Side of the HST stamps (None: :func:`hst_stamp_size_for`).

    Returns
    -------
    np.ndarray
        (n, stamp_size, stamp_size) float32, e-/s per survey pixel, axis order (y, x).
    """
    n = _check_int("n", n, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    stamp_size = _check_int("stamp_size", stamp_size, minimum=8, maximum=256)
    scale = as_arcsec("pixel_scale_arcsec", pixel_scale_arcsec, low=1e-3, high=5.0)
    if scale <= 1e-3:
        raise TfhybridInputError(f"pixel_scale_arcsec must be > 0.001 arcsec; got {scale}")
    fwhm = as_arcsec("psf_fwhm_arcsec", psf_fwhm_arcsec, low=0.01, high=10.0)
    if noise_sigma is not None:
        check_range("noise_sigma", noise_sigma, low=0.0)
    sigma = (COSMOS_NOISE_SIGMA * scale / HST_PIXEL_SCALE_ARCSEC if noise_sigma is None
             else float(noise_sigma))
    hst_size = (hst_stamp_size_for(stamp_size, scale) if hst_stamp_size is None
                else _check_int("hst_stamp_size", hst_stamp_size, minimum=16, maximum=1024))

    hst = simulate_galaxy_stamps(
        n, seed, stamp_size=hst_size, noise_sigma=0.0, num_workers=num_workers,
        progress=progress, max_hlr_fraction=0.2, keep_noiseless=False,
    )
    # The stamps hold the PSF's full wings (Fourier rendering); deconvolve a PSF image as
    # large as the stamp, not the truncated ``hst.psf``, so the wings are removed too.
    hst_psf = draw_psf_image(make_psf(None), hst.pixel_scale_arcsec, size=hst_size | 1)
    _check_psf_widths(hst_psf, hst.pixel_scale_arcsec, make_psf(fwhm), False)

    if augment:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        angles = rng.uniform(0.0, 2.0 * np.pi, n)
        flips = rng.random(n) < 0.5
    else:
        angles = np.zeros(n)
        flips = np.zeros(n, dtype=bool)
    tasks = [
        (hst.images[s : s + CHUNK_SIZE], hst_psf, hst.pixel_scale_arcsec, fwhm, scale, stamp_size,
         angles[s : s + CHUNK_SIZE], flips[s : s + CHUNK_SIZE])
        for s in range(0, n, CHUNK_SIZE)
    ]
    if num_workers is None:
        workers = min(os.cpu_count() or 1, len(tasks))
    else:
        workers = min(_check_int("num_workers", num_workers, minimum=1), len(tasks))
    sizes = [len(t[0]) for t in tasks]
    stamps = np.concatenate(_run_tasks(_reconvolve_chunk, tasks, workers, progress, sizes,
                                       desc="reconvolve"))
    if not noiseless and sigma > 0:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
        stamps = stamps + (sigma * rng.standard_normal(stamps.shape)).astype(np.float32)
    return stamps.astype(np.float32)

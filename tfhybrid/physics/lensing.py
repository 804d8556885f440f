"""Strong-lensing forward model: ray tracing, source model, PSF, noise, priors and S/N.

Implements the lensing simulator of Chianese et al. 2020 (MNRAS 496, 381; file ``003_*`` of the
papers), sections 3.1-3.3 and 5.1::

    I_pred = N(PSF * I_lens, sigma_noise)                       (eq. 9)
    I_lens(theta) = I_src(beta),  beta = theta - alpha(theta)    (eqs. 7-8)
    alpha = alpha_SPLE(theta | r_ein, gamma, q, phi, theta_lens) + alpha_ext(theta | gamma1, gamma2)
    I_src(theta) = iota * d((theta1 - theta_src1) / s, (theta2 - theta_src2) / s)   (eq. 17)

Parameters (names as in the paper; one value per lens system)
-------------------------------------------------------------
Lens (eqs. 10-13, 18-23): ``r_ein`` (major-axis Einstein radius, arcsec), ``gamma`` (slope),
``q`` (minor/major axis ratio, ``0 < q <= 1``), ``phi`` (major-axis angle, rad, counter-clockwise
from +x), ``theta_lens1``, ``theta_lens2`` (lens centre, arcsec), ``gamma1``, ``gamma2``
(external shear, eq. 13, about the coordinate origin). Source (eqs. 14-17): ``theta_src1``,
``theta_src2`` (centre of the source image, arcsec), ``s`` (scale, arcsec), ``iota``
(intensity). See :mod:`tfhybrid.physics.lens_profiles` for the lens conventions.

Conventions
-----------
* Images are ``(batch, ny, nx)``, axis order ``(y, x)``; ROW index increases with ``theta2``
  (``y``), column index with ``theta1`` (``x``), so display with ``origin="lower"``. Pixel
  ``(i, j)`` of an ``n x n`` lens-plane image has its centre at
  ``theta = ((j - (n-1)/2) * pixel_scale, (i - (n-1)/2) * pixel_scale)``: the optical axis
  (the origin of the shear, eq. 13) is the image centre, a pixel corner for even ``n``. This is
  lenstronomy's ``PixelGrid`` with ``transform_pix2angle = diag(pixel_scale, pixel_scale)``.
* Source scale ``s`` (eq. 17): the source image ``d`` (``(ny_s, nx_s)``, e.g. the 64 x 64 VAE
  output) is a function of normalised coordinates ``(u, v)`` in ``[-1, 1]`` whose OUTER EDGES
  (not pixel centres) are at +-1 (PyTorch ``grid_sample`` with ``align_corners=False``, what the
  authors used). Hence ``s`` is HALF the angular side of the source image: it covers the
  square ``theta_src +- s`` arcsec and its pixel size is ``2 s / nx_s`` (0.156" for s = 5 and
  64 pixels). With the paper's prior ``s ~ N(5, 1)`` the source image spans about the 10"
  field. Row ``i`` of ``d`` lies at ``v = -1 + (2 i + 1) / ny_s`` (rows increase with theta2).
  Outside the image the source is zero with a linear taper over one source pixel
  (``mode="grid-constant"`` of :func:`tfhybrid.physics.interpolation.bilinear_interpolate`).
  lenstronomy's ``INTERPOL`` with ``scale = 2 s / nx_s``, ``center = theta_src``,
  ``amp = iota`` is the same function (:func:`params_to_lenstronomy`).
* Units: the simulated image holds SURFACE BRIGHTNESS sampled at the pixel centres (averaged
  over the sub-pixels with supersampling), in the units of ``iota * d``. lenstronomy's
  ``ImageModel.image`` returns flux per pixel, i.e. ours times ``pixel_scale**2``.
* Field: the paper's grid is "256 x 256 pixels with angular size 10 x 10 arcsec, corresponding
  to a pixel size of 0.04 arcsec". The two figures are not exactly consistent
  (256 x 0.04 = 10.24"); the default :class:`LensingConfig` keeps the stated pixel size
  (0.04", the WFC3 pixel the paper cites), i.e. a 10.24" field; ``LensingConfig.from_field(10.0)``
  gives the 10" field (0.0390625" pixels).
* PSF: circular Gaussian, ``sigma = 0.05"``, truncated at ``psf_truncation_sigma`` (5) sigma:
  a ``2 round(5 sigma / pixel) + 1`` = 13 px kernel for the defaults, unit sum, 'same' FFT
  convolution with zero padding (:mod:`tfhybrid.physics.psf`). ``psf_pixel_integrated=True``
  (default) integrates the Gaussian over each pixel (GalSim's convention,
  :func:`tfhybrid.physics.psf.gaussian_psf`); ``False`` samples it at pixel centres, which is
  lenstronomy's ``PSF(psf_type="GAUSSIAN")`` kernel exactly.

Deflection
----------
``LensingConfig.deflection = "table"`` (default, the paper's method) uses the interpolation
table of appendix A (:func:`tfhybrid.physics.lens_profiles.spl_deflection`, ``q`` in
``[0.1, 1]``, ``gamma`` in ``[1.2, 2.8]``, relative error <= 1e-5); ``"epl"`` the exact
Tessore & Metcalf series (``0 < q <= 1``, ``1 < gamma < 3``), slower with gradients.

Batching and compilation
------------------------
Every function takes a leading batch axis of independent systems: source images
``(batch, ny_s, nx_s)``, parameters ``(batch,)`` (or scalars, broadcast), images
``(batch, n, n)``. :class:`LensingSimulator` (and :func:`simulate_lensed_image`, which caches
one simulator per configuration, :func:`shared_simulator`) runs the whole forward model as one
``tf.function``, with XLA when ``LensingConfig.jit_compile`` (default True; measured in
``benchmarks/bench_lensing.py``). Called inside another graph (a posterior's gradient), the
layer keeps the lens equation and the source lookup an XLA cluster of their own where that
graph is not compiled, and inlines them where it is.
Everything is differentiable with respect to the source image and all 12 parameters, finite at
``q = 1`` and at the lens centre.

Speed (``benchmarks/bench_lensing.py``, 256 x 256, 64 x 64 source, float32, batch 1, the
shared 2-core CPU under heavy load from other jobs, so +-2x between runs): forward 2.7-12 ms
with XLA, 11-21 ms without; forward + gradient in all 12 parameters and the source image
11-28 ms with XLA, 25-29 ms without; lenstronomy's ``ImageModel`` forward 78-85 ms (ratio of
our forward + gradient to it: 0.13-0.36 with the table, 0.13-0.23 with the exact EPL in graph
mode). The first XLA call compiles for ~15 s.

Validation
----------
The public functions check shapes, names and (when called eagerly) values, raising
:class:`tfhybrid.validation.TfhybridInputError`; ``*_core`` functions never check.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.physics import interpolation, lens_profiles, psf, spl_table
from tfhybrid.physics.xla import nestable_function
from tfhybrid.validation import TfhybridInputError

tfd = tfp.distributions

__all__ = [
    "LENS_PARAM_NAMES",
    "SOURCE_PARAM_NAMES",
    "PARAM_NAMES",
    "NOISE_SIGMA_PRESETS",
    "LensingConfig",
    "LensingSimulator",
    "shared_simulator",
    "lens_plane_grid",
    "gaussian_psf_kernel",
    "ray_trace",
    "ray_trace_core",
    "source_surface_brightness",
    "source_surface_brightness_core",
    "source_pixel_coordinates_core",
    "resample_source_stamp",
    "simulate_lensed_image",
    "noise_sigma",
    "add_noise",
    "signal_to_noise",
    "source_light_centroid",
    "count_images",
    "mock_prior",
    "params_to_lenstronomy",
    "lenstronomy_to_params",
]

#: Lens parameters of eqs. 10-13 (names as in the paper; theta_lens = (x0, y0) of lens_profiles).
LENS_PARAM_NAMES = ("r_ein", "gamma", "q", "phi", "theta_lens1", "theta_lens2", "gamma1", "gamma2")
#: Source parameters of eq. 17 besides the image (the VAE latent z is upstream of the image).
SOURCE_PARAM_NAMES = ("theta_src1", "theta_src2", "s", "iota")
PARAM_NAMES = LENS_PARAM_NAMES + SOURCE_PARAM_NAMES

#: Pixel noise sigma of the paper's three data qualities (section 3.1, Table 1), keyed by S/N.
NOISE_SIGMA_PRESETS = {"low": 0.333, "medium": 0.1, "high": 0.0333}

_DEFLECTIONS = ("table", "epl")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LensingConfig:
    """Immutable settings of the lensing simulator (grid, PSF, deflection, numerics).

    Attributes
    ----------
    n_pix : int
        Side of the square lens-plane image in pixels (paper: 256).
    pixel_scale_arcsec : float
        Pixel side in arcsec (paper: 0.04). Field side = ``n_pix * pixel_scale_arcsec``.
    supersampling : int
        Ray-trace ``supersampling**2`` sub-pixels per pixel and average them (1 = pixel centres,
        as the paper and lenstronomy's default).
    psf_sigma_arcsec : float or None
        Gaussian PSF standard deviation (paper: 0.05"); None for no PSF.
    psf_truncation_sigma : float
        PSF kernel half-size in sigmas: ``size = 2 round(t sigma / pixel) + 1`` (lenstronomy's
        rule; 13 px for the defaults).
    psf_pixel_integrated : bool
        True: Gaussian integrated over pixels (GalSim); False: sampled at pixel centres
        (lenstronomy's GAUSSIAN PSF).
    deflection : {"table", "epl"}
        SPLE deflection by the appendix-A table (default) or the exact series.
    interpolation_mode : {"grid-constant", "constant"}
        Zero rule outside the source image, see :mod:`tfhybrid.physics.interpolation`.
    dtype : {"float32", "float64"}
    jit_compile : bool
        Compile the forward model with XLA.
    """

    n_pix: int = 256
    pixel_scale_arcsec: float = 0.04
    supersampling: int = 1
    psf_sigma_arcsec: float | None = 0.05
    psf_truncation_sigma: float = 5.0
    psf_pixel_integrated: bool = True
    deflection: str = "table"
    interpolation_mode: str = "grid-constant"
    dtype: str = "float32"
    jit_compile: bool = True

    def __post_init__(self):
        for name in ("n_pix", "supersampling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise TfhybridInputError(f"{name} must be a positive integer; got {value!r}")
        if not (np.isfinite(self.pixel_scale_arcsec) and self.pixel_scale_arcsec > 0):
            raise TfhybridInputError(
                f"pixel_scale_arcsec must be > 0 arcsec; got {self.pixel_scale_arcsec!r}"
            )
        if self.psf_sigma_arcsec is not None and not (
            np.isfinite(self.psf_sigma_arcsec) and self.psf_sigma_arcsec > 0
        ):
            raise TfhybridInputError(
                f"psf_sigma_arcsec must be > 0 arcsec or None; got {self.psf_sigma_arcsec!r}"
            )
        if not (np.isfinite(self.psf_truncation_sigma) and self.psf_truncation_sigma > 0):
            raise TfhybridInputError(
                f"psf_truncation_sigma must be > 0; got {self.psf_truncation_sigma!r}"
            )
        if self.deflection not in _DEFLECTIONS:
            raise TfhybridInputError(
                f"deflection must be one of {_DEFLECTIONS}; got {self.deflection!r}"
            )
        if self.interpolation_mode not in interpolation.INTERPOLATION_MODES:
            raise TfhybridInputError(
                f"interpolation_mode must be one of {interpolation.INTERPOLATION_MODES}; "
                f"got {self.interpolation_mode!r}"
            )
        if self.dtype not in ("float32", "float64"):
            raise TfhybridInputError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")

    @classmethod
    def from_field(cls, field_arcsec: float = 10.0, n_pix: int = 256, **kwargs) -> LensingConfig:
        """Configuration with a given field side (arcsec): ``pixel = field_arcsec / n_pix``."""
        return cls(n_pix=n_pix, pixel_scale_arcsec=float(field_arcsec) / n_pix, **kwargs)

    @property
    def field_arcsec(self) -> float:
        """Side of the field in arcsec."""
        return self.n_pix * self.pixel_scale_arcsec

    @property
    def tf_dtype(self) -> tf.DType:
        return tf.as_dtype(self.dtype)

    @property
    def psf_size(self) -> int:
        """Odd side of the PSF kernel in pixels (0 when there is no PSF)."""
        if self.psf_sigma_arcsec is None:
            return 0
        radius = max(
            round(self.psf_truncation_sigma * self.psf_sigma_arcsec / self.pixel_scale_arcsec), 1
        )
        return 2 * radius + 1


# ----------------------------------------------------------------------------------------------
# Grid and PSF
# ----------------------------------------------------------------------------------------------
def lens_plane_grid(config: LensingConfig = LensingConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Sky positions (arcsec) of the ray-traced (sub-)pixel centres, ``(theta1, theta2)``.

    Returns two float64 arrays of shape ``(N, N)``, ``N = n_pix * supersampling``, axis order
    ``(y, x)``; the grid is centred on the origin (see the module conventions).
    """
    n = config.n_pix * config.supersampling
    step = config.pixel_scale_arcsec / config.supersampling
    coords = (np.arange(n, dtype=np.float64) - 0.5 * (n - 1)) * step
    theta2, theta1 = np.meshgrid(coords, coords, indexing="ij")
    return theta1, theta2


def gaussian_psf_kernel(config: LensingConfig = LensingConfig()) -> np.ndarray:
    """The configured Gaussian PSF image, ``(size, size)`` float64, unit sum (None-free).

    Pixel-integrated (:func:`tfhybrid.physics.psf.gaussian_psf`) or sampled at pixel centres
    (lenstronomy's ``kernel_gaussian``), per ``config.psf_pixel_integrated``.
    """
    if config.psf_sigma_arcsec is None:
        raise TfhybridInputError("this LensingConfig has no PSF (psf_sigma_arcsec=None)")
    size = config.psf_size
    sigma_pix = config.psf_sigma_arcsec / config.pixel_scale_arcsec
    if config.psf_pixel_integrated:
        fwhm_pix = psf.psf_sigma_to_fwhm(sigma_pix)
        kernel = psf.gaussian_psf_image(tf.constant(fwhm_pix, tf.float64), size).numpy()
    else:
        r = np.arange(size, dtype=np.float64) - size // 2
        g = np.exp(-0.5 * (r / sigma_pix) ** 2)
        kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


# ----------------------------------------------------------------------------------------------
# Pure cores (no validation)
# ----------------------------------------------------------------------------------------------
def _per_system(value: tf.Tensor, rank: int) -> tf.Tensor:
    """``(batch,)`` -> ``(batch, 1, ..., 1)`` with ``rank`` total axes."""
    return tf.reshape(value, tf.concat([tf.shape(value), tf.ones([rank - 1], tf.int32)], 0))


def ray_trace_core(
    theta1, theta2, params: Mapping, deflection: str = "table", table=None, n_terms=None
):
    """Unvalidated lens equation ``beta = theta - alpha_SPLE(theta) - alpha_ext(theta)``.

    ``theta1, theta2``: ``(batch or 1, H, W)`` arcsec; ``params``: dict of ``(batch,)`` tensors
    of the same dtype. ``deflection="table"`` needs ``table``; ``"epl"`` takes ``n_terms``
    (Python int, or None for a data-dependent count bounded by 400).
    Returns ``(beta1, beta2)`` of shape ``(batch, H, W)``.
    """
    args = (
        params["r_ein"],
        params["gamma"],
        params["q"],
        params["phi"],
        params["theta_lens1"],
        params["theta_lens2"],
    )
    rank = theta1.shape.rank
    r_ein, gamma, q, phi, x0, y0 = (_per_system(a, rank) for a in args)
    if deflection == "table":
        ax, ay = lens_profiles.spl_deflection_core(
            theta1, theta2, r_ein, gamma, q, phi, x0, y0, table
        )
    else:
        if n_terms is None:
            n_terms = lens_profiles.epl_num_terms(q, theta1.dtype)
        ax, ay = lens_profiles.epl_deflection_core(
            theta1, theta2, r_ein, gamma, q, phi, x0, y0, n_terms
        )
    g1 = _per_system(params["gamma1"], rank)
    g2 = _per_system(params["gamma2"], rank)
    sx, sy = lens_profiles.external_shear_deflection_core(theta1, theta2, g1, g2)
    return theta1 - ax - sx, theta2 - ay - sy


def source_surface_brightness_core(
    source, beta1, beta2, theta_src1, theta_src2, s, iota, mode: str = "grid-constant"
):
    """Unvalidated eq. 17: ``iota * d((beta - theta_src) / s)`` by bilinear interpolation.

    ``source`` ``(batch, ny_s, nx_s)`` (static spatial shape); ``beta1, beta2``
    ``(batch, H, W)`` arcsec; the four parameters ``(batch,)``. Returns ``(batch, H, W)``.
    """
    shape = (int(source.shape[-2]), int(source.shape[-1]))
    col, row = source_pixel_coordinates_core(beta1, beta2, theta_src1, theta_src2, s, shape)
    iota_ = _per_system(iota, beta1.shape.rank)
    return iota_ * interpolation.bilinear_interpolate_core(source, col, row, mode)


def source_pixel_coordinates_core(beta1, beta2, theta_src1, theta_src2, s, source_shape):
    """Source-plane positions (arcsec) → pixel coordinates of the source stamp (eq. 17).

    ``beta1, beta2`` ``(batch, H, W)``; ``theta_src1, theta_src2, s`` ``(batch,)``;
    ``source_shape`` = ``(ny_s, nx_s)``. The stamp spans ``theta_src ± s`` to its outer
    edges (see the module's conventions); returns ``(col, row)`` with pixel centres at
    integers, the coordinates :func:`source_surface_brightness_core` interpolates at.
    """
    ny_s, nx_s = source_shape
    rank = beta1.shape.rank
    c1, c2, s_ = (_per_system(a, rank) for a in (theta_src1, theta_src2, s))
    # normalised (u, v) in [-1, 1] over the outer edges -> pixel coordinates, centres at integers
    col = ((beta1 - c1) / s_ + 1.0) * (0.5 * nx_s) - 0.5
    row = ((beta2 - c2) / s_ + 1.0) * (0.5 * ny_s) - 0.5
    return col, row


def resample_source_stamp(source, factor) -> tf.Tensor:
    """The source image of eq. 17 redrawn on a stamp ``factor`` times wider, same galaxy.

    ``source`` ``(batch, ny_s, nx_s)`` spans ``theta_src ± s`` (see the module's conventions);
    the result spans ``theta_src ± factor * s`` with the same pixel count, so that rendering it
    with scale ``factor * s`` gives the same surface brightness ``d((beta - theta_src) / s)``:
    new pixel ``j`` samples old pixel coordinate ``c + factor (j - c)``, ``c = (n - 1) / 2``, by
    bilinear interpolation, zero beyond the old stamp. ``factor > 1`` shrinks the galaxy on the
    stamp (and loses resolution), ``factor < 1`` enlarges it (and may crop it). ``factor``:
    scalar or ``(batch,)``, > 0. Used by the MAP search to move between source-scale modes
    (:func:`tfhybrid.lens.fit.source_scale_jumps`).
    """
    source = tf.convert_to_tensor(source)
    if source.shape.rank != 3:
        raise TfhybridInputError(
            f"source must have rank 3 (batch, ny_s, nx_s); got shape {tuple(source.shape)}"
        )
    fac = np.asarray(factor, dtype=np.float64)
    if not np.all(np.isfinite(fac) & (fac > 0)):
        raise TfhybridInputError(f"factor must be finite and > 0; got {factor!r}")
    ny_s, nx_s = int(source.shape[-2]), int(source.shape[-1])
    k = tf.reshape(tf.broadcast_to(tf.constant(fac, source.dtype), tf.shape(source)[:1]),
                   [-1, 1, 1])
    rows, cols = tf.meshgrid(tf.range(ny_s, dtype=source.dtype) - 0.5 * (ny_s - 1),
                             tf.range(nx_s, dtype=source.dtype) - 0.5 * (nx_s - 1), indexing="ij")
    row = 0.5 * (ny_s - 1) + k * rows
    col = 0.5 * (nx_s - 1) + k * cols
    return interpolation.bilinear_interpolate_core(source, col, row, "grid-constant")


def _downsample(image: tf.Tensor, factor: int) -> tf.Tensor:
    if factor == 1:
        return image
    b = tf.shape(image)[0]
    n = image.shape[-1] // factor
    blocks = tf.reshape(image, tf.stack([b, n, factor, n, factor]))
    return tf.reduce_mean(blocks, axis=[2, 4])


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------
def _concrete(value):
    if isinstance(value, (np.ndarray, np.generic, float, int, list, tuple)):
        return np.asarray(value)
    if tf.executing_eagerly():
        try:
            return np.asarray(value)
        except (TypeError, ValueError, NotImplementedError):
            return None
    return tf.get_static_value(value)


def _as_float(name: str, value, dtype: tf.DType) -> tf.Tensor:
    if (
        isinstance(value, (tf.Tensor, tf.Variable))
        or hasattr(value, "dtype")
        and hasattr(value, "shape")
        and not isinstance(value, np.ndarray)
    ):
        tensor = tf.convert_to_tensor(value)
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as err:
            raise TfhybridInputError(f"{name} must be numeric; got {value!r}") from err
        if arr.dtype.kind not in "biuf":
            raise TfhybridInputError(f"{name} must be real numbers; got dtype {arr.dtype}")
        tensor = tf.convert_to_tensor(arr)
    if not (tensor.dtype.is_floating or tensor.dtype.is_integer):
        raise TfhybridInputError(f"{name} must be real numbers; got dtype {tensor.dtype.name}")
    return tensor if tensor.dtype == dtype else tf.cast(tensor, dtype)


def _check_values(name, tensor, low=None, high=None, low_open=False, high_open=False):
    arr = _concrete(tensor)
    if arr is None:
        return
    arr = np.asarray(arr, np.float64)
    if not np.all(np.isfinite(arr)):
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise TfhybridInputError(
            f"{name} contains {n_bad} non-finite value(s) (NaN or inf); expected finite numbers"
        )
    if low is not None and np.any(arr <= low if low_open else arr < low):
        raise TfhybridInputError(
            f"{name} must be {'>' if low_open else '>='} {low}; got {np.min(arr):g}"
        )
    if high is not None and np.any(arr >= high if high_open else arr > high):
        raise TfhybridInputError(
            f"{name} must be {'<' if high_open else '<='} {high}; got {np.max(arr):g}"
        )


def _param_ranges(deflection: str, table) -> dict:
    if deflection == "table" and table is not None:
        q_low, q_high = table.q_range
        gamma_rng = dict(low=table.gamma_range[0], high=table.gamma_range[1])
        q_rng = dict(low=q_low, high=q_high)
        if q_low <= 0:  # pragma: no cover - a table never starts at q = 0
            q_rng = dict(low=0.0, low_open=True, high=1.0)
    else:
        gamma_rng = dict(low=1.0, high=3.0, low_open=True, high_open=True)
        q_rng = dict(low=0.0, high=1.0, low_open=True)
    return dict(
        r_ein=dict(low=0.0, low_open=True), gamma=gamma_rng, q=q_rng, s=dict(low=0.0, low_open=True)
    )


def _validate_params(
    params, batch, dtype, deflection="table", table=None, names=PARAM_NAMES
) -> dict:
    """Check names, ranks, sizes and values; return ``(batch,)`` tensors of ``dtype``."""
    if not isinstance(params, Mapping):
        raise TfhybridInputError(
            f"params must be a mapping of the parameter names {names}; got {type(params).__name__}"
        )
    missing = [k for k in names if k not in params]
    unknown = [k for k in params if k not in PARAM_NAMES]
    if missing or unknown:
        raise TfhybridInputError(
            f"params must have exactly the keys {names}; missing {missing}, unknown {unknown}"
        )
    ranges = _param_ranges(deflection, table)
    out = {}
    for name in names:
        value = _as_float(name, params[name], dtype)
        if value.shape.rank is None or value.shape.rank > 1:
            raise TfhybridInputError(
                f"parameter {name} must be a scalar or have shape (batch,) = ({batch},); got "
                f"shape {tuple(value.shape)}"
            )
        if value.shape.rank == 1 and value.shape[0] is not None and value.shape[0] != batch:
            raise TfhybridInputError(
                f"parameter {name} has {value.shape[0]} values but the source batch has {batch}"
            )
        _check_values(f"parameter {name}", value, **ranges.get(name, {}))
        out[name] = tf.broadcast_to(value, [batch]) if value.shape.rank == 0 else value
    return out


def _validate_source(source, dtype) -> tf.Tensor:
    source = _as_float("source", source, dtype)
    if source.shape.rank != 3:
        raise TfhybridInputError(
            f"source must have rank 3 (batch, ny_s, nx_s); got shape {tuple(source.shape)}"
        )
    if None in source.shape.as_list():
        raise TfhybridInputError(f"source must have a static shape; got {source.shape}")
    _check_values("source", source)
    return source


def _validate_psf(psf_image, config: LensingConfig) -> np.ndarray | None:
    if psf_image is None:
        return None if config.psf_sigma_arcsec is None else gaussian_psf_kernel(config)
    arr = np.asarray(psf_image, dtype=np.float64)
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            raise TfhybridInputError(
                f"psf has {arr.shape[0]} bands but the lensed image has 1; pass one (py, px) kernel"
            )
        arr = arr[0]
    if arr.ndim != 2:
        raise TfhybridInputError(
            f"psf_image must have rank 2 (py, px) (or (1, py, px)); got shape {arr.shape}"
        )
    if arr.shape[0] % 2 == 0 or arr.shape[1] % 2 == 0:
        raise TfhybridInputError(
            f"psf_image sides must be odd (centre on the central pixel); got {arr.shape}"
        )
    if arr.shape[0] > config.n_pix or arr.shape[1] > config.n_pix:
        raise TfhybridInputError(
            f"psf_image {arr.shape} is larger than the {config.n_pix} x {config.n_pix} image"
        )
    _check_values("psf_image", arr)
    if not arr.sum() > 0:
        raise TfhybridInputError(f"psf_image must have a positive sum; got {arr.sum():g}")
    return arr / arr.sum()


# ----------------------------------------------------------------------------------------------
# Public pure functions
# ----------------------------------------------------------------------------------------------
def ray_trace(theta1, theta2, params: Mapping, deflection: str = "table", table=None):
    """Lens equation with the SPLE + external shear deflection (eqs. 7, 10-13 of 003_*).

    ``beta = theta - alpha_SPLE(theta) - alpha_ext(theta)``.

    Parameters
    ----------
    theta1, theta2 : array ``(H, W)`` or ``(batch, H, W)``
        Lens-plane positions in arcsec (e.g. from :func:`lens_plane_grid`); their dtype
        (float32 / float64, default float32) is the computation's.
    params : dict
        The 8 lens parameters :data:`LENS_PARAM_NAMES` (scalars or ``(batch,)``); source
        parameters may be present and are ignored.
    deflection : {"table", "epl"}
    table : SPLTable, optional (default: the shipped table)

    Returns
    -------
    (beta1, beta2) : tf.Tensor ``(batch, H, W)`` arcsec (batch 1 when all inputs are scalars).
    """
    if deflection not in _DEFLECTIONS:
        raise TfhybridInputError(f"deflection must be one of {_DEFLECTIONS}; got {deflection!r}")
    dtype = tf.as_dtype(getattr(theta1, "dtype", tf.float32))
    dtype = dtype if dtype in (tf.float32, tf.float64) else tf.float32
    theta1 = _as_float("theta1", theta1, dtype)
    theta2 = _as_float("theta2", theta2, dtype)
    if theta1.shape != theta2.shape or theta1.shape.rank not in (2, 3):
        raise TfhybridInputError(
            f"theta1, theta2 must have one shape (H, W) or (batch, H, W); got "
            f"{tuple(theta1.shape)} and {tuple(theta2.shape)}"
        )
    _check_values("theta1", theta1)
    _check_values("theta2", theta2)
    if theta1.shape.rank == 2:
        theta1, theta2 = theta1[None], theta2[None]
    sizes = [
        np.size(_concrete(params[k]) if _concrete(params[k]) is not None else 1)
        for k in LENS_PARAM_NAMES
        if k in params
    ]
    batch = max(sizes + [int(theta1.shape[0] or 1)])
    if deflection == "table" and table is None:
        table = spl_table.load_default_table()
    lens = {k: v for k, v in params.items() if k in LENS_PARAM_NAMES}
    lens = _validate_params(lens, batch, dtype, deflection, table, names=LENS_PARAM_NAMES)
    n_terms = None
    if deflection == "epl" and _concrete(lens["q"]) is not None:
        n_terms = int(lens_profiles.epl_num_terms(lens["q"], dtype))
    return ray_trace_core(theta1, theta2, lens, deflection, table, n_terms)


def source_surface_brightness(
    source, beta1, beta2, theta_src1, theta_src2, s, iota, mode: str = "grid-constant"
) -> tf.Tensor:
    """Source model, eq. 17 of 003_*: ``iota * d((beta - theta_src) / s)``, bilinear sampling.

    Parameters
    ----------
    source : ``(batch, ny_s, nx_s)``
        Source images ``d`` (e.g. VAE decoder output), rows increasing with ``beta2``.
    beta1, beta2 : ``(batch, H, W)``
        Source-plane positions in arcsec.
    theta_src1, theta_src2, s, iota : scalar or ``(batch,)``
        Centre (arcsec), half-side ``s`` (arcsec, > 0; the image spans ``theta_src +- s``, pixel
        size ``2 s / nx_s``) and intensity.
    mode : zero rule outside the source image (:mod:`tfhybrid.physics.interpolation`).

    Returns
    -------
    tf.Tensor ``(batch, H, W)``, dtype of ``source`` (float32 unless float64).
    """
    if mode not in interpolation.INTERPOLATION_MODES:
        raise TfhybridInputError(
            f"mode must be one of {interpolation.INTERPOLATION_MODES}; got {mode!r}"
        )
    dtype = tf.as_dtype(getattr(source, "dtype", tf.float32))
    dtype = dtype if dtype in (tf.float32, tf.float64) else tf.float32
    source = _validate_source(source, dtype)
    batch = int(source.shape[0])
    beta1 = _as_float("beta1", beta1, dtype)
    beta2 = _as_float("beta2", beta2, dtype)
    if beta1.shape != beta2.shape or beta1.shape.rank != 3 or beta1.shape[0] != batch:
        raise TfhybridInputError(
            f"beta1, beta2 must both have shape (batch={batch}, H, W); got "
            f"{tuple(beta1.shape)} and {tuple(beta2.shape)}"
        )
    _check_values("beta1", beta1)
    _check_values("beta2", beta2)
    p = _validate_params(
        dict(theta_src1=theta_src1, theta_src2=theta_src2, s=s, iota=iota),
        batch,
        dtype,
        names=SOURCE_PARAM_NAMES,
    )
    return source_surface_brightness_core(
        source, beta1, beta2, p["theta_src1"], p["theta_src2"], p["s"], p["iota"], mode
    )


# ----------------------------------------------------------------------------------------------
# The simulator
# ----------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tfhybrid")
class LensingSimulator(keras.layers.Layer):
    """Noise-free lensed image of eqs. 7-13, 17 and the PSF of eq. 9, as a Keras 3 layer.

    ``LensingSimulator(config)(inputs)`` with ``inputs`` a dict holding ``"source"``
    ``(batch, ny_s, nx_s)`` and the 12 parameters :data:`PARAM_NAMES`, each ``(batch,)``;
    returns ``(batch, n_pix, n_pix)`` (surface brightness, see the module conventions).
    The layer has no weights. :meth:`call` checks shapes only (it normally runs inside a
    compiled model); :meth:`simulate` validates values too and runs the compiled forward model.

    Parameters
    ----------
    config : LensingConfig
    psf_image : array ``(py, px)``, optional
        Replaces the configured Gaussian PSF (odd sides, normalised to unit sum here).
    table : SPLTable, optional
        Deflection table for ``config.deflection == "table"`` (default: the shipped one).
    """

    def __init__(self, config: LensingConfig | None = None, psf_image=None, table=None, **kwargs):
        kwargs.setdefault("dtype", None)
        super().__init__(**kwargs)
        config = LensingConfig() if config is None else config
        if isinstance(config, Mapping):
            config = LensingConfig(**config)
        if not isinstance(config, LensingConfig):
            raise TfhybridInputError(f"config must be a LensingConfig; got {config!r}")
        self.config = config
        self._psf_image = _validate_psf(psf_image, config)
        self._custom_psf = psf_image is not None
        self.table = None
        if config.deflection == "table":
            self.table = spl_table.load_default_table() if table is None else table
        dtype = config.tf_dtype
        theta1, theta2 = lens_plane_grid(config)
        with tf.init_scope():
            self._theta1 = tf.constant(theta1[None], dtype)
            self._theta2 = tf.constant(theta2[None], dtype)
        self._convolution = None
        if self._psf_image is not None:
            self._convolution = psf.FFTConvolution(
                self._psf_image[None], (config.n_pix, config.n_pix), dtype=dtype
            )
        self._compiled = tf.function(
            self._forward, jit_compile=config.jit_compile, reduce_retracing=False
        )
        # The lens equation and the source lookup as an XLA cluster of their own, also inside
        # callers' graphs that are not compiled (the lensing posterior's coarse search keeps
        # the VAE decoder's convolutions out of XLA, which makes them slower on CPU there):
        # on a 2-core CPU the table ray trace of one 256 x 256 system with its gradient takes
        # 7.9 ms instead of 19.1 ms (171 ms instead of 457 ms for a batch of 39). Inside a
        # compiled caller it is simply inlined (nestable_function: as a nested call, its
        # gradient would not compile once; XLA needs the gather gradient's shapes as
        # constants). The exact EPL's loop keeps its own form.
        self._lensed = self._lensed_core
        self._traced = self._traced_core
        if config.jit_compile and config.deflection == "table":
            self._lensed = nestable_function(self._lensed_core, jit_compile=True,
                                             autograph=False, reduce_retracing=False)
            self._traced = nestable_function(self._traced_core, jit_compile=True,
                                             autograph=False, reduce_retracing=False)

    # -- the model ------------------------------------------------------------------------
    def _traced_core(self, params, source_shape, n_terms=None):
        beta1, beta2 = ray_trace_core(
            self._theta1, self._theta2, params, self.config.deflection, self.table, n_terms
        )
        return source_pixel_coordinates_core(beta1, beta2, params["theta_src1"],
                                             params["theta_src2"], params["s"], source_shape)

    def _forward(self, source, params, n_terms=None, coordinates_shape=None):
        if coordinates_shape is None:
            image = self._lensed(source, params, n_terms)
            coordinates = None
        else:
            image, coordinates = self._lensed(source, params, n_terms, coordinates_shape)
        if self._convolution is not None:
            image = self._convolution(image[:, None])[:, 0]
        return image if coordinates is None else (image, coordinates)

    def _lensed_core(self, source, params, n_terms=None, coordinates_shape=None):
        """The supersampled lensed source, averaged to pixels, before the PSF; with
        ``coordinates_shape``, also where the rays land on such a stamp (one ray trace)."""
        config = self.config
        beta1, beta2 = ray_trace_core(
            self._theta1, self._theta2, params, config.deflection, self.table, n_terms
        )
        coordinates = None
        if coordinates_shape is not None:  # the same rays, on another stamp's pixel grid
            coordinates = source_pixel_coordinates_core(
                beta1, beta2, params["theta_src1"], params["theta_src2"], params["s"],
                coordinates_shape)
        image = source_surface_brightness_core(
            source,
            beta1,
            beta2,
            params["theta_src1"],
            params["theta_src2"],
            params["s"],
            params["iota"],
            config.interpolation_mode,
        )
        image = _downsample(image, config.supersampling)
        return image if coordinates is None else (image, coordinates)

    def traced_source_coordinates(self, params, source_shape=(64, 64)):
        """Where each ray-traced (sub-)pixel lands on the source stamp, in stamp pixels.

        ``params``: dict of ``(batch,)`` tensors (unvalidated, as in :meth:`call`);
        returns ``(col, row)``, each ``(batch, N, N)`` with ``N = n_pix * supersampling``
        (:func:`source_pixel_coordinates_core`). Used by the source-plane residual of
        :mod:`tfhybrid.physics.source_residual`.
        """
        return self._traced(params, tuple(source_shape))

    def image_and_source_coordinates(self, inputs, source_shape=(64, 64)):
        """:meth:`call`'s image and :meth:`traced_source_coordinates` from one ray trace.

        Returns ``(image, (col, row))``: the image ``(batch, n_pix, n_pix)`` and where each
        traced (sub-)pixel lands on a ``source_shape`` stamp spanning ``theta_src ± s``. The
        lens equation is the costly part of both; the source-plane residual's likelihood
        needs both at every evaluation.
        """
        source, params = self._check_inputs(inputs)
        return self._forward(source, params, coordinates_shape=tuple(source_shape))

    def call(self, inputs):
        source, params = self._check_inputs(inputs)
        return self._forward(source, params)

    def _check_inputs(self, inputs):
        dtype = self.config.tf_dtype
        source = tf.cast(inputs["source"], dtype)
        if source.shape.rank != 3:
            raise TfhybridInputError(
                f"source must have rank 3 (batch, ny_s, nx_s); got shape {tuple(source.shape)}"
            )
        missing = [k for k in PARAM_NAMES if k not in inputs]
        if missing:
            raise TfhybridInputError(f"inputs lack the parameters {missing}")
        params = {k: tf.reshape(tf.cast(inputs[k], dtype), [-1]) for k in PARAM_NAMES}
        return source, params

    def simulate(self, source, params: Mapping) -> tf.Tensor:
        """Validated, compiled forward model; see :func:`simulate_lensed_image`."""
        dtype = self.config.tf_dtype
        source = _validate_source(source, dtype)
        batch = int(source.shape[0])
        params = _validate_params(params, batch, dtype, self.config.deflection, self.table)
        n_terms = None
        if self.config.deflection == "epl" and _concrete(params["q"]) is not None:
            # exact static loop bound: keeps the gradient's loop buffers small (retraces per
            # distinct count)
            n_terms = int(lens_profiles.epl_num_terms(params["q"], dtype))
        return self._compiled(source, params, n_terms)

    @property
    def psf_kernel(self) -> np.ndarray | None:
        """The PSF image in use, ``(py, px)`` float64 with unit sum (the configured Gaussian's
        or the custom one), or None without a PSF."""
        return None if self._psf_image is None else self._psf_image.copy()

    def get_config(self):
        if self._custom_psf:
            raise NotImplementedError(
                "a LensingSimulator with a custom psf_image is not serialisable"
            )
        cfg = super().get_config()
        cfg.update(config=dict(self.config.__dict__))
        return cfg


#: the simulators :func:`shared_simulator` keeps, newest last
_SHARED_SIMULATORS: collections.OrderedDict = collections.OrderedDict()
_SHARED_SIMULATORS_SIZE = 8


def shared_simulator(config: LensingConfig, psf_image=None) -> LensingSimulator:
    """One :class:`LensingSimulator` per configuration and PSF for the process (the default
    table). The simulator holds no state but its compiled graphs, so everything that models
    the same grid (:func:`simulate_lensed_image`, every ``LensPosterior`` of that
    configuration, e.g. the copies a fit makes with another source residual) shares them
    instead of tracing and XLA-compiling its own (3-6 s per input shape on a 2-core CPU).

    ``psf_image``: a PSF image replacing the configured Gaussian (as for
    :class:`LensingSimulator`); simulators of PSFs with the same values are shared. The last
    8 are kept.
    """
    kernel = None if psf_image is None else _validate_psf(psf_image, config)
    key = (config, None if kernel is None else (kernel.shape, kernel.tobytes()))
    simulator = _SHARED_SIMULATORS.get(key)
    if simulator is None:
        simulator = LensingSimulator(config, psf_image=kernel)
        _SHARED_SIMULATORS[key] = simulator
        while len(_SHARED_SIMULATORS) > _SHARED_SIMULATORS_SIZE:
            _SHARED_SIMULATORS.popitem(last=False)
    else:
        _SHARED_SIMULATORS.move_to_end(key)
    return simulator


def simulate_lensed_image(
    source, params: Mapping, config: LensingConfig | None = None, psf_image=None
) -> tf.Tensor:
    """Noise-free lensed, PSF-convolved image ``PSF * I_lens`` (eqs. 7-13, 17, 9 of 003_*).

    Parameters
    ----------
    source : array ``(batch, ny_s, nx_s)``
        Source images ``d`` (e.g. the 64 x 64 VAE output); rows increase with ``theta2``.
    params : dict
        The 12 parameters :data:`PARAM_NAMES`, each a scalar or ``(batch,)`` array / tensor
        (tensors and variables keep the gradient tape).
    config : LensingConfig, optional (default ``LensingConfig()``: 256 x 256 at 0.04",
        Gaussian PSF sigma 0.05", table deflection, float32, XLA)
    psf_image : array ``(py, px)``, optional
        Replaces the configured Gaussian PSF (odd sides, normalised here).

    Returns
    -------
    tf.Tensor ``(batch, n_pix, n_pix)``, ``config.dtype``, axis order ``(y, x)``.

    Raises
    ------
    TfhybridInputError
        Wrong ranks, missing / unknown parameter names, parameter sizes that differ from the
        source batch, non-finite values, ``q`` outside ``(0, 1]`` (or the table), ``gamma``
        outside the table (``(1, 3)`` for ``"epl"``), ``r_ein <= 0``, ``s <= 0``, PSF not odd,
        multi-band or larger than the image.
    """
    config = LensingConfig() if config is None else config
    if not isinstance(config, LensingConfig):
        raise TfhybridInputError(f"config must be a LensingConfig; got {config!r}")
    return shared_simulator(config, psf_image).simulate(source, params)


# ----------------------------------------------------------------------------------------------
# Image multiplicity
# ----------------------------------------------------------------------------------------------
def source_light_centroid(source, params: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Source-plane position (arcsec) of the light centroid of each source image (eq. 17).

    ``source`` ``(ny_s, nx_s)`` or ``(batch, ny_s, nx_s)`` with some positive flux; negative
    pixels (a VAE decoder's faint ringing around a decoded galaxy) count as zero light;
    ``params`` holds ``theta_src1``, ``theta_src2`` and ``s`` (scalars or ``(batch,)``).
    Pixel ``(i, j)`` of the stamp lies at ``theta_src + s (u_j, v_i)`` with
    ``u_j = -1 + (2 j + 1) / nx_s`` (the convention of
    :func:`source_surface_brightness_core`). Returns float64 ``(batch,)`` arrays.
    """
    src = np.asarray(source, dtype=np.float64)
    src = src[None] if src.ndim == 2 else src
    if src.ndim != 3:
        raise TfhybridInputError(
            f"source must have shape (ny_s, nx_s) or (batch, ny_s, nx_s); got {np.shape(source)}"
        )
    _check_values("source", src)
    src = np.maximum(src, 0.0)
    flux = src.sum(axis=(1, 2))
    if np.any(flux <= 0):
        bad = np.flatnonzero(flux <= 0).tolist()
        raise TfhybridInputError(
            f"source images {bad} have no positive pixel: the light centroid is undefined"
        )
    ny_s, nx_s = src.shape[1:]
    u = -1.0 + (2.0 * np.arange(nx_s) + 1.0) / nx_s
    v = -1.0 + (2.0 * np.arange(ny_s) + 1.0) / ny_s
    uc = (src.sum(axis=1) * u).sum(axis=1) / flux
    vc = (src.sum(axis=2) * v).sum(axis=1) / flux
    missing = [k for k in ("theta_src1", "theta_src2", "s") if k not in params]
    if missing:
        raise TfhybridInputError(f"params lack {missing}")
    c1, c2, s = (np.asarray(params[k], np.float64) for k in ("theta_src1", "theta_src2", "s"))
    return c1 + s * uc, c2 + s * vc


def count_images(
    params: Mapping,
    beta1,
    beta2,
    config: LensingConfig = LensingConfig(),
    supersampling: int = 2,
    min_magnification: float = 1e-3,
    deflection: str = "table",
    table=None,
) -> np.ndarray:
    """Number of images of the source-plane point ``(beta1, beta2)`` inside the field of view.

    Triangle mapping (e.g. Schneider, Ehlers & Falco 1992, section 11.2): every cell of a
    lens-plane grid ``supersampling`` times finer than the pixels is cut into two triangles,
    their corners are ray-traced with :func:`ray_trace` (eqs. 7, 10-13), and a triangle holds
    an image when its image in the source plane contains the point (exact for the map
    linearised over the cell). Hit cells that touch (8-connectivity) are one image. Images
    closer than about two cells merge (near a critical curve), images outside the field and
    images demagnified below ``min_magnification`` are not counted, and neither are the cells
    within 1.5 cells of the centre of a lens with γ ≥ 2 (its deflection jumps or diverges
    there, so those cells' triangles cover a whole disc of the source plane; the profile has
    no image there). A point inside the caustics of an SPLE has 2-5 images; a count of 1 means
    the source is not multiply imaged, and its Einstein radius is then poorly constrained.

    Parameters
    ----------
    params : the 8 lens parameters (scalars or ``(batch,)``).
    beta1, beta2 : source-plane point(s), arcsec, scalars or ``(batch,)``.
    config : the field (``n_pix``, ``pixel_scale_arcsec``); its supersampling is ignored.
    supersampling : cells per pixel side (default 2: cells of 0.02" for the paper's grid;
        4 gave the same counts on the 10-mock study, 15 times slower).
    min_magnification : smallest ``|μ|`` of a counted image (cell area over its source-plane
        area).

    Returns
    -------
    int ``(batch,)`` array.
    """
    from scipy import ndimage

    if not isinstance(supersampling, int | np.integer) or supersampling < 1:
        raise TfhybridInputError(f"supersampling must be a positive int; got {supersampling!r}")
    if not (np.isfinite(min_magnification) and min_magnification > 0):
        raise TfhybridInputError(f"min_magnification must be > 0; got {min_magnification!r}")
    n_cells = config.n_pix * int(supersampling)
    step = config.pixel_scale_arcsec / int(supersampling)
    edges = (np.arange(n_cells + 1, dtype=np.float64) - 0.5 * n_cells) * step
    t2, t1 = np.meshgrid(edges, edges, indexing="ij")
    missing = [k for k in LENS_PARAM_NAMES if k not in params]
    if missing:
        raise TfhybridInputError(f"params lack {missing}")
    lens = {k: np.atleast_1d(np.asarray(params[k], np.float64)) for k in LENS_PARAM_NAMES}
    p1 = np.atleast_1d(np.asarray(beta1, np.float64))
    p2 = np.atleast_1d(np.asarray(beta2, np.float64))
    sizes = [p1.size, p2.size] + [v.size for v in lens.values()]
    batch = max(sizes)
    if any(n not in (1, batch) for n in sizes):
        raise TfhybridInputError(
            f"beta1, beta2 and the parameters must have one batch size (or 1); got sizes {sizes}"
        )
    _check_values("beta1", p1)
    _check_values("beta2", p2)
    lens = {k: np.broadcast_to(v, (batch,)) for k, v in lens.items()}
    p1, p2 = np.broadcast_to(p1, (batch,)), np.broadcast_to(p2, (batch,))

    def cross(p, q):  # z-component of p × q
        return p[0] * q[1] - p[1] * q[0]

    def contains(p, q, r):  # the origin inside the triangle p q r (either orientation)
        e1, e2, e3 = cross(p, q), cross(q, r), cross(r, p)
        return ((e1 >= 0) & (e2 >= 0) & (e3 >= 0)) | ((e1 <= 0) & (e2 <= 0) & (e3 <= 0))

    def magnified(p, q, r):  # |mu| = cell triangle area / source-plane area >= min_magnification
        area = 0.5 * np.abs(cross((q[0] - p[0], q[1] - p[1]), (r[0] - p[0], r[1] - p[1])))
        return area * min_magnification <= 0.5 * step**2

    hit = np.zeros((batch, n_cells, n_cells), bool)
    for lo in range(0, batch, 8):  # ~60 MB of temporaries per system: 8 systems at a time
        sl = slice(lo, lo + 8)
        b1, b2 = (x.numpy() for x in ray_trace(t1, t2, {k: v[sl] for k, v in lens.items()},
                                                deflection, table))
        d1 = b1 - p1[sl, None, None]  # corners relative to the point
        d2 = b2 - p2[sl, None, None]
        # a (i, j), b (i, j+1), c (i+1, j), d (i+1, j+1) of each cell
        a, b, c, d = (
            (d1[:, i:i + n_cells, j:j + n_cells], d2[:, i:i + n_cells, j:j + n_cells])
            for i, j in ((0, 0), (0, 1), (1, 0), (1, 1))
        )
        hit[sl] = ((contains(a, b, d) & magnified(a, b, d))
                   | (contains(a, d, c) & magnified(a, d, c)))
    # γ >= 2: the deflection jumps (γ = 2) or diverges (γ > 2) at the lens centre, and the cells
    # around it map onto a whole disc of the source plane; there is no image there
    centres = 0.5 * (edges[1:] + edges[:-1])
    near1 = np.abs(centres[None, None, :] - lens["theta_lens1"][:, None, None]) < 1.5 * step
    near2 = np.abs(centres[None, :, None] - lens["theta_lens2"][:, None, None]) < 1.5 * step
    hit &= ~(near1 & near2 & (lens["gamma"] >= 2.0)[:, None, None])
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # 8-connectivity within a system, none across systems
    labels, _ = ndimage.label(hit, structure=structure)
    _, first = np.unique(labels[hit], return_index=True)  # labels are unique across systems
    system_of_label = np.nonzero(hit)[0][first]
    return np.bincount(system_of_label, minlength=batch).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Noise and S/N
# ----------------------------------------------------------------------------------------------
def noise_sigma(noise: str | float) -> float:
    """Pixel noise sigma from a preset (``"low"``, ``"medium"``, ``"high"`` S/N) or a number."""
    if isinstance(noise, str):
        if noise not in NOISE_SIGMA_PRESETS:
            raise TfhybridInputError(
                f"noise preset must be one of {tuple(NOISE_SIGMA_PRESETS)}; got {noise!r}"
            )
        return NOISE_SIGMA_PRESETS[noise]
    value = float(noise)
    if not (np.isfinite(value) and value > 0):
        raise TfhybridInputError(f"noise sigma must be > 0; got {noise!r}")
    return value


def add_noise(image, noise: str | float, seed) -> tf.Tensor:
    """Eq. 9: add uncorrelated Gaussian pixel noise of sigma ``noise`` (number or preset).

    ``seed``: an int or a pair of ints (stateless, reproducible). Returns ``image``'s shape and
    float dtype.
    """
    sigma = noise_sigma(noise)
    image = tf.convert_to_tensor(image)
    if not image.dtype.is_floating:
        image = tf.cast(image, tf.float32)
    seed = tf.constant([int(seed), 0] if np.ndim(seed) == 0 else list(seed), tf.int64)
    return image + sigma * tf.random.stateless_normal(tf.shape(image), seed, dtype=image.dtype)


def signal_to_noise(
    observed, noise: str | float, pixel_scale_arcsec: float = 0.04, mask_sigma_arcsec: float = 0.16
) -> tuple[np.ndarray, np.ndarray]:
    """S/N of eqs. 24-25 of 003_* and its mask.

    ``m = (G * I_obs >= sigma_noise)`` with ``G`` a unit-sum Gaussian of standard deviation
    ``mask_sigma_arcsec`` (paper: 0.16" = 4 pixels), pixel-integrated, truncated at 4 sigma,
    'same' convolution with zero padding; ``S/N = sum(m I_obs) / (sigma_noise sqrt(sum m))``,
    defined as 0 when the mask is empty.

    Parameters
    ----------
    observed : ``(ny, nx)`` or ``(batch, ny, nx)``, the (noisy) observed image.
    noise : pixel noise sigma or preset name.

    Returns
    -------
    (snr, mask) : float64 ``(batch,)`` (scalar for one image) and bool, ``observed``'s shape.
    """
    sigma = noise_sigma(noise)
    obs = np.asarray(observed, dtype=np.float64)
    if obs.ndim not in (2, 3):
        raise TfhybridInputError(
            f"observed must have rank 2 (ny, nx) or 3 (batch, ny, nx); got shape {obs.shape}"
        )
    _check_values("observed", obs)
    for name, v in (
        ("pixel_scale_arcsec", pixel_scale_arcsec),
        ("mask_sigma_arcsec", mask_sigma_arcsec),
    ):
        _check_values(name, v, low=0.0, low_open=True)
    single = obs.ndim == 2
    batch = obs[None] if single else obs
    sigma_pix = mask_sigma_arcsec / pixel_scale_arcsec
    size = 2 * math.ceil(4.0 * sigma_pix) + 1
    kernel = psf.gaussian_psf_image(
        tf.constant(psf.psf_sigma_to_fwhm(sigma_pix), tf.float64), size
    ).numpy()
    blurred = psf.convolve_fft(batch[:, None], kernel[None]).numpy()[:, 0]
    mask = blurred >= sigma
    n_mask = mask.sum(axis=(-2, -1))
    signal = np.where(mask, batch, 0.0).sum(axis=(-2, -1))
    snr = np.where(n_mask > 0, signal / (sigma * np.sqrt(np.maximum(n_mask, 1))), 0.0)
    return (snr[0], mask[0]) if single else (snr, mask)


# ----------------------------------------------------------------------------------------------
# Priors (eqs. 14-16, 18-23)
# ----------------------------------------------------------------------------------------------
def mock_prior(
    dtype=tf.float32,
    q_range: tuple[float, float] | None = None,
    gamma_range: tuple[float, float] | None = None,
) -> tfd.JointDistributionNamed:
    """Priors of the mock parameters, eqs. 14-16 (source) and 18-23 (lens) of 003_*.

    Independent normals ``N(mean, std)`` with the paper's values (the second number read as
    the standard deviation), truncated where the normal would give unphysical or
    un-modellable values (the paper does not say what it did there):

    ============  ==================  =====================================================
    name          paper               here
    ============  ==================  =====================================================
    theta_src1/2  N(0, 0.1) arcsec    as is
    s             N(5, 1) arcsec      truncated to (0, 15]: the scale must be positive
    iota          N(1, 0.5)           truncated to (0, 3]: negative intensity is unphysical
                                      (2.3 % of the normal's mass)
    gamma1/2      N(0, 1)             as is (note: |shear| ~ 1 is far beyond real lenses)
    phi           N(0, 1) rad         as is
    q             N(0.5, 0.5)         truncated to ``q_range`` (default the table's [0.1, 1]):
                                      q <= 0 is meaningless, q > 1 duplicates (1/q, phi +
                                      pi/2), and the SPLE table starts at 0.1 (32 % of the
                                      normal's mass lies outside [0.1, 1])
    r_ein         N(1.5, 0.5) arcsec  truncated to (0, 4]: the radius must be positive
    gamma         N(2, 0.5)           truncated to ``gamma_range`` (default the table's
                                      [1.2, 2.8]; the profile needs 1 < gamma < 3)
    theta_lens1/2 N(0, 0.5) arcsec    as is
    ============  ==================  =====================================================

    Returns a ``tfd.JointDistributionNamed`` over :data:`PARAM_NAMES` (scalar events):
    ``mock_prior().sample(n, seed=...)`` gives a dict of ``(n,)`` tensors, ``log_prob(dict)``
    the joint log density (MAP and HMC read the same object).
    """
    dtype = tf.as_dtype(dtype)
    if q_range is None or gamma_range is None:
        table = spl_table.load_default_table()
        q_range = table.q_range if q_range is None else q_range
        gamma_range = table.gamma_range if gamma_range is None else gamma_range
    q_low, q_high = (float(v) for v in q_range)
    g_low, g_high = (float(v) for v in gamma_range)
    if not 0.0 < q_low < q_high <= 1.0:
        raise TfhybridInputError(f"q_range must satisfy 0 < low < high <= 1; got {q_range}")
    if not 1.0 < g_low < g_high < 3.0:
        raise TfhybridInputError(f"gamma_range must lie inside (1, 3); got {gamma_range}")

    def c(v):
        return tf.constant(v, dtype)

    def normal(mean, std):
        return tfd.Normal(c(mean), c(std))

    def truncated(mean, std, low, high):
        return tfd.TruncatedNormal(c(mean), c(std), c(low), c(high))

    return tfd.JointDistributionNamed(
        dict(
            r_ein=truncated(1.5, 0.5, 0.0, 4.0),
            gamma=truncated(2.0, 0.5, g_low, g_high),
            q=truncated(0.5, 0.5, q_low, q_high),
            phi=normal(0.0, 1.0),
            theta_lens1=normal(0.0, 0.5),
            theta_lens2=normal(0.0, 0.5),
            gamma1=normal(0.0, 1.0),
            gamma2=normal(0.0, 1.0),
            theta_src1=normal(0.0, 0.1),
            theta_src2=normal(0.0, 0.1),
            s=truncated(5.0, 1.0, 0.0, 15.0),
            iota=truncated(1.0, 0.5, 0.0, 3.0),
        )
    )


# ----------------------------------------------------------------------------------------------
# lenstronomy converters
# ----------------------------------------------------------------------------------------------
def params_to_lenstronomy(params: Mapping, source_shape: tuple[int, int]) -> list[dict]:
    """lenstronomy keyword arguments of each system: ``EPL`` + ``SHEAR`` lens, ``INTERPOL`` source.

    Parameters
    ----------
    params : dict of the 12 :data:`PARAM_NAMES`, scalars or ``(batch,)`` (NumPy / tensors).
    source_shape : (ny_s, nx_s), must be square (INTERPOL has one pixel scale).

    Returns
    -------
    list (one per system) of dicts ``{"kwargs_lens": [epl, shear], "kwargs_source":
    [interpol]}``: ``theta_E = sqrt(q) r_ein`` (lenstronomy normalises to the intermediate
    axis), ``e1 + i e2 = (1-q)/(1+q) exp(2 i phi)``, shear ``gamma1, gamma2`` about
    ``ra_0 = dec_0 = 0``, source ``center = theta_src``, ``scale = 2 s / nx_s`` (arcsec per
    source pixel), ``amp = iota``, ``phi_G = 0``. Add ``"image": source`` to the INTERPOL
    dict before use. lenstronomy's ``ImageModel`` image equals ours times ``pixel_scale**2``
    when its grid is ``diag(pixel, pixel)`` centred on the origin (see the module doc).
    """
    ny_s, nx_s = (int(v) for v in source_shape)
    if ny_s != nx_s:
        raise TfhybridInputError(
            f"lenstronomy's INTERPOL needs a square source image; got {source_shape}"
        )
    missing = [k for k in PARAM_NAMES if k not in params]
    if missing:
        raise TfhybridInputError(f"params lack {missing}")
    arrays = {k: np.atleast_1d(np.asarray(params[k], np.float64)) for k in PARAM_NAMES}
    batch = max(a.size for a in arrays.values())
    arrays = {k: np.broadcast_to(v, (batch,)) for k, v in arrays.items()}
    _check_values("q", arrays["q"], low=0.0, high=1.0, low_open=True)
    _check_values("s", arrays["s"], low=0.0, low_open=True)
    out = []
    for b in range(batch):
        p = {k: float(v[b]) for k, v in arrays.items()}
        lens = lens_profiles.paper_to_lenstronomy(
            p["r_ein"],
            p["gamma"],
            p["q"],
            p["phi"],
            p["theta_lens1"],
            p["theta_lens2"],
            p["gamma1"],
            p["gamma2"],
        )
        epl = {k: float(lens[k]) for k in ("theta_E", "gamma", "e1", "e2", "center_x", "center_y")}
        shear = {"gamma1": p["gamma1"], "gamma2": p["gamma2"], "ra_0": 0.0, "dec_0": 0.0}
        source = {
            "amp": p["iota"],
            "center_x": p["theta_src1"],
            "center_y": p["theta_src2"],
            "phi_G": 0.0,
            "scale": 2.0 * p["s"] / nx_s,
        }
        out.append({"kwargs_lens": [epl, shear], "kwargs_source": [source]})
    return out


def lenstronomy_to_params(
    kwargs_lens: list, kwargs_source: list, source_shape: tuple[int, int]
) -> dict:
    """Inverse of :func:`params_to_lenstronomy` for one system: dict of the 12 floats.

    ``kwargs_lens = [epl, shear]`` (EPL keys ``theta_E, gamma, e1, e2, center_x, center_y``;
    SHEAR ``gamma1, gamma2`` with ``ra_0 = dec_0 = 0``), ``kwargs_source = [interpol]``
    (``amp, center_x, center_y, scale``, ``phi_G = 0``). ``phi`` comes back in
    ``(-pi/2, pi/2]``.
    """
    ny_s, nx_s = (int(v) for v in source_shape)
    if ny_s != nx_s:
        raise TfhybridInputError(
            f"lenstronomy's INTERPOL needs a square source image; got {source_shape}"
        )
    if len(kwargs_lens) != 2 or len(kwargs_source) != 1:
        raise TfhybridInputError(
            f"expected kwargs_lens = [EPL, SHEAR] and kwargs_source = [INTERPOL]; got "
            f"{len(kwargs_lens)} lens and {len(kwargs_source)} source dicts"
        )
    epl, shear = kwargs_lens
    (src,) = kwargs_source
    if shear.get("ra_0", 0.0) != 0.0 or shear.get("dec_0", 0.0) != 0.0:
        raise TfhybridInputError("SHEAR must be centred on the origin (ra_0 = dec_0 = 0)")
    if src.get("phi_G", 0.0) != 0.0:
        raise TfhybridInputError(f"INTERPOL phi_G must be 0 (no source rotation); got {src}")
    lens = lens_profiles.lenstronomy_to_paper(
        epl["theta_E"],
        epl["gamma"],
        epl["e1"],
        epl["e2"],
        epl.get("center_x", 0.0),
        epl.get("center_y", 0.0),
        shear["gamma1"],
        shear["gamma2"],
    )
    return {
        "r_ein": float(lens["r_ein"]),
        "gamma": float(lens["gamma"]),
        "q": float(lens["q"]),
        "phi": float(lens["phi"]),
        "theta_lens1": float(lens["x0"]),
        "theta_lens2": float(lens["y0"]),
        "gamma1": float(lens["gamma1"]),
        "gamma2": float(lens["gamma2"]),
        "theta_src1": float(src.get("center_x", 0.0)),
        "theta_src2": float(src.get("center_y", 0.0)),
        "s": 0.5 * float(src["scale"]) * nx_s,
        "iota": float(src.get("amp", 1.0)),
    }

"""Observations, model frame and sources of a deblending problem (000_* §3, eq. 6).

A :class:`Observation` is one multi-band image ``(B, ny, nx)`` with its per-band PSFs and
inverse-variance weights, validated once here (the public boundary). The :class:`ModelFrame`
fixes where the morphologies live: the observation's pixel grid (HSC, 0.168″/pixel) blurred by
a narrow reference PSF (Gaussian, FWHM 0.6″), i.e. exactly the stamps the PixelCNN++ prior was
trained on (:mod:`tfhybrid.priors.pixelcnn`); each band is reached from it by the difference
kernel of :func:`tfhybrid.physics.psf.difference_kernel`. Sources are given by their centres
``(x, y)`` in pixels (x = column, y = row, pixel centres at integers); each gets a square box
of ``box_size`` pixels whose centre pixel ``(box_size // 2, box_size // 2)`` sits on the pixel
nearest to its centre.

Bad input (all raise :class:`~tfhybrid.validation.TfhybridInputError` before anything is
computed or written):

* images and PSFs with different numbers of bands, or a PSF of even size / wrong rank;
* a PSF that does not sum to a positive finite number (PSFs are normalised to unit sum);
* negative, NaN or infinite weights; a band whose weights are all zero; a scalar or per-band
  weight of zero (per-PIXEL zeros are allowed: they are how pixels are masked);
* NaN/inf in the images: masked by default (weight 0 at those pixels, a ``UserWarning`` says
  how many), or an error with ``nan_policy="raise"``;
* a centre outside the image (or non-finite), or centres of the wrong shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from tfhybrid.data.preprocess import estimate_noise_sigma
from tfhybrid.validation import TfhybridInputError, as_arcsec, check_finite, check_rank

__all__ = [
    "HSC_BANDS",
    "HSC_PIXEL_SCALE_ARCSEC",
    "HSC_PSF_FWHM_ARCSEC",
    "ModelFrame",
    "Observation",
    "validate_centres",
    "estimate_noise_sigma",
]

HSC_BANDS = ("g", "r", "i", "z", "y")
#: HSC pixel side (arcsec).
HSC_PIXEL_SCALE_ARCSEC = 0.168
#: Typical HSC PSF FWHM per band (arcsec), grizy (papers/README.md).
HSC_PSF_FWHM_ARCSEC = (0.79, 0.75, 0.61, 0.68, 0.68)


@dataclass(frozen=True)
class ModelFrame:
    """Where morphologies S_k are modelled (000_* eq. 6): pixel grid, model PSF, box size.

    Attributes
    ----------
    pixel_scale_arcsec : pixel side of the model frame; must equal the observation's (the
        model frame shares the observed grid; the PixelCNN prior is trained at 0.168″).
    psf_fwhm_arcsec : FWHM of the Gaussian model PSF (the prior's reference PSF, 0.6″); must
        be narrower than every observed band's PSF.
    psf_size : odd side (pixels) of the model PSF image.
    box_size : side (pixels) of every source box = the prior's stamp size (32). Boxes of
        another size are allowed: the prior then sees the box zero-padded (smaller) or its
        central ``stamp`` pixels (larger), see :func:`tfhybrid.deblend.fit.prior_window`.
    """

    pixel_scale_arcsec: float = HSC_PIXEL_SCALE_ARCSEC
    psf_fwhm_arcsec: float = 0.6
    psf_size: int = 25
    box_size: int = 32

    def __post_init__(self):
        as_arcsec("pixel_scale_arcsec", self.pixel_scale_arcsec, low=1e-6)
        as_arcsec("psf_fwhm_arcsec", self.psf_fwhm_arcsec, low=1e-6)
        if int(self.psf_size) < 3 or int(self.psf_size) % 2 == 0:
            raise TfhybridInputError(f"psf_size must be odd and >= 3; got {self.psf_size}")
        if int(self.box_size) < 3:
            raise TfhybridInputError(f"box_size must be >= 3 pixels; got {self.box_size}")

    def model_psf(self) -> np.ndarray:
        """The model PSF image ``(psf_size, psf_size)``, unit sum."""
        from tfhybrid.physics.psf import gaussian_psf

        return gaussian_psf(self.psf_fwhm_arcsec, self.pixel_scale_arcsec, int(self.psf_size))


@dataclass(frozen=True)
class Observation:
    """One validated multi-band image: ``images`` (B, ny, nx), ``psfs`` (B, py, px), ``weights``.

    Build it with :meth:`Observation.create` (which validates); the fields are NumPy arrays.

    Attributes
    ----------
    images : (B, ny, nx) float32, NaN replaced by 0 where masked.
    psfs : (B, py, px) float32, odd sizes, unit sum per band.
    weights : (B, ny, nx) float32 inverse variances (0 = masked pixel).
    bands : band names.
    pixel_scale_arcsec : pixel side.
    n_masked : number of pixels masked because the data were not finite.
    """

    images: np.ndarray
    psfs: np.ndarray
    weights: np.ndarray
    bands: tuple = field(default=HSC_BANDS)
    pixel_scale_arcsec: float = HSC_PIXEL_SCALE_ARCSEC
    n_masked: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def n_bands(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def create(
        cls,
        images,
        psfs,
        weights=None,
        noise_sigma=None,
        bands=None,
        pixel_scale_arcsec=HSC_PIXEL_SCALE_ARCSEC,
        nan_policy: str = "mask",
    ) -> Observation:
        """Validate and assemble an observation.

        Parameters
        ----------
        images : (B, ny, nx) (or (ny, nx) for one band).
        psfs : (B, py, px) one per band, or (py, px) shared by all bands; odd sizes; each must
            sum to a positive number (they are normalised to unit sum).
        weights : inverse variances: scalar, (B,) per band, or (B, ny, nx) per pixel.
        noise_sigma : alternative to ``weights``: σ scalar or (B,); weights = 1/σ².
            With neither, σ is estimated per band (:func:`estimate_noise_sigma`).
        bands : B names (default grizy for B = 5, else "0", "1", …).
        pixel_scale_arcsec : pixel side (float arcsec or astropy Quantity).
        nan_policy : "mask" (NaN/inf pixels get weight 0, a warning says how many) or "raise".
        """
        if nan_policy not in ("mask", "raise"):
            raise TfhybridInputError(f"nan_policy must be 'mask' or 'raise'; got {nan_policy!r}")
        scale = as_arcsec("pixel_scale_arcsec", pixel_scale_arcsec, low=1e-6)
        img = np.asarray(images, dtype=np.float64)
        if img.ndim == 2:
            img = img[None]
        check_rank("images", img, 3, "(bands, ny, nx)")
        n_bands, ny, nx = img.shape
        if n_bands < 1 or ny < 3 or nx < 3:
            raise TfhybridInputError(
                f"images must be (bands, ny, nx) with ny, nx >= 3; got {img.shape}"
            )

        psf = np.asarray(psfs, dtype=np.float64)
        if psf.ndim == 2:
            psf = np.broadcast_to(psf, (n_bands,) + psf.shape)
        check_rank("psfs", psf, 3, "(bands, py, px)")
        if psf.shape[0] != n_bands:
            raise TfhybridInputError(
                f"psf has {psf.shape[0]} bands but image has {n_bands}; give one PSF per band"
            )
        if psf.shape[1] % 2 == 0 or psf.shape[2] % 2 == 0:
            raise TfhybridInputError(
                f"PSF images must have odd sizes (centre on the central pixel); got "
                f"{psf.shape[1]}x{psf.shape[2]}"
            )
        check_finite("psfs", psf)
        sums = psf.sum(axis=(1, 2))
        if np.any(~(sums > 0)):
            b = int(np.argmax(~(sums > 0)))
            raise TfhybridInputError(
                f"the PSF of band {b} sums to {sums[b]:g}; every PSF must sum to a positive "
                "number (it is normalised to unit sum)"
            )
        psf = psf / sums[:, None, None]

        finite = np.isfinite(img)
        n_bad = int(img.size - np.count_nonzero(finite))
        if n_bad and nan_policy == "raise":
            raise TfhybridInputError(
                f"images contain {n_bad} non-finite pixel(s) (NaN or inf); pass "
                "nan_policy='mask' to give them zero weight"
            )
        if n_bad:
            warnings.warn(
                f"images contain {n_bad} non-finite pixel(s); they are masked (weight 0)",
                UserWarning,
                stacklevel=2,
            )
            img = np.where(finite, img, 0.0)

        if weights is not None and noise_sigma is not None:
            raise TfhybridInputError("give weights or noise_sigma, not both")
        if weights is None:
            if noise_sigma is None:
                sigma = estimate_noise_sigma(np.where(finite, img, np.nan))
            else:
                sigma = np.broadcast_to(
                    check_finite("noise_sigma", np.asarray(noise_sigma, np.float64)), (n_bands,)
                )
            if np.any(~(sigma > 0)):
                raise TfhybridInputError(
                    f"noise_sigma must be > 0 in every band; got {np.array2string(sigma)}"
                    + ("" if noise_sigma is not None
                       else " (estimated from the data: pass noise_sigma)")
                )
            w = np.broadcast_to((1.0 / sigma**2)[:, None, None], img.shape).copy()
        else:
            w = check_finite("weights", np.asarray(weights, dtype=np.float64))
            if w.ndim in (0, 1):
                if np.any(w <= 0):
                    raise TfhybridInputError(
                        f"scalar or per-band weights (inverse variances) must be > 0; got "
                        f"{np.array2string(np.atleast_1d(w))}"
                    )
                w = np.broadcast_to(np.reshape(w, (-1, 1, 1)), img.shape).copy()
            elif w.shape != img.shape:
                raise TfhybridInputError(
                    f"weights must be a scalar, (bands,) = ({n_bands},) or the image shape "
                    f"{img.shape}; got {w.shape}"
                )
            if np.any(w < 0):
                raise TfhybridInputError(
                    f"weights (inverse variances) must be >= 0; {int(np.sum(w < 0))} are negative"
                )
        w = np.where(finite, w, 0.0)
        dead = [b for b in range(n_bands) if not np.any(w[b] > 0)]
        if dead:
            raise TfhybridInputError(
                f"band(s) {dead} have zero weight everywhere (all masked): nothing to fit"
            )

        if bands is None:
            bands = HSC_BANDS if n_bands == 5 else tuple(str(b) for b in range(n_bands))
        bands = tuple(str(b) for b in bands)
        if len(bands) != n_bands:
            raise TfhybridInputError(f"{len(bands)} band names given for {n_bands} bands")
        return cls(
            images=img.astype(np.float32),
            psfs=psf.astype(np.float32),
            weights=w.astype(np.float32),
            bands=bands,
            pixel_scale_arcsec=scale,
            n_masked=n_bad,
        )

    def detection_image(self) -> np.ndarray:
        """Inverse-variance weighted mean of the bands ``(ny, nx)`` (detection, initialisation)."""
        w = self.weights
        return (np.sum(w * self.images, axis=0) / np.maximum(np.sum(w, axis=0), 1e-30)).astype(
            np.float32
        )

    def detection_sigma(self) -> np.ndarray:
        """Per-pixel noise σ of :meth:`detection_image` (inf where fully masked)."""
        wsum = np.sum(self.weights, axis=0)
        with np.errstate(divide="ignore"):
            return np.where(wsum > 0, 1.0 / np.sqrt(wsum), np.inf).astype(np.float32)


def validate_centres(centres_xy, frame_shape) -> np.ndarray:
    """Check source centres ``(K, 2)`` as (x, y) pixels inside the image; return float64 array."""
    c = np.asarray(centres_xy, dtype=np.float64)
    if c.ndim == 1 and c.size == 2:
        c = c[None]
    if c.ndim != 2 or c.shape[1] != 2:
        raise TfhybridInputError(
            f"centres must be (K, 2) pixel coordinates (x, y); got shape {c.shape}"
        )
    if c.shape[0] == 0:
        raise TfhybridInputError("no sources: centres is empty (use detection instead)")
    check_finite("centres", c)
    ny, nx = frame_shape
    outside = (c[:, 0] < -0.5) | (c[:, 0] > nx - 0.5) | (c[:, 1] < -0.5) | (c[:, 1] > ny - 0.5)
    if np.any(outside):
        k = int(np.argmax(outside))
        raise TfhybridInputError(
            f"centre {k} at (x={c[k, 0]:g}, y={c[k, 1]:g}) lies outside the {ny}x{nx} image "
            f"(x must be in [-0.5, {nx - 0.5}], y in [-0.5, {ny - 0.5}])"
        )
    return c

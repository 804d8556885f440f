"""Observed lens images from FITS files, made ready for :class:`~tfhybrid.lens.model.LensPosterior`.

A real lens image (the lens galaxy's light subtracted, as the paper's model has none) comes as
a 2-D FITS image in any brightness unit. :func:`read_lens_image` reads it with its pixel scale
(from the celestial WCS, ``CDELT``/``CD``/``PC``, by ``astropy.wcs``; else a ``PIXSCALE``
keyword in arcsec, as tfhybrid's mocks have; else the caller's value) and checks what the
model needs: one square image, finite pixels, square pixels.

The model's source is the VAE's peak-normalised stamp times ι, whose prior is N(1, 0.5)
truncated to (0, 3] (eq. 16), so the fit wants images whose brightest lensed pixels are of
order 1: :func:`flux_scale` is the divisor that does this (the image's peak after a 3 × 3
median filter, so a cosmic ray or a hot pixel does not set it), applied to the image and its
noise σ alike. χ², the lens parameters and the source's shape do not depend on it; ι is then
in units of that peak.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfhybrid.validation import TfhybridInputError, as_arcsec

#: relative difference allowed between the two axes' pixel scales (square pixels)
SQUARE_PIXEL_RTOL = 1e-3


@dataclass
class LensImage:
    """One observed lens image: ``image`` (n, n) float32, axis order (y, x), in the file's
    units; ``pixel_scale_arcsec``; ``path``; ``header`` (astropy) of the HDU it came from."""

    image: np.ndarray
    pixel_scale_arcsec: float
    path: Path
    header: object = field(repr=False, default=None)


def _pixel_scale_from_header(header) -> float | None:
    """Pixel side in arcsec from a celestial WCS or a ``PIXSCALE`` card (arcsec); None if
    neither is there. Non-square pixels are an error."""
    from astropy import units as u
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FITSFixedWarning about date or RADESYS cards
            wcs = WCS(header)
    except Exception as err:  # noqa: BLE001 - astropy raises many kinds for a broken WCS
        raise TfhybridInputError(
            f"the header's WCS cannot be read ({type(err).__name__}: "
            f"{' '.join(str(err).split())}); give the pixel "
            "scale (--pixel-scale ARCSEC)") from err
    if wcs.has_celestial:
        celestial = wcs.celestial
        # the FITS standard's unit for celestial axes is the degree when CUNITi is absent
        units = [u.Unit(str(x)) if str(x) else u.deg for x in celestial.wcs.cunit]
        scales = [(s * unit).to_value(u.arcsec) for s, unit in
                  zip(proj_plane_pixel_scales(celestial), units, strict=True)]
        if abs(scales[0] - scales[1]) > SQUARE_PIXEL_RTOL * max(scales):
            raise TfhybridInputError(
                f"the WCS gives non-square pixels ({scales[0]:.6g} × {scales[1]:.6g} arcsec); "
                "the lens model needs square pixels: resample the image first")
        return float(np.mean(scales))
    if "PIXSCALE" in header:
        return float(header["PIXSCALE"])
    return None


def _read_image_hdu(path: Path, hdu, what: str, allow_nan: bool = False):
    """``(data, header)`` of the chosen (or first 2-D image) HDU of a FITS file, checked to be
    2-D (and finite unless ``allow_nan``); ``what`` names the file in messages ("image",
    "PSF")."""
    from astropy.io import fits

    if not path.is_file():
        raise TfhybridInputError(f"{what} file {path} does not exist")
    try:
        with fits.open(path, memmap=False) as hdul:
            if hdu is not None:
                try:
                    chosen = hdul[hdu]
                except (KeyError, IndexError) as err:
                    raise TfhybridInputError(
                        f"{path} has no HDU {hdu!r}; it has "
                        f"{[h.name for h in hdul]}") from err
            else:
                chosen = next((h for h in hdul if getattr(h, "data", None) is not None
                               and getattr(h.data, "ndim", 0) == 2
                               and h.data.dtype.names is None), None)
                if chosen is None:
                    shapes = [getattr(getattr(h, "data", None), "shape", None) for h in hdul]
                    raise TfhybridInputError(
                        f"{path} has no 2-D image HDU (HDU shapes: {shapes}); the lens fit "
                        f"takes one {what} per file")
            data, header = chosen.data, chosen.header.copy()
    except TfhybridInputError:
        raise
    except (OSError, ValueError, TypeError) as err:
        raise TfhybridInputError(f"{path} is not a readable FITS file: {err}") from err
    if data is None or np.ndim(data) != 2 or getattr(data.dtype, "names", None):
        raise TfhybridInputError(
            f"{path}: HDU {hdu!r} must be a 2-D image; got shape {np.shape(data)}")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad and not allow_nan:
        raise TfhybridInputError(
            f"{path}: {bad} NaN or inf pixel(s); mask them (a noise map with σ = inf or a "
            "weight map with 0 there) or inpaint them before fitting")
    return data, header


def read_lens_image(path: str | os.PathLike, pixel_scale_arcsec=None,
                    hdu: int | str | None = None, allow_nan: bool = False) -> LensImage:
    """Read one observed lens image from a FITS file, checking it.

    Parameters
    ----------
    path : FITS file.
    pixel_scale_arcsec : float or ``astropy`` angle, optional
        Overrides the header's (WCS or ``PIXSCALE``); needed when the header has neither.
    hdu : index or name of the image HDU (default: the first HDU with 2-D data).
    allow_nan : keep NaN pixels (for pixels a noise map masks; checked there) instead of
        refusing the image.
    """
    path = Path(path)
    data, header = _read_image_hdu(path, hdu, "image", allow_nan=allow_nan)
    image = np.asarray(data, dtype=np.float32)
    ny, nx = image.shape
    if ny != nx:
        raise TfhybridInputError(
            f"{path}: the image is {ny} × {nx} pixels; the lens model needs a square image "
            "(cut a square stamp centred on the lens)")
    if pixel_scale_arcsec is None:
        scale = _pixel_scale_from_header(header)
        if scale is None:
            raise TfhybridInputError(
                f"cannot tell the pixel scale of {path}: its header has no celestial WCS "
                "(CDELT/CD) and no PIXSCALE card; give it (--pixel-scale ARCSEC)")
    else:
        scale = pixel_scale_arcsec
    scale = as_arcsec("pixel scale", scale, low=1e-6, high=3600.0)
    if not scale > 0:
        raise TfhybridInputError(f"{path}: the pixel scale must be > 0 arcsec; got {scale}")
    return LensImage(image, float(scale), path, header)


def read_psf_image(path: str | os.PathLike, pixel_scale_arcsec: float,
                   hdu: int | str | None = None) -> tuple[np.ndarray, int]:
    """Read a PSF image (TinyTim, WebbPSF, a stack of stars) for images of the given pixel
    scale: ``(kernel, oversampling)``, the kernel ``(p, p)`` float64 with unit sum on the
    images' pixels.

    The PSF's own pixel scale comes from its header as for :func:`read_lens_image`; without
    one it is taken to be the images'. A PSF sampled an integer ``k`` ≥ 2 times finer than the
    images (an oversampled model PSF) is binned to their pixels by
    :func:`tfhybrid.physics.psf.bin_psf_image` (exact for odd ``k``); any other ratio is an
    error (resample it first). The sides must be odd with the brightest pixel within one pixel
    of the central one (the model centres the PSF on that pixel: an off-centre PSF shifts the
    lens).
    """
    from tfhybrid.physics.psf import bin_psf_image

    path = Path(path)
    data, header = _read_image_hdu(path, hdu, "PSF")
    kernel = np.asarray(data, dtype=np.float64)
    if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise TfhybridInputError(
            f"{path}: the PSF image is {kernel.shape[0]} × {kernel.shape[1]} pixels; its sides "
            "must be odd, centred on the central pixel (pad or recentre it)")
    if not kernel.sum() > 0:
        raise TfhybridInputError(f"{path}: the PSF image must have a positive sum; got "
                                 f"{kernel.sum():.3g}")
    peak = np.unravel_index(np.argmax(kernel), kernel.shape)
    centre = tuple(side // 2 for side in kernel.shape)
    if max(abs(p - c) for p, c in zip(peak, centre, strict=True)) > 1:
        raise TfhybridInputError(
            f"{path}: the PSF's brightest pixel is at (y, x) = {tuple(map(int, peak))}, not the "
            f"central pixel {centre}; recentre it")
    own = _pixel_scale_from_header(header)
    factor = 1
    if own is not None:
        ratio = float(pixel_scale_arcsec) / own
        factor = int(round(ratio))
        if factor < 1 or abs(ratio - factor) > SQUARE_PIXEL_RTOL * ratio:
            raise TfhybridInputError(
                f"{path}: the PSF is sampled at {own:.6g} arcsec per pixel and the images at "
                f"{float(pixel_scale_arcsec):.6g}; their ratio {ratio:.4g} is not a whole "
                "number: resample the PSF to the images' pixels (or a whole fraction of them)")
    if factor > 1:
        kernel = bin_psf_image(kernel, factor)
    return kernel / kernel.sum(), factor


def read_noise_map(path: str | os.PathLike, shape, kind: str = "rms",
                   hdu: int | str | None = None) -> np.ndarray:
    """Read a per-pixel noise map for an image of ``shape``: σ per pixel (float64), ``inf``
    where a pixel is masked, for ``LensPosterior(noise=...)``.

    ``kind="rms"``: the file holds σ in the image's units; NaN, inf and values ≤ 0 mark masked
    pixels. ``kind="weight"``: it holds the inverse variance ``1 / σ²`` (a drizzled image's
    ``WHT`` extension in inverse-variance mode); 0 (or NaN, inf, < 0) marks masked pixels.
    """
    if kind not in ("rms", "weight"):
        raise TfhybridInputError(f"kind must be 'rms' or 'weight'; got {kind!r}")
    path = Path(path)
    data, _ = _read_image_hdu(path, hdu, "noise map", allow_nan=True)
    values = np.asarray(data, dtype=np.float64)
    if values.shape != tuple(shape):
        raise TfhybridInputError(
            f"{path}: the noise map is {values.shape[0]} × {values.shape[1]} pixels but its "
            f"image is {shape[0]} × {shape[1]}")
    usable = np.isfinite(values) & (values > 0)
    if not usable.any():
        raise TfhybridInputError(f"{path}: the noise map masks every pixel (no finite value "
                                 "> 0)")
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = values if kind == "rms" else 1.0 / np.sqrt(values)
    return np.where(usable, sigma, np.inf)


def flux_scale(image: np.ndarray) -> float:
    """The divisor that brings an observed lens image to the model's units: its peak after a
    3 × 3 median filter, which removes single-pixel spikes but keeps an arc a few pixels
    wide (> 0; an error for an image with no positive light)."""
    from scipy import ndimage

    peak = float(np.max(ndimage.median_filter(np.asarray(image, np.float64), size=3)))
    if not peak > 0:
        raise TfhybridInputError(
            "the image has no positive light (its 3 × 3-median-filtered peak is "
            f"{peak:.3g}); is the lens image background-subtracted and in linear units?")
    return peak

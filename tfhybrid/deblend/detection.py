"""Simple built-in source detection on a detection image (used when no centres are given).

The paper takes the number of sources and their first positions from an external detection
(000_* §3); this module is the fallback: peaks of the PSF-smoothed, inverse-variance weighted
band sum that stand ``threshold`` σ above the noise, at least ``min_separation`` pixels
apart, refined to sub-pixel precision by the flux-weighted centroid of the 3×3 neighbourhood.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tfhybrid.deblend.scene import Observation
from tfhybrid.validation import TfhybridInputError

__all__ = ["detect_sources"]


def detect_sources(
    observation: Observation,
    threshold: float = 5.0,
    min_separation: float = 3.0,
    max_sources: int = 20,
    edge: int = 1,
) -> np.ndarray:
    """Peak detection on the detection image; returns centres ``(K, 2)`` as (x, y) pixels.

    Parameters
    ----------
    observation : the scene.
    threshold : detection significance in σ of the smoothed detection image.
    min_separation : minimum distance between two peaks (pixels).
    max_sources : keep at most this many, brightest first.
    edge : ignore peaks closer than this to the image border (pixels).

    Returns
    -------
    ``(K, 2)`` float64, sorted by decreasing smoothed peak value; raises
    :class:`TfhybridInputError` when nothing is detected.
    """
    if threshold <= 0 or min_separation < 1 or max_sources < 1:
        raise TfhybridInputError(
            "threshold must be > 0, min_separation >= 1 and max_sources >= 1; got "
            f"{threshold}, {min_separation}, {max_sources}"
        )
    det = observation.detection_image().astype(np.float64)
    sigma_map = observation.detection_sigma().astype(np.float64)
    # Smooth with the mean PSF (matched filter for point-like sources); the noise of the
    # smoothed image is σ·‖psf‖₂ for white noise.
    psf = observation.psfs.mean(axis=0).astype(np.float64)
    smooth = ndimage.convolve(det, psf, mode="constant")
    finite_sigma = np.where(np.isfinite(sigma_map), sigma_map, np.nan)
    noise = np.nanmedian(finite_sigma) * np.sqrt(np.sum(psf**2))
    size = int(2 * np.floor(min_separation) + 1)
    local_max = smooth == ndimage.maximum_filter(smooth, size=size, mode="constant", cval=-np.inf)
    peaks = local_max & (smooth > threshold * noise)
    ny, nx = det.shape
    if edge > 0:
        peaks[:edge] = peaks[-edge:] = False
        peaks[:, :edge] = peaks[:, -edge:] = False
    iy, ix = np.nonzero(peaks)
    if iy.size == 0:
        raise TfhybridInputError(
            f"no source detected above {threshold} sigma; give centres explicitly or lower "
            "the threshold"
        )
    order = np.argsort(-smooth[iy, ix])[:max_sources]
    iy, ix = iy[order], ix[order]
    centres = []
    for y, x in zip(iy, ix, strict=True):
        y0, y1, x0, x1 = max(y - 1, 0), min(y + 2, ny), max(x - 1, 0), min(x + 2, nx)
        patch = np.clip(smooth[y0:y1, x0:x1], 0.0, None)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        tot = patch.sum()
        centres.append((np.sum(xx * patch) / tot, np.sum(yy * patch) / tot) if tot > 0 else (x, y))
    return np.asarray(centres, dtype=np.float64)

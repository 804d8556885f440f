"""Mosaic of image stamps (quick look at simulated or preprocessed galaxies).

Uses ``matplotlib.figure.Figure`` directly with the Agg canvas: no pyplot state is created, so
figures are garbage-collected and never shown by accident.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tfhybrid.validation import TfhybridInputError

SCALES = ("asinh", "linear")


def _display_stretch(image: np.ndarray, scale: str, percentile: float) -> tuple[np.ndarray, float]:
    """Map one stamp to display values; returns (values, vmax) with vmin = 0 for asinh."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image), 1.0
    lo = float(np.percentile(finite, 100.0 - percentile))
    hi = float(np.percentile(finite, percentile))
    if hi <= lo:
        hi = lo + 1.0
    if scale == "linear":
        return image, hi
    # asinh stretch (Lupton et al. 2004) with softening at ~ the noise level: the median absolute
    # deviation estimates it, falling back to 1 % of the range for noiseless stamps.
    mad = float(np.median(np.abs(finite - np.median(finite)))) * 1.4826
    soft = mad if mad > 0 else 0.01 * (hi - lo)
    stretched = np.arcsinh(image / soft)
    return stretched, float(np.arcsinh(hi / soft))


def plot_mosaic(
    images,
    ncols: int | None = None,
    titles: Sequence[str] | None = None,
    scale: str = "asinh",
    cmap: str = "viridis",
    percentile: float = 99.5,
    panel_size_in: float = 1.2,
    suptitle: str | None = None,
):
    """Grid of image stamps, each with its own stretch.

    Parameters
    ----------
    images : array_like
        (n, ny, nx) stamps, or (n, ny, nx, 1) (a trailing channel axis is dropped), axis order
        (y, x); drawn with ``origin="lower"`` so pixel (0, 0) is bottom-left.
    ncols : int, optional
        Columns of the grid (default ``ceil(sqrt(n))``).
    titles : sequence of str, optional
        One title per stamp.
    scale : {"asinh", "linear"}
        Display stretch: ``asinh`` (softened at the noise level, shows faint outskirts) or
        ``linear`` between the stamp's ``100 - percentile`` and ``percentile`` percentiles.
    cmap : str
        Matplotlib colour map.
    percentile : float
        Upper clipping percentile of each stamp's display range, in (50, 100].
    panel_size_in : float
        Side of one panel, inches.
    suptitle : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise TfhybridInputError(
            f"images must have shape (n, ny, nx) or (n, ny, nx, 1); got {np.shape(images)}"
        )
    n = arr.shape[0]
    if n == 0:
        raise TfhybridInputError("images holds no stamps")
    if scale not in SCALES:
        raise TfhybridInputError(f"scale must be one of {SCALES}; got {scale!r}")
    if not 50.0 < percentile <= 100.0:
        raise TfhybridInputError(f"percentile must be in (50, 100]; got {percentile}")
    if titles is not None and len(titles) != n:
        raise TfhybridInputError(f"titles has {len(titles)} entries but there are {n} images")
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise TfhybridInputError(f"ncols must be a positive integer; got {ncols!r}")
    ncols = min(int(ncols), n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_size_in * ncols, panel_size_in * nrows + (0.4 if suptitle else 0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        values, vmax = _display_stretch(arr[k], scale, percentile)
        vmin = 0.0 if scale == "asinh" else float(np.percentile(arr[k], 100.0 - percentile))
        ax.imshow(values, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax,
                  interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92 if suptitle else 0.99,
                        wspace=0.04, hspace=0.2 if titles is not None else 0.04)
    return fig


def save_mosaic(images, path: str | os.PathLike, dpi: int = 100, **kwargs) -> Path:
    """Draw ``plot_mosaic(images, **kwargs)`` and save it atomically to ``path`` (PNG, PDF...)."""
    from tfhybrid.io import savefig_atomic

    fig = plot_mosaic(images, **kwargs)
    return savefig_atomic(fig, path, dpi=dpi)

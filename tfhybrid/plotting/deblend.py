"""Figures of a deblended scene, laid out like Figs. 1, 3 and 4 of 000_*.

* :func:`plot_scene`: (a) observed scene, (b) sky model with the source centres, (c) residuals
  (data − model)/σ, and (d) the individual components ``P A_kᵀ S_k`` (colour composites), plus
  optionally (e) the model-frame morphologies ``S_k`` and (f) their true or alternative values.
* :func:`plot_morphologies`: rows of morphologies side by side (Fig. 4e/f: SCARLET vs deep).

Colour composites use the asinh stretch of Lupton et al. (2004) on three bands (reddest to
blue as R, G, B), with one stretch shared by all panels of a figure so that they compare.
Built on ``matplotlib.figure.Figure`` (no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["rgb_composite", "plot_scene", "plot_morphologies"]


def rgb_composite(images, stretch: float, q: float = 8.0, bands=None) -> np.ndarray:
    """(ny, nx, 3) asinh colour image of ``(B, ny, nx)`` (Lupton et al. 2004).

    ``bands`` (R, G, B) indices default to i, r, g for five bands (z, y are noisier) and to
    the last three otherwise; ``stretch`` is the linear scale (about the noise level).
    """
    images = np.asarray(images, dtype=np.float64)
    n = images.shape[0]
    if bands is None:
        bands = (2, 1, 0) if n >= 3 else (0, 0, 0)
    rgb = np.stack([images[b] for b in bands], axis=-1)
    intensity = rgb.mean(axis=-1, keepdims=True)
    safe = np.where(intensity > 0, intensity, 1.0)
    f = np.arcsinh(q * intensity / stretch) / q
    out = np.where(intensity > 0, rgb * f / safe, 0.0)
    return np.clip(out / max(np.arcsinh(q) / q, 1e-12), 0.0, 1.0)


def _stretch(images, sigma) -> float:
    peak = float(np.percentile(np.asarray(images).mean(axis=0), 99.5))
    return max(peak / 3.0, 5.0 * float(np.mean(sigma)), 1e-12)


def plot_scene(observation, result, title: str | None = None, true_morphs=None,
               panel_in: float = 2.2):
    """Figure like 000_* Fig. 1: observed, model, residuals, components (and morphologies).

    Parameters
    ----------
    observation : :class:`tfhybrid.deblend.scene.Observation`.
    result : :class:`tfhybrid.deblend.fit.DeblendResult`.
    title : suptitle.
    true_morphs : optional (K, h, w) true morphologies drawn under the fitted ones.
    """
    from matplotlib.figure import Figure

    sigma = 1.0 / np.sqrt(np.maximum(np.median(observation.weights, axis=(1, 2)), 1e-30))
    stretch = _stretch(observation.images, sigma)
    k = len(result.seds)
    ncols = max(3, k)
    nrows = 2 + 1 + (true_morphs is not None)
    fig = Figure(figsize=(panel_in * ncols, panel_in * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()

    def show(ax, img, label, **kw):
        ax.set_axis_on()
        ax.imshow(img, origin="lower", interpolation="nearest", **kw)
        ax.set_title(label, fontsize=8)

    show(axes[0, 0], rgb_composite(observation.images, stretch), "(a) observed scene")
    show(axes[0, 1], rgb_composite(result.model, stretch), f"(b) {result.method} sky model")
    for j, (x, y) in enumerate(result.centres_xy):
        axes[0, 1].text(x, y, str(j), color="w", fontsize=7, ha="center", va="center")
    resid = np.sum(result.residual * np.sqrt(observation.weights), axis=0) / np.sqrt(
        observation.n_bands
    )
    show(axes[0, 2], resid, f"(c) residual/σ, χ²/pix {result.chi2_per_pixel:.2f}",
         cmap="RdBu_r", vmin=-5, vmax=5)
    for j in range(k):
        show(axes[1, j], rgb_composite(result.components[j], stretch), f"(d) component {j}")
        show(axes[2, j], result.morphs[j], f"S_{j} ({result.method})", cmap="magma",
             vmin=0, vmax=1)
        if true_morphs is not None:
            show(axes[3, j], true_morphs[j], f"true S_{j}", cmap="magma", vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_morphologies(rows: Sequence[np.ndarray], labels: Sequence[str], panel_in: float = 1.6,
                      title: str | None = None):
    """Morphologies side by side: one row per method (e.g. true, SCARLET, deep), K columns."""
    from matplotlib.figure import Figure

    k = max(len(r) for r in rows)
    fig = Figure(figsize=(panel_in * k + 0.8, panel_in * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), k, squeeze=False)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        for j in range(k):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j], origin="lower", cmap="magma", vmin=0, vmax=1,
                          interpolation="nearest")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig

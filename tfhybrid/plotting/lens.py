"""Figures of the strong-lensing application (Chianese et al. 2020, Figs. 6–9).

Pure matplotlib on NumPy arrays: every function takes results, returns a ``Figure`` and never
writes files (``tfhybrid.io.savefig_atomic`` does that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

SNR_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def map_reconstruction_figure(rows: Sequence[Mapping], source_extent_arcsec=None, title=None):
    """Fig. 6/7 of the lensing paper: one row per S/N level.

    Parameters
    ----------
    rows : sequence of mappings, each with keys
        ``observed`` (ny, nx), ``model`` (ny, nx) the fitted noiseless image, ``noise_sigma``
        (float, or σ per pixel (ny, nx); NaN pixels of it or of ``observed`` (masked) are
        drawn blank), ``true_source`` (sy, sx), ``fit_source`` (sy, sx) evaluated on the same
        source-plane grid, and ``label`` (str, e.g. ``"high S/N (σ=0.0333)"``).
    source_extent_arcsec : (xmin, xmax, ymin, ymax), optional
        Extent of the source-plane panels.

    Columns: true observation, fitted image, residual / σ_noise, true source, fitted source,
    source residual / (10 % of the true source maximum) — the normalisations of the paper.
    """
    n = len(rows)
    fig, axes = plt.subplots(n, 6, figsize=(15, 2.6 * n + 0.4), squeeze=False)
    titles = ("observed", "MAP model", "residual / σ", "true source", "MAP source",
              "source residual / 0.1 max")
    for r, row in enumerate(rows):
        obs, mod = np.asarray(row["observed"]), np.asarray(row["model"])
        tsrc, fsrc = np.asarray(row["true_source"]), np.asarray(row["fit_source"])
        vmax = max(np.nanmax(obs), np.nanmax(mod))
        smax = max(tsrc.max(), fsrc.max())
        panels = (
            (obs, dict(vmin=0, vmax=vmax, cmap="viridis"), None),
            (mod, dict(vmin=0, vmax=vmax, cmap="viridis"), None),
            ((obs - mod) / row["noise_sigma"], dict(vmin=-4, vmax=4, cmap="RdBu_r"), None),
            (tsrc, dict(vmin=0, vmax=smax, cmap="viridis"), source_extent_arcsec),
            (fsrc, dict(vmin=0, vmax=smax, cmap="viridis"), source_extent_arcsec),
            ((tsrc - fsrc) / (0.1 * max(tsrc.max(), 1e-12)),
             dict(vmin=-1, vmax=1, cmap="RdBu_r"), source_extent_arcsec),
        )
        for c, (img, kw, extent) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(img, origin="lower", extent=extent, **kw)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
        axes[r, 0].set_ylabel(row.get("label", ""), fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _credible_levels(hist: np.ndarray, probs: Sequence[float]) -> list[float]:
    """Density thresholds enclosing the given probability masses of a 2-D histogram."""
    flat = np.sort(hist.ravel())[::-1]
    cum = np.cumsum(flat)
    cum /= cum[-1]
    levels = [flat[min(np.searchsorted(cum, p), flat.size - 1)] for p in probs]
    return sorted(set(levels))


def axis_range(values: np.ndarray, truth: float | None = None) -> tuple[float, float]:
    """The corner figure's axis range for draws ``values``: their 0.5–99.5 % range, widened
    to include ``truth`` (if given), padded by 8 % either side."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    if truth is not None:
        lo, hi = min(lo, truth), max(hi, truth)
    pad = 0.08 * (hi - lo if hi > lo else abs(hi) + 1e-3)
    return lo - pad, hi + pad


def smoothed_density_2d(x: np.ndarray, y: np.ndarray, x_range, y_range, bins: int = 40,
                        min_smooth_bins: float = 1.0):
    """2-D histogram of draws ``(x, y)`` smoothed by a Gaussian kernel of Scott's width.

    The kernel's standard deviation along each axis is ``σ n^(-1/6)`` (Scott's rule in two
    dimensions; ``σ`` the smaller of the standard deviation and IQR / 1.349, so that a few
    outlying draws do not blur the core), expressed in bins and at least ``min_smooth_bins``:
    with the few hundred (correlated) draws of a lens posterior, a fixed one-bin kernel on
    40 bins leaves islands of a few draws inside and outside the credible contours. Returns
    ``(x_centres, y_centres, density)``, the density ``(bins, bins)`` indexed ``[x, y]``.
    """
    x, y = np.ravel(x), np.ravel(y)
    hist, xe, ye = np.histogram2d(x, y, bins=bins, range=[x_range, y_range])
    widths = []
    for v, (lo, hi) in ((x, x_range), (y, y_range)):
        q25, q75 = np.percentile(v, [25, 75])
        spread = min(np.std(v), (q75 - q25) / 1.349) if v.size > 1 else 0.0
        if not spread > 0:
            spread = np.std(v)
        bin_width = (hi - lo) / bins
        width = spread * max(v.size, 1) ** (-1.0 / 6.0) / bin_width if bin_width > 0 else 0.0
        widths.append(max(float(min_smooth_bins), float(width)))
    hist = ndimage.gaussian_filter(hist, widths)
    return 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1]), hist


def posterior_corner_figure(
    chains: Sequence[Mapping[str, np.ndarray]],
    names: Sequence[str],
    truths: Mapping[str, float] | None = None,
    labels: Sequence[str] | None = None,
    display_names: Mapping[str, str] | None = None,
    probs: Sequence[float] = (0.68, 0.95, 0.99),
    bins: int = 40,
    smooth_bins: float = 1.0,
):
    """Fig. 8/9 of the lensing paper: 1-D and 2-D marginals, one colour per S/N level.

    Parameters
    ----------
    chains : sequence of mappings name -> samples (n,) (chains flattened), one per S/N level.
    names : parameters to show, e.g. ``("r_ein", "gamma", "phi")``.
    truths : true values, drawn as black squares and dashed lines.
    probs : probability masses of the 2-D contours (68/95/99 % by default).
    bins : bins per axis of the 2-D densities, and at most this many in the 1-D histograms
        (which use √n bins for n draws, at least 10).
    smooth_bins : the least width (bins) of the 2-D densities' Gaussian kernel, whose width
        is otherwise Scott's (:func:`smoothed_density_2d`).
    """
    k = len(names)
    display_names = display_names or {}
    fig, axes = plt.subplots(k, k, figsize=(2.6 * k + 0.6, 2.6 * k + 0.6), squeeze=False)
    ranges = {name: axis_range(np.concatenate([np.ravel(c[name]) for c in chains]),
                               truths.get(name) if truths else None) for name in names}
    for i, yi in enumerate(names):
        for j, xj in enumerate(names):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            for ci, chain in enumerate(chains):
                colour = SNR_COLOURS[ci % len(SNR_COLOURS)]
                if i == j:
                    n_1d = int(np.clip(np.sqrt(np.size(chain[xj])), 10, bins))
                    ax.hist(np.ravel(chain[xj]), bins=n_1d, range=ranges[xj], density=True,
                            histtype="step", color=colour,
                            label=None if labels is None else labels[ci])
                else:
                    x, y = np.ravel(chain[xj]), np.ravel(chain[yi])
                    xc, yc, hist = smoothed_density_2d(x, y, ranges[xj], ranges[yi], bins,
                                                       smooth_bins)
                    levels = _credible_levels(hist, probs)
                    if len(levels) > 1:
                        ax.contourf(xc, yc, hist.T, levels=levels + [hist.max() * 1.01],
                                    colors=[colour], alpha=0.15)
                        ax.contour(xc, yc, hist.T, levels=levels, colors=[colour],
                                   linewidths=1.0)
                    ax.plot(x[:: max(1, x.size // 300)], y[:: max(1, y.size // 300)], ".",
                            color=colour, ms=1, alpha=0.3)
            if truths:
                if xj in truths:
                    ax.axvline(truths[xj], color="k", ls="--", lw=0.8)
                if i != j and yi in truths and xj in truths:
                    ax.axhline(truths[yi], color="k", ls="--", lw=0.8)
                    ax.plot(truths[xj], truths[yi], "ks", ms=4)
            ax.set_xlim(ranges[xj])
            if i != j:
                ax.set_ylim(ranges[yi])
            if i == k - 1:
                ax.set_xlabel(display_names.get(xj, xj))
            else:
                ax.set_xticklabels([])
            if j == 0 and i != j:
                ax.set_ylabel(display_names.get(yi, yi))
            elif i == j:
                ax.set_yticks([])
    fig.tight_layout()
    if labels is not None:
        # in the empty upper-right triangle; an axes legend outside its axes would make
        # tight_layout squeeze the first column
        handles, texts = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, texts, loc="upper right", fontsize=8, frameon=False)
    return fig


def loss_trace_figure(loss_trace: np.ndarray, title: str = "MAP: negative log posterior"):
    """Loss trace(s) of a MAP fit; ``loss_trace`` is (steps,) or (steps, n_curves); NaN where
    a curve has no value (a start dropped by ``find_map``'s pruning ends there)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    trace = np.asarray(loss_trace, dtype=np.float64)
    trace = trace.reshape(trace.shape[0], -1)
    trace = trace[:, np.isfinite(trace).any(axis=0)]
    shifted = trace - np.nanmin(trace, axis=0, keepdims=True) + 1.0
    ax.semilogy(shifted, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss − min + 1")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig

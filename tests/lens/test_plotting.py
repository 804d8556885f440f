"""The lensing figures' credible contours (Figs. 8–9 of the lensing paper)."""

import numpy as np
import pytest
from scipy import ndimage

COV = np.array([[1.0, 0.6], [0.6, 1.0]])
BINS = 40


def _figure_ranges(draws):
    """The axis ranges posterior_corner_figure gives these draws."""
    from tfhybrid.plotting.lens import axis_range

    return [axis_range(v) for v in draws.T]


def _regions_and_mass(density, x_range, y_range, fresh, probs=(0.68, 0.95)):
    """For each credible level of ``density``: its number of separate regions, and the
    fraction of ``fresh`` draws (the true distribution) that falls inside it."""
    from tfhybrid.plotting.lens import _credible_levels

    ix = np.floor((fresh[:, 0] - x_range[0]) / (x_range[1] - x_range[0]) * BINS).astype(int)
    iy = np.floor((fresh[:, 1] - y_range[0]) / (y_range[1] - y_range[0]) * BINS).astype(int)
    on_grid = (ix >= 0) & (ix < BINS) & (iy >= 0) & (iy < BINS)
    values = density[np.clip(ix, 0, BINS - 1), np.clip(iy, 0, BINS - 1)]
    out = []
    for p in probs:
        level = _credible_levels(density, [p])[0]
        inside = float(np.mean(on_grid & (values >= level)))
        out.append((ndimage.label(density >= level)[1], inside))
    return out


@pytest.mark.parametrize("n", [150, 500])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_credible_contours_of_a_few_hundred_draws_are_one_region_holding_their_mass(n, seed):
    """2-D marginals of a correlated Gaussian (ρ = 0.6) from n draws, as the lens figures
    draw them: the 68 % and 95 % regions are each one region and hold 62–80 % and 90–99 % of
    20 000 fresh draws. Scott's kernel widens the density by a factor sqrt(1 + n^(-1/3)),
    so the regions hold a little more than their nominal mass: ~74 % and ~96 % at n = 150,
    ~70 % and ~95 % at n = 5 000; the spread over seeds is ~0.03."""
    from tfhybrid.plotting.lens import smoothed_density_2d

    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal([0.0, 0.0], COV, n)
    fresh = rng.multivariate_normal([0.0, 0.0], COV, 20_000)
    x_range, y_range = _figure_ranges(draws)
    _, _, density = smoothed_density_2d(draws[:, 0], draws[:, 1], x_range, y_range, BINS)
    (regions68, mass68), (regions95, mass95) = _regions_and_mass(density, x_range, y_range,
                                                                 fresh)
    assert regions68 == 1 and 0.62 < mass68 < 0.80, (regions68, mass68)
    assert regions95 <= 2 and 0.90 < mass95 < 0.99, (regions95, mass95)
    if n == 150:
        # the check has teeth: the fixed one-bin kernel of earlier releases broke these
        # draws' 68 % region into islands holding only 51–59 % of the mass
        hist, _, _ = np.histogram2d(draws[:, 0], draws[:, 1], bins=BINS,
                                    range=[x_range, y_range])
        (old_regions, old_mass), _ = _regions_and_mass(ndimage.gaussian_filter(hist, 1.0),
                                                       x_range, y_range, fresh)
        assert old_regions > 1 and old_mass < 0.62, (old_regions, old_mass)


def test_kernel_width_follows_scotts_rule_and_its_floor():
    """The kernel's width in bins is σ n^(-1/6) / bin width, at least min_smooth_bins: a
    single draw's density is the kernel itself, whose second moment gives the width back."""
    from tfhybrid.plotting.lens import smoothed_density_2d

    rng = np.random.default_rng(4)
    draws = rng.normal(size=(1000, 2)) * [1.0, 3.0]
    # bins of σ/5: Scott's width, σ 1000^(-1/6) = 0.32 σ, is 1.6 bins, above the floor
    x_range, y_range = (-4.0, 4.0), (-12.0, 12.0)
    _, _, density = smoothed_density_2d(draws[:, 0], draws[:, 1], x_range, y_range, BINS)
    assert density.shape == (BINS, BINS)
    # the kernel keeps the counts (less the draws beyond 4σ, outside the range: ~0.1 expected)
    assert 997.0 <= density.sum() <= 1000.0 + 1e-9
    # the smoothed density's variance along each axis: the draws' plus the kernel's
    for axis, (sd, (lo, hi)) in enumerate(((1.0, x_range), (3.0, y_range))):
        width = (hi - lo) / BINS
        centres = lo + width * (np.arange(BINS) + 0.5)
        marginal = density.sum(axis=1 - axis)
        var = np.sum(marginal * centres**2) / marginal.sum() - (
            np.sum(marginal * centres) / marginal.sum()) ** 2
        sample_var = np.var(draws[:, axis]) + width**2 / 12.0  # binning adds w²/12
        q25, q75 = np.percentile(draws[:, axis], [25, 75])
        spread = min(np.std(draws[:, axis]), (q75 - q25) / 1.349)
        kernel = spread * 1000 ** (-1.0 / 6.0)
        assert var == pytest.approx(sample_var + kernel**2, rel=0.03), (axis, sd)
    # a tiny spread: the floor (min_smooth_bins) sets the width; the draws fill the two bins
    # either side of 0, whose centres are half a bin from it
    tight = rng.normal(size=(1000, 2)) * 1e-3
    _, _, density = smoothed_density_2d(tight[:, 0], tight[:, 1], (-1.0, 1.0), (-1.0, 1.0),
                                        BINS, min_smooth_bins=2.0)
    marginal = density.sum(axis=1)
    centres = -1.0 + (2.0 / BINS) * (np.arange(BINS) + 0.5)
    var = np.sum(marginal * centres**2) / marginal.sum()
    assert np.sqrt(var) / (2.0 / BINS) == pytest.approx(np.sqrt(2.0**2 + 0.5**2), rel=0.02)


def test_corner_figure_of_few_draws_builds():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfhybrid.plotting.lens import posterior_corner_figure

    rng = np.random.default_rng(0)
    chains = [{"a": rng.normal(size=150), "b": rng.normal(size=150)},
              {"a": rng.normal(size=150) + 1.0, "b": rng.normal(size=150)}]
    fig = posterior_corner_figure(chains, ["a", "b"], truths={"a": 0.0, "b": 0.0},
                                  labels=["one", "two"])
    # the 1-D histograms of 150 draws use √150 → 12 bins (13 edges; one outline per chain)
    outlines = fig.axes[0].patches
    assert len(outlines) == 2
    assert all(len(np.unique(p.get_xy()[:, 0])) == 13 for p in outlines)
    assert len(fig.axes[2].collections) > 0  # the 2-D panel's contours
    plt.close(fig)

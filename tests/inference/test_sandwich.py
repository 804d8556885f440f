"""Tests of tfhybrid.inference.sandwich: the model-robust covariance must cover where the
model-based one does not.

A linear-Gaussian problem (three smooth basis images, 64 × 64 pixels) whose estimate and
covariances are exact: with white noise the sandwich must agree with the Fisher covariance
and both must cover the truth 68 % of the time; with spatially correlated noise that the
model calls white the Fisher intervals must under-cover badly and the block sandwich must
recover most of the estimator's actual spread. Coverage is judged with the exact binomial
test over 400 simulated data sets.
"""

import numpy as np
import pytest
from scipy import ndimage, stats

from tfhybrid.inference.diagnostics import coverage_test
from tfhybrid.inference.sandwich import block_scores, open_faced_adjustment, sandwich_covariance
from tfhybrid.validation import TfhybridInputError

N = 64
SIGMA = 0.1


def _design():
    c = (np.arange(N) - (N - 1) / 2) / N
    y, x = np.meshgrid(c, c, indexing="ij")
    blob = np.exp(-0.5 * ((x - 0.1) ** 2 + y**2) / 0.25**2)
    return np.stack([np.ones_like(x), x, blob], -1)  # (N, N, 3)


def _fit(noise_images):
    """β̂, Fisher covariance, block-8 sandwich covariance for each noise image (β = 0)."""
    x = _design()
    xf = x.reshape(-1, 3)
    h = xf.T @ xf / SIGMA**2
    h_inv = np.linalg.inv(h)
    beta = (noise_images.reshape(len(noise_images), -1) @ xf / SIGMA**2) @ h_inv
    resid = noise_images - np.einsum("nd,ijd->nij", beta, x)
    pixel_scores = resid[..., None] / SIGMA**2 * x
    cov = sandwich_covariance(np.broadcast_to(h, (len(beta), 3, 3)),
                              block_scores(pixel_scores, 8))
    return beta, h_inv, cov


def _covered(beta, sd):
    return np.abs(beta) <= 0.9945 * sd  # the central 68 % of a Gaussian (truth β = 0)


def test_with_white_noise_the_sandwich_agrees_with_the_fisher_covariance():
    rng = np.random.default_rng(0)
    beta, h_inv, cov = _fit(SIGMA * rng.normal(size=(400, N, N)))
    ratio = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1) / np.diag(h_inv))
    # 64 blocks: the meat's relative noise is ~ sqrt(2/64) = 18 % per system, its median
    # over 400 systems is within a few per cent of 1
    assert np.all(np.abs(np.median(ratio, axis=0) - 1.0) < 0.08), np.median(ratio, axis=0)
    for k in range(3):
        assert coverage_test(_covered(beta[:, k], np.sqrt(h_inv[k, k]))).p_value > 1e-3
        assert coverage_test(_covered(beta[:, k], np.sqrt(cov[:, k, k]))).p_value > 1e-3


def test_with_correlated_noise_the_block_sandwich_recovers_the_sampling_variance():
    rng = np.random.default_rng(1)
    white = rng.normal(size=(400, N, N))
    noise = np.stack([ndimage.gaussian_filter(w, 1.0, mode="wrap") for w in white])
    noise *= SIGMA / noise.std()  # the per-pixel σ the model assumes, but correlated
    beta, h_inv, cov = _fit(noise)
    true_var = np.var(beta, axis=0)  # the estimator's actual spread over the 400 data sets
    for k in range(3):
        naive = coverage_test(_covered(beta[:, k], np.sqrt(h_inv[k, k])))
        robust = coverage_test(_covered(beta[:, k], np.sqrt(cov[:, k, k])))
        # the Fisher variance misses the pixels' covariance: ~1/12 of the truth here
        assert h_inv[k, k] / true_var[k] < 0.15
        assert naive.covered < 0.3 * naive.n and naive.p_value < 1e-10, str(naive)
        # the 8-pixel Bartlett window recovers most of it; what it misses is its known
        # downward bias (weights 1 - |Δ|/8 on the covariance at lag Δ) and the fit's
        # absorption of part of the noise: measured 0.61-0.76 of the variance, coverage
        # 220-243 of 400 (the naive 84-98; the Fisher variance 0.07-0.09)
        ratio = np.mean(cov[:, k, k]) / true_var[k]
        assert 0.55 < ratio < 1.1, ratio
        assert robust.covered > 0.5 * robust.n, str(robust)


def test_bad_input_is_reported():
    with pytest.raises(TfhybridInputError, match="multiple of block_size"):
        block_scores(np.zeros((10, 12, 2)), 4, overlapping=False)
    with pytest.raises(TfhybridInputError, match="larger than the image"):
        block_scores(np.zeros((10, 12, 2)), 11)
    with pytest.raises(TfhybridInputError, match="block_size"):
        block_scores(np.zeros((8, 8, 2)), 0)
    with pytest.raises(TfhybridInputError, match="NaN"):
        block_scores(np.full((8, 8, 2), np.nan), 4)
    with pytest.raises(TfhybridInputError, match="hessian"):
        sandwich_covariance(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(TfhybridInputError, match="scores"):
        sandwich_covariance(np.eye(2), np.zeros((4, 3)))


def test_open_faced_adjustment_gives_the_target_covariance_and_keeps_the_mean():
    rng = np.random.default_rng(11)
    n, b, d = 5000, 3, 4
    a = rng.normal(size=(b, d, d))
    draws = 0.1 * np.einsum("bij,nbj->nbi", a, rng.normal(size=(n, b, d))) + rng.normal(size=(b, d))
    t = rng.normal(size=(b, d, d))
    target = t @ np.swapaxes(t, -1, -2) + 0.1 * np.eye(d)
    draws[:, 2] = draws[0, 2]  # the third member's chain never moved
    out = open_faced_adjustment(draws, target)
    np.testing.assert_allclose(out.mean(0), draws.mean(0), atol=1e-12)
    dev = out - out.mean(0)
    cov = np.einsum("nbi,nbj->bij", dev, dev) / (n - 1)
    np.testing.assert_allclose(cov[:2], target[:2], rtol=1e-9, atol=1e-12)  # exact, by algebra
    np.testing.assert_array_equal(out[:, 2], draws[:, 2])
    # Gaussian draws stay Gaussian: each marginal is N(mean, target_ii) (KS test)
    for i in range(d):
        z = (out[:, 0, i] - draws[:, 0, i].mean()) / np.sqrt(target[0, i, i])
        assert stats.kstest(z, "norm").pvalue > 1e-3
    # the map only rescales: applied to draws with the target's covariance it is the identity
    again = open_faced_adjustment(out[:, :2], cov[:2])
    np.testing.assert_allclose(again, out[:, :2], atol=1e-9)
    with pytest.raises(TfhybridInputError, match="draws must be"):
        open_faced_adjustment(draws[0], target)
    with pytest.raises(TfhybridInputError, match="finite"):
        open_faced_adjustment(np.where(draws > 1e9, 0, np.nan), target)

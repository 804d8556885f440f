"""Tests of tfhybrid.lens.robust (sandwich intervals) on the small self-consistent problem of
test_model.py (64 × 64 pixels, a smooth source model that represents its source exactly).

* The Gauss–Newton Hessian agrees with the finite-difference Hessian of eq. 26
  (:func:`tfhybrid.lens.fit.laplace_hessian`): this checks the image Jacobian and the
  prior's Hessian; r_Ein's width follows from it through its bijector.
* With white noise (the model right) the sandwich agrees with the Laplace width; with
  spatially correlated noise (a misfit the white likelihood does not know) it is wider.
* The sandwich-adjusted draws (open-faced sandwich) have the sandwich covariance exactly,
  keep the draws' mean and shape, and leave the draws alone when the two covariances agree.
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tests.lens.test_model import CONFIG, SIGMA, TRUTH, SmoothSourceModel
from tfhybrid.lens.fit import LensSamples, coverage_flags, laplace_hessian
from tfhybrid.lens.model import LensPosterior
from tfhybrid.lens.robust import RobustIntervals, sandwich_adjusted_samples, sandwich_intervals
from tfhybrid.physics.lensing import PARAM_NAMES, simulate_lensed_image
from tfhybrid.validation import TfhybridInputError

NAMES = ("r_ein", "gamma", "q", "phi", "theta_e")


@pytest.fixture(scope="module")
def setup():
    vae = SmoothSourceModel()
    z = np.full((1, 8), 0.3, np.float32)
    image = simulate_lensed_image(vae.decode(z).numpy(), {k: [v] for k, v in TRUTH.items()},
                                  CONFIG).numpy()
    rng = np.random.default_rng(5)
    white = rng.normal(size=(4,) + image.shape[1:])
    smooth = np.stack([ndimage.gaussian_filter(w, 2.0) for w in white])
    smooth /= smooth.std()
    return dict(vae=vae, z=z, image=image, white=SIGMA * white, correlated=SIGMA * smooth)


def _intervals(setup, noise, block_size=8):
    obs = (setup["image"] + noise).astype(np.float32)
    post = LensPosterior(obs, SIGMA, setup["vae"], CONFIG)
    state = post.state_from_dict(dict(TRUTH, z=setup["z"][0]), lead_shape=(len(obs),))
    return post, state, sandwich_intervals(post, state, block_size=block_size)


def test_gauss_newton_hessian_matches_the_finite_difference_one(setup):
    post, state, ri = _intervals(setup, setup["white"][:1])
    hess = laplace_hessian(post, state, scheme="central")[0]
    gn = ri.hessian[0]
    # Gauss-Newton drops the residuals' curvature term (Σ r ∂²I / σ², noise-sized at the
    # truth; it gives the finite-difference Hessian one negative eigenvalue here) and the
    # central differences carry float32 noise: measured 0.35 % (Frobenius) and 2.4 % of
    # sqrt(H_ii H_jj) at worst
    assert np.linalg.norm(gn - hess) / np.linalg.norm(hess) < 0.02
    scale = np.sqrt(np.outer(np.abs(np.diag(hess)), np.abs(np.diag(hess))))
    assert np.max(np.abs(gn - hess) / scale) < 0.06
    # the delta method: r_Ein's Laplace width from H through its bijector, by hand
    cov = np.linalg.inv(gn)
    bij = post.bijectors()[PARAM_NAMES.index("r_ein")]
    u = bij.inverse(tf.constant(TRUTH["r_ein"], tf.float32))
    dr = float((bij.forward(u + 1e-3) - bij.forward(u - 1e-3)) / 2e-3)
    i = PARAM_NAMES.index("r_ein")
    np.testing.assert_allclose(ri.laplace_sd["r_ein"][0], np.sqrt(cov[i, i]) * abs(dr),
                               rtol=1e-3)


def test_sandwich_agrees_with_laplace_for_white_noise_and_widens_for_a_misfit(setup):
    _, _, white = _intervals(setup, setup["white"])
    _, _, corr = _intervals(setup, setup["correlated"])
    for name in NAMES:
        w = np.median(white.inflation()[name])
        c = np.median(corr.inflation()[name])
        # white: 64 overlapping 8-pixel windows' worth of blocks, the meat's noise ~ 20 %
        assert 0.7 < w < 1.3, (name, white.inflation()[name])
        # correlated noise (σ 2 pixels): the variance of a sum of N correlated pixels is
        # ~ 4π σ² = 50 times the white one; the 8-pixel Bartlett window sees part of it
        # (the widths' ratio for r_Ein: 2.1-2.7 over the four noise images)
        assert c > 1.8, (name, corr.inflation()[name])
    lo, hi = corr.interval(0.68)["r_ein"]
    np.testing.assert_allclose(0.5 * (lo + hi), TRUTH["r_ein"], rtol=1e-6)
    np.testing.assert_allclose(hi - lo, 2 * 0.99446 * corr.sd["r_ein"], rtol=1e-4)
    # the truth is the intervals' centre here, so every interval covers it
    flags = coverage_flags(dict((k, np.full(4, v)) for k, v in TRUTH.items()), corr)
    assert all(np.all(v) for v in flags.values())


def test_bad_input(setup):
    post, state, _ = _intervals(setup, setup["white"][:1])
    with pytest.raises(TfhybridInputError, match="block_size"):
        sandwich_intervals(post, state, block_size=0)
    with pytest.raises(TfhybridInputError, match="block_size"):
        sandwich_intervals(post, state, block_size=65)
    with pytest.raises(TfhybridInputError, match="LensPosterior"):
        sandwich_intervals(object(), state)
    with pytest.raises(TfhybridInputError, match="probability"):
        _intervals(setup, setup["white"][:1])[2].interval(1.5)


def _draws_and_intervals(post, sigma_s, rng, n=4000, stuck=False):
    """Draws of two systems in the unconstrained coordinates (Gaussian, the second coordinate
    skewed) mapped through the priors' bijectors; RobustIntervals with covariance ``sigma_s``."""
    k, s = len(PARAM_NAMES), 2
    bijs = post.bijectors()[:k]
    center = np.array([float(b.inverse(tf.constant(TRUTH[name], tf.float32))) if b else
                       TRUTH[name] for name, b in zip(PARAM_NAMES, bijs, strict=True)])
    mix = rng.normal(size=(s, k, k)) * 0.02
    u = center + np.einsum("sij,nsj->nsi", mix, rng.normal(size=(n, s, k)))
    u[..., 1] += 0.03 * rng.gamma(2.0, size=(n, s))  # a skewed coordinate
    if stuck:
        u[:, 1] = u[0, 1]  # the second system's chain never moved
    params = {name: (np.asarray(b.forward(tf.constant(u[..., i], tf.float32)), np.float64)
                     if b else u[..., i]).reshape(n, 1, s)
              for i, (name, b) in enumerate(zip(PARAM_NAMES, bijs, strict=True))}
    d = k + 8
    cov = np.zeros((s, d, d))
    cov[:, :k, :k] = sigma_s
    cov[:, k:, k:] = np.eye(8)
    robust = RobustIntervals({}, {}, {}, cov, np.zeros_like(cov), 8)
    return LensSamples(params, np.zeros((n, 1, s, 8), np.float32), None), robust


def _unconstrained(post, samples):
    bijs = post.bijectors()[:len(PARAM_NAMES)]
    return np.stack([np.asarray(b.inverse(tf.constant(samples.params[n], tf.float32)))
                     if b else samples.params[n] for n, b in zip(PARAM_NAMES, bijs, strict=True)],
                    axis=-1).reshape(-1, 2, len(PARAM_NAMES)).astype(np.float64)


def test_adjusted_draws_have_the_sandwich_covariance_and_keep_mean_and_shape(setup):
    post, _, _ = _intervals(setup, setup["white"][:1])
    rng = np.random.default_rng(3)
    k = len(PARAM_NAMES)
    a = rng.normal(size=(2, k, k)) * 0.03
    sigma_s = a @ np.swapaxes(a, -1, -2) + 1e-4 * np.eye(k)  # a random target covariance
    samples, robust = _draws_and_intervals(post, sigma_s, rng)
    adjusted = sandwich_adjusted_samples(samples, robust, post)
    u, v = _unconstrained(post, samples), _unconstrained(post, adjusted)
    # float32 bijector round trips: relative errors ~1e-5 on spreads of ~0.03
    np.testing.assert_allclose(v.mean(0), u.mean(0), atol=2e-5)
    cov = np.einsum("nsi,nsj->sij", v - v.mean(0), v - v.mean(0)) / (len(v) - 1)
    np.testing.assert_allclose(cov, sigma_s, atol=3e-3 * np.max(np.abs(sigma_s)))
    assert np.array_equal(adjusted.z, samples.z)
    # the draws' coordinates are linear maps of the originals: a diagonal target of the
    # draws' own variances (correlations dropped) changes them, but keeps each coordinate's
    # skewness when the draws' covariance is diagonal too (symmetric roots: Ω diagonal)
    from scipy import stats

    iid = np.stack([rng.normal(size=4000), 0.03 * rng.gamma(2.0, size=4000)], -1)
    diag = rng.normal(size=(4000, 2, k)) * 0.01
    diag[..., 0], diag[..., 1] = iid[:, None, 0] * 0.02, iid[:, None, 1]
    diag += _unconstrained(post, samples).mean(0)
    draws = LensSamples({n: (np.asarray(b.forward(tf.constant(diag[..., i], tf.float32)),
                                        np.float64) if b else diag[..., i]).reshape(4000, 1, 2)
                         for i, (n, b) in enumerate(zip(PARAM_NAMES,
                                                        post.bijectors()[:k], strict=True))},
                        samples.z[:1].repeat(4000, 0), None)
    target = np.zeros((2, k, k))
    target[:, 0, 0], target[:, 1, 1] = 4e-4 * 4, np.var(diag[:, 0, 1]) * 9
    target[:, 2:, 2:] = np.eye(k - 2) * 1e-6
    robust_d = RobustIntervals({}, {}, {}, np.pad(target, ((0, 0), (0, 8), (0, 8))),
                               np.zeros((2, k + 8, k + 8)), 8)
    out = _unconstrained(post, sandwich_adjusted_samples(draws, robust_d, post))
    np.testing.assert_allclose(out[:, 0, 1].std() / diag[:, 0, 1].std(), 3.0, rtol=1e-3)
    np.testing.assert_allclose(stats.skew(out[:, 0, 1]), stats.skew(diag[:, 0, 1]), atol=1e-3)
    assert stats.skew(diag[:, 0, 1]) > 0.5  # the shape that is kept is not a Gaussian's


def test_adjustment_is_the_identity_when_the_covariances_agree(setup):
    post, _, _ = _intervals(setup, setup["white"][:1])
    rng = np.random.default_rng(4)
    samples, _ = _draws_and_intervals(post, np.eye(len(PARAM_NAMES)), rng, n=2000)
    u = _unconstrained(post, samples)
    own = np.einsum("nsi,nsj->sij", u - u.mean(0), u - u.mean(0)) / (len(u) - 1)
    _, robust = _draws_and_intervals(post, own, rng, n=2)
    adjusted = sandwich_adjusted_samples(samples, robust, post)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(adjusted.params[name], samples.params[name],
                                   rtol=1e-4, atol=1e-6, err_msg=name)
    # and the intervals then coincide with the draws' own
    for name, (lo, hi) in adjusted.interval(0.68).items():
        lo0, hi0 = samples.interval(0.68)[name]
        np.testing.assert_allclose(lo, lo0, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(hi, hi0, rtol=1e-4, atol=1e-6)


def test_adjustment_leaves_a_stuck_chain_and_refuses_bad_input(setup):
    post, _, _ = _intervals(setup, setup["white"][:1])
    rng = np.random.default_rng(5)
    samples, robust = _draws_and_intervals(post, np.eye(len(PARAM_NAMES)) * 1e-3, rng,
                                           n=500, stuck=True)
    adjusted = sandwich_adjusted_samples(samples, robust, post)
    for name in PARAM_NAMES:
        assert np.all(np.isfinite(adjusted.params[name]))
        np.testing.assert_allclose(adjusted.params[name][:, :, 1],
                                   samples.params[name][:, :, 1], rtol=1e-5, atol=1e-7)
    v = _unconstrained(post, adjusted)[:, 0]  # the first system's draws are adjusted
    np.testing.assert_allclose(v.var(0, ddof=1), 1e-3, rtol=1e-2)
    one = RobustIntervals({}, {}, {}, robust.covariance[:1], robust.hessian[:1], 8)
    with pytest.raises(TfhybridInputError, match="same systems"):
        sandwich_adjusted_samples(samples, one, post)
    with pytest.raises(TfhybridInputError, match="LensSamples"):
        sandwich_adjusted_samples(samples.params, robust, post)
    with pytest.raises(TfhybridInputError, match="RobustIntervals"):
        sandwich_adjusted_samples(samples, robust.covariance, post)
    bad = LensSamples(dict(samples.params, q=samples.params["q"] + 5.0), samples.z, None)
    with pytest.raises(TfhybridInputError, match="outside the priors' supports"):
        sandwich_adjusted_samples(bad, robust, post)

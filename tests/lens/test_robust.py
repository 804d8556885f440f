"""Tests of tfhybrid.lens.robust (sandwich intervals) on the small self-consistent problem of
test_model.py (64 × 64 pixels, a smooth source model that represents its source exactly).

* The Gauss–Newton Hessian agrees with the finite-difference Hessian of eq. 26
  (:func:`tfhybrid.lens.fit.laplace_hessian`): this checks the image Jacobian and the
  prior's Hessian; r_Ein's width follows from it through its bijector.
* With white noise (the model right) the sandwich agrees with the Laplace width; with
  spatially correlated noise (a misfit the white likelihood does not know) it is wider.
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tests.lens.test_model import CONFIG, SIGMA, TRUTH, SmoothSourceModel
from tfhybrid.lens.fit import coverage_flags, laplace_hessian
from tfhybrid.lens.model import LensPosterior
from tfhybrid.lens.robust import sandwich_intervals
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

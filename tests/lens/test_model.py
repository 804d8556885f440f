"""Tests of tfhybrid.lens.model and tfhybrid.lens.fit on a small, self-consistent problem.

The source model is a small VAE with fixed random weights (training is not what is tested
here): a mock whose source IS the decoder output at a known z is exactly representable, so the
MAP must land on the truth up to the noise. The grid is 64 × 64 at 0.16″ (the paper's 10″ field
at a quarter of the resolution) to keep the tests fast.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.lens.fit import (
    LensSamples,
    coverage,
    fit_map,
    parameter_table,
    polish_with_source_residual,
    sample_lens_posterior,
)
from tfhybrid.lens.model import (
    STATE_NAMES,
    LensPosterior,
    LensPriorConfig,
    normal_log_density,
    parameter_prior,
)
from tfhybrid.physics.lensing import PARAM_NAMES, LensingConfig, simulate_lensed_image
from tfhybrid.physics.source_residual import SourceResidualConfig
from tfhybrid.validation import TfhybridInputError

CONFIG = LensingConfig(n_pix=64, pixel_scale_arcsec=0.16, psf_sigma_arcsec=0.2)
TRUTH = dict(
    r_ein=1.3,
    gamma=2.1,
    q=0.7,
    phi=0.4,
    theta_lens1=0.05,
    theta_lens2=-0.1,
    gamma1=0.03,
    gamma2=-0.02,
    theta_src1=0.05,
    theta_src2=0.02,
    s=1.6,
    iota=1.0,
)
SIGMA = 0.01


class SmoothSourceModel:
    """A stand-in for the VAE with the interface LensPosterior uses (decode, latent_prior).

    d(z) is a smooth elliptical blob plus two knots whose shapes and brightnesses are set by
    z (8-d): smooth, so the lensing likelihood is well posed, and exactly representable, so the
    MAP must land on the truth. The VAE itself is tested in tests/priors/test_vae.py.
    """

    latent_dim = 8

    def __init__(self):
        c = (np.arange(64) - 31.5) / 32.0
        self._v, self._u = (tf.constant(a, tf.float32) for a in np.meshgrid(c, c, indexing="ij"))
        self.latent_prior = tfp.distributions.MultivariateNormalTriL(
            tf.zeros(8), tf.linalg.diag(tf.fill([8], 3.0))
        )

    def decode(self, z):
        z = tf.convert_to_tensor(z, tf.float32)
        zz = [z[..., i, None, None] for i in range(8)]
        u, v = self._u, self._v
        e1, e2 = 0.2 * tf.tanh(zz[0]), 0.2 * tf.tanh(zz[1])
        r2 = ((1 - e1) * u**2 + (1 + e1) * v**2 - 2 * e2 * u * v) / (
            0.2 + 0.05 * tf.tanh(zz[2])
        ) ** 2
        blob = tf.exp(-0.5 * r2)
        k1 = tf.sigmoid(zz[3]) * tf.exp(
            -0.5 * ((u - 0.2 * tf.tanh(zz[4])) ** 2 + (v - 0.2) ** 2) / 0.01
        )
        k2 = tf.sigmoid(zz[5]) * tf.exp(
            -0.5 * ((u + 0.25) ** 2 + (v - 0.2 * tf.tanh(zz[6])) ** 2) / 0.01
        )
        return blob + 0.5 * k1 + 0.5 * k2 + 0.0 * zz[7]


@pytest.fixture(scope="module")
def vae():
    return SmoothSourceModel()


@pytest.fixture(scope="module")
def problem(vae):
    z_true = np.full((1, 8), 0.3, np.float32)
    image = simulate_lensed_image(
        vae.decode(z_true).numpy(), {k: [v] for k, v in TRUTH.items()}, CONFIG
    ).numpy()
    rng = np.random.default_rng(1)
    observed = image + SIGMA * rng.normal(size=image.shape)
    return dict(z=z_true, observed=observed.astype(np.float32), noiseless=image)


def test_joint_distribution_matches_target_and_hand_computation(vae, problem):
    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    state = post.state_from_dict(dict(TRUTH, z=problem["z"][0]))
    lp = post.target_log_prob(*state).numpy()
    # hand computation of eq. 26
    model = simulate_lensed_image(
        vae.decode(problem["z"]).numpy(), {k: [v] for k, v in TRUTH.items()}, CONFIG
    ).numpy()
    r = (problem["observed"] - model) / SIGMA
    n = model.size
    loglik = -0.5 * np.sum(r**2) - 0.5 * n * np.log(2 * np.pi) - n * np.log(SIGMA)
    prior = (
        parameter_prior()
        .log_prob({k: tf.constant([v], tf.float32) for k, v in TRUTH.items()})
        .numpy()
    )
    latent = vae.latent_prior.log_prob(problem["z"]).numpy()
    expected = loglik + prior + latent
    # float32 sums over 4096 pixels: relative 1e-5 of |log p| ~ 1e4 is ~0.1 nat
    np.testing.assert_allclose(lp, expected, rtol=1e-5)
    jd = post.joint_distribution()
    values = dict(zip(STATE_NAMES, state, strict=True))
    values["observed"] = tf.constant(problem["observed"])
    np.testing.assert_allclose(jd.log_prob(values).numpy(), lp.sum(), rtol=1e-5)
    # sampling the joint gives a complete system
    draw = jd.sample(seed=(4, 2))
    assert draw["observed"].shape == (1, 64, 64) and draw["z"].shape == (1, 8)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_closed_form_prior_equals_the_joint_distributions_log_prob(vae, problem, dtype):
    """log_prior sums normal_log_density instead of calling the JD: same density and gradient.

    Tolerances: float32 rounding of terms of size up to ~50 (1 ulp there is 3.8e-6: atol 1e-5,
    ~3 ulp; measured worst 4.8e-7); in float64 the normalisers (erfc in float64 against TFP's
    log_ndtr) and the terms agree to 1e-12.
    Points: prior draws, the truncation bounds (finite) and just outside them (−inf), and a
    far upper tail (the normaliser from the upper tail, where 1 − Φ loses its digits).
    """
    jd = parameter_prior(dtype=dtype)
    draws = jd.sample(2000, seed=(3, 9))
    atol = 1e-5 if dtype == tf.float32 else 1e-12
    for name, dist in jd.model.items():
        density = normal_log_density(dist)
        assert density is not None, name
        np.testing.assert_allclose(density(draws[name]).numpy(), dist.log_prob(draws[name]),
                                   rtol=0, atol=atol, err_msg=name)
        if isinstance(dist, tfp.distributions.TruncatedNormal):
            low, high = float(dist.low), float(dist.high)
            edges = tf.constant([low, high, low - 1e-3, high + 1e-3], dtype)
            got, want = density(edges).numpy(), dist.log_prob(edges).numpy()
            np.testing.assert_allclose(got[:2], want[:2], rtol=0, atol=atol, err_msg=name)
            assert np.all(got[2:] == -np.inf) and np.all(want[2:] == -np.inf), name
    tail = tfp.distributions.TruncatedNormal(tf.constant(0.0, tf.float64),
                                             tf.constant(1.0, tf.float64),
                                             tf.constant(9.0, tf.float64),
                                             tf.constant(9.5, tf.float64))
    x = tf.constant([9.0, 9.2, 9.5], tf.float64)
    np.testing.assert_allclose(normal_log_density(tail)(x).numpy(), tail.log_prob(x).numpy(),
                               rtol=1e-9)
    # non-constant or other distributions are not rewritten
    assert normal_log_density(tfp.distributions.Laplace(0.0, 1.0)) is None
    assert normal_log_density(tfp.distributions.Normal(tf.zeros(3), 1.0)) is None

    # the posterior's log_prior and its gradient against the JD's log_prob + the latent prior
    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    assert post._prior_terms is not None  # the closed form is what is under test
    state = [tf.constant(np.asarray(p)) for p in post.initial_states(6, seed=2)]

    def both(parts):
        params = dict(zip(PARAM_NAMES, parts[:-1], strict=True))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(parts)
            fast = post.log_prior(params, parts[-1])
            slow = post.parameter_prior().log_prob(params) + vae.latent_prior.log_prob(parts[-1])
        return fast, slow, tape.gradient(fast, parts), tape.gradient(slow, parts)

    fast, slow, g_fast, g_slow = both(state)
    assert fast.shape == (6, 1)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=0, atol=1e-5)
    for name, a, b in zip(STATE_NAMES, g_fast, g_slow, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_batched_systems_equal_separate(vae, problem):
    obs2 = np.concatenate([problem["observed"], problem["observed"][:, ::-1]])
    post2 = LensPosterior(obs2, [SIGMA, 2 * SIGMA], vae, CONFIG)
    post_a = LensPosterior(obs2[:1], SIGMA, vae, CONFIG)
    post_b = LensPosterior(obs2[1:], 2 * SIGMA, vae, CONFIG)
    st = post2.initial_states(3, seed=5)  # (3 starts, 2 systems)
    both = post2.target_log_prob(*st).numpy()
    a = post_a.target_log_prob(*[s[:, :1] for s in st]).numpy()
    b = post_b.target_log_prob(*[s[:, 1:] for s in st]).numpy()
    np.testing.assert_allclose(both, np.concatenate([a, b], axis=1), rtol=1e-6)


RESIDUAL = SourceResidualConfig(grid_size=6, pixel_factor=4.0)


def test_source_residual_likelihood_equals_the_dense_marginal(vae, problem):
    """Woodbury + per-cell moments against a dense N(I_pred, σ² I + σ_δ² B Bᵀ), where the
    columns of B are the lensed unit residuals of residual_image (an independent code path:
    bilinear interpolation of the grid image)."""
    from scipy.stats import multivariate_normal

    sigma_res = 0.05
    white = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    post = white.with_source_residual(RESIDUAL, sigma_res)
    assert post.residual_sigma_values.shape == (1,)
    state = post.state_from_dict(dict(TRUTH, z=problem["z"][0], q=0.72, r_ein=1.28))
    params = dict(zip(PARAM_NAMES, state[:-1], strict=True))
    m = RESIDUAL.grid_size
    unit = np.eye(m * m, dtype=np.float32).reshape(m * m, m, m)
    columns = [post.residual_image(params, unit[j][None]).numpy().reshape(-1)
               for j in range(m * m)]
    design = np.stack(columns, 1).astype(np.float64)  # (n_pix², M)
    assert np.count_nonzero(design.sum(0)) > m * m // 2  # the grid is lensed into the image
    resid = (problem["observed"] - post.predict(params, state[-1]).numpy()).reshape(-1)
    n = resid.size
    cov = SIGMA**2 * np.eye(n) + sigma_res**2 * design @ design.T
    dense = multivariate_normal(np.zeros(n), cov).logpdf(resid.astype(np.float64))
    got = post.log_likelihood(params, state[-1]).numpy()[0]
    # float32 over 4096 pixels: ~1e-6 relative of a ~1e4 log density, and the correction
    # (tens of nats) is computed to ~1e-4 of itself
    np.testing.assert_allclose(got, dense, rtol=2e-6, atol=0.05)
    base = white.log_likelihood(params, state[-1]).numpy()[0]
    assert got != pytest.approx(base, abs=0.5)  # the residual changes the density
    # the joint distribution: the residual as an explicit part, added to the image
    jd = post.joint_distribution()
    draw = jd.sample(seed=(3, 1))
    assert draw["residual"].shape == (1, m, m) and draw["observed"].shape == (1, 64, 64)
    values = dict(zip(STATE_NAMES, state, strict=True))
    delta = 0.05 * np.random.default_rng(2).normal(size=(1, m, m)).astype(np.float32)
    values.update(residual=tf.constant(delta), observed=tf.constant(problem["observed"]))
    shifted = LensPosterior(problem["observed"] - post.residual_image(params, delta).numpy(),
                            SIGMA, vae, CONFIG)
    prior_delta = np.sum(-0.5 * (delta / sigma_res) ** 2 - np.log(sigma_res * np.sqrt(2 * np.pi)))
    expected = shifted.target_log_prob(*state).numpy().sum() + prior_delta
    np.testing.assert_allclose(jd.log_prob(values).numpy(), expected, rtol=1e-5)


def test_source_residual_batches_and_validates(vae, problem):
    obs2 = np.concatenate([problem["observed"], problem["observed"][:, ::-1]])
    post2 = LensPosterior(obs2, [SIGMA, 2 * SIGMA], vae, CONFIG, source_residual=RESIDUAL,
                          residual_sigma=[0.02, 0.05])
    post_b = LensPosterior(obs2[1:], 2 * SIGMA, vae, CONFIG, source_residual=RESIDUAL,
                           residual_sigma=0.05)
    st = post2.initial_states(3, seed=5)
    both = post2.target_log_prob(*st).numpy()
    b = post_b.target_log_prob(*[s[:, 1:] for s in st]).numpy()
    np.testing.assert_allclose(both[:, 1:], b, rtol=1e-6)
    # σ_δ re-chosen in place (the residual polish's rounds): a graph traced before reads the
    # new values without retracing, and agrees with a posterior built with them
    traced = tf.function(post2.target_log_prob)
    before = traced(*st).numpy()
    post2._assign_residual_sigma([0.05, 0.02])
    fresh = LensPosterior(obs2, [SIGMA, 2 * SIGMA], vae, CONFIG, source_residual=RESIDUAL,
                          residual_sigma=[0.05, 0.02])
    after = traced(*st).numpy()
    # (graph against eager: float32 sums in another order, ~4e-6 of a -4e5 log density)
    np.testing.assert_allclose(after, fresh.target_log_prob(*st).numpy(), rtol=2e-5)
    assert np.all(after != before) and traced.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(post2.residual_sigma_values, [0.05, 0.02], rtol=1e-6)
    with pytest.raises(TfhybridInputError, match="finite and > 0"):
        post2._assign_residual_sigma([0.05, np.nan])
    with pytest.raises(TfhybridInputError, match="no source residual"):
        post2.with_source_residual(None)._assign_residual_sigma(0.1)
    obs = problem["observed"]
    with pytest.raises(TfhybridInputError, match="needs residual_sigma"):
        LensPosterior(obs, SIGMA, vae, CONFIG, source_residual=RESIDUAL)
    with pytest.raises(TfhybridInputError, match="without source_residual"):
        LensPosterior(obs, SIGMA, vae, CONFIG, residual_sigma=0.1)
    with pytest.raises(TfhybridInputError, match="finite and > 0"):
        LensPosterior(obs, SIGMA, vae, CONFIG, source_residual=RESIDUAL, residual_sigma=-0.1)
    with pytest.raises(TfhybridInputError, match="shape"):
        LensPosterior(obs, SIGMA, vae, CONFIG, source_residual=RESIDUAL,
                      residual_sigma=[0.1, 0.2])
    with pytest.raises(TfhybridInputError, match="SourceResidualConfig"):
        LensPosterior(obs, SIGMA, vae, CONFIG, source_residual=dict(grid_size=6),
                      residual_sigma=0.1)
    config2 = LensingConfig(n_pix=64, pixel_scale_arcsec=0.16, psf_sigma_arcsec=0.2,
                            supersampling=2)
    with pytest.raises(TfhybridInputError, match="supersampling=1"):
        LensPosterior(obs, SIGMA, vae, config2, source_residual=RESIDUAL, residual_sigma=0.1)


def _knotted_observation(vae, problem, amplitude):
    """The problem's image with a knot the source model cannot make added to the source."""
    c = (np.arange(64) - 31.5) / 32.0
    v, u = np.meshgrid(c, c, indexing="ij")
    knot = amplitude * np.exp(-0.5 * ((u - 0.1) ** 2 + (v + 0.15) ** 2) / 0.05**2)
    source = vae.decode(problem["z"]).numpy() + knot[None].astype(np.float32)
    image = simulate_lensed_image(source, {k: [v_] for k, v_ in TRUTH.items()}, CONFIG).numpy()
    noise = SIGMA * np.random.default_rng(7).normal(size=image.shape)
    return (image + noise).astype(np.float32)


def test_evidence_asks_for_a_residual_only_where_the_source_model_misses():
    from tfhybrid.lens.fit import RESIDUAL_SIGMA_GRID, residual_sigma_by_evidence

    vae = SmoothSourceModel()
    z_true = np.full((1, 8), 0.3, np.float32)
    problem = dict(z=z_true)
    exact = _knotted_observation(vae, problem, 0.0)
    knotted = _knotted_observation(vae, problem, 0.4)
    post = LensPosterior(np.concatenate([exact, knotted]), SIGMA, vae, CONFIG)
    state = post.state_from_dict(dict(TRUTH, z=z_true[0]))
    sigma, gain = residual_sigma_by_evidence(post, state, RESIDUAL)
    # no misfit: the Occam factor wins, the smallest sigma_delta and no evidence gained
    assert sigma[0] < 3 * RESIDUAL_SIGMA_GRID[0] and abs(gain[0]) < 2.0, (sigma, gain)
    # a knot of 0.4 (40 sigma per pixel before lensing): a residual of a few per cent of
    # the source's peak, worth hundreds of nats (measured: sigma ~0.1, gain ~1e3)
    assert 0.01 < sigma[1] < 0.3 and gain[1] > 100.0, (sigma, gain)
    with pytest.raises(TfhybridInputError, match="grid"):
        residual_sigma_by_evidence(post, state, RESIDUAL, grid=[0.1, 0.2])


def test_fit_map_with_a_source_residual_polishes_and_samples_that_posterior(vae, problem,
                                                                            monkeypatch):
    import tfhybrid.lens.fit as fit_module

    knotted = _knotted_observation(vae, problem, 0.4)
    post = LensPosterior(knotted, SIGMA, vae, CONFIG)
    init = post.state_from_dict(dict(TRUTH, z=problem["z"][0]), lead_shape=(1, 1))
    calls, polish, started = [], fit_module.newton_polish, []
    start_graph = fit_module._start_residual_polish_graph

    def spy(posterior, state, **kwargs):
        traced = [f.experimental_get_tracing_count() for f in
                  vars(posterior).get("_value_and_gradient_fns", {}).values()]
        out = polish(posterior, state, **kwargs)
        calls.append((posterior, kwargs.get("start_hessian"), out[2], traced, kwargs))
        return out

    def spy_start(*args):
        started.append(start_graph(*args))
        return started[-1]

    monkeypatch.setattr(fit_module, "newton_polish", spy)
    monkeypatch.setattr(fit_module, "_start_residual_polish_graph", spy_start)
    fit = fit_map(post, initial_state=init, num_steps=100, newton_iter=1, lbfgs_iter=20,
                  lbfgs_cycles=2, source_residual=RESIDUAL, residual_rounds=2, progress=False)
    # the white polish, then the residual one, whose Newton starts from the white Hessian;
    # then a second residual round (σ_δ re-chosen): no Newton, one L-BFGS run whitened by the
    # first round's Hessian
    assert [c[0].source_residual for c in calls] == [None, RESIDUAL, RESIDUAL]
    assert calls[0][1] is None and calls[1][1] is calls[0][2] and calls[2][1] is calls[1][2]
    assert [(c[4]["num_iter"], c[4]["lbfgs_cycles"]) for c in calls] == [(1, 2), (1, 2), (0, 1)]
    assert calls[2][0] is calls[1][0] and fit.hessian is calls[2][2]
    # the residual polish ran on the posterior whose graph was compiled in the background
    # during the white polish: traced once before the polish began, and not again
    assert len(started) == 1 and started[0][1].done() and calls[1][0] is started[0][0]
    assert calls[1][3] == [1]
    assert [f.experimental_get_tracing_count() for f in
            vars(calls[1][0])["_value_and_gradient_fns"].values()] == [1]
    assert fit.source_residual == RESIDUAL and fit.residual_sigma.shape == (1,)
    assert fit.residual_gain[0] > 100.0 and "source residual" in fit.message
    post_r = fit.posterior_of(post)
    assert post_r.source_residual == RESIDUAL
    np.testing.assert_allclose(fit.log_prob, post_r.target_log_prob(*fit.state()).numpy(),
                               rtol=1e-5)
    # the polish climbed the residual posterior (the truth is not its mode: the knot is a
    # strong, non-Gaussian feature that biases the white fit and this one alike)
    truth_lp = post_r.target_log_prob(*post.state_from_dict(dict(TRUTH, z=problem["z"][0])))
    assert fit.log_prob[0] > truth_lp.numpy()[0]
    # the sampler (here with the opt-in whitening at the posterior's scale) runs on the
    # residual posterior
    rewhitened = []

    def spy_whitening(fn, flat, amat, step, floor):
        rewhitened.append((step, floor, amat.shape))
        return real_whitening(fn, flat, amat, step, floor)

    real_whitening = fit_module.posterior_scale_whitening
    monkeypatch.setattr(fit_module, "posterior_scale_whitening", spy_whitening)
    samples = sample_lens_posterior(post, fit, num_results=4, num_burnin=0, progress=False,
                                    whitening_step=1.0)
    assert np.all(np.isfinite(samples.params["r_ein"]))
    assert rewhitened == [(1.0, 2e-3, fit.hessian.shape)]
    with pytest.raises(TfhybridInputError, match="already has a source residual"):
        fit_map(post_r, initial_state=init, source_residual=RESIDUAL, progress=False)
    with pytest.raises(TfhybridInputError, match="newton_iter >= 1"):
        fit_map(post, initial_state=init, source_residual=RESIDUAL, newton_iter=0,
                progress=False)
    with pytest.raises(TfhybridInputError, match="residual_rounds must be >= 1; got 0"):
        fit_map(post, initial_state=init, source_residual=RESIDUAL, residual_rounds=0,
                progress=False)
    with pytest.raises(TfhybridInputError, match="rounds and newton_iter must be >= 1"):
        polish_with_source_residual(post, fit, RESIDUAL, rounds=0)
    with pytest.raises(TfhybridInputError, match="later_cycles must be an int >= 0; got -1"):
        polish_with_source_residual(post, fit, RESIDUAL, later_cycles=-1)


def test_bijectors_keep_parameters_in_support(vae, problem):
    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    bij = post.bijectors()
    rng = np.random.default_rng(2)
    prior = post.parameter_prior()
    for name, b in zip(PARAM_NAMES, bij[:-1], strict=True):
        if b is None:
            continue
        x = b.forward(tf.constant(rng.normal(scale=10.0, size=1000), tf.float32)).numpy()
        d = prior.model[name]
        assert np.all(x >= d.low.numpy()) and np.all(x <= d.high.numpy()), name
        assert np.all(
            np.isfinite(d.log_prob(np.clip(x, d.low.numpy() + 1e-6, d.high.numpy() - 1e-6)).numpy())
        )


def test_map_recovers_truth_on_self_consistent_mock(vae, problem):
    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    # start near the truth with every parameter perturbed (the test is of the optimiser and the
    # gradients of the whole pipeline, not of the global search)
    start = dict(
        TRUTH, r_ein=1.2, gamma=2.0, q=0.8, phi=0.3, s=1.5, iota=0.9, z=np.zeros(8, np.float32)
    )
    state = post.state_from_dict(start, lead_shape=(1, 1))
    fit = fit_map(post, initial_state=state, num_steps=1500, progress=False)
    est = fit.params
    # the noise (S/N of several hundred) limits r_Ein to ~0.1 %: allow 1 %
    assert abs(est["r_ein"][0] / TRUTH["r_ein"] - 1) < 0.01, est["r_ein"]
    assert abs(est["gamma"][0] / TRUTH["gamma"] - 1) < 0.03, est["gamma"]
    assert abs(est["q"][0] - TRUTH["q"]) < 0.03, est["q"]
    chi2 = np.mean(
        (
            (post.predict({k: v for k, v in est.items()}, fit.z).numpy() - problem["observed"])
            / SIGMA
        )
        ** 2
    )
    assert chi2 < 1.1, chi2  # residuals at the noise level
    rows = parameter_table({k: [v] for k, v in TRUTH.items()}, fit)
    assert {r["parameter"] for r in rows} >= {"r_ein", "theta_e", "gamma", "phi"}
    row = next(r for r in rows if r["parameter"] == "theta_e")
    assert row["map"] == pytest.approx(np.sqrt(est["q"][0]) * est["r_ein"][0], rel=1e-6)
    assert row["true"] == pytest.approx(np.sqrt(TRUTH["q"]) * TRUTH["r_ein"], rel=1e-12)

    # a short HMC run from the MAP stays around it and brackets the truth
    samples = sample_lens_posterior(
        post, fit, num_results=120, num_burnin=40, seed=3, progress=False
    )
    r = samples.params["r_ein"].ravel()
    assert np.all(np.isfinite(r))
    assert samples.result.diagnostics["acceptance_rate"] > 0.3
    sd = max(r.std(), 1e-4)
    # 120 correlated draws: the posterior mean is within 5 posterior sd of the truth
    assert abs(r.mean() - TRUTH["r_ein"]) < 5 * sd + 2e-3, (r.mean(), sd)

    # the polished MAP of this smooth, self-consistent problem is the mode: no draw beats it,
    # and the best draw lies in the typical set (a Gaussian's best of 120 draws in D = 20
    # dimensions sits ~D/2 - 2 sqrt(D/2) = 4 nats below the mode; allow up to D)
    gap = samples.mode_gap(post, fit.log_prob, every=1)
    assert gap.shape == (1,) and -20.0 < gap[0] < 0.0, gap
    draws = [samples.params[k][:, 0] for k in PARAM_NAMES] + [samples.z[:, 0]]
    direct = post.target_log_prob(*[tf.constant(d, tf.float32) for d in draws]).numpy()
    np.testing.assert_allclose(gap, direct.max(0) - fit.log_prob, atol=0.05)
    with pytest.raises(TfhybridInputError, match="every"):
        samples.mode_gap(post, fit.log_prob, every=0)


def test_bad_input(vae, problem):
    with pytest.raises(TfhybridInputError, match="shape"):
        LensPosterior(np.zeros((2, 32, 32)), SIGMA, vae, CONFIG)
    bad = problem["observed"].copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(TfhybridInputError, match="NaN"):
        LensPosterior(bad, SIGMA, vae, CONFIG)
    with pytest.raises(TfhybridInputError, match="noise"):
        LensPosterior(problem["observed"], -1.0, vae, CONFIG)
    with pytest.raises(TfhybridInputError, match="GalaxyVAE"):
        LensPosterior(problem["observed"], SIGMA, object(), CONFIG)
    with pytest.raises(TfhybridInputError, match="shear_std"):
        LensPriorConfig(shear_std=0.0)
    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    with pytest.raises(TfhybridInputError, match="lbfgs_iter must be an int >= 0"):
        fit_map(post, lbfgs_iter=-1, progress=False)
    with pytest.raises(TfhybridInputError, match="lbfgs_cycles must be an int >= 0"):
        fit_map(post, lbfgs_cycles=-1, progress=False)
    # newton_polish checks its own counts (a negative count used to mean 0)
    from tfhybrid.lens.fit import newton_polish

    state = [part[0] for part in post.initial_states(1)]
    with pytest.raises(TfhybridInputError, match="lbfgs_iter must be an int >= 0"):
        newton_polish(post, state, lbfgs_iter=-1)
    with pytest.raises(TfhybridInputError, match="num_iter must be an int >= 0"):
        newton_polish(post, state, num_iter=2.5)
    with pytest.raises(TfhybridInputError, match=r"start_hessian must be a finite \(1, \d+, \d+\)"):
        newton_polish(post, state, start_hessian=np.eye(3))
    for step in (0.0, -1.0, np.inf):
        with pytest.raises(TfhybridInputError, match="whitening_step must be None or finite"):
            sample_lens_posterior(post, state, whitening_step=step, progress=False)
    with pytest.raises(TfhybridInputError, match="whitening_floor must be finite and > 0"):
        sample_lens_posterior(post, state, whitening_step=1.0, whitening_floor=0.0,
                              progress=False)
    with pytest.raises(TfhybridInputError, match="pilot_draws must be an int >= 0"):
        sample_lens_posterior(post, state, pilot_draws=-1, progress=False)
    with pytest.raises(TfhybridInputError, match="it needs precondition=True"):
        sample_lens_posterior(post, state, pilot_draws=10, precondition=False, progress=False)


def test_coarse_posterior_bins_data_and_matches_binned_model(vae, problem):
    from tfhybrid.lens.fit import coarse_posterior

    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    coarse = coarse_posterior(post, factor=2, supersampling=2)
    assert coarse.config.n_pix == 32 and coarse.config.pixel_scale_arcsec == 0.32
    obs = problem["observed"][0]
    np.testing.assert_allclose(coarse.observed_images[0],
                               obs.reshape(32, 2, 32, 2).mean(axis=(1, 3)), rtol=1e-6)
    np.testing.assert_allclose(coarse.noise_sigma, SIGMA / 2)
    # With 2x2 rays per coarse pixel the coarse model at the truth is the binned fine model up
    # to the PSF, which acts before binning in one and after ray-tracing in the other: both
    # smooth the image by less than a coarse pixel, so they agree to a few per cent of the peak.
    state = coarse.state_from_dict(dict(TRUTH, z=problem["z"][0]))
    model_c = coarse.predict(dict(zip(PARAM_NAMES, state[:-1], strict=True)), state[-1]).numpy()
    binned = problem["noiseless"][0].reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.max(np.abs(model_c[0] - binned)) < 0.05 * binned.max()
    # the simulator's XLA setting is the fine posterior's unless overridden (the small batch
    # of coarse jumps runs in the plain graph); the override changes no number
    assert coarse.config.jit_compile == post.config.jit_compile
    plain = coarse_posterior(post, factor=2, supersampling=2, jit_compile=False)
    assert plain.config.jit_compile is False
    np.testing.assert_allclose(
        plain.predict(dict(zip(PARAM_NAMES, state[:-1], strict=True)), state[-1]).numpy(),
        model_c, rtol=0, atol=1e-5 * binned.max())
    with pytest.raises(TfhybridInputError, match="dividing n_pix"):
        coarse_posterior(post, factor=3)


def test_coarse_global_search_finds_the_basin_from_the_prior(vae, problem):
    # No start near the truth: 12 coarse starts from the prior (medians, then draws), the best
    # one refined at full resolution (Adam, then Newton: Adam alone stopped 4.6 % off).
    # The Einstein radius must come out within 1 %.
    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    fit = fit_map(post, num_starts=1, num_steps=1200, coarse_starts=12, coarse_steps=400,
                  coarse_factor=2, seed=1, progress=False, newton_iter=3, jump_stage="full",
                  jump_steps=300)
    assert fit.hessian.shape == (1, 20, 20)
    # the source-scale jumps ran after the search (and a jump only replaces a worse estimate)
    assert fit.scale_jump.shape == (1,) and fit.jump_gain[0] >= 0.0
    assert "source-scale jumps" in fit.message
    assert abs(fit.params["r_ein"][0] / TRUTH["r_ein"] - 1) < 0.01, fit.params["r_ein"]
    assert abs(fit.params["theta_lens1"][0] - TRUTH["theta_lens1"]) < 0.02
    with pytest.raises(TfhybridInputError, match="coarse_starts"):
        fit_map(post, num_starts=4, coarse_starts=2, progress=False)


def test_coarse_stage_jumps_compete_for_the_full_resolution_starts(vae, problem):
    # jump_stage="coarse" (the default): the jumps start from the best coarse optimum and run
    # on the coarse grid; the full-resolution starts are the best of the coarse starts and the
    # jumps' results
    # Both prunings on: the coarse search keeps its 4 best starts after 100 steps, Adam its
    # leading start after 200 (fit_map's default; whatever its lead)
    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    fit = fit_map(post, num_starts=2, num_steps=1200, coarse_starts=12, coarse_steps=400,
                  coarse_factor=2, seed=1, progress=False, newton_iter=3,
                  coarse_prune_after=100, coarse_keep=4, prune_margin=0.0)
    assert fit.jump_gain is None
    assert fit.scale_jump.shape == (1,) and fit.scale_jump[0] in (1.0, 0.6, 1.6, 2.6)
    # the winner is named by its index among the 2 full-resolution starts; the dropped start's
    # trace ends at step 200
    kept = fit.result.kept_starts
    assert kept.shape == (1, 1) and fit.best_start[0] == kept[0, 0] in (0, 1)
    trace = fit.result.loss_trace
    assert trace.shape == (1200, 2, 1) and np.isfinite(trace[:200]).all()
    assert np.isfinite(trace[200:, kept[0, 0], 0]).all()
    assert np.isnan(trace[200:, 1 - kept[0, 0], 0]).all()
    assert "from step 200 only the leading 1 start(s) of each system went on" in fit.message
    assert "source-scale jumps on the coarse grid won in" in fit.message
    assert abs(fit.params["r_ein"][0] / TRUTH["r_ein"] - 1) < 0.01, fit.params["r_ein"]
    with pytest.raises(TfhybridInputError, match="jump_stage must be"):
        fit_map(post, jump_stage="fine", progress=False)


class ScalableBlob:
    """Stand-in source model that can draw its galaxy at any size on the stamp.

    d(z): an elliptical Gaussian of peak pixel 1, width 0.2 exp(z₀) (stamp half-widths) and axis
    ratio exp(0.3 tanh z₁): the source at (s, z₀) and at (s / k, z₀ + ln k) is the same
    physical galaxy, so the two states give the same image, the exact mode pair that
    :func:`source_scale_jumps` moves between.
    """

    latent_dim = 2
    decoder_sigma = 0.02

    def __init__(self):
        c = (np.arange(64) - 31.5) / 32.0
        self._v, self._u = (tf.constant(a, tf.float32) for a in np.meshgrid(c, c, indexing="ij"))
        self.latent_prior = tfp.distributions.MultivariateNormalTriL(tf.zeros(2), tf.eye(2))

    def decode(self, z):
        z = tf.convert_to_tensor(z, tf.float32)
        width = 0.2 * tf.exp(z[..., 0, None, None])
        ratio = tf.exp(0.3 * tf.tanh(z[..., 1, None, None]))
        r2 = ((self._u * ratio) ** 2 + (self._v / ratio) ** 2) / width**2
        g = tf.exp(-0.5 * r2)
        return g / tf.reduce_max(g, axis=[-2, -1], keepdims=True)  # peak-normalised, as the VAE


def test_scale_jump_candidates_keep_the_image_and_restore_the_scale():
    from tfhybrid.lens.fit import scale_jump_candidates

    model = ScalableBlob()
    # width 0.12 of the stamp's half-side: twice as wide, it still fits on the stamp (a cropped
    # galaxy would not be the same galaxy)
    z_true = np.array([[np.log(0.6), 0.4]], np.float32)
    image = simulate_lensed_image(model.decode(z_true).numpy(),
                                  {k: [v] for k, v in TRUTH.items()}, CONFIG).numpy()
    # σ = 0.05: the two renderings differ by their bilinear sampling of the source (~0.3 % of
    # the peak, 85 nats at σ = 0.01, 3.4 nats here)
    post = LensPosterior(image, 0.05, model, CONFIG)
    truth = post.state_from_dict(dict(TRUTH, z=z_true[0]))
    # the galaxy drawn twice as wide on a stamp half as wide: same image, wrong scale
    wrong = post.state_from_dict(dict(TRUTH, s=TRUTH["s"] / 2, z=[np.log(1.2), 0.4]))

    def loglik(state):
        return post.log_likelihood(dict(zip(PARAM_NAMES, state[:-1], strict=True)),
                                   state[-1]).numpy()

    # (noise-free data: log-likelihood differences are -χ²/2 of the model differences)
    assert np.all(np.abs(loglik(truth) - loglik(wrong)) < 10.0)
    cand = scale_jump_candidates(post, wrong, factors=(2.0, 1.0))
    s = cand[PARAM_NAMES.index("s")].numpy()[:, 0]
    z = cand[-1].numpy()[:, 0]
    np.testing.assert_allclose(s, [TRUTH["s"], TRUTH["s"] / 2], rtol=1e-6)
    # k = 2 redraws the galaxy at its true width and shape; k = 1 keeps it
    np.testing.assert_allclose(z[0], z_true[0], atol=0.03)
    np.testing.assert_allclose(z[1], [np.log(1.2), 0.4], atol=0.03)
    # both candidates keep the lensed image: a resampling slip of one source pixel would cost
    # thousands of nats
    lik = loglik(cand)
    assert np.all(np.abs(loglik(truth) - lik) < 10.0), (loglik(truth), lik)
    # and the jump back to the true scale wins on the prior of s (N(5, 1))
    lp = post.target_log_prob(*cand).numpy()[:, 0]
    assert lp[0] > lp[1] > post.target_log_prob(*wrong).numpy()[0] - 5.0


def test_newton_polish_converges_to_the_mode(vae, problem):
    from tfhybrid.lens.fit import laplace_hessian, newton_polish

    post = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    start = dict(TRUTH, r_ein=1.28, gamma=2.05, q=0.72, s=1.55, z=np.full(8, 0.2, np.float32))
    state = post.state_from_dict(start)
    # reference mode: Adam from the truth (r_Ein within 0.3 % of it)
    ref = fit_map(post, initial_state=post.state_from_dict(dict(TRUTH, z=problem["z"][0]),
                                                           lead_shape=(1, 1)),
                  num_steps=800, progress=False)
    lp0 = post.target_log_prob(*state).numpy()
    parts, lp, hess = newton_polish(post, state, num_iter=4)
    # measured: the gap of ~190 nats to the reference closes to ~8 (the likelihood is only
    # piecewise smooth, so Newton converges linearly here)
    assert lp[0] - lp0[0] > 0.9 * (ref.log_prob[0] - lp0[0]), (lp0, lp, ref.log_prob)
    assert abs(float(parts[PARAM_NAMES.index("r_ein")][0]) / TRUTH["r_ein"] - 1) < 0.02
    # the returned Hessian is the one at the returned point (up to the float32 round trip of
    # the point and float32 finite differences: 1e-4 of the largest entry), and symmetric
    atol = 1e-4 * np.abs(hess).max()
    np.testing.assert_allclose(hess, laplace_hessian(post, parts), rtol=1e-3, atol=atol)
    np.testing.assert_allclose(hess, np.swapaxes(hess, 1, 2))
    # and the chunked Hessian does not depend on the chunk size beyond float32 noise (the
    # batch shape changes the order of the float32 sums)
    np.testing.assert_allclose(laplace_hessian(post, parts, chunk_size=7), hess,
                               rtol=1e-3, atol=atol)
    # given a start curvature (here a wrong one, 2x) and nothing to move, the polish
    # still returns the Hessian at its point, not the one it was given
    parts2, lp2, hess2 = newton_polish(post, parts, num_iter=0, lbfgs_iter=0,
                                       start_hessian=2.0 * hess)
    np.testing.assert_allclose(hess2, hess, rtol=1e-3, atol=atol)
    np.testing.assert_allclose(lp2, lp, rtol=1e-6)


def test_polish_gradient_is_compiled_once_for_every_state(vae, problem):
    """The polish's XLA value-and-gradient takes the state as a program parameter (white and
    with the source residual): compiled once, not once per state (each call recompiled when
    the PSF convolution and the residual's gram were nested calls), and equal to the
    uncompiled posterior's value and gradient."""
    from tests.hlo import entry_parameter_shapes
    from tfhybrid.lens.fit import _flat_unconstrained, _log_prob_and_grad, _unflatten

    white = LensPosterior(problem["observed"], SIGMA, vae, CONFIG)
    for post in (white, white.with_source_residual(RESIDUAL, 0.05)):
        state = post.state_from_dict(dict(TRUTH, z=problem["z"][0], r_ein=1.28))
        bijs, u, sizes, flat = _flat_unconstrained(post, state)
        fn = _log_prob_and_grad(post, bijs, u, sizes)
        assert f"f32[1,{flat.shape[1]}]" in entry_parameter_shapes(fn, flat)
        with tf.GradientTape() as tape:
            tape.watch(flat)
            parts, jac = _unflatten(post, bijs, u, sizes, flat)
            lp_ref = post.target_log_prob(*parts) + jac
        grad_ref = tape.gradient(lp_ref, flat)
        lp, grad = fn(flat)
        np.testing.assert_allclose(lp, lp_ref, rtol=1e-6)
        scale = np.abs(grad_ref.numpy()).max()
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("scheme, rtol", [("forward", 5e-4), ("central", 1e-4)])
def test_finite_difference_hessian_matches_the_analytic_one(scheme, rtol):
    """_hessian_at on log p = -x^T A x / 2 - sum(x^4) / 4 (two systems, D = 5, batched).

    Exact Hessian of -log p: A + 3 diag(x^2). Measured error, relative to the largest entry:
    forward 1.2e-4 (eps/2 times the third derivative 6 x_i), central 1.9e-5 (float32 round-off
    of the gradients dominates its eps^2 term); the tolerances are 4-5 times those.
    """
    from tfhybrid.lens.fit import _hessian_at

    rng = np.random.default_rng(3)
    m = rng.normal(size=(2, 5, 5))
    a = np.einsum("sij,skj->sik", m, m) + 5.0 * np.eye(5)
    x0 = rng.normal(size=(2, 5)) * 0.5
    a_tf = tf.constant(a, tf.float32)

    @tf.function
    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            lp = (-0.5 * tf.reduce_sum(x * tf.linalg.matvec(a_tf, x), axis=-1)
                  - 0.25 * tf.reduce_sum(x**4, axis=-1))
            total = tf.reduce_sum(lp)
        return lp, tape.gradient(total, x)

    exact = a + 3.0 * np.stack([np.diag(v**2) for v in x0])
    # one state at a time (the default), one chunk, and uneven chunks with padding
    for chunk in (1, 40, 3):
        hess = _hessian_at(fn, x0, 1e-3, chunk, scheme)
        np.testing.assert_allclose(hess, exact, rtol=rtol, atol=rtol * np.abs(exact).max())
    with pytest.raises(TfhybridInputError, match="scheme"):
        _hessian_at(fn, x0, 1e-3, 40, "backward")
    with pytest.raises(TfhybridInputError, match="chunk_size"):
        _hessian_at(fn, x0, 1e-3, 0)


def test_whitened_lbfgs_follows_a_curved_ridge():
    """The polish's L-BFGS reaches the mode of a banana that a Newton step at the start misses.

    log p = -(x0 - 1)^2 - 100 (x1 - x0^2)^2 for two independent systems started at different
    points (batched), whitened by the Hessian at the start: the mode (1, 1) to 1e-3.
    """
    from tfhybrid.lens.fit import _lbfgs_cycles, _whitened_lbfgs, laplace_whitening

    @tf.function
    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            lp = -(x[:, 0] - 1.0) ** 2 - 100.0 * (x[:, 1] - x[:, 0] ** 2) ** 2
        return lp, tape.gradient(lp, x)

    x0 = np.array([[-1.2, 1.0], [0.3, -0.5]])
    hess = np.stack([np.array([[2.0 - 400.0 * (x[1] - 3 * x[0] ** 2), -400.0 * x[0]],
                               [-400.0 * x[0], 200.0]]) for x in x0])
    # a full Newton step from the start lands far from the mode (the ridge is curved)
    newton = x0 + np.linalg.solve(hess, fn(tf.constant(x0, tf.float32))[1].numpy())
    assert np.abs(newton - 1.0).max() > 0.3
    out = _whitened_lbfgs(fn, x0, laplace_whitening(hess), 200)
    np.testing.assert_allclose(out, np.ones_like(x0), atol=1e-3)

    # runs cut short (6 iterations) reach the mode only when repeated, each re-whitened by the
    # Hessian where the last stopped
    def log_prob(x):
        return fn(tf.constant(x, tf.float32))[0].numpy().astype(np.float64)

    def hessian(x):
        return np.stack([np.array([[2.0 - 400.0 * (p[1] - 3 * p[0] ** 2), -400.0 * p[0]],
                                   [-400.0 * p[0], 200.0]]) for p in x])

    lp0 = log_prob(x0)
    one, lp_one, _ = _lbfgs_cycles(fn, log_prob, hessian, x0, lp0, hess, 6, 1, 1e-6, 1e-9)
    assert np.abs(one - 1.0).max() > 1e-2
    many, lp_many, h_many = _lbfgs_cycles(fn, log_prob, hessian, x0, lp0, hess, 6, 30, 1e-6,
                                          1e-9)
    np.testing.assert_allclose(many, np.ones_like(x0), atol=1e-3)
    assert np.all(lp_many >= lp_one) and np.all(lp_one >= lp0)
    np.testing.assert_allclose(h_many, hessian(many))
    np.testing.assert_array_equal(x0, [[-1.2, 1.0], [0.3, -0.5]])  # inputs not modified


def test_lbfgs_graph_is_traced_once_and_reused_by_every_objective():
    """Each polish has its own objective; the compiled L-BFGS loop is shared (traced once per
    shape and iteration count) and still minimises the objective of the call that runs it."""
    from tfhybrid.lens.fit import _LBFGS_RUNNERS, _whitened_lbfgs

    iters = 37  # a count no other test uses, so the trace count below is this test's own
    for centre in (1.0, -2.0, 0.5):
        c = tf.constant(centre * np.linspace(1.0, 2.0, 6)[None].repeat(2, 0), tf.float32)

        @tf.function
        def fn(x, c=c):
            with tf.GradientTape() as tape:
                tape.watch(x)
                lp = -tf.reduce_sum(tf.square(x - c) * [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], -1)
            return lp, tape.gradient(lp, x)

        out = _whitened_lbfgs(fn, np.zeros((2, 6)), np.eye(6)[None].repeat(2, 0), iters)
        np.testing.assert_allclose(out, c.numpy(), atol=1e-5)
    graph, current = _LBFGS_RUNNERS[iters]
    assert graph.experimental_get_tracing_count() == 1
    assert current[0] is None  # no objective kept alive after its call


def test_equivalent_truth_folds_phi_by_pi_only():
    """φ and φ ± π are the same ellipse: errors and coverage use the nearest branch."""
    from tfhybrid.lens.fit import equivalent_truth

    t = np.array([1.0624, -0.7459, 0.3])
    est = np.array([-2.0881, 2.2064, 0.31])
    folded = equivalent_truth("phi", t, est)
    np.testing.assert_allclose(folded, [1.0624 - np.pi, -0.7459 + np.pi, 0.3])
    assert np.all(np.abs(folded - est) <= np.pi / 2)
    # a non-periodic parameter is never moved, however far the estimate
    np.testing.assert_array_equal(equivalent_truth("r_ein", t, est + 10.0), t)


def test_samples_ess_flags_poorly_mixed_systems():
    from tfhybrid.lens.fit import LensSamples

    rng = np.random.default_rng(0)
    n = 1000
    iid = rng.normal(size=n)
    ar = np.zeros(n)  # AR(1) with rho = 0.98: ESS ≈ n (1 - rho) / (1 + rho) ≈ 10
    for i in range(1, n):
        ar[i] = 0.98 * ar[i - 1] + np.sqrt(1 - 0.98**2) * rng.normal()
    draws = np.stack([iid, ar], axis=-1)[:, None, :]  # (R, 1 chain, 2 systems)
    params = {k: draws + j for j, k in enumerate(PARAM_NAMES)}
    samples = LensSamples(params, np.zeros((n, 1, 2, 8)), None)
    ess = samples.ess()
    assert set(ess) == {"r_ein", "gamma", "phi", "q"} and ess["r_ein"].shape == (2,)
    # iid: ESS ≈ n (the estimator's spread at n = 1000 is ~10 %); AR(1): ≈ 10, well below 100
    assert 0.7 * n < ess["r_ein"][0] < 1.4 * n, ess
    assert ess["r_ein"][1] < 40, ess
    assert samples.low_ess_systems() == [1]
    assert samples.low_ess_systems(threshold=5.0) == []
    # a chain that never moved (every proposal rejected) has no defined ESS: it is listed
    stuck = np.concatenate([draws, np.ones((n, 1, 1))], axis=-1)
    samples = LensSamples({k: stuck + j for j, k in enumerate(PARAM_NAMES)},
                          np.zeros((n, 1, 3, 8)), None)
    assert not np.isfinite(samples.ess()["r_ein"][2])
    assert samples.low_ess_systems(threshold=5.0) == [2]


def test_coverage_and_summaries_include_the_circularised_einstein_radius():
    """Draws whose r_Ein is 10 % high and q low by the matching factor: θ_E = sqrt(q) r_Ein is
    right, so its interval covers the truth while r_Ein's misses it."""
    rng = np.random.default_rng(0)
    n, s = 400, 3
    r = 1.1 * (1 + 0.001 * rng.standard_normal((n, 1, s)))
    q = 0.64 / 1.1**2 * (1 + 0.001 * rng.standard_normal((n, 1, s)))
    samples = LensSamples({"r_ein": r, "q": q}, np.zeros((n, 1, s, 2)), None)
    truth = {"r_ein": np.ones(s), "q": np.full(s, 0.64)}
    cov = coverage(truth, samples, 0.68, names=("r_ein", "theta_e"))
    assert cov == {"r_ein": 0.0, "theta_e": 1.0}
    np.testing.assert_allclose(samples.mean()["theta_e"], 0.8, rtol=2e-3)
    assert samples.std()["theta_e"].shape == (s,)
    assert samples.ess(("theta_e",))["theta_e"].shape == (s,)


def test_coverage_flags_and_table_rows_agree_and_pool_into_a_binomial_test():
    """Per-system flags (what studies pool), their mean (``coverage``), the table's
    ``covered_68`` and its interval all describe the same 68 % intervals; a calibrated
    Gaussian posterior passes the binomial test and a twice over-confident one fails it."""
    from tfhybrid.inference.diagnostics import coverage_test
    from tfhybrid.lens.fit import LensMap, coverage_flags

    rng = np.random.default_rng(1)
    n, s = 2000, 300
    truth = {"r_ein": 1.0 + 0.05 * rng.standard_normal(s), "q": np.full(s, 0.81)}
    centre = truth["r_ein"] + 0.01 * rng.standard_normal(s)  # posterior mean ~ N(truth, 0.01)

    def samples_of(width):
        r = centre + width * rng.standard_normal((n, 1, s))
        return LensSamples({"r_ein": r, "q": np.full((n, 1, s), 0.81)},
                           np.zeros((n, 1, s, 2)), None)

    calibrated, narrow = samples_of(0.01), samples_of(0.005)
    flags = coverage_flags(truth, calibrated, 0.68, names=("r_ein",))["r_ein"]
    assert flags.dtype == bool and flags.shape == (s,)
    assert coverage(truth, calibrated, 0.68, names=("r_ein",))["r_ein"] == flags.mean()
    zeros = {k: np.zeros(s) for k in PARAM_NAMES}
    fit = LensMap(zeros | {"r_ein": centre, "q": truth["q"]}, np.zeros((s, 2)), np.zeros(s),
                  np.zeros(s, int), None, 0.0)
    rows = parameter_table(zeros | truth, fit, calibrated, names=("r_ein",))
    np.testing.assert_array_equal([r["covered_68"] for r in rows], flags)
    lo, hi = calibrated.interval(0.68)["r_ein"]
    np.testing.assert_allclose([r["lo68"] for r in rows], lo)
    np.testing.assert_allclose([r["hi68"] for r in rows], hi)
    # 300 calibrated intervals: coverage 0.68 ± 0.027; half as wide: 0.38 (p ~ 1e-25)
    assert coverage_test(flags, 0.68).p_value > 1e-3
    narrow_flags = coverage_flags(truth, narrow, 0.68, names=("r_ein",))["r_ein"]
    assert coverage_test(narrow_flags, 0.68).p_value < 1e-10


def test_loss_trace_figure_draws_the_dropped_starts_up_to_where_they_end():
    import matplotlib

    matplotlib.use("Agg")
    from tfhybrid.plotting.lens import loss_trace_figure

    trace = np.linspace(10.0, 1.0, 50)[:, None] * np.array([1.0, 2.0, 3.0])
    trace[20:, 1] = np.nan  # dropped at step 20
    trace[:, 2] = np.nan  # never ran
    fig = loss_trace_figure(trace)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2
    y = lines[1].get_ydata()
    assert np.isfinite(y[:20]).all() and np.isnan(y[20:]).all() and np.nanmin(y) == 1.0


def test_posterior_scale_whitening_recovers_a_gaussian_from_a_wrong_laplace_whitening():
    """For a Gaussian target the re-measured whitening is exact whatever the Laplace one was.

    Two systems, D = 6, precisions P_s with eigenvalues spanning 1e-2..1e3 (in u). The Laplace
    whitening is built from a wrong Hessian (P with one eigenvalue flipped negative and scaled
    ×400, as the noisy finite-difference Hessians of the lens posterior are, and another ×1/50).
    The result A must satisfy A Aᵀ = P⁻¹ (float32 gradients: 1e-3 relative); a direction of
    zero curvature gets the floor's width, 1/sqrt(floor) Laplace widths.
    """
    from tfhybrid.lens.fit import laplace_whitening, posterior_scale_whitening

    rng = np.random.default_rng(5)
    d = 6
    prec, wrong = [], []
    for s in range(2):
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        lam = np.geomspace(1e-2, 1e3, d) * (1 + 0.3 * s)
        prec.append(q @ np.diag(lam) @ q.T)
        bad = lam.copy()
        bad[1] *= -400.0
        bad[4] /= 50.0
        wrong.append(q @ np.diag(bad) @ q.T)
    prec, wrong = np.stack(prec), np.stack(wrong)
    centre = rng.normal(size=(2, d))

    def gaussian(precision):  # compiled x -> (log p, gradient), like _log_prob_and_grad's
        p32 = tf.constant(precision, tf.float32)

        @tf.function
        def fn(x):
            r = x - tf.constant(centre, tf.float32)
            g = -tf.einsum("sij,sj->si", p32, r)
            return 0.5 * tf.reduce_sum(r * g, -1), g

        return fn

    fn = gaussian(prec)
    amat = laplace_whitening(wrong)
    # whitened by it, the target's curvatures are far from 1 (400 and 1/50 as built)
    curv = np.linalg.eigvalsh(np.transpose(amat, (0, 2, 1)) @ prec @ amat)
    np.testing.assert_allclose(curv.min(-1), 1 / 400, rtol=1e-6)
    np.testing.assert_allclose(curv.max(-1), 50, rtol=1e-6)
    new = posterior_scale_whitening(fn, centre, amat, step=1.0, floor=1e-6)
    assert new.shape == (2, d, d) and new.dtype == np.float64
    np.testing.assert_allclose(new @ np.transpose(new, (0, 2, 1)), np.linalg.inv(prec),
                               rtol=2e-3, atol=1e-6 * np.abs(np.linalg.inv(prec)).max())
    # whitened by it, the target's curvature is the identity
    np.testing.assert_allclose(np.transpose(new, (0, 2, 1)) @ prec @ new,
                               np.broadcast_to(np.eye(d), (2, d, d)), atol=2e-3)

    # a flat direction (zero curvature) is given the floor: width 1/sqrt(floor) there
    lam, vec = np.linalg.eigh(prec)
    lam[:, 0] = 0.0
    flat_prec = np.einsum("sij,sj,skj->sik", vec, lam, vec)
    amat = laplace_whitening(prec)  # exact elsewhere; 1 Laplace width along the flat one
    new = posterior_scale_whitening(gaussian(flat_prec), centre, amat, step=1.0, floor=0.04)
    whitened = np.linalg.solve(amat, new)  # A_laplace^-1 A_new: the widths in Laplace units
    widths = np.sqrt(np.linalg.eigvalsh(whitened @ np.transpose(whitened, (0, 2, 1))))
    np.testing.assert_allclose(widths.max(-1), 5.0, rtol=2e-3)  # 1 / sqrt(0.04)

    for bad in (dict(step=0.0), dict(step=np.nan), dict(floor=0.0), dict(floor=-1.0)):
        with pytest.raises(TfhybridInputError, match="step and floor must be finite and > 0"):
            posterior_scale_whitening(fn, centre, amat, **bad)


def test_pilot_whitening_takes_the_pilots_covariance_shrunk_towards_the_laplace_one():
    # Pilot draws from N(0, Σ) in Laplace-whitened units (Σ: widths 3 and 1/2 along rotated
    # axes, as a posterior wider than its curvature at the MAP in one direction): the new
    # whitening's A Aᵀ is (n Σ̂ + k I) / (n + k) mapped back by the old A, within the
    # sampling error of Σ̂ (4000 draws: ~2 % per entry; 5 % allowed).
    from tfhybrid.lens.fit import PILOT_SHRINKAGE, pilot_whitening

    rng = np.random.default_rng(0)
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s], [s, c]])
    sigma = rot @ np.diag([9.0, 0.25]) @ rot.T
    n = 4000
    draws = rng.multivariate_normal(np.zeros(2), sigma, size=(n // 2, 2))[:, :, None, :]
    amat = np.array([[[2.0, 0.0], [0.5, 1.0]]])  # the pilot's own whitening
    new = pilot_whitening(amat, draws)
    assert new.shape == (1, 2, 2)
    expected = amat[0] @ ((n * sigma + PILOT_SHRINKAGE * np.eye(2)) / (n + PILOT_SHRINKAGE)) \
        @ amat[0].T
    np.testing.assert_allclose(new[0] @ new[0].T, expected, rtol=0.05, atol=0.05)
    # a pilot that never moved still gives a valid (shrunk, positive definite) whitening
    stuck = pilot_whitening(amat, np.zeros((5, 1, 1, 2)))
    np.testing.assert_allclose(stuck[0] @ stuck[0].T,
                               amat[0] @ amat[0].T * PILOT_SHRINKAGE / (5 + PILOT_SHRINKAGE))

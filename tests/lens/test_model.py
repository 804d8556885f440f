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

from tfhybrid.lens.fit import fit_map, parameter_table, sample_lens_posterior
from tfhybrid.lens.model import STATE_NAMES, LensPosterior, LensPriorConfig, parameter_prior
from tfhybrid.physics.lensing import PARAM_NAMES, LensingConfig, simulate_lensed_image
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
    assert {r["parameter"] for r in rows} >= {"r_ein", "gamma", "phi"}

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

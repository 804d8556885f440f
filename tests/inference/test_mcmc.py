"""Tests of tfhybrid.inference.mcmc: HMC / NUTS recover known posteriors; chunks resume exactly.

Tolerances come from the Monte Carlo error: a posterior mean is checked to |z| < 4.5 with
z = (mean − truth) / (sd / √ESS) per parameter (max over ≤ 50 parameters of |N(0, 1)| exceeds
4.5 with probability ~3e-4), and a variance to a relative error < 4.5 √(2 / ESS). A sampler
with a sign error in the gradient or a wrong Jacobian fails these (checked when writing them).
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfhybrid.inference.mcmc as mcmc
from tfhybrid.inference.diagnostics import save_netcdf, to_arviz
from tfhybrid.inference.mcmc import sample_posterior
from tfhybrid.validation import TfhybridInputError

tfd, tfb = tfp.distributions, tfp.bijectors
D = 50


def _correlated_gaussian():
    """50-d Gaussian: AR(1) correlation 0.6 and scales from 0.3 to 3."""
    idx = np.arange(D)
    scales = np.logspace(np.log10(0.3), np.log10(3.0), D)
    cov = 0.6 ** np.abs(np.subtract.outer(idx, idx)) * np.outer(scales, scales)
    mean = np.linspace(-2.0, 2.0, D)
    dist = tfd.MultivariateNormalTriL(
        tf.constant(mean, tf.float32), tf.linalg.cholesky(tf.constant(cov, tf.float32))
    )
    return dist, mean, cov


def _check_moments(draws, mean, var, ess):
    flat = draws.reshape(-1, draws.shape[-1]).astype(np.float64)
    z = (flat.mean(0) - mean) / np.sqrt(var / ess)
    assert np.max(np.abs(z)) < 4.5, f"posterior means off: max |z| = {np.max(np.abs(z)):.2f}"
    rel = flat.var(0, ddof=1) / var - 1.0
    assert np.all(np.abs(rel) < 4.5 * np.sqrt(2.0 / ess)), f"variances off: {rel}"


@pytest.fixture(scope="module")
def gaussian():
    return _correlated_gaussian()


@pytest.fixture(scope="module")
def hmc_result(gaussian):
    dist, _, _ = gaussian
    return sample_posterior(
        dist.log_prob, tf.zeros(D), num_results=1000, num_burnin=300, kernel="hmc",
        num_chains=4, seed=1, progress=False, jit_compile=False, chunk_size=650,
    )


@pytest.mark.parametrize("kind", ["hmc", "nuts"])
def test_correlated_gaussian_50d(kind, gaussian, hmc_result):
    dist, mean, cov = gaussian
    if kind == "hmc":
        res = hmc_result
    else:
        res = sample_posterior(
            dist.log_prob, tf.zeros(D), num_results=1000, num_burnin=300, kernel="nuts",
            num_chains=4, seed=2, progress=False, chunk_size=650, jit_compile=False,
        )
    diag = res.diagnostics
    ess = diag["ess"][0]
    assert diag["min_ess"] > 100, diag["min_ess"]
    # 4 x 1000 draws: the max over 50 parameters of the split R-hat of healthy chains is
    # ~1.005 (4 x 400 reached 1.0136 by chance); chains that do not mix give > 1.1
    assert diag["max_r_hat"] < 1.01, diag["max_r_hat"]
    assert diag["num_divergences"] == 0
    assert 0.6 < diag["acceptance_rate"] < 0.97
    _check_moments(res.samples[0], mean, np.diag(cov), ess)
    # the adapted diagonal mass matrix learnt the marginal variances (to ~30 %)
    learnt = res.mass_matrix_variance[0].mean(0)
    assert np.all(np.abs(np.log(learnt / np.diag(cov))) < 0.5)


@pytest.mark.parametrize("kind", ["nuts", "hmc"])
def test_hierarchical_model_with_bijector(kind):
    """HMC / NUTS on a normal hierarchy (known tau: conjugate, funnel-free) + a Softplus part.

    y_j ~ N(theta_j, sigma_j), theta_j ~ N(mu, tau), mu ~ N(0, 5); the posterior of
    (mu, theta) is Gaussian with closed-form moments. s ~ Gamma(3, 2) is independent of the
    data, so its posterior is its prior (mean 1.5, variance 0.75): this checks the Jacobian.
    """
    y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]) / 5.0
    sigma = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]) / 5.0
    tau = 2.0
    j = len(y)
    # Gaussian posterior over (mu, theta): precision matrix and mean
    prec = np.zeros((j + 1, j + 1))
    prec[0, 0] = 1 / 25.0 + j / tau**2
    prec[0, 1:] = prec[1:, 0] = -1 / tau**2
    prec[1:, 1:] = np.diag(1 / tau**2 + 1 / sigma**2)
    cov = np.linalg.inv(prec)
    mean = cov @ np.concatenate([[0.0], y / sigma**2])

    def lp(mu, theta, s):
        return (
            tfd.Normal(0.0, 5.0).log_prob(mu)
            + tf.reduce_sum(tfd.Normal(mu[..., None], tau).log_prob(theta), -1)
            + tf.reduce_sum(tfd.Normal(theta, sigma.astype(np.float32)).log_prob(y), -1)
            + tfd.Gamma(3.0, 2.0).log_prob(s)
        )

    # HMC: twice the draws, so that the max split R-hat over 10 parameters of healthy chains
    # sits well below 1.01 (4 x 400 HMC draws gave 1.0095, too close to call)
    res = sample_posterior(
        lp, [tf.constant(0.0), tf.zeros(j), tf.constant(1.0)],
        bijectors=[None, None, tfb.Softplus()], num_results=400 if kind == "nuts" else 800,
        num_burnin=150, kernel=kind, num_chains=4, seed=3, progress=False,
        names=["mu", "theta", "s"], jit_compile=kind == "nuts",  # XLA compile > HMC's run time
    )
    diag = res.diagnostics
    assert diag["max_r_hat"] < 1.01 and diag["num_divergences"] == 0
    draws = np.concatenate([res.samples[0][..., None], res.samples[1]], axis=-1)
    ess = np.concatenate([[diag["ess"][0]], diag["ess"][1]])
    _check_moments(draws, mean, np.diag(cov), ess)
    _check_moments(res.samples[2][..., None], np.array([1.5]), np.array([0.75]),
                   np.array([diag["ess"][2]]))
    assert np.all(res.samples[2] > 0)
    table = res.summary()
    assert table.names[:2] == ["mu", "theta[0]"]


def test_kill_and_resume_is_bit_identical(gaussian, hmc_result, tmp_path, monkeypatch):
    """Same arguments as the ``hmc_result`` fixture (so the compiled kernel is reused), run with
    a checkpoint directory and killed after its first chunk (injected KeyboardInterrupt after
    the chunk file is written), then resumed: the draws equal the uninterrupted run's exactly."""
    dist, _, _ = gaussian
    kwargs = dict(
        num_results=1000, num_burnin=300, kernel="hmc", num_chains=4, seed=1, progress=False,
        jit_compile=False, chunk_size=650,
    )
    real_write = mcmc._write_chunk

    def write_then_die(ckpt, index, *args):
        real_write(ckpt, index, *args)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(mcmc, "_write_chunk", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        sample_posterior(dist.log_prob, tf.zeros(D), checkpoint_dir=tmp_path, **kwargs)
    assert [p.name for p in tmp_path.glob("chunk_*.npz")] == ["chunk_00000.npz"]
    monkeypatch.setattr(mcmc, "_write_chunk", real_write)
    resumed = sample_posterior(dist.log_prob, tf.zeros(D), checkpoint_dir=tmp_path, **kwargs)
    np.testing.assert_array_equal(resumed.samples[0], hmc_result.samples[0])
    for key in hmc_result.trace:
        np.testing.assert_array_equal(resumed.trace[key], hmc_result.trace[key])
    assert resumed.step_size == hmc_result.step_size
    np.testing.assert_array_equal(
        resumed.mass_matrix_variance[0], hmc_result.mass_matrix_variance[0]
    )
    # the run's sampling time counts the chunk read from disk, as it was timed then
    with np.load(tmp_path / "chunk_00000.npz") as z:
        first = float(z["seconds"])
    assert first > 0 and len(resumed.chunk_seconds) == 1
    assert resumed.total_sampling_s == pytest.approx(first + resumed.chunk_seconds[0])
    assert resumed.wall_time_s < resumed.total_sampling_s
    # a different setting in the same directory is refused, not silently mixed
    with pytest.raises(TfhybridInputError, match="different settings"):
        sample_posterior(
            dist.log_prob, tf.zeros(D), checkpoint_dir=tmp_path, **{**kwargs, "seed": 8}
        )
    # so is a target the caller says differs (checkpoint_config: e.g. a digest of the data),
    # named; it may not overwrite the sampler's own settings
    with pytest.raises(TfhybridInputError, match=r"different settings \(data_sha1\)"):
        sample_posterior(dist.log_prob, tf.zeros(D), checkpoint_dir=tmp_path,
                         checkpoint_config=dict(data_sha1="abc"), **kwargs)
    with pytest.raises(TfhybridInputError, match=r"must not set the sampler's own.*'seed'"):
        sample_posterior(dist.log_prob, tf.zeros(D), checkpoint_dir=tmp_path / "new",
                         checkpoint_config=dict(seed=3), **kwargs)


def test_arviz_export(hmc_result, tmp_path):
    idata = to_arviz(hmc_result, names=["x"])
    assert idata.posterior["x"].shape == (4, 1000, D)
    assert idata.sample_stats["diverging"].shape == (4, 1000)
    assert save_netcdf(idata, tmp_path / "hmc.nc").exists()


def test_bad_inputs():
    lp = tfd.Normal(0.0, 1.0).log_prob
    with pytest.raises(TfhybridInputError, match="scalar"):
        sample_posterior(lp, tf.constant(0.0), progress=False)
    with pytest.raises(TfhybridInputError, match="num_burnin"):
        sample_posterior(lp, tf.zeros(2), num_burnin=5, progress=False)
    with pytest.raises(TfhybridInputError, match="kernel"):
        sample_posterior(lp, tf.zeros(2), kernel="mala", progress=False)


def test_step_size_only_adaptation_is_per_system_and_samples_correctly():
    """adapt="step_size" with a (S, 1) step: each system of the batch gets its own step.

    Two independent 10-d Gaussians with scales 1 and 0.1 share one state (chains, 2, 10): a
    shared step would be ~10x off for one of them. After 150 warm-up steps from a step of 0.5
    for both, the adapted steps must differ by a factor 5–20, and 400 draws per chain × 4
    chains must recover each scale (sample std within 15 %: ESS ≳ 300 per coordinate, averaged
    over 10 coordinates) and zero means (|mean| < 0.25 scale).
    """
    scales = tf.constant([[1.0], [0.1]], tf.float64)

    def log_prob(x):  # x: (chains, 2, 10)
        return -0.5 * tf.reduce_sum((x / scales) ** 2, axis=-1)

    res = sample_posterior(
        log_prob, tf.zeros([2, 10], tf.float64), num_results=400, num_burnin=150,
        num_chains=4, seed=11, progress=False, adapt="step_size",
        step_size=np.full((2, 1), 0.5), num_leapfrog_steps=8,
    )
    draws = res.samples[0]  # (400, 4, 2, 10)
    step = np.ravel(res.final_step_size)
    assert draws.shape == (400, 4, 2, 10) and step.shape == (2,)
    assert 5.0 < step[0] / step[1] < 20.0, step
    stds = draws.reshape(-1, 2, 10).std(0).mean(-1)
    np.testing.assert_allclose(stds, [1.0, 0.1], rtol=0.15)
    means = np.abs(draws.reshape(-1, 2, 10).mean(0)).max(-1)
    assert np.all(means < 0.25 * np.array([1.0, 0.1])), means
    assert 0.5 < res.diagnostics["acceptance_rate"] < 0.95
    with pytest.raises(TfhybridInputError, match="adapt must be"):
        sample_posterior(log_prob, tf.zeros([2, 10], tf.float64), num_chains=2, adapt="mass")

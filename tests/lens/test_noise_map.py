"""A lens posterior with a per-pixel noise map (``LensPosterior(noise=σ map)``, ``inf`` for a
masked pixel): the likelihood against scipy, the source residual's marginal against a dense
Gaussian, the coarse search's binning, the joint distribution, and a fit that a contaminated
patch biases unless it is masked.

Tolerances: float64 model (``LensingConfig(dtype="float64")``) against scipy in float64: 1e-9
relative; float32 with the source residual against the dense float64 marginal: as
tests/lens/test_model.py (2e-6 relative, 0.05 nats).
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import multivariate_normal, norm

from tests.lens.test_model import CONFIG, SIGMA, TRUTH, SmoothSourceModel
from tfhybrid.lens.fit import coarse_posterior, fit_map
from tfhybrid.lens.model import STATE_NAMES, LensPosterior
from tfhybrid.physics.lensing import PARAM_NAMES, simulate_lensed_image
from tfhybrid.physics.source_residual import SourceResidualConfig
from tfhybrid.validation import TfhybridInputError

CONFIG64 = dataclasses.replace(CONFIG, dtype="float64")
Z_TRUE = np.full((1, 8), 0.3, np.float32)


@pytest.fixture(scope="module")
def vae():
    return SmoothSourceModel()


@pytest.fixture(scope="module")
def data(vae):
    """A mock with noise that varies across the image (σ from 0.5 to 3 × SIGMA) and a masked
    band of 3 columns and a 5 × 5 patch, where the 'observation' is NaN or garbage."""
    image = simulate_lensed_image(vae.decode(Z_TRUE).numpy(),
                                  {k: [v] for k, v in TRUTH.items()}, CONFIG).numpy()[0]
    rng = np.random.default_rng(7)
    y, x = np.mgrid[:64, :64]
    sigma_map = SIGMA * (0.5 + 2.5 * (x / 63.0) ** 2) * (1.0 + 0.2 * np.sin(y / 5.0))
    observed = image + sigma_map * rng.normal(size=image.shape)
    sigma_map[:, 10:13] = np.inf
    sigma_map[40:45, 20:25] = np.inf
    observed[:, 10:13] = np.nan
    observed[40:45, 20:25] = 50.0
    return dict(observed=observed, sigma_map=sigma_map, noiseless=image)


def _truth(post):
    state = post.state_from_dict(dict(TRUTH, z=Z_TRUE[0], r_ein=1.28, q=0.72))
    return state, dict(zip(PARAM_NAMES, state[:-1], strict=True))


def test_likelihood_is_the_per_pixel_gaussian_over_the_unmasked_pixels(vae, data):
    post = LensPosterior(data["observed"], data["sigma_map"], vae, CONFIG64)
    assert post.has_noise_map
    valid = np.isfinite(data["sigma_map"])
    np.testing.assert_allclose(post.noise_sigma, np.median(data["sigma_map"][valid]))
    np.testing.assert_allclose(post.noise_map[0], data["sigma_map"], rtol=1e-12)
    np.testing.assert_allclose(post.inverse_variance[0][~valid], 0.0)
    state, params = _truth(post)
    model = post.predict(params, state[-1]).numpy()[0]
    expected = norm.logpdf(data["observed"][valid], model[valid], data["sigma_map"][valid]).sum()
    np.testing.assert_allclose(post.log_likelihood(params, state[-1]).numpy()[0], expected,
                               rtol=1e-9)
    # the masked pixels' values do not matter; a NaN outside the mask is refused
    other = data["observed"].copy()
    other[~valid] = -3.0
    again = LensPosterior(other, data["sigma_map"], vae, CONFIG64)
    np.testing.assert_allclose(again.log_likelihood(params, state[-1]).numpy(),
                               post.log_likelihood(params, state[-1]).numpy(), rtol=1e-12)
    bad = data["observed"].copy()
    bad[30, 30] = np.nan
    with pytest.raises(TfhybridInputError, match="1 NaN or inf pixels; mask them"):
        LensPosterior(bad, data["sigma_map"], vae, CONFIG64)
    # a map of one value is the scalar σ (both code paths)
    flat = LensPosterior(data["noiseless"], np.full((64, 64), SIGMA), vae, CONFIG64)
    scalar = LensPosterior(data["noiseless"], SIGMA, vae, CONFIG64)
    assert flat.has_noise_map and not scalar.has_noise_map
    np.testing.assert_allclose(flat.log_likelihood(params, state[-1]).numpy(),
                               scalar.log_likelihood(params, state[-1]).numpy(), rtol=1e-12)
    # the joint distribution leaves the masked pixels out too (tfd.Masked; float32, whose
    # latent prior's draws it samples: 1e-5 relative)
    post32 = LensPosterior(data["observed"], data["sigma_map"], vae, CONFIG)
    state32, _ = _truth(post32)
    jd = post32.joint_distribution()
    values = dict(zip(STATE_NAMES, state32, strict=True))
    values["observed"] = tf.constant(post32.observed_images)
    np.testing.assert_allclose(jd.log_prob(values).numpy(),
                               post32.target_log_prob(*state32).numpy().sum(), rtol=1e-5)
    assert jd.sample(seed=(1, 2))["observed"].shape == (1, 64, 64)


def test_source_residual_marginal_with_a_noise_map_equals_the_dense_gaussian(vae, data):
    residual = SourceResidualConfig(grid_size=8, pixel_factor=4.0)
    sigma_res = 0.05
    post = LensPosterior(data["observed"], data["sigma_map"], vae, CONFIG,
                         source_residual=residual, residual_sigma=sigma_res)
    state, params = _truth(post)
    m = residual.grid_size
    unit = np.eye(m * m, dtype=np.float32).reshape(m * m, m, m)
    design = np.stack([post.residual_image(params, unit[j][None]).numpy().reshape(-1)
                       for j in range(m * m)], 1).astype(np.float64)
    valid = np.isfinite(data["sigma_map"]).reshape(-1)
    resid = (post.observed_images - post.predict(params, state[-1]).numpy()).reshape(-1)
    b = design[valid]
    cov = np.diag(data["sigma_map"].reshape(-1)[valid] ** 2) + sigma_res**2 * b @ b.T
    dense = multivariate_normal(np.zeros(valid.sum()), cov).logpdf(resid[valid])
    np.testing.assert_allclose(post.log_likelihood(params, state[-1]).numpy()[0], dense,
                               rtol=2e-6, atol=0.05)


def test_coarse_search_bins_with_inverse_variance_weights(vae, data):
    post = LensPosterior(data["observed"], data["sigma_map"], vae, CONFIG)
    coarse = coarse_posterior(post, factor=2)
    ivar = (1.0 / data["sigma_map"] ** 2).reshape(32, 2, 32, 2)
    obs = np.where(np.isfinite(data["sigma_map"]), data["observed"], 0.0).reshape(32, 2, 32, 2)
    total = ivar.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = (ivar * obs).sum(axis=(1, 3)) / total
        np.testing.assert_allclose(coarse.noise_map[0], 1.0 / np.sqrt(total), rtol=1e-6)
    masked = total == 0  # columns 10–12 cover coarse column 5
    assert masked[:, 5].all() and masked.sum() == 32 + 4  # and the patch's 2 × 2 blocks
    # float32 images: 1e-5 relative, 1e-7 absolute (1e-5 σ)
    np.testing.assert_allclose(coarse.observed_images[0][~masked], expected[~masked], rtol=1e-5,
                               atol=1e-7)


def test_bad_noise_maps_are_refused(vae, data):
    obs = data["noiseless"]
    cases = [(np.full((32, 32), SIGMA), "noise must be a number, one per system"),
             (np.full((3, 64, 64), SIGMA), r"noise map must have shape \(64, 64\) or \(1,"),
             (np.where(np.eye(64) > 0, 0.0, SIGMA), "0 NaN and 64 pixels <= 0"),
             (np.where(np.eye(64) > 0, np.nan, SIGMA), "64 NaN and 0 pixels <= 0"),
             (np.full((64, 64), np.inf), r"masks every pixel of system\(s\) \[0\]")]
    for noise, match in cases:
        with pytest.raises(TfhybridInputError, match=match):
            LensPosterior(obs, noise, vae, CONFIG)


def test_masking_a_contaminated_patch_removes_its_bias(vae, data, tmp_path):
    # A bright compact blob (a neighbour, or a residual of the lens light) on one arc: the
    # white fit must bend the lens to explain it; masking it (σ = inf there) recovers r_Ein
    # (measured: 8.6 % off white, 0.6 % masked).
    # Both start from the truth's neighbourhood (the test is of the likelihood, not the search).
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:64, :64]
    peak = np.unravel_index(np.argmax(data["noiseless"]), (64, 64))
    blob = 2.0 * data["noiseless"].max() * np.exp(
        -0.5 * ((y - peak[0]) ** 2 + (x - peak[1] - 3) ** 2) / 1.5**2)
    observed = data["noiseless"] + blob + SIGMA * rng.normal(size=(64, 64))
    sigma = np.where(blob > 0.01 * SIGMA, np.inf, SIGMA)
    start = dict(TRUTH, r_ein=1.25, gamma=2.0, q=0.75, s=1.5, z=np.zeros(8, np.float32))
    errors = {}
    for name, noise in (("white", SIGMA), ("masked", sigma)):
        post = LensPosterior(observed, noise, vae, CONFIG)
        fit = fit_map(post, initial_state=post.state_from_dict(start, lead_shape=(1, 1)),
                      num_steps=800, newton_iter=3, progress=False)
        errors[name] = abs(fit.params["r_ein"][0] / TRUTH["r_ein"] - 1)
    assert errors["masked"] < 0.01 and errors["white"] > 3 * errors["masked"], errors


def test_observed_model_files_are_in_each_images_units_and_never_overwrite_each_other(
        vae, data, tmp_path):
    from astropy.io import fits

    from tfhybrid.lens.fit import LensMap
    from tfhybrid.lens.observations import LensImage
    from tfhybrid.lens.pipeline import write_observed_model_fits

    noise = np.stack([data["sigma_map"], np.full((64, 64), SIGMA)])
    post = LensPosterior(np.stack([data["observed"], data["noiseless"]]), noise, vae, CONFIG)
    params = {k: np.full(2, v) for k, v in TRUTH.items()}
    fit = LensMap(params, np.repeat(Z_TRUE, 2, axis=0), np.zeros(2), np.zeros(2, int), None, 1.0)
    header = fits.Header(dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CDELT1=-0.16 / 3600,
                              CDELT2=0.16 / 3600, CRPIX1=32.5, CRPIX2=32.5, CUNIT1="deg",
                              CUNIT2="deg", BUNIT="electron/s"))
    images = [LensImage(np.zeros((64, 64), np.float32), 0.16, tmp_path / d / "lens.fits",
                        header) for d in ("a", "b")]
    paths = write_observed_model_fits(tmp_path, post, fit, images, [2.0, 3.0])
    assert [p.name for p in paths] == ["000_lens_map.fits", "001_lens_map.fits"]
    model = post.predict({k: tf.constant(v, tf.float32) for k, v in params.items()},
                         tf.constant(np.repeat(Z_TRUE, 2, axis=0))).numpy()
    for i, (path, scale) in enumerate(zip(paths, [2.0, 3.0], strict=True)):
        with fits.open(path) as hdul:
            np.testing.assert_allclose(hdul[0].data, scale * model[i], rtol=1e-6, atol=1e-9)
            assert hdul[0].header["BUNIT"] == "electron/s"
            assert hdul[0].header["CTYPE1"] == "RA---TAN"
            assert hdul[0].header["R_EIN"] == pytest.approx(TRUTH["r_ein"])
            resid = hdul["RESIDUAL"].data
        masked = ~np.isfinite(noise[i])
        assert np.isnan(resid[masked]).all() and np.isfinite(resid[~masked]).all()
    # the second system is noiseless at the truth: its residual is zero
    np.testing.assert_allclose(fits.getdata(paths[1], "RESIDUAL"), 0.0, atol=1e-3)

"""Tests of the eq. 7 fit (deep prior and SCARLET baseline), tfhybrid/deblend/fit.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.deblend.detection import detect_sources
from tfhybrid.deblend.fit import DeblendConfig, deblend, deblend_batch, prior_window
from tfhybrid.deblend.mocks import gaussian_morphology
from tfhybrid.deblend.scene import ModelFrame, Observation
from tfhybrid.inference.proxes import prox_monotonic, prox_symmetric
from tfhybrid.physics.psf import difference_kernel, gaussian_psf
from tfhybrid.physics.scene import box_corners, scene_model

tfd = tfp.distributions

SHAPE = (40, 40)
BOX = 24
FRAME = ModelFrame(box_size=BOX)
PSF_FWHM = (0.79, 0.68, 0.61)
#: True SEDs of the two sources (distinct colours: blue, red).
SEDS = np.array([[30.0, 20.0, 10.0], [8.0, 16.0, 32.0]], np.float32)
#: Centres (x, y) in pixels: 7 pixels apart, so the sources overlap at the 10 % level.
CENTRES = np.array([[16.0, 19.0], [23.0, 21.0]])


def _two_source_scene(noise_sigma: float, seed: int = 0, n_sources: int = 2):
    morphs = np.stack([
        gaussian_morphology(BOX, 2.2, q=0.6, theta_rad=0.4),
        gaussian_morphology(BOX, 1.6, q=0.8, theta_rad=2.0),
    ])[:n_sources]
    psfs = np.stack([gaussian_psf(f, 0.168, 21) for f in PSF_FWHM])
    kernels = difference_kernel(FRAME.model_psf(), psfs).numpy()
    corners = box_corners(CENTRES[:n_sources, ::-1], (BOX, BOX))
    clean = scene_model(SEDS[:n_sources], morphs, corners, SHAPE, kernels).numpy()
    rng = np.random.default_rng(seed)
    noisy = clean + noise_sigma * rng.standard_normal(clean.shape)
    sigma = max(noise_sigma, 1e-3)  # noiseless: any fixed weight; 1e-3 keeps χ² readable
    obs = Observation.create(noisy, psfs, noise_sigma=sigma, bands=("g", "i", "z"))
    true_flux = SEDS[:n_sources] * morphs.sum(axis=(-2, -1))[:, None]
    return obs, morphs, true_flux, clean


def _oracle_prior(morphs_true, scale=0.05):
    """A stand-in for the PixelCNN: independent Gaussians centred on the true 32×32 stamps.

    It is not a galaxy model; it checks that the fit adds ∇ log p with the right sign, in the
    right place (box → stamp window) and with a stable step (its curvature 1/scale² is large).
    """
    loc = prior_window(tf.constant(morphs_true), 32).numpy()
    return tfd.Independent(tfd.Normal(loc=loc, scale=np.float32(scale)), 2)


class _PerSourcePrior:
    """Applies a different Independent Normal to each of the K sources (shape (K, 32, 32))."""

    def __init__(self, morphs_true, scale):
        self._dist = _oracle_prior(morphs_true, scale)
        self.event_shape = tf.TensorShape([32, 32])

    def log_prob(self, x):
        x = tf.reshape(x, [-1, 2, 32, 32])
        return tf.reshape(self._dist.log_prob(x), [-1])


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def noiseless_baseline():
    obs, morphs, flux, _ = _two_source_scene(0.0)
    cfg = DeblendConfig(method="scarlet", frame=FRAME, max_iter=400, rtol=1e-6)
    return deblend(obs, CENTRES, config=cfg), morphs, flux


def test_baseline_recovers_a_noiseless_two_source_scene(noiseless_baseline):
    res, morphs, flux = noiseless_baseline
    # Elliptical Gaussians are symmetric and monotonic, so the truth is inside the baseline's
    # constraint set and the noiseless problem has it as a minimiser. Tolerances: 2 % on each
    # morphology (L2) and 1 % on each flux, set by convergence within 400 iterations (the
    # measured values are ~5x smaller), not by any modelling bias.
    for k in range(2):
        assert _rel(res.morphs[k], morphs[k]) < 0.02, k
    np.testing.assert_allclose(res.fluxes, flux, rtol=0.01)
    # σ = 1e-3 weights: χ²/pixel < 0.05 is a residual RMS < 2.2e-4, < 1e-5 of the ~30 peak
    # (float32 rounding and the last iterations' convergence).
    assert res.chi2_per_pixel < 0.05


def test_baseline_solution_is_exactly_symmetric_and_monotonic(noiseless_baseline):
    res = noiseless_baseline[0]
    s = tf.constant(res.morphs)
    # The last operation of every iteration is the projection chain, so the result is a fixed
    # point of both projections to float32 rounding (the prox of an exact projection).
    np.testing.assert_allclose(prox_symmetric(s).numpy(), res.morphs, atol=1e-6)
    np.testing.assert_allclose(prox_monotonic(s).numpy(), res.morphs, atol=1e-6)
    np.testing.assert_allclose(res.morphs.max(axis=(-2, -1)), 1.0, rtol=1e-6)
    assert np.all(res.morphs >= 0) and np.all(res.seds >= 0)


def test_flux_is_conserved_within_the_noise():
    sigma = 0.2
    obs, _, _, _ = _two_source_scene(sigma, seed=1)
    res = deblend(obs, CENTRES, method="scarlet", frame=FRAME, max_iter=300)
    n_pix = SHAPE[0] * SHAPE[1]
    data_total = obs.images.sum(axis=(-2, -1))
    model_total = res.model.sum(axis=(-2, -1))
    # Σ(data − model) per band is a sum of n_pix residuals: it must be within a few σ√n_pix
    # (4σ√n = 32; the sources' totals are ~700–1500).
    assert np.all(np.abs(data_total - model_total) < 4 * sigma * np.sqrt(n_pix)), (
        data_total - model_total
    )
    # Components add up to the model (flux bookkeeping of the per-source outputs).
    np.testing.assert_allclose(res.components.sum(axis=0), res.model, atol=1e-4)
    assert 0.8 < res.chi2_per_pixel < 1.2


def test_deep_mode_uses_the_prior_gradient_with_the_right_sign():
    obs, morphs, flux, _ = _two_source_scene(2.0, seed=2)  # noisy: peak S/N ~ 15
    prior = _PerSourcePrior(morphs, scale=0.05)
    # init_iter=0: start both fits from the detection cutouts, so that the prior alone makes
    # the difference (a baseline warm start would already remove most of the noise).
    base = DeblendConfig(method="deep", frame=FRAME, max_iter=150, init_iter=0)
    free = deblend(obs, CENTRES, config=base, prior=prior, prior_weight=0.0)
    pulled = deblend(obs, CENTRES, config=base, prior=prior)
    err_free = [_rel(free.morphs[k], morphs[k]) for k in range(2)]
    err_prior = [_rel(pulled.morphs[k], morphs[k]) for k in range(2)]
    # Positivity alone overfits the noise (errors ~0.3–0.5); a prior centred on the truth with
    # σ = 0.05 must pull each morphology to within ~0.1 of it and beat the free fit.
    for k in range(2):
        assert err_prior[k] < 0.15 and err_prior[k] < 0.6 * err_free[k], (err_free, err_prior)
    assert np.isfinite(pulled.loss_trace).all()
    np.testing.assert_allclose(pulled.morphs.max(axis=(-2, -1)), 1.0, rtol=1e-6)
    assert pulled.log_prior is not None and pulled.log_prior.shape == (2,)


def test_batched_fit_equals_single_fits_and_pads_different_source_counts():
    obs, _, _, _ = _two_source_scene(0.5, seed=3)
    lone, _, _, _ = _two_source_scene(0.5, seed=5, n_sources=1)
    cfg = DeblendConfig(method="scarlet", frame=FRAME, max_iter=100)
    single = deblend(obs, CENTRES, config=cfg)
    one_src = deblend(lone, CENTRES[:1], config=cfg)
    both = deblend_batch([obs, lone], [CENTRES, CENTRES[:1]], config=cfg)
    # The loss is a sum over scenes and the padded source has A = 0, so each scene follows its
    # own path; only FISTA's restart test is shared, and float32 reduction order differs:
    # 1e-3 relative on fluxes.
    np.testing.assert_allclose(both[0].fluxes, single.fluxes, rtol=1e-3)
    np.testing.assert_allclose(both[1].fluxes, one_src.fluxes, rtol=1e-3)
    assert both[1].seds.shape == (1, 3) and both[1].components.shape == (1, 3) + SHAPE


def test_prior_window_pads_or_crops_about_the_box_centre():
    small = tf.reshape(tf.range(24 * 24, dtype=tf.float32), [1, 24, 24])
    win = prior_window(small, 32).numpy()
    assert win.shape == (1, 32, 32)
    # Box centre (12, 12) lands on the stamp centre (16, 16); the 4-pixel border is zero.
    assert win[0, 16, 16] == small.numpy()[0, 12, 12]
    assert win[0, :4].sum() == 0 and win[0, :, -4:].sum() == 0
    big = tf.reshape(tf.range(40 * 40, dtype=tf.float32), [1, 40, 40])
    win = prior_window(big, 32).numpy()
    assert win.shape == (1, 32, 32) and win[0, 16, 16] == big.numpy()[0, 20, 20]


def test_builtin_detection_finds_both_sources():
    obs, _, _, _ = _two_source_scene(0.2, seed=4)
    found = detect_sources(obs, threshold=5.0, min_separation=3)
    assert len(found) == 2
    # Each true centre has a detection within 1.5 pixels (PSF-smoothed peaks of blended
    # sources are pulled towards each other by ≲ 1 pixel).
    for c in CENTRES:
        assert np.min(np.hypot(*(found - c).T)) < 1.5


# --------------------------------------------------------------------------- real PixelCNN
@pytest.fixture(scope="module")
def shipped_prior_fits():
    """Deep fits of a noisy two-source scene with the shipped PixelCNN++ (box = its stamp).

    Three fits of the same data: prior weight 1
    and prior weight 0 (positivity only), both from the detection cutouts (init_iter=0) so the
    prior alone makes the difference, 40 iterations; plus the default deep fit (30 baseline
    warm-start iterations, then 40 with the prior). Peak S/N ~ 15 per band: noise matters, so
    the prior has something to do.
    """
    from tfhybrid.priors.pixelcnn import load_default_pixelcnn

    prior = load_default_pixelcnn()
    frame = ModelFrame(box_size=32)
    morphs = np.stack([
        gaussian_morphology(32, 2.2, q=0.6, theta_rad=0.4),
        gaussian_morphology(32, 1.6, q=0.8, theta_rad=2.0),
    ])
    psfs = np.stack([gaussian_psf(f, 0.168, 21) for f in PSF_FWHM])
    kernels = difference_kernel(frame.model_psf(), psfs).numpy()
    corners = box_corners(CENTRES[:, ::-1], (32, 32))
    clean = scene_model(SEDS, morphs, corners, SHAPE, kernels).numpy()
    sigma = 1.0
    noisy = clean + sigma * np.random.default_rng(7).standard_normal(clean.shape)
    obs = Observation.create(noisy, psfs, noise_sigma=sigma, bands=("g", "i", "z"))
    true_flux = SEDS * morphs.sum(axis=(-2, -1))[:, None]
    base = DeblendConfig(method="deep", frame=frame, max_iter=40, init_iter=0, check_every=20)
    with_prior = deblend(obs, CENTRES, config=base, prior=prior)
    free = deblend(obs, CENTRES, config=base, prior=prior, prior_weight=0.0)
    default = deblend(obs, CENTRES, config=dataclasses.replace(base, init_iter=30), prior=prior)
    return with_prior, free, default, morphs, true_flux


def test_shipped_prior_gradient_reaches_the_morphologies(shipped_prior_fits):
    with_prior, free, _, morphs, _ = shipped_prior_fits
    assert np.isfinite(with_prior.loss_trace).all() and np.isfinite(with_prior.log_prior).all()
    # The trace holds the χ²/2 part of the loss: it must come down from the detection start
    # (measured 3170 → 2400) to about its noise expectation (n_pixels / 2 = 2400) even with
    # the prior pulling, i.e. the prior does not stop the fit from fitting the data.
    assert with_prior.loss_trace[-1] < 0.9 * with_prior.loss_trace[0]
    assert 0.8 < with_prior.chi2_per_pixel < 1.2
    # −log p_θ is in the S step: the prior fit must end at a clearly more probable morphology
    # under the prior than the positivity-only fit of the same data (measured: +8000 and
    # +17000 nats; 200 is far above the float32 / iteration noise, and fails if the prior
    # gradient is dropped, has the wrong sign, or misses the box ↔ stamp mapping).
    gain = with_prior.log_prior - free.log_prior
    assert np.all(gain > 200), gain
    # ...and closer to the truth: positivity alone fits the noise.
    for k in range(2):
        assert _rel(with_prior.morphs[k], morphs[k]) < 0.8 * _rel(free.morphs[k], morphs[k])


def test_shipped_prior_default_fit_recovers_a_two_source_blend(shipped_prior_fits):
    _, _, default, morphs, flux = shipped_prior_fits
    # Default deep mode (baseline warm start + prior). Morphology (L2) within 15 % (measured
    # 0.13 and 0.08; seeded, deterministic up to float32 thread order). Flux: the extended
    # source 0 within 6 % per band (measured <= 3 %); the compact source 1 (~13 peak units in
    # total) only within 30 % (measured +9 to +22 %): the shipped prior was trained with 0.005
    # noise, so it accepts a positive background of that order over the ~1000 box pixels,
    # which the fit fills with noise (a known bias of deep mode, see the experiments' report).
    for k in range(2):
        assert _rel(default.morphs[k], morphs[k]) < 0.15, k
    np.testing.assert_allclose(default.fluxes[0], flux[0], rtol=0.06)
    np.testing.assert_allclose(default.fluxes[1], flux[1], rtol=0.30)
    assert 0.8 < default.chi2_per_pixel < 1.2

"""A lens posterior with the PSF as an image (``LensPosterior(psf_image=...)``): the model
against scipy's convolution, the coarse search's binned PSF, and a fit that recovers the lens.

Tolerances: float32 model against float64 scipy ``fftconvolve``: 1e-5 of the peak (as
tests/physics/test_psf.py); the coarse model against the binned fine one: 5 % of the peak
(as tests/lens/test_model.py: the PSF acts before binning in one and after ray tracing in the
other).
"""

import dataclasses

import galsim
import numpy as np
import pytest
import tensorflow as tf
from scipy.signal import fftconvolve

from tests.lens.test_model import CONFIG, SIGMA, TRUTH, SmoothSourceModel
from tfhybrid.lens.fit import coarse_posterior, fit_map
from tfhybrid.lens.model import LensPosterior
from tfhybrid.physics.lensing import PARAM_NAMES, simulate_lensed_image
from tfhybrid.physics.psf import bin_psf_image
from tfhybrid.validation import TfhybridInputError

# a sheared Moffat of FWHM 0.45" (2.8 pixels of 0.16"): nothing like the config's Gaussian
PSF = galsim.Moffat(beta=2.5, fwhm=0.45).shear(g1=0.15, g2=-0.1).drawImage(
    nx=15, ny=15, scale=CONFIG.pixel_scale_arcsec, method="auto").array.astype(np.float64)
Z_TRUE = np.full((1, 8), 0.3, np.float32)


@pytest.fixture(scope="module")
def vae():
    return SmoothSourceModel()


@pytest.fixture(scope="module")
def observed(vae):
    image = simulate_lensed_image(vae.decode(Z_TRUE).numpy(),
                                  {k: [v] for k, v in TRUTH.items()}, CONFIG,
                                  psf_image=PSF).numpy()
    noisy = image + SIGMA * np.random.default_rng(4).normal(size=image.shape)
    return noisy.astype(np.float32), image


def _truth_state(post):
    state = post.state_from_dict(dict(TRUTH, z=Z_TRUE[0]))
    return dict(zip(PARAM_NAMES, state[:-1], strict=True)), state[-1]


def test_the_model_convolves_with_the_psf_image(vae, observed):
    post = LensPosterior(observed[0], SIGMA, vae, CONFIG, psf_image=PSF)
    np.testing.assert_allclose(post.psf_kernel, PSF / PSF.sum(), rtol=1e-12)
    unblurred = LensPosterior(observed[0], SIGMA, vae,
                              dataclasses.replace(CONFIG, psf_sigma_arcsec=None))
    assert unblurred.psf_kernel is None
    params, z = _truth_state(post)
    model = post.predict(params, z).numpy()[0]
    ref = fftconvolve(unblurred.predict(params, z).numpy()[0].astype(np.float64),
                      PSF / PSF.sum(), mode="same")
    assert np.max(np.abs(model - ref)) < 1e-5 * ref.max()
    # at the truth the residuals are the noise: χ² per pixel ≈ 1 (64² pixels: ± 0.1)
    chi2 = np.mean(((model - observed[0][0]) / SIGMA) ** 2)
    assert 0.9 < chi2 < 1.1, chi2
    # the configuration's Gaussian given as an image is the same model; equal PSF values
    # share one simulator (its compiled graphs)
    gaussian = LensPosterior(observed[0], SIGMA, vae, CONFIG)
    as_image = LensPosterior(observed[0], SIGMA, vae, CONFIG, psf_image=gaussian.psf_kernel)
    np.testing.assert_allclose(as_image.predict(params, z).numpy(),
                               gaussian.predict(params, z).numpy(), rtol=0, atol=1e-6)
    again = LensPosterior(observed[0], SIGMA, vae, CONFIG, psf_image=PSF.copy() * 3.0)
    assert again._simulator is post._simulator
    # the copies a fit makes keep the PSF
    assert post.with_source_residual(None).psf_image is post.psf_image


def test_coarse_search_bins_the_psf_image(vae, observed):
    post = LensPosterior(observed[0], SIGMA, vae, CONFIG, psf_image=PSF)
    coarse = coarse_posterior(post, factor=2, supersampling=2)
    np.testing.assert_allclose(coarse.psf_kernel, bin_psf_image(PSF, 2), rtol=1e-12)
    params, z = _truth_state(coarse)
    model_c = coarse.predict(params, z).numpy()[0]
    binned = observed[1][0].reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.max(np.abs(model_c - binned)) < 0.05 * binned.max()
    # a PSF wider than the coarse grid is cropped to it (its far wings dropped)
    wide = galsim.Moffat(beta=2.5, fwhm=0.45).drawImage(
        nx=63, ny=63, scale=CONFIG.pixel_scale_arcsec, method="auto").array
    coarse = coarse_posterior(LensPosterior(observed[0], SIGMA, vae, CONFIG, psf_image=wide),
                              factor=4)
    assert coarse.psf_kernel.shape == (15, 15)


def test_bad_psf_images_are_refused(vae, observed):
    for bad, match in ((np.ones((4, 5)), "odd"), (np.full((5, 5), np.nan), "non-finite|NaN"),
                       (-PSF, "positive sum"), (np.ones((65, 65)), "larger than")):
        with pytest.raises(TfhybridInputError, match=match):
            LensPosterior(observed[0], SIGMA, vae, CONFIG, psf_image=bad)


def test_fit_with_the_psf_image_recovers_the_lens_and_its_checkpoint_knows_the_psf(
        vae, observed, tmp_path):
    # from the prior (12 coarse starts on the 2x coarser grid with the binned PSF), as
    # tests/lens/test_model.py's global search, on data made with the sheared Moffat
    post = LensPosterior(observed[0], SIGMA, vae, CONFIG, psf_image=PSF)
    fit = fit_map(post, num_starts=1, num_steps=800, coarse_starts=12, coarse_steps=300,
                  coarse_factor=2, seed=1, progress=False, newton_iter=3, scale_jumps=(),
                  checkpoint_dir=tmp_path / "ckpt")
    assert abs(fit.params["r_ein"][0] / TRUTH["r_ein"] - 1) < 0.01, fit.params["r_ein"]
    assert abs(fit.params["gamma"][0] / TRUTH["gamma"] - 1) < 0.03, fit.params["gamma"]
    model = post.predict({k: tf.constant(v) for k, v in fit.params.items()}, fit.z).numpy()
    assert np.mean(((model - observed[0]) / SIGMA) ** 2) < 1.1
    # the same data with another PSF is another fit: its checkpoint is refused
    other = LensPosterior(observed[0], SIGMA, vae, CONFIG, psf_image=PSF.T)
    with pytest.raises(TfhybridInputError, match="psf_sha1"):
        fit_map(other, num_starts=1, num_steps=800, coarse_starts=12, coarse_steps=300,
                coarse_factor=2, seed=1, progress=False, newton_iter=3, scale_jumps=(),
                checkpoint_dir=tmp_path / "ckpt")

"""Bad-input handling of the deblending observation (tfhybrid/deblend/scene.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tfhybrid.deblend.scene import Observation, validate_centres
from tfhybrid.physics.psf import gaussian_psf
from tfhybrid.validation import TfhybridInputError

IMAGES = np.random.default_rng(0).normal(size=(3, 20, 20))
PSFS = np.stack([gaussian_psf(0.7, 0.168, 11)] * 3)


def test_bands_of_images_and_psfs_must_agree():
    with pytest.raises(TfhybridInputError, match="psf has 2 bands but image has 3"):
        Observation.create(IMAGES, PSFS[:2], noise_sigma=1.0)


def test_psf_must_sum_to_a_positive_number():
    bad = PSFS.copy()
    bad[1] = -bad[1]
    with pytest.raises(TfhybridInputError, match="PSF of band 1 sums to"):
        Observation.create(IMAGES, bad, noise_sigma=1.0)
    bad[1] = 0.0
    with pytest.raises(TfhybridInputError, match="sums to 0"):
        Observation.create(IMAGES, bad, noise_sigma=1.0)


def test_centre_outside_the_image_is_an_error():
    with pytest.raises(TfhybridInputError, match=r"centre 1 at \(x=25, y=3\) lies outside"):
        validate_centres([[3.0, 3.0], [25.0, 3.0]], (20, 20))
    with pytest.raises(TfhybridInputError, match="non-finite|NaN"):
        validate_centres([[np.nan, 3.0]], (20, 20))


def test_nan_pixels_are_masked_with_a_warning_or_raise_on_request():
    img = IMAGES.copy()
    img[0, 5, 5] = np.nan
    img[2, 1, 1] = np.inf
    with pytest.warns(UserWarning, match="2 non-finite pixel"):
        obs = Observation.create(img, PSFS, noise_sigma=1.0)
    assert obs.weights[0, 5, 5] == 0 and obs.weights[2, 1, 1] == 0 and obs.n_masked == 2
    assert np.isfinite(obs.images).all()
    with pytest.raises(TfhybridInputError, match="non-finite"):
        Observation.create(img, PSFS, noise_sigma=1.0, nan_policy="raise")


@pytest.mark.parametrize("weights", [0.0, -1.0, np.array([1.0, 0.0, 1.0])])
def test_zero_or_negative_scalar_or_band_weights_are_errors(weights):
    with pytest.raises(TfhybridInputError, match="must be > 0"):
        Observation.create(IMAGES, PSFS, weights=weights)


def test_negative_pixel_weights_and_all_masked_bands_are_errors():
    w = np.ones_like(IMAGES)
    w[1, 2, 2] = -1.0
    with pytest.raises(TfhybridInputError, match="1 are negative"):
        Observation.create(IMAGES, PSFS, weights=w)
    w = np.ones_like(IMAGES)
    w[2] = 0.0
    with pytest.raises(TfhybridInputError, match=r"band\(s\) \[2\] have zero weight everywhere"):
        Observation.create(IMAGES, PSFS, weights=w)
    with pytest.raises(TfhybridInputError, match="noise_sigma must be > 0"):
        Observation.create(IMAGES, PSFS, noise_sigma=[1.0, 0.0, 1.0])


def test_per_pixel_zero_weights_mask_pixels():
    w = np.ones_like(IMAGES)
    w[0, :3] = 0.0
    obs = Observation.create(IMAGES, PSFS, weights=w)
    assert np.count_nonzero(obs.weights == 0) == 60
    np.testing.assert_allclose(obs.psfs.sum(axis=(1, 2)), 1.0, rtol=1e-6)

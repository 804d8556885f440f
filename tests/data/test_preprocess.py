"""Tests of tfhybrid.data.preprocess: the lensing paper's cuts and the HST -> survey reconvolution.

Images are built with known answers: the S/N statistic ``max(I_1/4) / sigma`` from 4 x 4 blocks
of known value, split sizes from the paper's numbers, and PSF sizes from ``galsim.hsm`` adaptive
moments of GalSim's own rendering of the same profile.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.data.cosmos_example import EXAMPLE_DIR, requires_cosmos_example
from tfhybrid.data.preprocess import (
    LENSING_SPLIT,
    crop_to_square,
    downscale,
    downscaled_noise_sigma,
    make_lensing_training_set,
    make_survey_stamps,
    preprocess_lensing,
    reconvolve_to_survey,
    select_valid_sersic_fits,
    snr_cut_mask,
    snr_quarter,
    split_indices,
)
from tfhybrid.data.simulate import draw_psf_image, make_psf
from tfhybrid.validation import TfhybridInputError

# ------------------------------------------------------------------------ Sérsic-fit selection


@requires_cosmos_example
def test_sersic_selection_drops_exactly_the_failed_and_unphysical_fits():
    from astropy.table import Table

    table = Table.read(EXAMPLE_DIR / "real_galaxy_catalog_23.5_example_fits.fits", hdu=1)
    assert select_valid_sersic_fits(table).all()  # the 100 real example fits all converged
    bad = {
        3: ("fit_status", (slice(None), 4), 0),  # bad input
        7: ("fit_status", (slice(None), 4), 5),  # iteration limit
        11: ("sersicfit", (slice(None), 2), 7.5),  # Sérsic n beyond galsim.Sersic's 6.2
        13: ("sersicfit", (slice(None), 3), 0.0),  # axis ratio 0
        17: ("sersicfit", (slice(None), 0), np.nan),
        19: ("hlr", (slice(None), 0), -0.1),
        23: ("flux", (slice(None), 0), 0.0),
        29: ("viable_sersic", (), 0),
    }
    for row, (col, idx, value) in bad.items():
        values = np.array(table[col])
        values[(row,) + idx[1:]] = value
        table[col] = values
    keep = select_valid_sersic_fits(table)
    np.testing.assert_array_equal(np.flatnonzero(~keep), sorted(bad))


def test_sersic_selection_needs_the_columns():
    with pytest.raises(TfhybridInputError, match="lacks column"):
        select_valid_sersic_fits({"fit_status": np.ones((2, 5))})


# ----------------------------------------------------------------------------- crop, downscale


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (8, 5), (8, 6), (7, 4), (6, 6)])
def test_crop_to_square_keeps_the_centre_pixel_and_values(shape):
    ny, nx = shape
    image = np.arange(ny * nx, dtype=float).reshape(ny, nx)
    out = crop_to_square(image)
    s = min(shape)
    assert out.shape == (s, s)
    assert out[s // 2, s // 2] == image[ny // 2, nx // 2]
    # A contiguous, unmodified cut of the input.
    y0, x0 = np.argwhere(image == out[0, 0])[0]
    np.testing.assert_array_equal(out, image[y0 : y0 + s, x0 : x0 + s])


@pytest.mark.parametrize("n_in", [128, 100, 64, 77])
def test_downscale_conserves_flux_or_mean(n_in):
    rng = np.random.default_rng(n_in)
    image = rng.lognormal(size=(3, n_in, n_in))
    flux = downscale(image, 64, preserve="flux")
    sb = downscale(image, 64, preserve="surface_brightness")
    assert flux.shape == sb.shape == (3, 64, 64)
    # Exact pixel integration: sums (flux) or means (surface brightness) agree to rounding.
    np.testing.assert_allclose(flux.sum(axis=(1, 2)), image.sum(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(sb.mean(axis=(1, 2)), image.mean(axis=(1, 2)), rtol=1e-12)
    if n_in % 64 == 0:
        f = n_in // 64
        blocks = image.reshape(3, 64, f, 64, f).sum(axis=(2, 4))
        np.testing.assert_allclose(flux, blocks, rtol=1e-12)


def test_downscaled_noise_sigma_matches_monte_carlo():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((8, 128, 128))
    measured = downscale(noise, 64).std()
    # 2 x 2 block sums of unit white noise have sigma 2; 32768 samples: ~0.4 % standard error.
    assert downscaled_noise_sigma(1.0, 128, 64) == pytest.approx(2.0)
    assert measured == pytest.approx(2.0, rel=0.02)
    assert downscaled_noise_sigma(1.0, 128, 64, "surface_brightness") == pytest.approx(0.5)


def test_downscale_bad_input():
    with pytest.raises(TfhybridInputError, match="square"):
        downscale(np.ones((64, 80)))
    with pytest.raises(TfhybridInputError, match="does not upsample"):
        downscale(np.ones((32, 32)), 64)
    image = np.ones((64, 64))
    image[3, 3] = np.nan
    with pytest.raises(TfhybridInputError, match="non-finite"):
        downscale(image, 32)


# ------------------------------------------------------------------------------- the S/N cut


def _block_image(size: int, value: float, y0: int = 64, x0: int = 64) -> np.ndarray:
    """Zero image with one 4 x 4 block of ``value`` at (y0, x0)."""
    image = np.zeros((size, size))
    image[y0 : y0 + 4, x0 : x0 + 4] = value
    return image


def test_snr_statistic_is_max_of_4x4_block_means_over_sigma():
    # Aligned with the 4 x 4 grid the block mean is the value; shifted by 2 pixels the block is
    # shared by four blocks, each a quarter filled: max(I_1/4) = value / 4.
    aligned = _block_image(128, 40.0)
    shifted = _block_image(128, 40.0, 66, 66)
    np.testing.assert_allclose(snr_quarter(np.stack([aligned, shifted]), 2.0), [20.0, 5.0])


def test_snr_cut_keeps_exactly_the_window():
    # max(I_1/4) / sigma: 14.99, 15, 30, 50, 50.01, 80, and 30 / 2 = 15, 30 / 0.5 = 60.
    values = [14.99, 15.0, 30.0, 50.0, 50.01, 80.0, 30.0, 30.0]
    sigma = np.array([1, 1, 1, 1, 1, 1, 2.0, 0.5])
    images = np.stack([_block_image(128, v) for v in values])
    np.testing.assert_allclose(snr_quarter(images, sigma), [14.99, 15, 30, 50, 50.01, 80, 15, 60])
    mask = snr_cut_mask(images, sigma, 15.0, 50.0)
    np.testing.assert_array_equal(np.flatnonzero(mask), [1, 2, 3, 6])
    out, kept = preprocess_lensing(images, sigma)
    np.testing.assert_array_equal(kept, [1, 2, 3, 6])
    assert out.shape == (4, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0)  # divided by the maximum


def test_preprocess_lensing_drops_small_stamps_and_crops_the_rest():
    # A list of stamps of varying shapes: 60 px (< 64) is dropped even with a passing S/N; the
    # 64 x 96 one is cropped to its central 64 x 64 (which holds the bright block).
    stamps = [
        _block_image(128, 20.0),
        _block_image(60, 20.0, 28, 28),
        np.pad(_block_image(64, 20.0, 32, 32), ((0, 0), (16, 16))),
        _block_image(96, 100.0, 48, 48),  # S/N 100: cut
    ]
    out, kept = preprocess_lensing(stamps, 1.0)
    np.testing.assert_array_equal(kept, [0, 2])
    # 64 x 64 input: no downscaling; the block stays at the same place, normalised to 1.
    np.testing.assert_array_equal(out[1], _block_image(64, 1.0, 32, 32))
    with pytest.raises(TfhybridInputError, match="noise_sigma must be > 0"):
        preprocess_lensing(stamps, 0.0)
    with pytest.raises(TfhybridInputError, match="non-finite"):
        preprocess_lensing([np.full((64, 64), np.nan)], 1.0)


# ----------------------------------------------------------------------------------- splits


def test_split_has_the_papers_exact_counts():
    parts = split_indices(17543, seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"train": 15500, "test": 500,
                                                     "validation": 1543}
    everything = np.concatenate(list(parts.values()))
    np.testing.assert_array_equal(np.sort(everything), np.arange(17543))  # disjoint, complete


@pytest.mark.parametrize(
    ("n", "fractions", "counts"),
    [
        (10, (8, 1, 1), (8, 1, 1)),
        (100, (0.7, 0.2, 0.1), (70, 20, 10)),
        (7, (1, 1, 1), (3, 2, 2)),  # largest remainder, ties to the earlier split
        (5, (1, 0, 0), (5, 0, 0)),
        (1000, LENSING_SPLIT, (884, 28, 88)),  # 1000 * (15500, 500, 1543) / 17543 -> 883.5...
    ],
)
def test_split_proportions_are_configurable(n, fractions, counts):
    parts = split_indices(n, fractions, seed=3)
    assert (len(parts["train"]), len(parts["test"]), len(parts["validation"])) == counts
    assert sum(counts) == n
    again = split_indices(n, fractions, seed=3)
    for k in parts:
        np.testing.assert_array_equal(parts[k], again[k])


def test_split_depends_on_seed_and_validates():
    one, two = split_indices(100, seed=1), split_indices(100, seed=2)
    assert not np.array_equal(one["test"], two["test"])
    with pytest.raises(TfhybridInputError, match="3 numbers"):
        split_indices(10, (1, 1))
    with pytest.raises(TfhybridInputError, match=">= 0"):
        split_indices(10, (1, -1, 1))
    with pytest.raises(TfhybridInputError, match="all be zero"):
        split_indices(10, (0, 0, 0))


def test_make_lensing_training_set_small():
    out = make_lensing_training_set(6, seed=2, fractions=(4, 1, 1), stamp_size=64, size=32,
                                    num_workers=1)
    assert out["train"].shape == (4, 32, 32)
    assert out["test"].shape == (1, 32, 32) and out["validation"].shape == (1, 32, 32)
    for name in ("train", "validation", "test"):
        np.testing.assert_allclose(out[name].max(axis=(1, 2)), 1.0)
        sigma = out[f"{name}_noise_sigma"]
        # Normalised images of S/N 15-50 per 4 x 4 block: pixel noise between ~1/100 and ~1/7.
        assert np.all((sigma > 0.005) & (sigma < 0.2)), sigma
    again = make_lensing_training_set(6, seed=2, fractions=(4, 1, 1), stamp_size=64, size=32,
                                      num_workers=1)
    np.testing.assert_array_equal(out["train"], again["train"])
    # noiseless=True: the same selection and noisy images, plus each galaxy without its noise,
    # peak-normalised; the noisy image minus the clean one (at the noisy image's scale) is
    # the noise, of the recorded sigma.
    both = make_lensing_training_set(6, seed=2, fractions=(4, 1, 1), stamp_size=64, size=32,
                                     num_workers=1, noiseless=True)
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(both[name], out[name])
        clean = both[f"{name}_noiseless"]
        assert clean.shape == out[name].shape
        np.testing.assert_allclose(clean.max(axis=(1, 2)), 1.0)
    noisy, clean = both["train"], both["train_noiseless"]
    # least-squares scale of the clean image in the noisy one (noise has zero mean)
    scale = (noisy * clean).sum(axis=(1, 2)) / (clean * clean).sum(axis=(1, 2))
    resid = noisy - scale[:, None, None] * clean
    np.testing.assert_allclose(resid.std(axis=(1, 2)), both["train_noise_sigma"], rtol=0.15)


# ---------------------------------------------------------------------------- reconvolution


def _hsm(image: np.ndarray, scale: float):
    import galsim

    return galsim.hsm.FindAdaptiveMom(galsim.Image(np.asarray(image, np.float64), scale=scale))


HST_SCALE = 0.03


@pytest.fixture(scope="module")
def hst_psf_image():
    # As large as the galaxy stamps below, so that the deconvolution removes the PSF's wings.
    return draw_psf_image(make_psf(), HST_SCALE, size=129)


def test_point_source_takes_the_reference_psf_size(hst_psf_image):
    import galsim

    # An unresolved galaxy: its HST image is the HST PSF. Reconvolved, it must be the survey
    # PSF (Gaussian FWHM 0.6") with the 0.168" pixel.
    out = reconvolve_to_survey(hst_psf_image, hst_psf_image, HST_SCALE, stamp_size=32)
    ref = galsim.Gaussian(fwhm=0.6).drawImage(nx=32, ny=32, scale=0.168, use_true_center=False)
    got, want = _hsm(out, 0.168), _hsm(ref.array, 0.168)
    # Size within 0.2 % (measured < 1e-6). Leaving the HST PSF in (no deconvolution) would
    # make it 2 % too large, applying the survey pixel twice 0.8 %.
    assert got.moments_sigma == pytest.approx(want.moments_sigma, rel=2e-3)
    assert abs(got.observed_shape.e) < 0.01  # still round
    assert out.sum() == pytest.approx(1.0, rel=0.01)  # flux conserved
    # Centred on pixel (16, 16), as the reference.
    assert abs(got.moments_centroid.x - want.moments_centroid.x) < 0.05
    assert abs(got.moments_centroid.y - want.moments_centroid.y) < 0.05


@pytest.mark.parametrize(("rotation", "flip"), [(0.0, False), (np.pi / 3, False), (0.5, True)])
def test_galaxy_matches_direct_rendering_with_the_survey_psf(hst_psf_image, rotation, flip):
    import galsim

    gal = galsim.Sersic(n=1.5, half_light_radius=0.35, flux=50.0).shear(
        q=0.5, beta=20 * galsim.degrees)
    hst = galsim.Convolve(gal, make_psf()).drawImage(nx=128, ny=128, scale=HST_SCALE,
                                                     use_true_center=False).array
    out = reconvolve_to_survey(hst, hst_psf_image, HST_SCALE, stamp_size=32,
                               rotation_rad=rotation, flip=flip)
    truth = gal.transform(-1.0, 0.0, 0.0, 1.0) if flip else gal
    truth = truth.rotate(rotation * galsim.radians)
    ref = galsim.Convolve(truth, galsim.Gaussian(fwhm=0.6)).drawImage(
        nx=32, ny=32, scale=0.168, use_true_center=False).array
    got, want = _hsm(out, 0.168), _hsm(ref, 0.168)
    # Size within 0.2 %, ellipticity components (0.1 to 0.3 here) within 2e-3; measured 2e-5
    # and 1e-5 although the HST stamp truncates the Sérsic wings at 1.9" (2.4 % of the light).
    assert got.moments_sigma == pytest.approx(want.moments_sigma, rel=2e-3)
    assert got.observed_shape.e1 == pytest.approx(want.observed_shape.e1, abs=2e-3)
    assert got.observed_shape.e2 == pytest.approx(want.observed_shape.e2, abs=2e-3)
    # The light of the HST stamp is conserved (0.5 %; measured 0.02 %).
    assert out.sum() == pytest.approx(hst.sum(), rel=5e-3)


def test_reconvolution_refuses_a_narrower_target(hst_psf_image):
    with pytest.raises(TfhybridInputError, match="narrower than the source PSF"):
        reconvolve_to_survey(hst_psf_image, hst_psf_image, HST_SCALE, target_psf_fwhm_arcsec=0.05,
                             target_pixel_scale_arcsec=0.03)
    bad = hst_psf_image.copy()
    bad[0, 0] = np.nan
    with pytest.raises(TfhybridInputError, match="image contains 1 non-finite"):
        reconvolve_to_survey(bad, hst_psf_image, HST_SCALE)
    with pytest.raises(TfhybridInputError, match="must be an angle"):
        from astropy import units as u

        reconvolve_to_survey(hst_psf_image, hst_psf_image, 0.03 * u.m)


def test_make_survey_stamps_is_seeded_and_augmentation_keeps_flux():
    kw = dict(stamp_size=32, num_workers=1)
    plain = make_survey_stamps(4, seed=5, augment=False, **kw)
    again = make_survey_stamps(4, seed=5, augment=False, **kw)
    augmented = make_survey_stamps(4, seed=5, augment=True, **kw)
    noisy = make_survey_stamps(4, seed=5, augment=False, noiseless=False, noise_sigma=0.05, **kw)
    assert plain.shape == (4, 32, 32) and plain.dtype == np.float32
    np.testing.assert_array_equal(plain, again)
    # Rotations and flips move light around but keep it (1 %: resampling, stamp edges).
    np.testing.assert_allclose(augmented.sum(axis=(1, 2)), plain.sum(axis=(1, 2)), rtol=0.01)
    assert not np.allclose(augmented, plain, atol=1e-3 * plain.max())
    # Same size before and after augmentation (adaptive moments are rotation invariant; 2 %).
    for a, p in zip(augmented, plain, strict=True):
        assert _hsm(a, 0.168).moments_sigma == pytest.approx(_hsm(p, 0.168).moments_sigma,
                                                             rel=0.02)
    # 4096 noise pixels: the std of the added noise is 0.05 within 5 %.
    assert (noisy - plain).std() == pytest.approx(0.05, rel=0.05)

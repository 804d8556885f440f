"""Tests of tfhybrid.data.simulate: reproducibility, flux, size, noise and input validation.

The batched Fourier renderer is checked against GalSim's own ``drawImage`` of the same profile
(``galaxy_profile`` convolved with ``make_psf``), drawn on the same grid with the galaxy at pixel
(s // 2, s // 2) (``use_true_center=False``).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u

from tfhybrid.data.simulate import galaxy_profile, make_psf, simulate_galaxy_stamps
from tfhybrid.validation import TfhybridInputError

PIXEL_SCALE = 0.03


def _galsim_reference(params, index: int, stamp_size: int, pixel_scale: float = PIXEL_SCALE):
    import galsim

    profile = galsim.Convolve(galaxy_profile(params, index), make_psf())
    return profile.drawImage(nx=stamp_size, ny=stamp_size, scale=pixel_scale,
                             use_true_center=False).array


def _half_light_radius_px(image: np.ndarray) -> float:
    """Radius (pixels) of the circle about pixel (ny // 2, nx // 2) enclosing half the stamp sum,
    linearly interpolated between pixel-centre radii."""
    ny, nx = image.shape
    y, x = np.indices(image.shape)
    r = np.hypot(y - ny // 2, x - nx // 2).ravel()
    order = np.argsort(r)
    cum = np.cumsum(image.ravel()[order])
    half = 0.5 * cum[-1]
    k = int(np.searchsorted(cum, half))
    r0, r1 = r[order][k - 1], r[order][k]
    c0, c1 = cum[k - 1], cum[k]
    return float(r0 + (half - c0) / (c1 - c0) * (r1 - r0))


@pytest.fixture(scope="module")
def small_galaxies():
    # Galaxies with hlr <= 0.08 * 64 px * 0.03" = 0.154": most light falls inside the stamp.
    return simulate_galaxy_stamps(12, seed=3, stamp_size=64, noise_sigma=0.0, num_workers=1,
                                  max_hlr_fraction=0.08)


def test_same_seed_same_stamps_whatever_the_workers():
    # 160 stamps = 2 chunks of CHUNK_SIZE = 128, so the 2-worker run really uses 2 processes.
    kw = dict(stamp_size=16, pixel_scale_arcsec=0.1, keep_noiseless=True)
    one = simulate_galaxy_stamps(160, seed=11, num_workers=1, **kw)
    again = simulate_galaxy_stamps(160, seed=11, num_workers=1, **kw)
    two = simulate_galaxy_stamps(160, seed=11, num_workers=2, **kw)
    np.testing.assert_array_equal(one.images, again.images)
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.noiseless, two.noiseless)
    for name in one.params:
        np.testing.assert_array_equal(one.params[name], two.params[name], err_msg=name)


def test_different_seeds_give_different_stamps():
    a = simulate_galaxy_stamps(8, seed=1, stamp_size=32, num_workers=1)
    b = simulate_galaxy_stamps(8, seed=2, stamp_size=32, num_workers=1)
    assert not np.allclose(a.params["flux"], b.params["flux"])
    # Every stamp differs (not only a few).
    diff = np.abs(a.images - b.images).max(axis=(1, 2))
    assert np.all(diff > 0)


def test_stamps_match_galsim_drawimage_pixel_by_pixel(small_galaxies):
    s = small_galaxies
    for i in range(4):
        ref = _galsim_reference(s.params, i, 64)
        # Tolerance: 1e-3 of the peak (measured ~1e-4: interpolated de Vaucouleurs transform,
        # periodic wrap of the FFT).
        np.testing.assert_allclose(s.noiseless[i], ref, atol=1e-3 * ref.max(), rtol=0)


def test_total_flux_matches_drawn_flux(small_galaxies):
    s = small_galaxies
    flux = s.params["flux"]
    stamp_sum = s.noiseless.sum(axis=(1, 2), dtype=np.float64)
    # Light inside the stamp equals GalSim's for the same profile within 1 % of the flux. (The
    # renderer's FFT box is twice the stamp and periodic, so light beyond it folds back in:
    # measured +0.2 to +0.6 % for these galaxies, largest for bulge-dominated ones; GalSim's own
    # folding threshold is 5e-3.)
    for i in range(len(s)):
        ref_sum = _galsim_reference(s.params, i, 64).sum(dtype=np.float64)
        assert abs(stamp_sum[i] - ref_sum) < 1e-2 * flux[i], i
    # For these small galaxies 85-101 % of the drawn flux lies inside the stamp (de
    # Vaucouleurs and Airy wings carry the rest), and the median galaxy loses < 5 %.
    frac = stamp_sum / flux
    assert np.all(frac < 1.01), frac
    assert np.all(frac > 0.85), frac
    assert np.median(frac) > 0.95, frac


def test_half_light_radius_matches_galsim(small_galaxies):
    s = small_galaxies
    for i in range(6):
        measured = _half_light_radius_px(s.noiseless[i])
        reference = _half_light_radius_px(_galsim_reference(s.params, i, 64))
        # 2 % tolerance on the PSF-convolved half-light radius.
        assert measured == pytest.approx(reference, rel=0.02), i
        # Convolution only widens: the convolved circular radius exceeds the intrinsic
        # circularised one, which is at most max_hlr_fraction * stamp extent.
        assert measured * PIXEL_SCALE > 0.9 * s.params["hlr_arcsec"][i]


def test_noise_std_equals_recorded_sigma():
    s = simulate_galaxy_stamps(24, seed=5, stamp_size=32, noise_sigma=(0.002, 0.02),
                               num_workers=1)
    resid = (s.images - s.noiseless).astype(np.float64)
    sigma = s.noise_sigma.astype(np.float64)
    assert sigma.min() >= 0.002 and sigma.max() <= 0.02
    assert np.ptp(sigma) > 0.005  # a range, not one value
    z = resid / sigma[:, None, None]
    # 24 * 1024 normalised pixels: std of the std is 1/sqrt(2 N) ~ 0.0044; allow 5 sigma.
    assert z.std() == pytest.approx(1.0, abs=0.025)
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    # Per stamp (1024 pixels, std error ~0.022): within 0.11.
    per_stamp = z.reshape(len(s), -1).std(axis=1)
    np.testing.assert_allclose(per_stamp, 1.0, atol=0.11)


def test_zero_noise_means_images_equal_noiseless():
    s = simulate_galaxy_stamps(4, seed=0, stamp_size=16, pixel_scale_arcsec=0.1,
                               noise_sigma=0.0, num_workers=1)
    np.testing.assert_array_equal(s.images, s.noiseless)
    np.testing.assert_array_equal(s.noise_sigma, 0.0)


def test_pixel_scale_quantity_is_converted():
    a = simulate_galaxy_stamps(2, seed=0, stamp_size=16, pixel_scale_arcsec=0.1, num_workers=1)
    b = simulate_galaxy_stamps(2, seed=0, stamp_size=16, pixel_scale_arcsec=100 * u.mas,
                               num_workers=1)
    assert b.pixel_scale_arcsec == pytest.approx(0.1)
    np.testing.assert_allclose(a.images, b.images, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=0), "n must be >= 1"),
        (dict(n=-3), "n must be >= 1"),
        (dict(noise_sigma=-0.1), "noise_sigma must be >= 0"),
        (dict(noise_sigma=(0.1, 0.01)), "low <= high"),
        (dict(pixel_scale_arcsec=0.03 * u.m), "must be an angle"),
        (dict(pixel_scale_arcsec=0.0), "pixel_scale_arcsec must be"),
        (dict(stamp_size=4), "stamp_size must be >= 8"),
        (dict(stamp_size=8, pixel_scale_arcsec=0.002), "too small"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(n=2.5), "n must be an integer"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(n=2, seed=0, stamp_size=16, num_workers=1)
    args.update(kwargs)
    with pytest.raises(TfhybridInputError, match=match):
        simulate_galaxy_stamps(**args)


def test_rendered_flux_and_half_light_radius_match_the_drawn_parameters():
    import galsim

    from tfhybrid.data.simulate import psf_kimage, render_galaxies

    # The parameters of real simulated galaxies (hlr <= 0.06 * 64 * 0.03" = 0.115"), made round
    # and knot-free so that the circular half-light radius is the drawn circularised one, then
    # rendered by the simulation's renderer at 0.004"/px with a negligible PSF (FWHM 0.002").
    s = simulate_galaxy_stamps(8, seed=3, stamp_size=64, noise_sigma=0.0, num_workers=1,
                               max_hlr_fraction=0.06)
    p = {k: np.array(v) for k, v in s.params.items()}
    p["disk_q"][:] = 1.0
    p["bulge_q"][:] = 1.0
    p["knot_fraction"][:] = 0.0
    scale, fft = 0.004, 512
    psf_k = psf_kimage(galsim.Gaussian(fwhm=0.002), fft, scale)
    # The whole periodic FFT image holds exactly the drawn flux (float32 rounding: 1e-5).
    full = render_galaxies(p, psf_k, fft, scale, fft)
    np.testing.assert_allclose(full.sum(axis=(1, 2), dtype=np.float64), p["flux"], rtol=1e-5)
    # Radius enclosing half the drawn flux: within 1.5 % of hlr_arcsec (measured <= 0.5 %; the
    # 0.004" pixel and PSF widen it by ~0.1 %, the bisection of component_sizes is exact).
    centre = galsim.PositionD(fft // 2 + 1, fft // 2 + 1)  # pixel fft // 2, GalSim 1-based
    for i in range(len(s)):
        image = galsim.Image(full[i].astype(np.float64), scale=scale)
        hlr = image.calculateHLR(center=centre, flux=float(p["flux"][i]))
        assert hlr == pytest.approx(p["hlr_arcsec"][i], rel=0.015), i

"""Tests of tfhybrid.lens.mocks: held-out sources, mock systems, FITS round trip."""

import numpy as np
import pytest
from astropy.io import fits

from tfhybrid.lens.mocks import (
    FITS_KEYS,
    held_out_sources,
    make_mocks,
    mock_image_counts,
    read_mock_fits,
    rescale_to_central_third,
    write_mock_fits,
)
from tfhybrid.physics.lensing import (
    PARAM_NAMES,
    LensingConfig,
    signal_to_noise,
    simulate_lensed_image,
)
from tfhybrid.validation import TfhybridInputError

SMALL = LensingConfig(n_pix=64, pixel_scale_arcsec=0.16, psf_sigma_arcsec=0.2)


def _r90(img):
    total = img.sum()
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    cy, cx = (img * yy).sum() / total, (img * xx).sum() / total
    r = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(r)
    return r[order][np.searchsorted(np.cumsum(img.ravel()[order]), 0.9 * total)]


def test_rescale_to_central_third_sets_the_90_percent_radius():
    yy, xx = np.mgrid[:64, :64]
    for width in (3.0, 6.0, 9.0):
        img = np.exp(-0.5 * ((xx - 30.2) ** 2 + (yy - 33.7) ** 2) / width**2)
        out = rescale_to_central_third(img)
        assert out.shape == (64, 64) and out.max() == pytest.approx(1.0)
        # target 64 / 6 = 10.7 px; the zoom range [0.5, 2] limits width 3 (r90 6.4 px) to
        # x 1.67 (reached) and the others fit; 1-px tolerance for the radius quantisation
        assert abs(_r90(out) - 64 / 6) < 1.0, (width, _r90(out))
        # recentred on the image centre
        cy = (out * yy).sum() / out.sum()
        cx = (out * xx).sum() / out.sum()
        assert abs(cy - 31.5) < 0.5 and abs(cx - 31.5) < 0.5
    with pytest.raises(TfhybridInputError, match="positive flux"):
        rescale_to_central_third(np.zeros((64, 64)))


def test_held_out_sources_are_deterministic_and_normalised():
    a = held_out_sources(2, seed=5)
    b = held_out_sources(2, seed=5)
    c = held_out_sources(2, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == (2, 64, 64) and a.dtype == np.float32
    np.testing.assert_allclose(a.max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert np.all(a >= 0)


def test_mocks_are_consistent_and_round_trip(tmp_path):
    yy, xx = np.mgrid[:64, :64]
    sources = np.stack(
        [np.exp(-0.5 * ((xx - 31.5 - d) ** 2 + (yy - 31.5) ** 2) / 16.0) for d in (0.0, 3.0)]
    ).astype(np.float32)
    mocks = make_mocks(2, seed=1, config=SMALL, sources=sources, noise_levels=("medium", 0.05))
    assert set(mocks.observed) == {"medium", "0.05"}
    # the noise-free image is the simulator's, the observations add noise of the stated sigma
    again = simulate_lensed_image(sources, mocks.params, SMALL).numpy()
    np.testing.assert_allclose(mocks.noiseless, again, atol=1e-6)
    for level, sigma in mocks.noise_sigma.items():
        resid = mocks.observed[level] - mocks.noiseless
        # 8192 pixels: the sample std is within 3 % of sigma (5 standard errors)
        assert abs(resid.std() / sigma - 1) < 0.03
        snr, _ = signal_to_noise(mocks.observed[level], sigma, SMALL.pixel_scale_arcsec)
        np.testing.assert_allclose(mocks.snr[level], snr)
    assert mocks.snr["0.05"][0] > mocks.snr["medium"][0]  # lower noise, higher S/N
    assert "system" in mocks.snr_table()

    paths = write_mock_fits(mocks, tmp_path)
    assert [p.name for p in paths] == ["mock_000.fits", "mock_001.fits"]
    with fits.open(paths[1]) as hdul:
        for name in PARAM_NAMES:
            assert hdul[0].header[FITS_KEYS[name]] == pytest.approx(mocks.params[name][1])
    back = read_mock_fits(paths[1])
    np.testing.assert_array_equal(back.observed["medium"][0], mocks.observed["medium"][1])
    np.testing.assert_array_equal(back.sources[0], sources[1])
    assert back.config == SMALL
    assert back.n_images is None  # not counted, not recorded
    with pytest.raises(TfhybridInputError, match="exists"):
        write_mock_fits(mocks, tmp_path)
    mocks.n_images = np.array([3, 1])  # recorded as NIMAGES when known
    write_mock_fits(mocks, tmp_path, overwrite=True)
    np.testing.assert_array_equal(read_mock_fits(paths[1]).n_images, [1])


def test_min_images_keeps_only_multiply_imaged_systems():
    """The same draws without the selection include singly imaged systems (so the selection
    has work to do); with min_images=2 every source centroid has 2-5 images, and the systems
    that were already strong lenses keep their parameters."""
    yy, xx = np.mgrid[:64, :64]
    sources = np.repeat(np.exp(-0.5 * ((xx - 31.5) ** 2 + (yy - 31.5) ** 2) / 16.0)[None], 6, 0)
    sources = sources.astype(np.float32)
    kw = dict(seed=4, config=SMALL, sources=sources, noise_levels=("medium",))
    free = make_mocks(6, **kw)
    strong = make_mocks(6, min_images=2, **kw)
    n_free = mock_image_counts(free.params, sources, SMALL)
    n_strong = mock_image_counts(strong.params, sources, SMALL)
    assert (n_free == 1).any() and (n_free >= 2).any()
    assert np.all((n_strong >= 2) & (n_strong <= 5))
    kept = n_free >= 2
    np.testing.assert_array_equal(strong.params["r_ein"][kept], free.params["r_ein"][kept])
    # the selection's counts travel with the mocks (and their files); unselected ones count
    # on demand
    np.testing.assert_array_equal(strong.n_images, n_strong)
    assert free.n_images is None
    np.testing.assert_array_equal(free.image_counts(), n_free)
    np.testing.assert_array_equal(strong.system(1).n_images, n_strong[1:2])
    with pytest.raises(TfhybridInputError, match="min_images"):
        make_mocks(1, config=SMALL, sources=sources[:1], min_images=-1)


def test_bad_mock_inputs(tmp_path):
    with pytest.raises(TfhybridInputError, match="sources must have shape"):
        make_mocks(2, config=SMALL, sources=np.ones((3, 64, 64)))
    with pytest.raises(TfhybridInputError, match="noise level"):
        make_mocks(1, config=SMALL, sources=np.ones((1, 64, 64)), noise_levels=(-1.0,))
    with pytest.raises(TfhybridInputError, match="does not exist"):
        read_mock_fits(tmp_path / "nope.fits")
    bad = tmp_path / "bad.fits"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(bad)
    with pytest.raises(TfhybridInputError, match="not a tfhybrid mock"):
        read_mock_fits(bad)
    trunc = tmp_path / "trunc.fits"
    trunc.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    with pytest.raises(TfhybridInputError):
        read_mock_fits(trunc)


def test_selection_that_cannot_be_met_warns():
    """No SPLE + shear images a point six times (at most five), so the selection fails after
    20 redraws: the mocks are kept and the failing systems are named."""
    yy, xx = np.mgrid[:64, :64]
    src = np.exp(-0.5 * ((xx - 31.5) ** 2 + (yy - 31.5) ** 2) / 16.0)[None].astype(np.float32)
    with pytest.warns(UserWarning, match=r"mock system\(s\) \[0\] still have"):
        mocks = make_mocks(1, seed=0, config=SMALL, sources=src, noise_levels=("medium",),
                           min_images=6)
    assert mocks.num_systems == 1


def test_mocks_with_a_psf_image_keep_it_in_the_file_and_fit_with_it(tmp_path, capsys):
    import galsim

    from tfhybrid.cli.lens import _load
    from tfhybrid.cli.main import build_parser, main

    psf = galsim.Moffat(beta=2.5, fwhm=0.5).shear(g1=0.2).drawImage(
        nx=11, ny=11, scale=SMALL.pixel_scale_arcsec, method="auto").array
    sources = held_out_sources(1, seed=2)
    mocks = make_mocks(1, seed=1, config=SMALL, sources=sources, noise_levels=("high",),
                       psf_image=3.0 * psf)
    np.testing.assert_allclose(mocks.psf_image, psf / psf.sum(), rtol=1e-6)  # float32 file
    expected = simulate_lensed_image(sources, mocks.params, SMALL, psf_image=psf).numpy()
    np.testing.assert_allclose(mocks.noiseless, expected, rtol=1e-6, atol=1e-7)
    # the Gaussian of the configuration would be another image
    assert np.abs(mocks.noiseless - simulate_lensed_image(sources, mocks.params, SMALL)
                  .numpy()).max() > 0.01 * expected.max()
    back = read_mock_fits(write_mock_fits(mocks, tmp_path)[0])
    np.testing.assert_array_equal(back.psf_image, mocks.psf_image)
    assert list(back.observed) == ["high"] and back.system(0).psf_image is back.psf_image
    assert read_mock_fits(write_mock_fits(make_mocks(1, seed=1, config=SMALL, sources=sources,
                                                     noise_levels=("high",)),
                                          tmp_path / "gauss")[0]).psf_image is None
    # fit --mock builds its posterior with the file's PSF; files of other PSFs are refused
    args = build_parser().parse_args(["lens", "fit", "--mock", str(tmp_path / "mock_000.fits"),
                                      "--out", "unused"])
    posterior = _load(args)[0]
    np.testing.assert_allclose(posterior.psf_kernel, mocks.psf_image, rtol=1e-12)
    assert main(["lens", "fit", "--mock", str(tmp_path / "mock_000.fits"),
                 str(tmp_path / "gauss" / "mock_000.fits"), "--out", str(tmp_path / "o")]) == 2
    assert "different grids / PSFs" in capsys.readouterr().err

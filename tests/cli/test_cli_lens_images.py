"""``tfhybrid lens fit|sample --image``: observed images (FITS with a WCS, any brightness unit)
instead of mock files, end to end, and the errors that protect it."""

import json

import numpy as np
import pytest
from astropy.io import fits

from tfhybrid.cli.main import main
from tfhybrid.lens.mocks import make_mocks
from tfhybrid.physics.lensing import LensingConfig
from tfhybrid.physics.psf import gaussian_psf, psf_sigma_to_fwhm

CONFIG = LensingConfig(n_pix=64, pixel_scale_arcsec=0.16, psf_sigma_arcsec=0.2)
UNIT = 1000.0  # the "observation" is in other units than the model's (e.g. e-/s)


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    d = tmp_path_factory.mktemp("obs")
    mocks = make_mocks(1, seed=4, noise_levels=("high",), config=CONFIG, min_images=2)
    hdu = fits.PrimaryHDU((UNIT * mocks.observed["high"][0]).astype(np.float32))
    # a celestial WCS in degrees, as a real image has (RA flipped)
    for key, value in dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRPIX1=32.5, CRPIX2=32.5,
                           CRVAL1=150.1, CRVAL2=2.2, CDELT1=-0.16 / 3600,
                           CDELT2=0.16 / 3600, CUNIT1="deg", CUNIT2="deg").items():
        hdu.header[key] = value
    hdu.writeto(d / "lens.fits")
    # the same image with a bad column band (NaN) and its noise maps: σ (NaN = masked) and
    # inverse variance (0 = masked)
    sigma = np.full(hdu.data.shape, UNIT * mocks.noise_sigma["high"], np.float32)
    sigma[:, 20:23] = np.nan
    masked = fits.PrimaryHDU(np.where(np.isnan(sigma), np.nan, hdu.data), hdu.header)
    masked.writeto(d / "lens_masked.fits")
    fits.PrimaryHDU(sigma).writeto(d / "rms.fits")
    fits.PrimaryHDU(np.nan_to_num(1.0 / sigma**2, nan=0.0)).writeto(d / "weight.fits")
    fits.PrimaryHDU(np.zeros((32, 32), np.float32)).writeto(d / "small.fits")
    odd = fits.PrimaryHDU(hdu.data[:62, :62])
    odd.header["PIXSCALE"] = 0.16
    odd.writeto(d / "odd.fits")
    # the mock's Gaussian PSF as a model PSF sampled 3x finer than the image (binned exactly
    # to it: a pixel-integrated profile), and one sampled 2.5x finer (refused)
    fwhm = psf_sigma_to_fwhm(CONFIG.psf_sigma_arcsec)
    for name, over in (("psf_x3.fits", 3), ("psf_x2.5.fits", 2.5)):
        psf = fits.PrimaryHDU(gaussian_psf(fwhm, CONFIG.pixel_scale_arcsec / over, 31))
        psf.header["PIXSCALE"] = CONFIG.pixel_scale_arcsec / over
        psf.writeto(d / name)
    return dict(path=d / "lens.fits", small=d / "small.fits", odd=d / "odd.fits",
                masked=d / "lens_masked.fits", rms=d / "rms.fits", weight=d / "weight.fits",
                psf=d / "psf_x3.fits", bad_psf=d / "psf_x2.5.fits",
                sigma=UNIT * mocks.noise_sigma["high"], mocks=mocks)


def test_fit_and_sample_observed_images(observed, tmp_path, capsys):
    fit_dir, sample_dir = tmp_path / "fit", tmp_path / "sample"
    image = str(observed["path"])
    # the fit: the image with a NaN column band that its noise map masks
    assert main(["lens", "fit", "--image", str(observed["masked"]), "--noise-map",
                 str(observed["rms"]), "--psf-sigma", "0.2",
                 "--steps", "30", "--starts", "1", "--coarse-starts", "2",
                 "--coarse-steps", "20", "--newton-iter", "1",
                 "--lbfgs-iter", "5", "--source-residual", "0", "--robust-block", "8",
                 "--out", str(fit_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "lens_masked.fits: 192 pixel(s) masked by the noise map" in out
    peak = float(out.split("the model's units): ")[1].split()[0])
    assert peak == pytest.approx(UNIT * np.max(observed["mocks"].observed["high"]), rel=0.3)
    assert "MAP of 1 system" in out
    data = json.loads((fit_dir / "map.json").read_text())
    assert np.isfinite(data["log_prob"][0]) and data["source_residual"] is None
    summary = json.loads((fit_dir / "map_summary.json").read_text())
    # χ²/pixel (over the unmasked pixels) near 1: σ and the image were scaled alike
    assert 0.8 < summary["chi2_per_pixel"][0] < 1.5
    assert (fit_dir / "fig_map.png").is_file()
    # the model and residual in the image's units and WCS
    assert "MAP model and residual / σ per image: lens_masked_map.fits" in out
    with fits.open(fit_dir / "lens_masked_map.fits") as hdul:
        model, resid, header = hdul[0].data, hdul["RESIDUAL"].data, hdul[0].header
        assert header["CDELT2"] == pytest.approx(0.16 / 3600) and header["CUNIT2"] == "deg"
        assert header["FLUXSCAL"] == pytest.approx(peak, rel=1e-3)
        assert header["R_EIN"] == pytest.approx(data["params"]["r_ein"][0], rel=1e-6)
        assert hdul["RESIDUAL"].header["CDELT1"] == pytest.approx(-0.16 / 3600)
    # in the input's units: (image − model) / its σ map is the residual
    pixels = fits.getdata(observed["masked"]).astype(np.float64)
    sigma = fits.getdata(observed["rms"]).astype(np.float64)
    np.testing.assert_allclose(resid[:, 23:], ((pixels - model) / sigma)[:, 23:], rtol=1e-4,
                               atol=1e-4)
    assert np.isnan(resid[:, 20:23]).all() and np.isfinite(resid[:, 23:]).all()
    assert 0.8 < np.nanstd(resid) < 1.3
    rows = summary["table"]
    assert {r["parameter"] for r in rows} >= {"r_ein", "gamma", "q"}
    assert all("true" not in r and "lo68_robust" in r for r in rows)  # no truth, robust widths
    assert "true" not in (fit_dir / "map_table.txt").read_text().split("\n")[0]
    # sampling: the whole image, σ estimated from it, the PSF as an image (the same Gaussian,
    # 3x oversampled in the file)
    assert main(["lens", "sample", "--image", image, "--noise-sigma", "auto", "--psf",
                 str(observed["psf"]), "--map", str(fit_dir / "map.json"), "--num-results", "4",
                 "--num-burnin", "0", "--robust-block", "0", "--out", str(sample_dir),
                 "--pilot-draws", "6", "--no-progress"]) == 0
    # the pilot chain that re-whitened the sampler kept its own chunks
    assert sorted(p.name for p in (sample_dir / "chunks" / "pilot").iterdir())[0] == \
        "chunk_00000.npz"
    out = capsys.readouterr().out
    # σ estimated from the image (clipped MAD of pixel differences)
    estimated = float(out.split("noise σ estimated at ")[1].split()[0])
    assert estimated == pytest.approx(observed["sigma"], rel=0.1)
    assert "PSF image 11 x 11, binned 3x to the images' pixels" in out
    assert "draws x 1 chain(s) in" in out and "after a pilot of 6 (" in out
    sampled = json.loads((sample_dir / "summary.json").read_text())
    assert sampled["pilot_draws"] == 6 and sampled["pilot_sampling_s"] > 0
    assert "HMC: 4 draws" in out
    assert (sample_dir / "posterior.nc").is_file()


def test_rms_and_weight_maps_give_the_same_posterior(observed):
    from tfhybrid.cli.lens import _load
    from tfhybrid.cli.main import build_parser

    def posterior(*noise):
        args = build_parser().parse_args(["lens", "fit", "--image", str(observed["masked"]),
                                          *noise, "--psf-sigma", "0.2", "--out", "unused"])
        return _load(args)[0]

    rms = posterior("--noise-map", str(observed["rms"]))
    weight = posterior("--weight-map", str(observed["weight"]))
    assert rms.has_noise_map and np.isinf(rms.noise_map[0][:, 20:23]).all()
    np.testing.assert_allclose(weight.noise_map, rms.noise_map, rtol=1e-6)
    np.testing.assert_array_equal(weight.observed_images, rms.observed_images)


def test_observed_image_errors(observed, tmp_path, capsys):
    image, out = str(observed["path"]), str(tmp_path / "out")
    cases = [
        (["--image", image, "--psf-sigma", "0.2"], "--image needs --noise-sigma"),
        (["--image", image, "--noise-sigma", "1"], "--image needs --noise-sigma"),
        (["--image", image, "--noise-sigma", "-1", "--psf-sigma", "0.2"],
         "noise σ must be finite and > 0"),
        (["--image", image, "--noise-sigma", "lots", "--psf-sigma", "0.2"],
         "--noise-sigma must be numbers or auto; got 'lots'"),
        (["--image", image, "--noise-sigma", "1", "--psf-sigma", "-0.2"],
         "--psf-sigma must be >= 0"),
        (["--image", image, "--noise-sigma", "1", "2", "3", "--psf-sigma", "0.2"],
         "3 --noise-sigma values for 1 images"),
        (["--image", image, str(observed["small"]), "--noise-sigma", "1",
          "--psf-sigma", "0.2", "--pixel-scale", "0.16"], "different sizes / pixel scales"),
        (["--image", str(observed["small"]), "--noise-sigma", "1", "--psf-sigma", "0.2"],
         "cannot tell the pixel scale"),
        (["--mock", image, "--psf-sigma", "0.2"], "--psf-sigma applies to --image only"),
        (["--mock", image, "--psf", str(observed["psf"])], "--psf applies to --image only"),
        (["--image", image, "--noise-sigma", "1", "--psf-sigma", "0.2", "--psf",
          str(observed["psf"])], "give --psf-sigma or --psf, not both"),
        (["--image", image, "--noise-sigma", "1", "--psf", str(observed["bad_psf"])],
         "ratio 2.5 is not a whole number"),
        (["--image", image, "--noise-sigma", "1", "--noise-map", str(observed["rms"]),
          "--psf-sigma", "0.2"], "give one of --noise-sigma, --noise-map and --weight-map"),
        (["--image", image, "--noise-map", str(observed["rms"]), str(observed["rms"]),
          "--psf-sigma", "0.2"], "2 noise / weight maps for 1 images"),
        (["--image", str(observed["masked"]), "--noise-sigma", "1", "--psf-sigma", "0.2"],
         "192 NaN or inf pixel(s); mask them"),
        (["--image", str(observed["masked"]), "--noise-map", str(observed["small"]),
          "--psf-sigma", "0.2"], "the noise map is 32 × 32 pixels but its image is 64 × 64"),
        (["--image", str(observed["path"]), "--weight-map", str(observed["small"]),
          "--psf-sigma", "0.2", "--pixel-scale", "0.16"], "the noise map is 32 × 32"),
        # the global search bins the image 4 × 4: refused before anything is written
        (["--image", str(observed["odd"]), "--noise-sigma", "1", "--psf-sigma", "0.2"],
         "dividing the image's side (62 pixels)"),
    ]
    for argv, message in cases:
        assert main(["lens", "fit", *argv, "--out", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):  # argparse: one of --mock and --image, not both
        main(["lens", "fit", "--mock", image, "--image", image, "--out", out])
    assert not (tmp_path / "out").exists()  # nothing written

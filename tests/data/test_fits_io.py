"""Tests of tfhybrid.data.fits_io: stamp and image-set FITS files round-trip, bad files fail."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from tfhybrid.data.fits_io import (
    STAMPS_FORMAT,
    read_image_sets_fits,
    read_stamps_fits,
    read_stamps_header,
    write_image_sets_fits,
    write_stamps_fits,
)
from tfhybrid.data.simulate import simulate_galaxy_stamps
from tfhybrid.validation import TfhybridInputError


@pytest.fixture(scope="module")
def stamps():
    return simulate_galaxy_stamps(5, seed=4, stamp_size=16, pixel_scale_arcsec=0.1,
                                  num_workers=1)


@pytest.fixture()
def stamp_file(tmp_path, stamps):
    return write_stamps_fits(tmp_path / "s.fits", stamps, seed=4, psf_description="test PSF")


def test_stamps_round_trip(stamp_file, stamps):
    back = read_stamps_fits(stamp_file)
    np.testing.assert_array_equal(back.images, stamps.images)
    np.testing.assert_array_equal(back.noiseless, stamps.noiseless)
    np.testing.assert_array_equal(back.noise_sigma, stamps.noise_sigma)
    np.testing.assert_array_equal(back.psf, stamps.psf)
    assert back.pixel_scale_arcsec == pytest.approx(0.1)
    assert set(back.params) == set(stamps.params)
    for name, values in stamps.params.items():
        np.testing.assert_array_equal(back.params[name], values, err_msg=name)
    header = read_stamps_header(stamp_file)
    assert header["FORMAT"] == STAMPS_FORMAT
    assert (header["SEED"], header["NSTAMPS"], header["PSFDESC"]) == (4, 5, "test PSF")
    with fits.open(stamp_file) as hdul:
        assert hdul["PARAMS"].columns["hlr_arcsec"].unit == "arcsec"


def test_array_stamps_with_string_params_and_psf_cube(tmp_path):
    images = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    psf = np.ones((2, 3, 3), np.float32) / 9
    path = write_stamps_fits(tmp_path / "a.fits", images, noise_sigma=[0.1, 0.2], psf=psf,
                             pixel_scale_arcsec=0.03, params={"ident": np.array(["a1", "b22"])})
    back = read_stamps_fits(path)
    assert back.noiseless is None
    np.testing.assert_array_equal(back.psf, psf)
    assert list(back.params["ident"]) == ["a1", "b22"]


def test_existing_file_needs_overwrite_and_no_temporary_is_left(stamp_file, stamps):
    with pytest.raises(TfhybridInputError, match="already exists"):
        write_stamps_fits(stamp_file, stamps)
    write_stamps_fits(stamp_file, stamps, overwrite=True)
    assert sorted(p.name for p in stamp_file.parent.iterdir()) == ["s.fits"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(images=np.full((2, 8, 8), np.nan)), "NaN or inf"),
        (dict(images=np.ones((8, 8))), r"shape \(n, ny, nx\)"),
        (dict(noise_sigma=-1.0), "finite and >= 0"),
        (dict(psf=np.ones((3, 3, 3))), "psf must have shape"),
        (dict(pixel_scale_arcsec=-0.1), "must be > 0"),
    ],
)
def test_bad_stamps_are_refused_and_nothing_is_written(tmp_path, change, match):
    args = dict(images=np.ones((2, 8, 8)), noise_sigma=0.1, psf=np.ones((3, 3)),
                pixel_scale_arcsec=0.03)
    args.update(change)
    images = args.pop("images")
    with pytest.raises(TfhybridInputError, match=match):
        write_stamps_fits(tmp_path / "x.fits", images, **args)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_files_name_the_file(tmp_path, stamp_file):
    missing = tmp_path / "missing.fits"
    with pytest.raises(TfhybridInputError, match="missing.fits does not exist"):
        read_stamps_fits(missing)
    text = tmp_path / "text.fits"
    text.write_text("hello")
    with pytest.raises(TfhybridInputError, match="text.fits is not a FITS file"):
        read_stamps_fits(text)
    truncated = tmp_path / "cut.fits"
    truncated.write_bytes(stamp_file.read_bytes()[:6000])
    with pytest.raises(TfhybridInputError, match="cut.fits is not a readable FITS file"):
        read_stamps_fits(truncated)
    other = tmp_path / "other.fits"
    fits.PrimaryHDU(np.ones((4, 4))).writeto(other)
    with pytest.raises(TfhybridInputError, match="other.fits is not a tfhybrid stamp file"):
        read_stamps_fits(other)


def test_nan_pixels_in_a_file_are_reported(tmp_path, stamp_file):
    with fits.open(stamp_file) as hdul:
        hdul["IMAGES"].data[1, 2, 3] = np.nan
        hdul.writeto(tmp_path / "nan.fits")
    with pytest.raises(TfhybridInputError, match="IMAGES contains 1 NaN"):
        read_stamps_fits(tmp_path / "nan.fits")


def test_image_sets_round_trip_with_an_empty_set(tmp_path):
    rng = np.random.default_rng(0)
    sets = {"train": rng.random((3, 8, 8)), "validation": rng.random((1, 8, 8)),
            "test": np.zeros((0, 8, 8))}
    tables = {"train": {"index": np.array([4, 0, 2])}, "validation": {"noise_sigma": [0.5]}}
    path = write_image_sets_fits(tmp_path / "sets.fits", sets, tables=tables,
                                 header={"TASK": ("lensing", "what for")})
    back = read_image_sets_fits(path)
    for name, images in sets.items():
        np.testing.assert_allclose(back[name], images.astype(np.float32))
    assert back["test"].shape == (0, 8, 8)
    np.testing.assert_array_equal(back["train_index"], [4, 0, 2])
    np.testing.assert_allclose(back["validation_noise_sigma"], [0.5])
    assert read_stamps_header(path)["TASK"] == "lensing"
    with pytest.raises(TfhybridInputError, match="not a tfhybrid image-set file"):
        read_image_sets_fits(_stamp_like(tmp_path))


def _stamp_like(tmp_path):
    path = tmp_path / "plain.fits"
    fits.PrimaryHDU().writeto(path)
    return path

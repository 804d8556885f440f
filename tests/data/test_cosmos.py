"""Tests of tfhybrid.data.cosmos on GalSim's real 100-galaxy COSMOS example release.

The catalog, parametric-fit, selection and PSF files are the real ones (linked, never copied);
only the galaxy image file is written by the test (``tests/data/cosmos_example.py``). GalSim's
own ``RealGalaxyCatalog`` reads the same folder as an independent reference.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from tests.data.cosmos_example import (
    CATALOG,
    EXAMPLE_DIR,
    REAL_FILES,
    make_cosmos_dir,
    requires_cosmos_example,
)
from tfhybrid.data.cosmos import COSMOSDataError, read_cosmos_catalog
from tfhybrid.validation import TfhybridInputError

pytestmark = requires_cosmos_example


@pytest.fixture(scope="module")
def cosmos(tmp_path_factory):
    return make_cosmos_dir(tmp_path_factory.mktemp("cosmos") / "example")


def _fresh_dir(tmp_path, cosmos_dir):
    """A private copy of the example folder (real files as links) that a test may damage."""
    target = tmp_path / "damaged"
    target.mkdir()
    for entry in cosmos_dir.iterdir():
        if entry.is_symlink():
            (target / entry.name).symlink_to(entry.resolve())
        else:
            shutil.copy(entry, target / entry.name)
    return target


def test_catalog_round_trips(cosmos):
    directory, images = cosmos
    with read_cosmos_catalog(directory) as cat:
        assert cat.sample == "23.5_example"
        assert len(cat) == 100
        original = Table.read(EXAMPLE_DIR / CATALOG, hdu=1)
        # Every column and row of the real-galaxy catalog comes back unchanged.
        assert cat.catalog.colnames == original.colnames
        for name in original.colnames:
            np.testing.assert_array_equal(cat.catalog[name], original[name], err_msg=name)
        np.testing.assert_array_equal(cat.ident, original["IDENT"])
        np.testing.assert_array_equal(cat.mag, original["MAG"])
        # PIXEL_SCALE is stored as 0.03 in single precision in the real file.
        np.testing.assert_allclose(cat.pixel_scale_arcsec, 0.03, rtol=1e-7)
        np.testing.assert_allclose(cat.noise_sigma**2, original["NOISE_VARIANCE"], rtol=1e-12)
        # The parametric fits and selection tables are row-aligned with the catalog.
        np.testing.assert_array_equal(cat.parametric["IDENT"], original["IDENT"])
        np.testing.assert_array_equal(cat.selection["IDENT"], original["IDENT"])
        assert cat.missing_files() == []
        # Galaxy images come back bit for bit, in catalog order, with their own PSF and noise.
        for gal in cat.iter_galaxies(range(0, 100, 7)):
            i = gal["index"]
            np.testing.assert_array_equal(gal["image"], images[i])
            assert gal["ident"] == original["IDENT"][i]
            assert gal["noise_sigma"] == pytest.approx(np.sqrt(original["NOISE_VARIANCE"][i]))
            assert gal["psf"].ndim == 2 and gal["psf"].shape[0] >= 37


def test_reader_agrees_with_galsim_realgalaxycatalog(cosmos):
    import galsim

    directory, _ = cosmos
    ref = galsim.RealGalaxyCatalog(CATALOG, dir=str(directory))
    with read_cosmos_catalog(directory, sample="23.5_example") as cat:
        assert len(cat) == ref.nobjects
        np.testing.assert_array_equal(cat.ident, np.asarray(ref.ident, dtype=np.int64))
        np.testing.assert_allclose(cat.noise_variance, ref.variance, rtol=1e-12)
        for i in (0, 1, 42, 99):
            np.testing.assert_array_equal(cat.galaxy_image(i), ref.getGalImage(i).array)
            np.testing.assert_array_equal(cat.psf_image(i), ref.getPSFImage(i).array)


def test_download_layout_subfolder_is_found(tmp_path, cosmos):
    # galsim_download_cosmos -s 25.2 -d DIR unpacks into DIR/COSMOS_25.2_training_sample with
    # files named real_galaxy_catalog_25.2*.fits; the reader accepts DIR itself.
    directory, images = cosmos
    sub = tmp_path / "COSMOS_25.2_training_sample"
    sub.mkdir()
    for entry in directory.iterdir():
        (sub / entry.name.replace("23.5_example", "25.2")).symlink_to(entry.resolve())
    with read_cosmos_catalog(tmp_path) as cat:
        assert cat.sample == "25.2"
        assert cat.directory == sub
        np.testing.assert_array_equal(cat.galaxy_image(3), images[3])


def _assert_names_file_and_hint(err: pytest.ExceptionInfo, file_name: str) -> None:
    message = str(err.value)
    assert file_name in message, message
    assert "galsim_download_cosmos" in message, message
    assert "\n" not in message.strip()


def test_missing_directory(tmp_path):
    with pytest.raises(COSMOSDataError) as err:
        read_cosmos_catalog(tmp_path / "nowhere")
    _assert_names_file_and_hint(err, "nowhere")


def test_directory_without_catalog(tmp_path):
    with pytest.raises(COSMOSDataError) as err:
        read_cosmos_catalog(tmp_path)
    _assert_names_file_and_hint(err, "real_galaxy_catalog_25.2.fits")


def test_missing_parametric_file(tmp_path, cosmos):
    d = _fresh_dir(tmp_path, cosmos[0])
    (d / REAL_FILES[1]).unlink()
    with pytest.raises(COSMOSDataError, match="not found") as err:
        read_cosmos_catalog(d)
    _assert_names_file_and_hint(err, REAL_FILES[1])


def test_catalog_that_is_not_fits(tmp_path, cosmos):
    d = _fresh_dir(tmp_path, cosmos[0])
    (d / CATALOG).unlink()
    (d / CATALOG).write_text("this is not a FITS file\n")
    with pytest.raises(COSMOSDataError, match="unreadable") as err:
        read_cosmos_catalog(d)
    _assert_names_file_and_hint(err, CATALOG)


def test_truncated_catalog(tmp_path, cosmos):
    d = _fresh_dir(tmp_path, cosmos[0])
    data = (EXAMPLE_DIR / CATALOG).read_bytes()
    (d / CATALOG).unlink()
    (d / CATALOG).write_bytes(data[: 2880 + 2880 + 100])  # headers + a sliver of the table
    with pytest.raises(COSMOSDataError) as err:
        read_cosmos_catalog(d)
    _assert_names_file_and_hint(err, CATALOG)


def test_catalog_missing_a_column(tmp_path, cosmos):
    d = _fresh_dir(tmp_path, cosmos[0])
    table = Table.read(EXAMPLE_DIR / CATALOG, hdu=1)
    table.remove_column("GAL_HDU")
    (d / CATALOG).unlink()
    table.write(d / CATALOG, format="fits")
    with pytest.raises(COSMOSDataError, match="GAL_HDU") as err:
        read_cosmos_catalog(d)
    _assert_names_file_and_hint(err, CATALOG)


def test_misaligned_parametric_table(tmp_path, cosmos):
    d = _fresh_dir(tmp_path, cosmos[0])
    table = Table.read(EXAMPLE_DIR / REAL_FILES[1], hdu=1)[::-1]
    (d / REAL_FILES[1]).unlink()
    table.write(d / REAL_FILES[1], format="fits")
    with pytest.raises(COSMOSDataError, match="do not match") as err:
        read_cosmos_catalog(d)
    _assert_names_file_and_hint(err, REAL_FILES[1])


def test_missing_galaxy_image_file(tmp_path, cosmos):
    d = _fresh_dir(tmp_path, cosmos[0])
    (d / "real_galaxy_images.fits").unlink()
    cat = read_cosmos_catalog(d)  # images are read lazily
    assert [p.name for p in cat.missing_files()] == ["real_galaxy_images.fits"]
    with pytest.raises(COSMOSDataError, match="not found") as err:
        cat.galaxy_image(0)
    _assert_names_file_and_hint(err, "real_galaxy_images.fits")


def test_truncated_galaxy_image_file(tmp_path, cosmos):
    d = _fresh_dir(tmp_path, cosmos[0])
    path = d / "real_galaxy_images.fits"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with read_cosmos_catalog(d) as cat:
        np.testing.assert_array_equal(cat.galaxy_image(0), cosmos[1][0])  # intact part reads
        with pytest.raises(COSMOSDataError) as err:
            cat.galaxy_image(99)
    _assert_names_file_and_hint(err, "real_galaxy_images.fits")


def test_nan_in_galaxy_image(tmp_path, cosmos):
    d = _fresh_dir(tmp_path, cosmos[0])
    path = d / "real_galaxy_images.fits"
    with fits.open(path, mode="update") as hdul:
        hdul[5].data[3, 4] = np.nan
    with read_cosmos_catalog(d) as cat, pytest.raises(COSMOSDataError, match="non-finite") as err:
        cat.galaxy_image(5)
    _assert_names_file_and_hint(err, "real_galaxy_images.fits")


def test_bad_arguments(cosmos):
    with pytest.raises(TfhybridInputError, match="sample must be one of"):
        read_cosmos_catalog(cosmos[0], sample="99")
    with read_cosmos_catalog(cosmos[0]) as cat:
        with pytest.raises(TfhybridInputError, match="out of range"):
            cat.galaxy_image(100)
        with pytest.raises(TfhybridInputError, match="must be an integer"):
            cat.galaxy_image(1.5)

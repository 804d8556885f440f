"""Tests of ``tfhybrid data simulate|cosmos|preprocess|show`` through ``tfhybrid.cli.main.main``.

Small inputs only (a few 16-64 pixel stamps, one worker). Every error case checks the exit code,
the single stderr line naming the argument or file, and that no output (not even a temporary
file) was left behind.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from tests.data.cosmos_example import galaxy_shape, make_cosmos_dir, requires_cosmos_example
from tfhybrid.cli.main import main
from tfhybrid.data.fits_io import read_image_sets_fits, read_stamps_fits
from tfhybrid.validation import TfhybridInputError

SMALL = ["--n", "6", "--stamp-size", "32", "--workers", "1", "--no-progress"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one line, no traceback
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A 64 x 64 stamp file written by `data simulate` (shared, read-only)."""
    out = tmp_path_factory.mktemp("sim") / "run"
    assert main(["data", "simulate", "--n", "8", "--seed", "3", "--workers", "1",
                 "--no-progress", "--out", str(out)]) == 0
    return out / "stamps.fits"


# ----------------------------------------------------------------------------------- simulate


def test_simulate_writes_fits_and_mosaic_and_one_summary_line(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(capsys, "data", "simulate", *SMALL, "--seed", "1", "--out", out)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["mosaic.png", "stamps.fits"]
    assert len(stdout.strip().splitlines()) == 1
    assert stdout.startswith("simulated 6 stamps 32x32") and "stamps/s" in stdout
    stamps = read_stamps_fits(out / "stamps.fits")
    assert stamps.images.shape == (6, 32, 32)
    assert (out / "mosaic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same seed, same stamps (a second run into another folder).
    assert main(["data", "simulate", *SMALL, "--seed", "1", "--out", str(tmp_path / "b")]) == 0
    np.testing.assert_array_equal(read_stamps_fits(tmp_path / "b" / "stamps.fits").images,
                                  stamps.images)


def test_simulate_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["data", "simulate", *SMALL, "--out", str(out)]) == 0
    before = (out / "stamps.fits").read_bytes()
    code, _, err = _run(capsys, "data", "simulate", *SMALL, "--seed", "9", "--out", out)
    _assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "stamps.fits").read_bytes() == before
    code, _, _ = _run(capsys, "data", "simulate", *SMALL, "--seed", "9", "--out", out,
                      "--overwrite")
    assert code == 0 and (out / "stamps.fits").read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["mosaic.png", "stamps.fits"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--stamp-size", "4"], "--stamp-size must be >= 8"),
        (["--noise-sigma", "-0.5"], "--noise-sigma must be a finite number >= 0"),
        (["--noise-sigma", "nan"], "--noise-sigma must be a finite number >= 0"),
        (["--pixel-scale", "3"], "--pixel-scale must be in (0.001, 2]"),
        (["--pixel-scale", "-0.03"], "--pixel-scale must be a finite number > 0"),
        (["--n", "0"], "--n must be >= 1"),
        (["--moffat-beta", "3"], "--moffat-beta needs --psf-fwhm"),
    ],
)
def test_simulate_bad_arguments_leave_nothing(tmp_path, capsys, args, fragment):
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "data", "simulate", "--n", "2", "--no-progress", *args,
                             "--out", out)
    _assert_one_line_error(code, err, fragment)
    assert stdout == ""
    assert not out.exists()


def test_failure_while_writing_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    out = tmp_path / "run"
    code, _, err = _run(capsys, "data", "simulate", *SMALL, "--out", out)
    _assert_one_line_error(code, err, "disk full")
    assert not out.exists()  # neither stamps.fits (written first) nor any temporary file


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(TfhybridInputError, match="--stamp-size"):
        main(["--debug", "data", "simulate", "--stamp-size", "2", "--out", str(tmp_path / "x")])


def test_simulate_tfds_format(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "tfds"
    code, stdout, _ = _run(capsys, "data", "simulate", "--n", "10", "--workers", "1",
                           "--no-progress", "--format", "tfds", "--out", out)
    assert code == 0
    assert "tfds tfhybrid_simulated_galaxies/hst64" in stdout
    assert (out / "mosaic.png").is_file()
    ds = tfds.load("tfhybrid_simulated_galaxies/hst64", split="train", data_dir=str(out),
                   download=False)
    assert len(list(ds)) == 8  # 10 stamps: 8 / 1 / 1


@pytest.mark.parametrize("existing", [False, True])
def test_failed_tfds_build_leaves_nothing(tmp_path, capsys, monkeypatch, existing):
    pytest.importorskip("tensorflow_datasets")
    import tfhybrid.data.tfds_builders as builders

    def broken(*args, **kwargs):
        raise RuntimeError("simulation crashed")

    monkeypatch.setattr(builders, "simulate_galaxy_stamps", broken)
    out = tmp_path / "tfds"
    if existing:  # a folder of the user's: kept, with its content, and nothing added
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "data", "simulate", "--n", "10", "--workers", "1",
                        "--no-progress", "--format", "tfds", "--out", out)
    _assert_one_line_error(code, err, "simulation crashed")
    if existing:
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


# ----------------------------------------------------------------------------------- show


def test_show_draws_a_mosaic(tmp_path, capsys, simulated):
    png = tmp_path / "m.png"
    code, stdout, _ = _run(capsys, "data", "show", "--in", simulated, "--out", png, "--n", "4",
                           "--scale", "linear")
    assert code == 0 and stdout.strip() == f"drew 4 of 8 stamps -> {png}"
    assert png.read_bytes()[:4] == b"\x89PNG"


def _nan_copy(tmp_path, source):
    path = tmp_path / "nan.fits"
    with fits.open(source) as hdul:
        hdul["IMAGES"].data[0, 5, 5] = np.nan
        hdul.writeto(path)
    return path


@pytest.mark.parametrize("command", ["show", "preprocess"])
def test_unreadable_inputs_give_one_line_and_no_output(tmp_path, capsys, simulated, command):
    out = tmp_path / ("out.png" if command == "show" else "out.fits")
    extra = ["--task", "lensing"] if command == "preprocess" else []
    text = tmp_path / "text.fits"
    text.write_text("not fits")
    cut = tmp_path / "cut.fits"
    cut.write_bytes(simulated.read_bytes()[:10000])
    cases = [
        (text, "text.fits is not a FITS file"),
        (cut, "cut.fits is not a readable FITS file"),
        (_nan_copy(tmp_path, simulated), "nan.fits: extension IMAGES contains 1 NaN"),
        (tmp_path / "absent.fits", "absent.fits does not exist"),
    ]
    for source, fragment in cases:
        code, _, err = _run(capsys, "data", command, *extra, "--in", source, "--out", out)
        _assert_one_line_error(code, err, fragment)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.fits", "nan.fits", "text.fits"]


# ------------------------------------------------------------------------------- preprocess


def test_preprocess_lensing_from_a_stamp_file(tmp_path, capsys, simulated):
    out = tmp_path / "lensing.fits"
    code, stdout, _ = _run(capsys, "data", "preprocess", "--task", "lensing", "--in", simulated,
                           "--snr-min", "0", "--snr-max", "1e9", "--fractions", "6", "1", "1",
                           "--out", out)
    assert code == 0 and "train 6, validation 1, test 1 (64x64 px)" in stdout
    sets = read_image_sets_fits(out)
    np.testing.assert_allclose(sets["train"].max(axis=(1, 2)), 1.0)
    # The index column points back at the input rows: all 8, each once.
    rows = np.concatenate([sets[f"{k}_index"] for k in ("train", "validation", "test")])
    np.testing.assert_array_equal(np.sort(rows), np.arange(8))


def test_preprocess_records_an_input_path_of_any_length_without_a_truncation_warning(
        tmp_path, capsys, simulated, monkeypatch):
    import shutil
    import warnings
    from pathlib import Path

    from astropy.io.fits.verify import VerifyWarning

    monkeypatch.chdir(tmp_path)  # relative paths: their length is the test's to choose
    # 54-67 characters: the path fits one card but its comment would not (astropy warned)
    for length in (30, 60, 100):
        stamps = Path("d" * (length - len("/s.fits"))) / "s.fits"
        stamps.parent.mkdir()
        shutil.copy(simulated, stamps)
        out = Path(f"lensing{length}.fits")
        with warnings.catch_warnings():
            warnings.simplefilter("error", VerifyWarning)
            code, _, _ = _run(capsys, "data", "preprocess", "--task", "lensing", "--in",
                              stamps, "--snr-min", "0", "--snr-max", "1e9", "--out", out)
        assert code == 0 and fits.getheader(out)["SOURCE"] == str(stamps)


def test_preprocess_deblending_simulated(tmp_path, capsys):
    out = tmp_path / "deblend.fits"
    code, stdout, _ = _run(capsys, "data", "preprocess", "--task", "deblending", "--simulate",
                           "4", "--fractions", "2", "1", "1", "--workers", "1", "--out", out)
    assert code == 0 and "train 2, validation 1, test 1 (32x32 px)" in stdout
    assert read_image_sets_fits(out)["train"].shape == (2, 32, 32)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--task", "lensing", "--simulate", "4", "--size", "4"], "--size must be >= 8"),
        (["--task", "lensing", "--simulate", "4", "--fractions", "1", "-1", "1"], "--fractions"),
        (["--task", "lensing", "--simulate", "4", "--snr-min", "60"], "--snr-min must be"),
        (["--task", "deblending", "--simulate", "4", "--pixel-scale", "0"], "--pixel-scale"),
        (["--task", "deblending", "--simulate", "4", "--psf-fwhm", "-1"], "--psf-fwhm"),
    ],
)
def test_preprocess_bad_arguments(tmp_path, capsys, args, fragment):
    out = tmp_path / "p.fits"
    code, _, err = _run(capsys, "data", "preprocess", *args, "--out", out)
    _assert_one_line_error(code, err, fragment)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- cosmos


@requires_cosmos_example
def test_cosmos_copies_and_crops_the_real_release(tmp_path, capsys):
    directory, images = make_cosmos_dir(tmp_path / "cosmos")
    out = tmp_path / "cosmos.fits"
    code, stdout, _ = _run(capsys, "data", "cosmos", "--dir", directory, "--max", "10",
                           "--stamp-size", "48", "--out", out)
    assert code == 0
    kept = [i for i in range(10) if min(galaxy_shape(i)) >= 48]
    assert f"kept {len(kept)} with stamps >= 48 px" in stdout
    stamps = read_stamps_fits(out)
    np.testing.assert_array_equal(stamps.params["index"], kept)
    for row, i in enumerate(kept):
        ny, nx = images[i].shape
        y0, x0 = ny // 2 - 24, nx // 2 - 24
        np.testing.assert_array_equal(stamps.images[row], images[i][y0 : y0 + 48, x0 : x0 + 48])
    assert stamps.psf.shape == (len(kept), 37, 37)
    np.testing.assert_allclose(stamps.psf.sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_cosmos_missing_directory(tmp_path, capsys):
    out = tmp_path / "c.fits"
    code, _, err = _run(capsys, "data", "cosmos", "--dir", tmp_path / "no_such_dir", "--out", out)
    _assert_one_line_error(code, err, "no_such_dir", "galsim_download_cosmos")
    assert not out.exists()


def test_cosmos_bad_stamp_size(tmp_path, capsys):
    code, _, err = _run(capsys, "data", "cosmos", "--dir", tmp_path, "--stamp-size", "4",
                        "--out", tmp_path / "c.fits")
    _assert_one_line_error(code, err, "--stamp-size must be >= 8")
    assert list(tmp_path.iterdir()) == []

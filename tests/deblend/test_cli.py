"""The ``tfhybrid deblend`` command (tfhybrid/cli/deblend.py), run in-process."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from tfhybrid.cli.main import main


def test_simulate_then_deblend_the_written_files(tmp_path, capsys):
    sim_dir = tmp_path / "sim"
    code = main(["deblend", "--simulate", "--seed", "3", "--baseline", "scarlet", "--box", "24",
                 "--max-iter", "40", "--out", str(sim_dir), "--no-progress"])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("simulated_seed3: scarlet,") and "chi2/pixel" in line
    for name in ("simulated_seed3.fits", "simulated_seed3_psf.fits", "simulated_seed3_truth.fits",
                 "simulated_seed3_centres.fits", "simulated_seed3_deblend.fits",
                 "simulated_seed3_deblend.png"):
        assert (sim_dir / name).stat().st_size > 0, name
    assert not list(sim_dir.glob(".*tmp*"))  # no temporary files left behind

    out = tmp_path / "fit"
    code = main(["deblend", "--image", str(sim_dir / "simulated_seed3.fits"),
                 "--psf", str(sim_dir / "simulated_seed3_psf.fits"),
                 "--centres", str(sim_dir / "simulated_seed3_centres.fits"),
                 "--baseline", "scarlet", "--box", "24", "--max-iter", "40",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    with fits.open(out / "simulated_seed3_deblend.fits") as hdul:
        model = hdul[0].data
        comps = hdul["COMPONENTS"].data
        k = hdul[0].header["NSOURCES"]
        assert hdul["MORPHS"].data.shape == (k, 24, 24)
        assert hdul["SEDS"].data.shape == (k, 5)
        assert len(hdul["CATALOG"].data) == k and "FLUX_i" in hdul["CATALOG"].columns.names
        np.testing.assert_allclose(comps.sum(axis=0), model, atol=1e-3 * np.abs(model).max())
    with fits.open(sim_dir / "simulated_seed3_centres.fits") as cat:
        assert len(cat[1].data) == k


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    img = np.random.default_rng(0).normal(size=(5, 32, 32)).astype(np.float32)
    fits.PrimaryHDU(img).writeto(tmp_path / "scene.fits")
    psf = np.zeros((4, 11, 11), np.float32)
    psf[:, 5, 5] = 1.0
    fits.PrimaryHDU(psf).writeto(tmp_path / "psf.fits")
    out = tmp_path / "out"
    code = main(["deblend", "--image", str(tmp_path / "scene.fits"), "--psf",
                 str(tmp_path / "psf.fits"), "--detect", "--baseline", "scarlet",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "psf has 4 bands but image has 5" in err
    assert not out.exists()

"""``tfhybrid lens mock|fit|sample|report`` and ``tfhybrid demo`` end to end (tiny runs)."""

import json
import shutil

import numpy as np
import pytest

from tfhybrid.cli.main import main


def test_lens_help(capsys):
    for argv in (["lens", "--help"], ["lens", "mock", "--help"], ["lens", "fit", "--help"],
                 ["lens", "sample", "--help"], ["lens", "report", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--num-burnin" in capsys.readouterr().out


def test_mock_fit_sample_report(tmp_path, capsys, monkeypatch):
    mock_dir, fit_dir = tmp_path / "mocks", tmp_path / "fit"
    assert main(["lens", "mock", "--n", "1", "--seed", "2", "--levels", "high",
                 "--out", str(mock_dir)]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 mock system" in out and "high" in out
    assert "images of each source: " in out
    mock = mock_dir / "mock_000.fits"
    # a window larger than the image is refused before the fit, and nothing is written
    assert main(["lens", "fit", "--mock", str(mock), "--robust-block", "300",
                 "--out", str(fit_dir)]) == 2
    assert "must not exceed the image's side (256 pixels)" in capsys.readouterr().err
    assert not fit_dir.exists()
    fit_argv = ["lens", "fit", "--mock", str(mock), "--steps", "30", "--starts", "1",
                "--coarse-starts", "3", "--coarse-steps", "20", "--newton-iter", "1",
                "--lbfgs-iter", "5", "--source-residual", "8", "--out", str(fit_dir),
                "--no-progress"]
    # interrupted after the white MAP (as the source-residual stage begins): its stages are
    # kept, no output is written, and the same command resumes from them
    import tfhybrid.lens.fit as fit_module

    residual_stage = fit_module.polish_with_source_residual

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "polish_with_source_residual", interrupted)
    assert main(fit_argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in fit_dir.iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in (fit_dir / "checkpoint").iterdir()) == [
        "adam.npz", "config.json", "global_search.npz", "polish.npz"]
    monkeypatch.setattr(fit_module, "polish_with_source_residual", residual_stage)
    assert main(fit_argv) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "global_search, adam, polish loaded, not rerun" in out
    assert not (fit_dir / "checkpoint").exists()  # the outputs hold the result now
    assert "MAP of 1 system" in out and "source residual (8² nodes)" in out
    data = json.loads((fit_dir / "map.json").read_text())
    assert np.isfinite(data["log_prob"][0]) and len(data["z"][0]) == 64
    # the residual the MAP was polished under is recorded, and sampling uses it
    assert data["source_residual"] == {"grid_size": 8, "pixel_factor": 1.0}
    assert len(data["residual_sigma"]) == 1 and data["residual_sigma"][0] > 0
    # each stage's wall time
    assert sorted(data["stage_seconds"]) == ["adam", "global search", "polish",
                                             "source residual"]
    assert sum(data["stage_seconds"].values()) == pytest.approx(data["wall_time_s"])
    for name in ("map_model.fits", "fig_map.png", "fig_loss.png", "map_table.txt"):
        assert (fit_dir / name).is_file(), name
    # the model-robust (sandwich) intervals at the MAP, by default
    assert "sandwich / Laplace width" in out
    map_summary = json.loads((fit_dir / "map_summary.json").read_text())
    assert map_summary["robust"]["block_size"] == 16
    assert map_summary["robust"]["sd"]["r_ein"][0] > 0
    row = next(r for r in map_summary["table"] if r["parameter"] == "r_ein")
    assert row["lo68_robust"] < row["map"] < row["hi68_robust"]
    assert isinstance(row["covered_68_robust"], bool)
    # the MAP's Hessian is kept with map.json (which records its digest); a changed file is
    # not taken for it
    from tfhybrid.lens.pipeline import load_map_hessian, load_map_json

    hessian = load_map_hessian(fit_dir / "map.json", load_map_json(fit_dir / "map.json"))
    assert hessian.shape == (1, 76, 76) and np.all(np.isfinite(hessian))
    assert len(data["hessian_sha256"]) == 64
    shutil.copytree(fit_dir, tmp_path / "map_only")  # before sampling: MAP outputs only
    np.save(tmp_path / "map_only" / "map_hessian.npy", 2.0 * hessian)
    assert load_map_hessian(tmp_path / "map_only" / "map.json", data) is None
    # so the sampler starts from it instead of evaluating the Hessian again
    import tfhybrid.lens.fit

    def no_hessian(*args, **kwargs):
        raise AssertionError("the sampler evaluated a Hessian the fit had saved")

    monkeypatch.setattr(tfhybrid.lens.fit, "laplace_hessian", no_hessian)
    assert main(["lens", "sample", "--mock", str(mock), "--map", str(fit_dir / "map.json"),
                 "--num-results", "6", "--num-burnin", "0", "--out", str(fit_dir),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "HMC: 6 draws" in out
    # 6 draws cannot reach an ESS of 100: the run says its intervals are unreliable
    assert "warning: ESS < 100" in out and "mock_000" in out
    summary = json.loads((fit_dir / "summary.json").read_text())
    assert summary["low_ess_systems"] == [0] and np.shape(summary["ess"]["r_ein"]) == (1,)
    with np.load(fit_dir / "samples.npz") as s:
        assert s["r_ein"].shape == (6, 1, 1) and np.all(np.isfinite(s["r_ein"]))
    for name in ("posterior.nc", "fig_posterior.png", "table.txt", "summary.json"):
        assert (fit_dir / name).is_file(), name
    # the draws with the sandwich covariance, by default
    assert "model-robust (sandwich, 16-pixel windows) draws" in out
    with np.load(fit_dir / "samples_adjusted.npz") as s:
        assert s["r_ein"].shape == (6, 1, 1) and np.all(np.isfinite(s["r_ein"]))
    assert summary["std_adjusted"]["r_ein"][0] >= 0
    row = next(r for r in summary["table"] if r["parameter"] == "r_ein")
    assert row["lo68_adjusted"] <= row["hi68_adjusted"]
    assert isinstance(row["covered_68_adjusted"], bool)
    # two runs pooled (here a copy of the same one): exact 68 % coverage, binomial test
    shutil.copytree(fit_dir, tmp_path / "fit2")
    assert main(["lens", "report", str(fit_dir), str(tmp_path / "fit2"),
                 "--out", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "r_ein" in out and "68 % interval covers the truth" in out and "/2 (expected" in out
    assert "r_ein and gamma both within 1 %:" in out and "/2 systems" in out
    assert "sandwich-adjusted draws' 68 % interval: " in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["r_ein"]["n"] == 2 and 0.0 <= report["r_ein"]["coverage_68_p_value"] <= 1.0
    # a MAP-only directory: the sandwich intervals' coverage
    assert main(["lens", "report", str(tmp_path / "map_only")]) == 0
    out = capsys.readouterr().out
    assert "sandwich 68 % interval covers: " in out and "/1 (expected" in out


def test_bad_input_one_line_no_output(tmp_path, capsys):
    assert main(["lens", "mock", "--n", "0", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--n must be >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    assert main(["lens", "mock", "--min-images", "-1", "--out", str(tmp_path / "m")]) == 2
    assert "--min-images must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"),
                 "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f").exists()
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--starts", "4",
                 "--coarse-starts", "2", "--out", str(tmp_path / "f")]) == 2
    assert "--coarse-starts (2) must be 0 or >= --starts (4)" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--lbfgs-iter", "-1",
                 "--out", str(tmp_path / "f")]) == 2
    assert "--lbfgs-iter must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--lbfgs-cycles", "-2",
                 "--out", str(tmp_path / "f")]) == 2
    assert "--lbfgs-cycles must be >= 0; got -2" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--prune-after",
                 "-1", "--out", str(tmp_path / "f")]) == 2
    assert "--prune-after must be >= 0; got -1" in capsys.readouterr().err
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--prune-margin",
                 "nan", "--out", str(tmp_path / "f")]) == 2
    assert "--prune-margin must be finite and >= 0 (nats); got nan" in capsys.readouterr().err
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--coarse-prune-after",
                 "100", "--coarse-keep", "1", "--out", str(tmp_path / "f")]) == 2
    assert "--coarse-keep (1) must be >= --starts (2)" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--residual-rounds",
                 "0", "--out", str(tmp_path / "f")]) == 2
    assert "--residual-rounds must be >= 1; got 0" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--source-residual",
                 "1", "--out", str(tmp_path / "f")]) == 2
    assert "grid_size must be an integer in [2, 64]" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["lens", "fit", "--mock", str(tmp_path / "missing.fits"), "--robust-block",
                 "-3", "--out", str(tmp_path / "f")]) == 2
    assert "--robust-block must be >= 0 (pixels; 0: none); got -3" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["lens", "sample", "--mock", str(tmp_path / "missing.fits"), "--map",
                 str(tmp_path / "missing.json"), "--robust-block", "-1",
                 "--out", str(tmp_path / "f")]) == 2
    assert "--robust-block must be >= 0 (pixels; 0: none); got -1" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    for flag, value in (("--whitening-step", "0"), ("--whitening-floor", "inf")):
        assert main(["lens", "sample", "--mock", str(tmp_path / "missing.fits"), "--map",
                     str(tmp_path / "missing.json"), flag, value,
                     "--out", str(tmp_path / "f")]) == 2
        assert f"{flag} must be finite and > 0; got" in capsys.readouterr().err
        assert not (tmp_path / "f").exists()
    assert main(["demo", "--map-steps", "0", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()


def test_report_computes_coverage_from_the_draws_of_older_runs(tmp_path, capsys):
    """A summary.json without ``covered_68`` (runs before it existed): the 68 % intervals
    come from the run's samples.npz; θ_E = sqrt(q) r_Ein is derived from the draws."""
    rng = np.random.default_rng(0)
    n, s = 400, 3
    r = 1.0 + 0.01 * rng.standard_normal((n, 1, s))
    q = 0.81 + 0.001 * rng.standard_normal((n, 1, s))
    np.savez(tmp_path / "samples.npz", r_ein=r, q=q, z=np.zeros((n, 1, s, 2)))
    true_r = [1.0, 1.05, 1.003]  # inside, far outside, inside the ±1 % interval
    table = [dict(system=i, parameter="r_ein", true=t, map=1.0, error_map_pct=100 * (1 - t) / t,
                  mean=1.0, std=0.01, bias_sigma=(1 - t) / 0.01) for i, t in enumerate(true_r)]
    table += [dict(system=i, parameter="theta_e", true=0.9 * t, map=0.9, mean=0.9, std=0.01,
                   error_map_pct=0.0, bias_sigma=0.0) for i, t in enumerate(true_r)]
    (tmp_path / "summary.json").write_text(json.dumps({"table": table}))
    assert main(["lens", "report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "r_ein" in out and "covers the truth: 2/3" in out
    assert "theta_e" in out and out.count("covers the truth: 2/3") == 2
    (tmp_path / "summary.json").write_text("{not json")
    assert main(["lens", "report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err

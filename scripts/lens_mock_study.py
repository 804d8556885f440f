"""Mock study of the strong-lensing pipeline (Chianese et al. 2020, sections 5.1-5.3).

``--n`` high-S/N mocks (held-out simulated sources, prior-drawn SPLE + shear lenses, the
paper's high-S/N noise sigma 0.0333, redrawn until S/N >= ``--min-snr``) are fitted with the
shipped VAE source model:

1. one batched multi-start Adam MAP over all systems (:func:`tfhybrid.lens.fit.fit_map`);
2. HMC from the MAP, all systems in one batched chain (``--num-burnin`` adaptation steps, then
   ``--num-results`` draws; the paper uses 50 + 500);

and written to ``--out``:

* ``mocks/``: the mock FITS files;
* ``map/``: :func:`tfhybrid.lens.pipeline.write_fit_outputs` (``fig_map.png`` = Fig. 6/7
  layout, ``map_table.txt``, ``map.json``, ...);
* ``posterior/``: :func:`tfhybrid.lens.pipeline.write_sample_outputs` (``fig_posterior.png``
  = Fig. 8/9 layout, ``table.txt`` = true / MAP / mean +- std / per cent error, ...);
* ``study_summary.json`` and ``study_summary.txt``: fraction of systems whose MAP r_Ein and
  gamma are within 1 % of the truth, median absolute per cent error of each MAP parameter, and
  the 68 % interval coverage of r_Ein, gamma, phi, q over the mocks, with wall times.

The MAP outputs are written before HMC starts, and the HMC run is chunked on disk
(``posterior/hmc_chunks``), so an interrupted run keeps its MAP numbers and resumes its chain.

HMC notes (measured): ``--num-burnin`` below ~50 breaks the windowed step-size / mass-matrix
adaptation (step size collapses to ~1e-17, acceptance 0); the batched run shares one step size
over all systems, so ``--hmc-per-system`` is the reliable choice.

Usage (MAP ~8 min for 10 systems on 2 busy CPU cores; HMC ~1-2 min per system)::

    nice -n 10 python scripts/lens_mock_study.py --out /tmp/lens_study --n 10 --no-hmc
    nice -n 10 python scripts/lens_mock_study.py --out /tmp/lens_study --n 10 --reuse-map \
        --hmc-per-system --num-burnin 50 --num-results 100
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MAP_NAMES = ("r_ein", "gamma", "phi", "q", "gamma1", "gamma2", "theta_lens1", "theta_lens2")


def _map_metrics(params_true, params_map, tol_pct):
    import numpy as np

    out = {}
    for name in MAP_NAMES:
        t = np.asarray(params_true[name], dtype=np.float64)
        m = np.asarray(params_map[name], dtype=np.float64)
        err = 100.0 * np.abs(m - t) / np.maximum(np.abs(t), 1e-12)
        out[name] = dict(
            median_abs_error_pct=float(np.median(err)),
            median_abs_error=float(np.median(np.abs(m - t))),
            frac_within_tol=float(np.mean(err <= tol_pct)),
            abs_error_pct=err.tolist(),
        )
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=10, help="number of mock systems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-snr", type=float, default=300.0,
                   help="redraw a mock's parameters while its high-noise S/N is below this")
    p.add_argument("--num-starts", type=int, default=2)
    p.add_argument("--map-steps", type=int, default=800)
    p.add_argument("--num-burnin", type=int, default=50)
    p.add_argument("--num-results", type=int, default=100)
    p.add_argument("--num-leapfrog", type=int, default=10)
    p.add_argument("--tol-pct", type=float, default=1.0, help="'within X %%' threshold")
    p.add_argument("--no-hmc", action="store_true", help="stop after the MAP outputs")
    p.add_argument("--hmc-per-system", action="store_true",
                   help="one HMC run per system (own step size and mass matrix) instead of one "
                        "batched run: the batched run shares ONE step size over all systems")
    p.add_argument("--hmc-systems", type=int, default=None,
                   help="with --hmc-per-system: sample only the first k systems (time)")
    p.add_argument("--reuse-map", action="store_true",
                   help="reuse --out's map/map.json and MAP numbers (same --n/--seed) and go "
                        "straight to HMC")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    import numpy as np

    from tfhybrid.io import atomic_path, write_json_atomic
    from tfhybrid.lens.fit import coverage, fit_map, sample_lens_posterior
    from tfhybrid.lens.mocks import make_mocks, write_mock_fits
    from tfhybrid.lens.model import LensPosterior
    from tfhybrid.lens.pipeline import write_fit_outputs, write_sample_outputs
    from tfhybrid.physics.lensing import PARAM_NAMES
    from tfhybrid.priors.vae import load_default_vae

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    summary = dict(command=vars(args) | {"out": str(args.out)})

    t0 = time.perf_counter()
    vae = load_default_vae()
    mocks = make_mocks(args.n, seed=args.seed, noise_levels=("high",), min_snr_high=args.min_snr)
    write_mock_fits(mocks, out / "mocks", overwrite=True)
    summary["mock_time_s"] = time.perf_counter() - t0
    summary["snr"] = np.asarray(mocks.snr["high"]).tolist()
    summary["noise_sigma"] = float(mocks.noise_sigma["high"])
    print(f"{args.n} mocks in {summary['mock_time_s']:.0f} s; S/N "
          f"{np.min(summary['snr']):.0f}-{np.max(summary['snr']):.0f}", flush=True)

    posterior = LensPosterior(mocks.observed["high"], mocks.noise_sigma["high"], vae)
    labels = [f"mock {i} (S/N={mocks.snr['high'][i]:.0f})" for i in range(args.n)]
    if args.reuse_map:
        import json
        from types import SimpleNamespace

        from tfhybrid.lens.pipeline import load_map_json

        saved = load_map_json(out / "map" / "map.json")
        fit = SimpleNamespace(params=saved["params"], z=saved["z"],
                              log_prob=np.asarray(saved["log_prob"]))
        summary["map"] = json.loads((out / "study_summary.json").read_text())["map"]
    else:
        fit = fit_map(posterior, num_starts=args.num_starts, num_steps=args.map_steps,
                      seed=args.seed, progress=args.progress)
        map_summary = write_fit_outputs(out / "map", posterior, fit, mocks, labels=labels)
        summary["map"] = dict(
            wall_time_s=fit.wall_time_s, num_starts=args.num_starts, num_steps=args.map_steps,
            message=fit.message, best_start=np.asarray(fit.best_start).tolist(),
            chi2_per_pixel=map_summary["chi2_per_pixel"],
            metrics=_map_metrics(mocks.params, fit.params, args.tol_pct),
        )
        summary["map"]["frac_r_ein_and_gamma_within_tol"] = float(np.mean(
            (np.asarray(summary["map"]["metrics"]["r_ein"]["abs_error_pct"]) <= args.tol_pct)
            & (np.asarray(summary["map"]["metrics"]["gamma"]["abs_error_pct"]) <= args.tol_pct)))
        write_json_atomic(out / "study_summary.json", summary)
        print(f"MAP: {fit.wall_time_s:.0f} s; {fit.message}", flush=True)

    if not args.no_hmc:
        if args.hmc_per_system:
            samples, post, truth = _hmc_per_system(args, posterior, fit, mocks, labels, out)
        else:
            truth = mocks.params
            samples = sample_lens_posterior(
                posterior, [np.asarray(fit.params[k]) for k in PARAM_NAMES] + [fit.z],
                num_results=args.num_results, num_burnin=args.num_burnin,
                seed=args.seed, progress=args.progress, num_leapfrog_steps=args.num_leapfrog,
                checkpoint_dir=out / "posterior" / "hmc_chunks",
            )
            post = write_sample_outputs(out / "posterior", samples, fit, mocks.params,
                                        labels=labels)
        mean, std = samples.mean(), samples.std()
        per_param = {}
        for name in ("r_ein", "gamma", "phi", "q"):
            t = np.asarray(truth[name], dtype=np.float64)
            per_param[name] = dict(
                median_abs_error_mean_pct=float(np.median(
                    100.0 * np.abs(mean[name] - t) / np.maximum(np.abs(t), 1e-12))),
                median_std=float(np.median(std[name])),
                median_abs_pull=float(np.median(np.abs(mean[name] - t) / std[name])),
            )
        summary["hmc"] = dict(
            wall_time_s=post["wall_time_s"], num_burnin=args.num_burnin,
            num_results=args.num_results, num_leapfrog=args.num_leapfrog,
            acceptance_rate=post["acceptance_rate"], num_divergences=post["num_divergences"],
            min_ess=post["min_ess"], step_size=post["step_size"],
            num_systems_sampled=len(np.asarray(truth["r_ein"])),
            per_system=bool(args.hmc_per_system),
            coverage_68=coverage(truth, samples, 0.68),
            per_param=per_param,
        )
    summary["total_wall_time_s"] = time.perf_counter() - t_all
    write_json_atomic(out / "study_summary.json", summary)
    text = _format(summary, args.tol_pct)
    with atomic_path(out / "study_summary.txt") as tmp:
        tmp.write_text(text + "\n")
    print(text, flush=True)
    return summary


def _hmc_per_system(args, posterior, fit, mocks, labels, out):
    """HMC of each system on its own (own adapted step size); outputs in posterior/system_i."""
    import numpy as np

    from tfhybrid.lens.fit import LensSamples, sample_lens_posterior
    from tfhybrid.lens.model import LensPosterior
    from tfhybrid.lens.pipeline import write_sample_outputs
    from tfhybrid.physics.lensing import PARAM_NAMES

    k = args.n if args.hmc_systems is None else min(args.n, args.hmc_systems)
    parts, zs, results, posts, wall = [], [], [], [], 0.0
    for i in range(k):
        post_i = LensPosterior(mocks.observed["high"][i:i + 1], mocks.noise_sigma["high"],
                               posterior.vae)
        start = [np.asarray(fit.params[n][i:i + 1]) for n in PARAM_NAMES] + [fit.z[i:i + 1]]
        smp = sample_lens_posterior(
            post_i, start, num_results=args.num_results, num_burnin=args.num_burnin,
            seed=args.seed, progress=args.progress, num_leapfrog_steps=args.num_leapfrog,
            checkpoint_dir=out / "posterior" / f"system_{i}" / "hmc_chunks",
        )
        truth_i = {n: np.asarray(mocks.params[n][i:i + 1]) for n in PARAM_NAMES}
        posts.append(write_sample_outputs(out / "posterior" / f"system_{i}", smp, None, truth_i,
                                          labels=[labels[i]]))
        parts.append(smp.params)
        zs.append(smp.z)
        results.append(smp.result)
        wall += posts[-1]["wall_time_s"]
        print(f"HMC system {i}: acceptance {posts[-1]['acceptance_rate']}, step "
              f"{posts[-1]['step_size']:.3g}", flush=True)
    params = {n: np.concatenate([p[n] for p in parts], -1) for n in PARAM_NAMES}
    samples = LensSamples(params, np.concatenate(zs, -2), results[0])
    post = dict(
        wall_time_s=wall,
        acceptance_rate=[p["acceptance_rate"] for p in posts],
        num_divergences=[p["num_divergences"] for p in posts],
        min_ess=[p["min_ess"] for p in posts],
        step_size=[p["step_size"] for p in posts],
    )
    truth = {n: np.asarray(mocks.params[n][:k]) for n in PARAM_NAMES}
    return samples, post, truth


def _format(summary, tol_pct) -> str:
    import numpy as np

    m = summary["map"]
    lines = [
        f"MAP ({m['num_starts']} starts x {m['num_steps']} Adam steps, batched): "
        f"{m['wall_time_s']:.0f} s; {m['message']}",
        f"systems with MAP r_ein AND gamma within {tol_pct:g} %: "
        f"{m['frac_r_ein_and_gamma_within_tol']:.2f}",
        f"{'parameter':>12s} {'frac<=' + format(tol_pct, 'g') + '%':>10s} "
        f"{'median|err|%':>13s} {'median|err|':>12s}",
    ]
    for name, d in m["metrics"].items():
        lines.append(f"{name:>12s} {d['frac_within_tol']:>10.2f} "
                     f"{d['median_abs_error_pct']:>13.3f} {d['median_abs_error']:>12.4g}")
    chi2 = np.asarray(m["chi2_per_pixel"])
    lines.append(f"chi2/pixel at MAP: median {np.median(chi2):.3f}, max {chi2.max():.3f}")
    if "hmc" in summary:
        h = summary["hmc"]
        lines += [
            f"HMC ({h['num_burnin']} burn-in + {h['num_results']} draws, {h['num_leapfrog']} "
            f"leapfrog, 1 chain, {'per system' if h['per_system'] else 'batched'}, "
            f"{h['num_systems_sampled']} systems): {h['wall_time_s']:.0f} s; acceptance "
            f"{h['acceptance_rate']}, divergences {h['num_divergences']}, min ESS "
            f"{h['min_ess']}",
            "68 % interval coverage: " + ", ".join(
                f"{k} {v:.2f}" for k, v in h["coverage_68"].items()),
        ]
        for name, d in h["per_param"].items():
            lines.append(f"{name:>12s} posterior mean median|err| "
                         f"{d['median_abs_error_mean_pct']:.3f} %, median std "
                         f"{d['median_std']:.4g}, median |pull| {d['median_abs_pull']:.2f}")
    lines.append(f"total wall time {summary['total_wall_time_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

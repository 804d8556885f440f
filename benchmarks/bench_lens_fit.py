"""Wall time of the lensing fits (003_* section 5): MAP and HMC, one and many systems.

Target: :class:`tfhybrid.lens.model.LensPosterior` (eq. 26) of paper-size 256 x 256 mocks
(0.04", SPLE + shear, the shipped VAE source), at the paper's high S/N. Measured:

* **MAP pipeline** (the number to compare with the paper's 20 min): the wall time of
  :func:`tfhybrid.lens.fit.fit_map` with its defaults (:mod:`tfhybrid.lens.defaults`) on one
  system (coarse search with source-scale jumps on the coarse grid, 3 x 500 steps, 2 x 1000
  full-resolution Adam steps with XLA, 3 Newton iterations, then up to 3 runs of 200
  whitened L-BFGS iterations, with forward-difference Hessians; the polish's value and
  gradient XLA-compiled), MEASURED end to end in a fresh call (tracing and XLA compilation
  included), with the stage breakdown.
* **Adam step**: seconds per step of :func:`tfhybrid.inference.map.find_map` as fit_map calls it
  (bijectors, default schedule), XLA off and on: the median of the compiled chunks after the
  first (``MapResult.chunk_seconds``; the first chunk traces and compiles).
* **HMC**: :func:`tfhybrid.lens.fit.sample_lens_posterior` with its defaults (Laplace
  preconditioning, 10 leapfrog steps, XLA-compiled chunks, the paper's 50 warm-up + 500 draws)
  from the MAP, MEASURED end to end (tracing included; the Hessian comes from the MAP, as in
  the pipeline), and the steady seconds per draw (median compiled chunk / its draws).
  ``--quick`` runs 20 + 100 draws and extrapolates the steady cost to 550, saying so.
* **batched systems**: per-step time of one graph holding S = 1, 8, 32 systems (1 start each,
  XLA as fit_map uses it), and the per-system cost = per-step time / S.
* with ``--source-residual M``: the MAP pipeline as ``tfhybrid lens fit`` runs it, one
  ``fit_map(source_residual=...)`` call: the white MAP above, then the source-residual stage
  (:func:`tfhybrid.lens.fit.polish_with_source_residual` with its defaults: σ_δ by the
  evidence, then the polish with that residual, whose graph compiles in a background thread
  during the white polish); the white MAP row is then that call's search + polish, and the
  HMC row samples the residual posterior.

The paper's reference (Chianese et al. 2020, section 5.2-5.3, CPU): ~20 min per MAP and ~10 h
for the HMC chain of one system. Timings on a shared machine vary with its load; the script
prints the load average next to the table.

With ``--compile-cache DIR``, XLA's compiled programs are kept in DIR (as the ``tfhybrid``
command keeps them by default): run the benchmark twice to time a second fit of the same size.

Usage::

    nice -n 10 python benchmarks/bench_lens_fit.py [--quick] [--batches 1 8 32] \
        [--source-residual 24] [--compile-cache DIR]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from tfhybrid.lens.defaults import (
    DEFAULT_COARSE_STARTS,
    DEFAULT_COARSE_STEPS,
    DEFAULT_JUMP_STAGE,
    DEFAULT_LBFGS_CYCLES,
    DEFAULT_LBFGS_ITER,
    DEFAULT_MAP_STEPS,
    DEFAULT_NEWTON_ITER,
    DEFAULT_NUM_STARTS,
    DEFAULT_PRUNE_AFTER,
    DEFAULT_RESIDUAL_PIXEL_FACTOR,
    DEFAULT_RESIDUAL_ROUNDS,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAPER_MAP_S = 20 * 60.0
PAPER_HMC_S = 10 * 3600.0
PAPER_HMC_DRAWS = 50 + 500


def _posterior(vae, mocks, s):
    import numpy as np

    from tfhybrid.lens.model import LensPosterior

    obs = np.asarray(mocks.observed["high"])
    reps = -(-s // obs.shape[0])
    obs = np.concatenate([obs] * reps, 0)[:s]
    return LensPosterior(obs, mocks.noise_sigma["high"], vae)


def map_step_time(posterior, num_starts, chunk, repeats, jit):
    """(seconds per Adam step, seconds of the first chunk incl. tracing / compilation)."""
    from tfhybrid.inference.map import find_map
    from tfhybrid.lens.fit import _default_learning_rate

    steps = chunk * (repeats + 1)
    res = find_map(
        posterior.target_log_prob, list(posterior.initial_states(num_starts, seed=0)),
        bijectors=posterior.bijectors(), method="adam", num_steps=steps,
        learning_rate=_default_learning_rate(DEFAULT_MAP_STEPS), rtol=0.0, progress=False,
        steps_per_update=chunk, jit_compile=jit,
    )
    sec = np.asarray(res.chunk_seconds)
    return float(np.median(sec[1:])) / chunk, float(sec[0])


def hmc_times(posterior, fit, num_burnin, num_results):
    """(measured wall of sample_lens_posterior, steady seconds per draw, its diagnostics)."""
    from tfhybrid.lens.fit import sample_lens_posterior

    t0 = time.perf_counter()
    samples = sample_lens_posterior(posterior, fit, num_results=num_results,
                                    num_burnin=num_burnin, progress=False)
    wall = time.perf_counter() - t0
    res = samples.result
    sec = np.asarray(res.chunk_seconds)
    draws_per_chunk = -(-(num_burnin + num_results) // len(sec))  # the engine's equal chunks
    per_draw = float(np.median(sec[1:] if len(sec) > 1 else sec)) / draws_per_chunk
    return wall, per_draw, res.diagnostics


def pipeline_times(posterior, num_starts=DEFAULT_NUM_STARTS, num_steps=DEFAULT_MAP_STEPS,
                   coarse_starts=DEFAULT_COARSE_STARTS, coarse_steps=DEFAULT_COARSE_STEPS,
                   newton_iter=DEFAULT_NEWTON_ITER, lbfgs_iter=DEFAULT_LBFGS_ITER,
                   lbfgs_cycles=DEFAULT_LBFGS_CYCLES,
                   jump_stage: str = DEFAULT_JUMP_STAGE,
                   source_residual=None) -> tuple[dict, object]:
    """Measured wall time of one fresh fit_map call (its full MAP pipeline), by stage.

    The stages are ``LensMap.stage_seconds``; with ``source_residual`` the residual posterior's
    polish graph compiles in a background thread during the white polish, as in ``lens fit``,
    so "polish" carries part of that stage's cost.
    """
    from tfhybrid.lens.fit import fit_map

    t0 = time.perf_counter()
    fit = fit_map(posterior, num_starts=num_starts, num_steps=num_steps,
                  coarse_starts=coarse_starts, coarse_steps=coarse_steps,
                  newton_iter=newton_iter, lbfgs_iter=lbfgs_iter, lbfgs_cycles=lbfgs_cycles,
                  progress=False, jump_stage=jump_stage, source_residual=source_residual)
    total = time.perf_counter() - t0
    st = fit.stage_seconds
    jumps = {"full": f"source-scale jumps 3 x {num_steps // 2}",
             "coarse": f"coarse source-scale jumps 3 x {coarse_steps}"}[jump_stage]
    search = total - st.get("polish", 0.0) - st.get("source residual", 0.0)
    stages = {
        f"search: coarse {coarse_starts} x {coarse_steps} + {jumps}, then Adam {num_starts} x "
        f"{num_steps} (XLA; the leading start only after {DEFAULT_PRUNE_AFTER})": search,
        f"polish: {newton_iter} Newton + {lbfgs_iter} whitened L-BFGS iterations x <= "
        f"{lbfgs_cycles} runs (Hessians included)": st.get("polish", 0.0),
    }
    if source_residual is not None:
        stages[f"source residual ({source_residual.grid_size}^2 nodes): "
               f"{DEFAULT_RESIDUAL_ROUNDS} round(s) of evidence + polish"] = st["source residual"]
    stages["MAP total (fresh call: tracing and compilation included)"] = total
    return stages, fit


def _fmt_s(sec):
    if sec < 120:
        return f"{sec:7.1f} s"
    if sec < 7200:
        return f"{sec / 60:7.1f} min"
    return f"{sec / 3600:7.2f} h"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer timed steps, 20 + 100 HMC draws extrapolated to 550 (noisier)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-starts", type=int, default=DEFAULT_NUM_STARTS,
                   help="full-resolution starts (fit_map's default)")
    p.add_argument("--jump-stage", choices=("coarse", "full"), default=DEFAULT_JUMP_STAGE,
                   help="fit_map's jump_stage (default: fit_map's own)")
    p.add_argument("--no-xla-off", action="store_true",
                   help="skip the Adam rows with XLA off (fit_map uses XLA)")
    p.add_argument("--source-residual", type=int, default=0, metavar="M",
                   help="also time the source-residual stage (M x M grid: evidence + polish, "
                        "then HMC of that posterior); 0: off")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="keep XLA's compiled programs in DIR (tfhybrid.physics.xla."
                        "enable_compile_cache, as the tfhybrid command does by default); run "
                        "twice to time a warm cache. Default: none, every program compiled")
    args = p.parse_args(argv)

    if args.compile_cache:
        from tfhybrid.physics.xla import enable_compile_cache

        cache = enable_compile_cache(args.compile_cache)
        found = len(list(cache.glob("*.pb")))
        print(f"# compile cache {cache}: {found} programs found "
              f"({'warm' if found else 'cold'})", flush=True)
    from tfhybrid.lens.mocks import make_mocks
    from tfhybrid.priors.vae import load_default_vae

    chunk, repeats = (20, 3) if args.quick else (50, 4)
    t0 = time.perf_counter()
    vae = load_default_vae()
    mocks = make_mocks(1, seed=0, noise_levels=("high",), min_snr_high=300.0)
    print(f"# setup (VAE + 1 mock, 256x256): {time.perf_counter() - t0:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    post1 = _posterior(vae, mocks, 1)

    residual = None
    if args.source_residual:
        from tfhybrid.physics.source_residual import SourceResidualConfig

        residual = SourceResidualConfig(args.source_residual, DEFAULT_RESIDUAL_PIXEL_FACTOR)
    stages, fit = pipeline_times(post1, num_starts=args.num_starts, jump_stage=args.jump_stage,
                                 source_residual=residual)
    for name, value in stages.items():
        print(f"# {name}: {value:.1f} s", flush=True)
    if residual is not None:
        print(f"# sigma_delta {fit.residual_sigma}", flush=True)
    map_total = stages["MAP total (fresh call: tracing and compilation included)"]

    rows = []  # (what, per-unit seconds, unit, total, how, paper)
    what = (f"MAP pipeline, 1 system ({args.num_starts} starts, {args.jump_stage} jumps)"
            if residual is None else
            f"MAP + source residual {args.source_residual}^2, 1 system")
    if residual is not None:  # the white MAP is this run's search + polish
        white = map_total - fit.stage_seconds["source residual"]
        rows.append((f"MAP pipeline, 1 system ({args.num_starts} starts, {args.jump_stage} "
                     "jumps)", None, "", white, "search + polish", PAPER_MAP_S))
    rows.append((what, None, "", map_total, "measured", PAPER_MAP_S))
    for jit in ([True] if args.no_xla_off else [True, False]):
        for starts in (1, args.num_starts):
            step, first = map_step_time(post1, starts, chunk, repeats, jit)
            rows.append((f"Adam, 1 system, {starts} start(s), XLA {'on' if jit else 'off'}",
                         step, "s/step", step * DEFAULT_MAP_STEPS,
                         f"x {DEFAULT_MAP_STEPS} steps", None))
            print(f"# {rows[-1][0]}: {1e3 * step:.1f} ms/step (first {chunk}-step chunk "
                  f"incl. compile {first:.1f} s)", flush=True)

    burn, draws = (20, 100) if args.quick else (50, 500)
    # HMC samples the posterior the MAP was made under (with the residual, if it was fitted)
    wall, per_draw, diag = hmc_times(post1, fit, burn, draws)
    if args.quick:
        rows.append(("HMC 50 + 500 draws, 1 system", per_draw, "s/draw",
                     per_draw * PAPER_HMC_DRAWS, "extrapolated", PAPER_HMC_S))
    else:
        rows.append(("HMC 50 + 500 draws, 1 system", per_draw, "s/draw", wall, "measured",
                     PAPER_HMC_S))
    print(f"# HMC {burn} + {draws} draws: {wall:.1f} s measured (incl. tracing), steady "
          f"{per_draw:.3f} s/draw; acceptance {diag['acceptance_rate']:.2f}, min ESS "
          f"{diag['min_ess']:.0f}", flush=True)

    batch_rows = []
    for s in args.batches:
        post = post1 if s == 1 else _posterior(vae, mocks, s)
        step, first = map_step_time(post, 1, max(5, chunk // 2), repeats, True)
        batch_rows.append((s, step, step / s, step / s * DEFAULT_MAP_STEPS, first))
        print(f"# batched S={s}: {1e3 * step:.0f} ms/step, {1e3 * step / s:.1f} ms/step/system "
              f"(first chunk incl. compile {first:.1f} s)", flush=True)

    print()
    print(f"{'target':<44s} {'per step/draw':>15s} {'total':>10s} {'':<18s} "
          f"{'paper (CPU)':>12s} {'speed-up':>9s}")
    for what, unit, label, total, how, paper in rows:
        per = f"{unit:9.4f} {label:<6s}" if unit is not None else ""
        gain = f"{paper / max(total, 1e-9):8.0f}x" if paper else ""
        ref = _fmt_s(paper) if paper else ""
        print(f"{what:<44s} {per:>15s} {_fmt_s(total):>10s} {how:<18s} {ref:>12s} {gain:>9s}")
    print()
    print(f"{'systems S (1 start each, XLA on)':<36s} {'per step':>10s} {'per step / S':>13s} "
          f"{f'Adam per system ({DEFAULT_MAP_STEPS} steps)':>29s}")
    for s, step, per, total, _ in batch_rows:
        print(f"{s:<36d} {step:>8.3f} s {per:>11.4f} s {_fmt_s(total):>29s}")
    print(f"\n# load average at end {os.getloadavg()[0]:.1f}; per-step and per-draw times: "
          "median of the compiled chunks after the first (which traces and compiles).")
    return rows, batch_rows


if __name__ == "__main__":
    main()

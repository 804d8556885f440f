"""Wall time of the lensing fits (003_* section 5): MAP (Adam) and HMC, one and many systems.

Target: :class:`tfhybrid.lens.model.LensPosterior` (eq. 26) of paper-size 256 x 256 mocks
(0.04", SPLE + shear, the shipped VAE source), at the paper's high S/N. Measured:

* **MAP**: seconds per Adam step of the loop of :func:`tfhybrid.inference.map.find_map` with the
  settings of :func:`tfhybrid.lens.fit.fit_map` (bijectors, default learning-rate schedule,
  compiled chunks of ``tfp.math.minimize``), XLA off and on (``jit_compile``): median of a few
  chunks after a warm-up chunk that traces and compiles. The time to a MAP is that times the
  default 2000 steps (extrapolated), for one start and for fit_map's default 4 starts (one
  batched graph).
* **HMC**: seconds per draw (10 leapfrog steps) of :func:`tfhybrid.inference.mcmc.sample_posterior`
  as :func:`tfhybrid.lens.fit.sample_lens_posterior` calls it (XLA off, its default): the
  DIFFERENCE of a 4-draw and a longer run (same compiled chunk size) over the extra draws, so the
  tracing / compilation cost cancels; the time to the paper's 50 warm-up + 500 draws is EXTRAPOLATED
  as 550 x that (the warm-up steps cost the same number of gradients).
* **batched systems**: per-step time of one graph holding S = 1, 8, 32 systems (1 start each),
  and per-system cost = per-step time / S.

The paper's reference (Chianese et al. 2020, section 5.2-5.3, CPU): ~20 min per MAP and ~10 h
for the HMC chain of one system. Timings on a shared machine vary with its load; the script
prints the load average next to the table.

Usage::

    nice -n 10 python benchmarks/bench_lens_fit.py [--quick] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAPER_MAP_S = 20 * 60.0
PAPER_HMC_S = 10 * 3600.0
DEFAULT_MAP_STEPS = 2000
PAPER_HMC_DRAWS = 50 + 500


def _posterior(vae, mocks, s):
    import numpy as np

    from tfhybrid.lens.model import LensPosterior

    obs = np.asarray(mocks.observed["high"])
    reps = -(-s // obs.shape[0])
    obs = np.concatenate([obs] * reps, 0)[:s]
    return LensPosterior(obs, mocks.noise_sigma["high"], vae)


def map_step_time(posterior, num_starts, chunk, repeats, jit):
    """(seconds per Adam step, seconds of the first chunk incl. tracing / compilation).

    The loop of :func:`tfhybrid.inference.map.find_map` (method "adam"): Keras Adam with the
    default schedule of :func:`tfhybrid.lens.fit.fit_map`, ``tfp.math.minimize`` chunks of
    ``chunk`` steps in one ``tf.function``, the target XLA-compiled when ``jit`` (as find_map
    does). The first call traces and compiles; the median of ``repeats`` further calls is timed.
    """
    import keras
    import numpy as np
    import tensorflow as tf
    import tensorflow_probability as tfp

    from tfhybrid.inference.map import to_unconstrained
    from tfhybrid.lens.fit import _default_learning_rate

    bijs = [tfp.bijectors.Identity() if b is None else b for b in posterior.bijectors()]
    state = posterior.initial_states(num_starts, seed=0)
    variables = [tf.Variable(u) for u in to_unconstrained(list(state), bijs)]

    def log_prob_u(*us):
        return posterior.target_log_prob(*[b.forward(u) for b, u in zip(bijs, us, strict=True)])

    target = tf.function(log_prob_u, jit_compile=True) if jit else log_prob_u
    optimizer = keras.optimizers.Adam(learning_rate=_default_learning_rate(DEFAULT_MAP_STEPS))

    def loss_fn():
        return -tf.convert_to_tensor(target(*variables))

    run = tf.function(lambda: tfp.math.minimize(
        loss_fn, num_steps=chunk, optimizer=optimizer, trainable_variables=variables,
        trace_fn=lambda tq: tq.loss), autograph=False)
    t0 = time.perf_counter()
    run().numpy()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run().numpy()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / chunk, first


def _hmc_run(posterior, num_results, chunk, jit, leapfrog):
    from tfhybrid.inference.mcmc import sample_posterior
    from tfhybrid.lens.model import STATE_NAMES

    state = [part[0] for part in posterior.initial_states(1, seed=0)]
    t0 = time.perf_counter()
    sample_posterior(posterior.target_log_prob, state, num_results=num_results, num_burnin=0,
                     kernel="hmc", bijectors=posterior.bijectors(), num_chains=1, seed=0,
                     chunk_size=chunk, progress=False, step_size=1e-3,
                     num_leapfrog_steps=leapfrog, jit_compile=jit, names=list(STATE_NAMES))
    return time.perf_counter() - t0


def hmc_draw_time(posterior, n, m, chunk, jit, leapfrog=10):
    t_short = _hmc_run(posterior, n, chunk, jit, leapfrog)
    t_long = _hmc_run(posterior, n + m, chunk, jit, leapfrog)
    return max(t_long - t_short, 0.0) / m, t_short


def pipeline_times(posterior, coarse_starts=16, coarse_steps=500, num_starts=1,
                   num_steps=1500, newton_iter=3) -> dict:
    """Wall time (measured, not extrapolated) of each stage of fit_map's full MAP pipeline."""
    from tfhybrid.lens.fit import fit_map, newton_polish

    t0 = time.perf_counter()
    fit_map(posterior, num_starts=num_starts, num_steps=20, coarse_starts=coarse_starts,
            coarse_steps=20, newton_iter=0, progress=False)  # traces and compiles both stages
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit = fit_map(posterior, num_starts=num_starts, num_steps=num_steps,
                  coarse_starts=coarse_starts, coarse_steps=coarse_steps, newton_iter=0,
                  progress=False)
    search = time.perf_counter() - t0
    t0 = time.perf_counter()
    newton_polish(posterior, fit.state(), num_iter=newton_iter)
    newton = time.perf_counter() - t0
    return {
        "pipeline warm-up (tracing, compilation; short run)": warm,
        f"coarse search {coarse_starts} x {coarse_steps} + Adam {num_starts} x {num_steps}":
            search,
        f"Newton polish, {newton_iter} iterations (Hessians included)": newton,
        "MAP total (without warm-up)": search + newton,
    }


def _fmt_s(sec):
    if sec < 120:
        return f"{sec:7.1f} s"
    if sec < 7200:
        return f"{sec / 60:7.1f} min"
    return f"{sec / 3600:7.2f} h"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timed steps (noisier)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-starts", type=int, default=4, help="fit_map's default starts")
    p.add_argument("--no-xla", action="store_true", help="skip the XLA-on MAP rows")
    p.add_argument("--hmc-xla", action="store_true", help="also time HMC with XLA on")
    p.add_argument("--pipeline", action="store_true",
                   help="also time fit_map's full pipeline end to end (coarse search, Adam, "
                        "Newton) on one system, as the demo and the mock study run it")
    args = p.parse_args(argv)

    import numpy as np

    from tfhybrid.lens.mocks import make_mocks
    from tfhybrid.priors.vae import load_default_vae

    chunk, repeats, m_hmc = (5, 2, 4) if args.quick else (10, 3, 8)
    t0 = time.perf_counter()
    vae = load_default_vae()
    mocks = make_mocks(1, seed=0, noise_levels=("high",), min_snr_high=300.0)
    print(f"# setup (VAE + 1 mock, 256x256): {time.perf_counter() - t0:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    post1 = _posterior(vae, mocks, 1)
    rows = []  # (what, per-unit seconds, units, extrapolated total, paper, first-run seconds)
    for jit in ([False] if args.no_xla else [False, True]):
        for starts in (1, args.num_starts):
            step, first = map_step_time(post1, starts, chunk, repeats, jit)
            rows.append((f"MAP, 1 system, {starts} start(s), XLA {'on' if jit else 'off'}",
                         step, f"{DEFAULT_MAP_STEPS} steps", step * DEFAULT_MAP_STEPS,
                         PAPER_MAP_S, first))
            print(f"# {rows[-1][0]}: {1e3 * step:.0f} ms/step (first {chunk}-step chunk "
                  f"incl. compile {first:.1f} s)", flush=True)
    hmc_jits = [False, True] if args.hmc_xla else [False]
    for jit in hmc_jits:
        draw, first = hmc_draw_time(post1, 4, m_hmc, 2, jit)
        rows.append((f"HMC, 1 system, 10 leapfrog, XLA {'on' if jit else 'off'}", draw,
                     f"{PAPER_HMC_DRAWS} draws (extrap.)", draw * PAPER_HMC_DRAWS,
                     PAPER_HMC_S, first))
        print(f"# {rows[-1][0]}: {draw:.2f} s/draw (first 4-draw run incl. compile "
              f"{first:.1f} s)", flush=True)

    batch_rows = []
    for s in args.batches:
        post = post1 if s == 1 else _posterior(vae, mocks, s)
        c = max(2, chunk // max(1, int(np.sqrt(s))))
        step, first = map_step_time(post, 1, c, repeats, False)
        batch_rows.append((s, step, step / s, step / s * DEFAULT_MAP_STEPS, first))
        print(f"# batched S={s}: {1e3 * step:.0f} ms/step, {1e3 * step / s:.0f} ms/step/system",
              flush=True)

    print()
    print(f"{'target':<40s} {'per step/draw':>14s} {'extrapolated to':>24s} {'total':>12s} "
          f"{'paper (CPU)':>12s} {'speed-up':>9s}")
    for what, unit, to, total, paper, _ in rows:
        print(f"{what:<40s} {unit:>12.3f} s {to:>24s} {_fmt_s(total):>12s} {_fmt_s(paper):>12s} "
              f"{paper / max(total, 1e-9):>8.0f}x")
    print()
    print(f"{'systems S (1 start each, XLA off)':<36s} {'per step':>10s} {'per step / S':>13s} "
          f"{'MAP per system (2000 steps)':>28s}")
    for s, step, per, total, _ in batch_rows:
        print(f"{s:<36d} {step:>8.3f} s {per:>11.4f} s {_fmt_s(total):>28s}")
    if args.pipeline:
        print()
        for name, value in pipeline_times(post1).items():
            print(f"{name:<60s} {value:>8.1f} s")
    print(f"\n# load average at end {os.getloadavg()[0]:.1f}; per-step times: "
          f"MAP: median of {repeats} compiled {chunk}-step chunks after a warm-up chunk; HMC: "
          f"difference of a 4- and a {4 + m_hmc}-draw run; all totals EXTRAPOLATED from them.")
    return rows, batch_rows


if __name__ == "__main__":
    main()

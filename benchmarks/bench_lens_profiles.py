"""Time one 256x256 SPLE deflection field: table vs exact series vs lenstronomy's EPL.

Prints a table of milliseconds per call (median of repeats, after a warm-up/compile call) and
the ratio to lenstronomy measured in the same run. Runtime: ~1-2 min on 2 CPU cores.

Usage::

    nice -n 10 python benchmarks/bench_lens_profiles.py [--q 0.5] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _median_ms(fn, repeats):
    fn()  # warm-up: tracing / XLA compilation, table load
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _time_dtype(tf, lp, table, gx, gy, lens, dtype, repeats):
    """Rows (label, ms) for the table and the exact series in one dtype."""
    x, y = tf.constant(gx, dtype), tf.constant(gy, dtype)
    p = {k: tf.constant(v, dtype) for k, v in lens.items()}
    n_terms = int(lp.epl_num_terms(p["q"], dtype))  # static loop bound, as eager calls use

    def spl(x, y, p):
        return lp.spl_deflection_core(
            x, y, p["r_ein"], p["gamma"], p["q"], p["phi"], p["x0"], p["y0"], table
        )

    def epl(x, y, p):
        return lp.epl_deflection_core(
            x, y, p["r_ein"], p["gamma"], p["q"], p["phi"], p["x0"], p["y0"], n_terms
        )

    def value_and_grad(fn):
        with tf.GradientTape() as tape:
            tape.watch(list(p.values()))
            ax, ay = fn(x, y, p)
            loss = tf.reduce_sum(ax**2 + ay**2)
        return loss, tape.gradient(loss, list(p.values()))

    rows = []
    for name, fn in (("table", spl), ("exact series", epl)):
        for label, compiled in (
            ("tf.function", tf.function(fn)),
            ("tf.function(jit_compile=True)", tf.function(fn, jit_compile=True)),
        ):
            ms = _median_ms(lambda c=compiled: [t.numpy() for t in c(x, y, p)], repeats)
            rows.append((f"{name} {dtype.name} {label}", ms))
        grad_fn = tf.function(lambda fn=fn: value_and_grad(fn), jit_compile=True)
        ms = _median_ms(lambda c=grad_fn: [t.numpy() for t in tf.nest.flatten(c())], repeats)
        rows.append((f"{name} {dtype.name} value+grad (6 params) jit", ms))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--q", type=float, default=0.5)
    parser.add_argument("--gamma", type=float, default=2.1)
    parser.add_argument("--npix", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import tensorflow as tf
    from lenstronomy.LensModel.lens_model import LensModel

    from tfhybrid.physics import lens_profiles as lp
    from tfhybrid.physics.spl_table import load_default_table

    coords = (np.arange(args.npix) - (args.npix - 1) / 2) * 0.04
    gx, gy = np.meshgrid(coords, coords)
    lens = dict(r_ein=1.5, gamma=args.gamma, q=args.q, phi=0.3, x0=0.05, y0=-0.1)
    table = load_default_table()
    kw = lp.paper_to_lenstronomy(**lens)
    kw = {k: float(kw[k]) for k in ("theta_E", "gamma", "e1", "e2", "center_x", "center_y")}
    lenstronomy_epl = LensModel(["EPL"])
    rows = [
        (
            "lenstronomy EPL (numpy float64)",
            _median_ms(lambda: lenstronomy_epl.alpha(gx, gy, [kw]), args.repeats),
        )
    ]

    for dtype in (tf.float32, tf.float64):
        rows.extend(_time_dtype(tf, lp, table, gx, gy, lens, dtype, args.repeats))

    ref = rows[0][1]
    print(
        f"\n{args.npix}x{args.npix} deflection field, q = {args.q}, gamma = {args.gamma} "
        f"(series terms float32/float64: {int(lp.epl_num_terms(args.q, tf.float32))}/"
        f"{int(lp.epl_num_terms(args.q, tf.float64))})"
    )
    print(f"{'method':<52s} {'ms':>9s} {'vs lenstronomy':>15s}")
    for name, ms in rows:
        print(f"{name:<52s} {ms:9.2f} {ms / ref:15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

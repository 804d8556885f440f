"""Build the SPLE deflection table shipped as ``tfhybrid/assets/spl_deflection_table.npz``.

Appendix A of Chianese et al. 2020 (003_*): the deflection on the unit circle, ``r_ein = 1``,
from eqs. A1-A4 by adaptive quadrature (scipy QUADPACK with the algebraic endpoint weight,
float64, ~1e-12 relative), on a deterministic grid (no randomness in the table):

    u      in [0, pi/2]        n_u     = 129 (elliptical angle, tan u = tan(eta) / q)
    log q  in [log 0.1, 0]     n_q     = 41
    gamma  in [1.2, 2.8]       n_gamma = 33

then checks the interpolated table against the exact Tessore & Metcalf series
(:func:`tfhybrid.physics.lens_profiles.epl_deflection`) on random off-grid points (seed 0),
prints the errors and stores them in the npz. Runtime: ~3-5 min on 2 CPU cores.

Usage::

    nice -n 10 python scripts/build_spl_table.py [--out PATH] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

N_U, N_Q, N_GAMMA = 129, 41, 33
Q_MIN = 0.1
GAMMA_RANGE = (1.2, 2.8)


def _column(args):
    """All u nodes of one (q, gamma) column: (n_u, 2)."""
    from tfhybrid.physics.spl_table import alpha_unit_circle_quadrature

    eta_column, q, gamma = args
    out = np.empty((len(eta_column), 2))
    for i, eta in enumerate(eta_column):
        # exact zeros on the axes, so the quadrature skips the vanishing component
        t1 = 0.0 if eta == 0.5 * np.pi else np.cos(eta)
        t2 = 0.0 if eta == 0.0 else np.sin(eta)
        out[i] = alpha_unit_circle_quadrature(t1, t2, q, gamma)
    return out


def compute_table(n_u, n_q, n_gamma, q_min, gamma_range, workers):
    from tqdm import tqdm

    from tfhybrid.physics.spl_table import table_nodes

    u, log_q, gamma, eta = table_nodes(n_u, n_q, n_gamma, q_min, gamma_range)
    jobs = [
        (eta[:, j], float(np.exp(log_q[j])), float(gamma[k]))
        for j in range(n_q)
        for k in range(n_gamma)
    ]
    with multiprocessing.Pool(workers) as pool:
        columns = list(
            tqdm(pool.imap(_column, jobs, chunksize=4), total=len(jobs), desc="quadrature")
        )
    alpha = np.stack(columns, axis=1).reshape(n_u, n_q, n_gamma, 2)
    return u, log_q, gamma, eta, alpha


def measure_error(table, n_points=20000, seed=0):
    """Relative deflection error of the table vs the exact series at random off-grid points."""
    import tensorflow as tf

    from tfhybrid.physics import lens_profiles

    rng = np.random.default_rng(seed)
    q_lo, q_hi = table.q_range
    q = rng.uniform(q_lo, q_hi, n_points)
    gamma = rng.uniform(*table.gamma_range, n_points)
    r_ein = rng.uniform(0.5, 2.5, n_points)
    phi = rng.uniform(-np.pi, np.pi, n_points)
    radius = rng.uniform(0.05, 5.0, n_points)
    angle = rng.uniform(-np.pi, np.pi, n_points)
    x, y = radius * np.cos(angle), radius * np.sin(angle)
    results = {}
    for dtype in (np.float64, np.float32):
        args = [a.astype(dtype) for a in (x, y, r_ein, gamma, q, phi)]
        tx, ty = lens_profiles.spl_deflection(*args, 0.0, 0.0, table=table)
        ex, ey = lens_profiles.epl_deflection(*[a.astype(np.float64) for a in args])
        err = np.hypot(tx.numpy() - ex.numpy(), ty.numpy() - ey.numpy()) / np.hypot(ex, ey)
        name = tf.as_dtype(dtype).name
        results[f"max_rel_error_{name}"] = float(err.max())
        results[f"p99_rel_error_{name}"] = float(np.percentile(err, 99))
        results[f"max_rel_error_q_ge_0.2_{name}"] = float(err[q >= 0.2].max())
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--out", default=root / "tfhybrid/assets/spl_deflection_table.npz")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-u", type=int, default=N_U)
    parser.add_argument("--n-q", type=int, default=N_Q)
    parser.add_argument("--n-gamma", type=int, default=N_GAMMA)
    args = parser.parse_args(argv)

    from tfhybrid.io import atomic_path
    from tfhybrid.physics.spl_table import SPLTable

    start = time.perf_counter()
    u, log_q, gamma, eta, alpha = compute_table(
        args.n_u, args.n_q, args.n_gamma, Q_MIN, GAMMA_RANGE, args.workers
    )
    build_s = time.perf_counter() - start
    table = SPLTable.from_values(u, log_q, gamma, alpha)
    errors = measure_error(table)
    print(f"table {alpha.shape[:3]} (u, q, gamma) built in {build_s:.0f} s")
    print(
        f"extent: eta/u in [0, pi/2], q in [{Q_MIN}, 1] (uniform in log q), "
        f"gamma in [{GAMMA_RANGE[0]}, {GAMMA_RANGE[1]}]"
    )
    for key, value in errors.items():
        print(f"{key:>32s}: {value:.3e}")
    with atomic_path(args.out) as tmp:
        np.savez_compressed(
            tmp,
            u=u,
            log_q=log_q,
            gamma=gamma,
            alpha=alpha,
            eta=eta,
            description=np.array(
                "SPLE deflection (alpha_1, alpha_2) on the unit circle, r_ein = 1, major-axis "
                "frame, eqs. A1-A4 of Chianese et al. 2020 by scipy quadrature; "
                "axes (u, log_q, gamma, component), tan u = tan(eta) / q"
            ),
            **{k: np.array(v) for k, v in errors.items()},
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

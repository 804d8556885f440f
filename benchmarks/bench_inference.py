"""Benchmark the samplers on the 50-d correlated Gaussian: gradient evaluations/s and ESS/s.

The target is the test suite's 50-d Gaussian (AR(1) correlation 0.6, scales 0.3 to 3;
``tests/inference/test_mcmc.py``). For HMC (10 leapfrog steps, jittered) and NUTS (max tree
depth 8), with the chunks compiled by ``tf.function`` with XLA off and on, it prints

* ``grad/s``     gradient evaluations (leapfrog steps summed over chains, warm-up included)
                 per second of sampling,
* ``ESS/s``      minimum over the 50 parameters of the bulk ESS of the kept draws per second
                 of sampling (warm-up included in the time: it is the cost of a run),
* ``min ESS``, ``max R-hat``, ``accept``,
* ``first s``    wall time of the first call (tracing + compilation + sampling),
* ``steady s``   wall time of an identical second call (compiled kernel reused), which the
                 two rates above use,

and, as a ceiling, the throughput of the bare ``value_and_grad`` of the target batched over the
chains (compiled, XLA off / on). Seeded. Run (about 2-4 minutes on a 2-core CPU)::

    TF_CPP_MIN_LOG_LEVEL=2 nice -n 10 python benchmarks/bench_inference.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

from tfhybrid.inference.mcmc import sample_posterior  # noqa: E402

tf.get_logger().setLevel("ERROR")  # TFP's ESS casts its FFT output (a harmless warning)

tfd = tfp.distributions
D = 50


def correlated_gaussian() -> tfd.Distribution:
    """The 50-d test Gaussian: AR(1) correlation 0.6, marginal scales log-spaced 0.3..3."""
    idx = np.arange(D)
    scales = np.logspace(np.log10(0.3), np.log10(3.0), D)
    cov = 0.6 ** np.abs(np.subtract.outer(idx, idx)) * np.outer(scales, scales)
    mean = np.linspace(-2.0, 2.0, D)
    return tfd.MultivariateNormalTriL(
        tf.constant(mean, tf.float32), tf.linalg.cholesky(tf.constant(cov, tf.float32))
    )


def bare_gradient_rate(dist, num_chains: int, jit: bool, min_time_s: float = 2.0) -> float:
    """Gradient evaluations per second of ``value_and_grad(log_prob)`` on ``num_chains`` states."""

    @tf.function(jit_compile=jit, autograph=False)
    def many(x):
        def body(i, x):
            _, g = tfp.math.value_and_gradient(dist.log_prob, x)
            return i + 1, x + 1e-6 * g

        return tf.while_loop(lambda i, _: i < 100, body, (tf.constant(0), x))[1]

    x = tf.zeros([num_chains, D])
    many(x).numpy()
    best = 0.0
    for _ in range(3):
        t0, calls = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_time_s / 3:
            many(x).numpy()
            calls += 1
        best = max(best, calls * 100 * num_chains / (time.perf_counter() - t0))
    return best


def run_sampler(dist, kernel: str, jit: bool, num_results: int, num_burnin: int, chains: int):
    kwargs = dict(
        num_results=num_results, num_burnin=num_burnin, kernel=kernel, num_chains=chains,
        seed=11, progress=False, jit_compile=jit,
    )
    t0 = time.perf_counter()
    sample_posterior(dist.log_prob, tf.zeros(D), **kwargs)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = sample_posterior(dist.log_prob, tf.zeros(D), **kwargs)
    steady = time.perf_counter() - t0
    diag = res.diagnostics
    return {
        "grad_per_s": res.num_gradient_evaluations / steady,
        "ess_per_s": diag["min_ess"] / steady,
        "min_ess": diag["min_ess"],
        "max_r_hat": diag["max_r_hat"],
        "accept": diag["acceptance_rate"],
        "first_s": first,
        "steady_s": steady,
        "grads": res.num_gradient_evaluations,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws (smoke run)")
    parser.add_argument("--chains", type=int, default=4)
    args = parser.parse_args(argv)
    num_results, num_burnin = (200, 100) if args.quick else (1000, 300)
    dist = correlated_gaussian()
    print(
        f"50-d correlated Gaussian, {args.chains} chains, {num_burnin} warm-up + {num_results} "
        f"draws per chain; TF {tf.__version__}, {os.cpu_count()} CPU cores"
    )
    print(f"{'target':<8} {'XLA':<4} {'grad/s':>10}")
    for jit in (False, True):
        rate = bare_gradient_rate(dist, args.chains, jit)
        print(f"{'bare':<8} {'on' if jit else 'off':<4} {rate:>10.0f}")
    print()
    header = (
        f"{'kernel':<6} {'XLA':<4} {'grad/s':>9} {'ESS/s':>8} {'min ESS':>8} {'max R-hat':>9} "
        f"{'accept':>6} {'first s':>8} {'steady s':>8}"
    )
    print(header)
    print("-" * len(header))
    for kernel in ("hmc", "nuts"):
        for jit in (False, True):
            r = run_sampler(dist, kernel, jit, num_results, num_burnin, args.chains)
            print(
                f"{kernel:<6} {'on' if jit else 'off':<4} {r['grad_per_s']:>9.0f} "
                f"{r['ess_per_s']:>8.1f} {r['min_ess']:>8.0f} {r['max_r_hat']:>9.4f} "
                f"{r['accept']:>6.2f} {r['first_s']:>8.1f} {r['steady_s']:>8.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

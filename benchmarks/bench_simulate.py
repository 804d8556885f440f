"""Benchmark the simulation of the embedded default galaxy sample (``simulate_galaxy_stamps``).

Times, wall clock (process-pool start-up included, as a user of ``tfhybrid data simulate``
sees it):

* ``--n`` stamps (default 10 000) of 64 x 64 pixels at 0.03"/px with the default worker count
  (``min(os.cpu_count(), chunks)``), the issue's target being under ~2 minutes on 2 cores;
* ``--n-single`` stamps (default 2 000) with 1 worker (in-process), for comparison;

and prints a table of seconds and stamps per second. Run (about 2-3 minutes on a 2-core CPU)::

    python benchmarks/bench_simulate.py [--n 10000] [--n-single 2000] [--stamp-size 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from tfhybrid.data.simulate import simulate_galaxy_stamps


def time_simulation(n: int, workers: int | None, stamp_size: int, seed: int) -> float:
    """Wall-clock seconds of one ``simulate_galaxy_stamps`` call."""
    start = time.perf_counter()
    stamps = simulate_galaxy_stamps(n, seed, stamp_size=stamp_size, num_workers=workers)
    elapsed = time.perf_counter() - start
    assert stamps.images.shape == (n, stamp_size, stamp_size)
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="stamps, default worker count")
    parser.add_argument("--n-single", type=int, default=2_000, help="stamps, 1 worker")
    parser.add_argument("--stamp-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cpus = os.cpu_count() or 1
    runs = [("default", None, args.n), ("1", 1, args.n_single)]
    rows = []
    for label, workers, n in runs:
        seconds = time_simulation(n, workers, args.stamp_size, args.seed)
        rows.append((label, n, seconds, n / seconds))

    s = args.stamp_size
    print(f"simulate_galaxy_stamps: {s}x{s} stamps at 0.03\"/px, ACS-like PSF, noiseless copy "
          f"kept; {cpus} CPU(s) ({platform.processor() or platform.machine()}), "
          f"default workers = min({cpus}, chunks)")
    print(f"{'workers':>9} {'stamps':>8} {'seconds':>9} {'stamps/s':>10}")
    for label, n, seconds, rate in rows:
        print(f"{label:>9} {n:>8d} {seconds:>9.1f} {rate:>10.1f}")
    default_rate, single_rate = rows[0][3], rows[1][3]
    print(f"projected time for 10 000 stamps with the default workers: "
          f"{10_000 / default_rate:.0f} s; speed-up over 1 worker: "
          f"{default_rate / single_rate:.2f}x")


if __name__ == "__main__":
    main()

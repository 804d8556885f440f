"""Time per scene of the eq. 7 fit: deep prior vs SCARLET baseline, 1 vs N scenes batched.

Scenes: HSC-like grizy, 64×64 pixels, 4 GalSim galaxies each (tfhybrid.deblend.mocks), boxes
of 32 pixels. Every fit runs exactly ``--iters`` iterations (rtol = 0, so no early stop) and
is timed twice: the first call includes tracing, the second is the steady state. Also times
one PixelCNN++ ``log_prob_and_grad`` on the 4 stamps of a scene (the prior's share).
Deep mode first runs ``--init-iter`` baseline iterations (the default warm start of
:class:`tfhybrid.deblend.fit.DeblendConfig`), included in its time; ms/iter divides by
``iters`` only (the deep iterations dominate).

Goal (issue 8): a 5-band, 4-source, 64×64 scene in ≤ 10 s on a 2-core CPU.

    python benchmarks/bench_deblend.py [--iters 100] [--batch 16] [--methods deep scarlet]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tfhybrid.deblend.fit import DeblendConfig, deblend_batch  # noqa: E402
from tfhybrid.deblend.mocks import simulate_scene  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--init-iter", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=["scarlet", "deep"])
    args = ap.parse_args(argv)

    scenes = [simulate_scene(100 + i, n_sources=4) for i in range(args.batch)]
    obs = [s.observation for s in scenes]
    centres = [s.centres_xy for s in scenes]
    prior = None
    if "deep" in args.methods:
        from tfhybrid.priors.pixelcnn import load_default_pixelcnn

        prior = load_default_pixelcnn()
        x = tf.constant(scenes[0].true_morphs)
        prior.log_prob_and_grad(x)
        t0 = time.perf_counter()
        for _ in range(10):
            prior.log_prob_and_grad(x, validate=False)
        t_prior = (time.perf_counter() - t0) / 10
        print(f"PixelCNN++ log_prob_and_grad on (4, 32, 32): {1e3 * t_prior:.1f} ms/call")

    print(f"(deep: {args.init_iter} warm-start baseline iterations + iters)")
    print(f"{'method':8s} {'scenes':>6s} {'iters':>5s} {'first call s/scene':>19s} "
          f"{'warm s/scene':>13s} {'ms/iter/scene':>14s}")
    for method in args.methods:
        cfg = DeblendConfig(method=method, max_iter=args.iters, rtol=1e-30,
                            check_every=min(50, args.iters), init_iter=args.init_iter)
        for n in sorted({1, args.batch}):
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                deblend_batch(obs[:n], centres[:n], cfg, prior)
                times.append((time.perf_counter() - t0) / n)
            print(f"{method:8s} {n:6d} {args.iters:5d} {times[0]:19.2f} {times[1]:13.2f} "
                  f"{1e3 * times[1] / args.iters:14.1f}", flush=True)
    print(f"({os.cpu_count()} CPUs visible; TF intra-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'})")


if __name__ == "__main__":
    main()

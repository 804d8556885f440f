"""``tfhybrid demo``: the package's main job on its embedded defaults.

One held-out simulated galaxy lensed by a prior-drawn SPLE + external-shear lens at the
paper's high S/N, fitted with the shipped VAE source model (global search, MAP, then a short
HMC run), with the figures of the paper (Figs. 6 and 8 layouts), a parameter table and one
summary line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tfhybrid.lens.defaults import DEFAULT_MAP_STEPS, DEFAULT_SOURCE_RESIDUAL_GRID


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="main job: mock lens system -> MAP -> HMC posterior, on shipped defaults",
        description=__doc__.splitlines()[2].strip() + " Takes a few minutes on a 2-core CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="tfhybrid_demo", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--map-steps", type=int, default=DEFAULT_MAP_STEPS,
                   help="Adam steps of the MAP fit")
    p.add_argument("--num-results", type=int, default=150, help="HMC draws kept")
    p.add_argument("--num-burnin", type=int, default=50, help="HMC warm-up draws, discarded")
    p.add_argument("--source-residual", type=int, default=DEFAULT_SOURCE_RESIDUAL_GRID,
                   metavar="M",
                   help="integrate out a source-plane residual on an M x M grid after the MAP "
                        "(0: the paper's white likelihood)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from tfhybrid.lens.pipeline import run_demo
    from tfhybrid.validation import TfhybridInputError

    for flag, v in (("--map-steps", args.map_steps), ("--num-results", args.num_results)):
        if v < 1:
            raise TfhybridInputError(f"{flag} must be >= 1; got {v}")
    if args.num_burnin != 0 and args.num_burnin < 20:
        raise TfhybridInputError(f"--num-burnin must be 0 or >= 20; got {args.num_burnin}")
    if args.source_residual != 0 and not 2 <= args.source_residual <= 64:
        raise TfhybridInputError(
            f"--source-residual must be 0 or in [2, 64]; got {args.source_residual}")
    s = run_demo(Path(args.out), seed=args.seed, map_steps=args.map_steps,
                 num_results=args.num_results, num_burnin=args.num_burnin,
                 progress=not args.no_progress, source_residual=args.source_residual)
    t, m = s["truth"], s["map"]
    mean, sd = s["posterior_mean"], s["posterior_std"]
    gap = s["hmc"]["mode_gap"][0]
    print(
        f"demo: S/N {s['snr']:.0f}; r_Ein true {t['r_ein']:.4f} MAP {m['r_ein']:.4f} "
        f"posterior {mean['r_ein']:.4f}±{sd['r_ein']:.4f}; theta_E = sqrt(q) r_Ein true "
        f"{t['theta_e']:.4f} MAP {m['theta_e']:.4f} posterior "
        f"{mean['theta_e']:.4f}±{sd['theta_e']:.4f}; gamma true {t['gamma']:.3f} "
        f"MAP {m['gamma']:.3f} posterior {mean['gamma']:.3f}±{sd['gamma']:.3f}; "
        f"chi2/pix {s['chi2_per_pixel']:.3f}; MAP {s['map_wall_time_s']:.0f} s, "
        f"HMC {s['hmc_wall_time_s']:.0f} s (ESS r_Ein {s['hmc']['ess']['r_ein']:.0f}, "
        f"gamma {s['hmc']['ess']['gamma']:.0f}; best draw's log p {gap:+.0f} nats from the "
        f"MAP's) -> {args.out}/"
    )
    rs = s["robust_std"]
    print(f"model-robust (sandwich) sd at the MAP, for the source model's misfit: r_Ein "
          f"{rs['r_ein']:.4f}, theta_E {rs['theta_e']:.4f}, gamma {rs['gamma']:.3f}, "
          f"q {rs['q']:.4f}; the HMC draws given that width (samples_adjusted.npz): sd "
          f"r_Ein {s['adjusted_std']['r_ein']:.4f}, gamma {s['adjusted_std']['gamma']:.3f}")
    if gap > 0:
        print("note: the chain found a higher log p than the MAP, which was a local optimum; "
              "its draws may still be moving (run longer: --num-burnin, --num-results)")
    return 0

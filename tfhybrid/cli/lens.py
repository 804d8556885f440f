"""``tfhybrid lens mock|fit|sample|report``: the strong-lensing pipeline of 003_* (section 5).

* ``mock``    held-out galaxies lensed by prior-drawn SPLE + shear lenses at the three noise
              levels: ``DIR/mock_000.fits``, … (true parameters in the header) and the S/N table;
* ``fit``     MAP of one or many mock/observed systems (batched in one graph); each finished
              stage is kept in ``OUT/checkpoint`` until the outputs are written, so the same
              command, run again after an interruption, resumes where it stopped;
* ``sample``  HMC / NUTS posterior from the MAP, chunked: the same command, run again after
              an interruption, resumes from the chunks in ``OUT/chunks``;
* ``report``  table of true vs MAP vs posterior, per cent errors and interval coverage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
    DEFAULT_PRUNE_MARGIN,
    DEFAULT_RESIDUAL_PIXEL_FACTOR,
    DEFAULT_RESIDUAL_ROUNDS,
    DEFAULT_ROBUST_BLOCK,
    DEFAULT_SOURCE_RESIDUAL_GRID,
    DEFAULT_WHITENING_FLOOR,
)


def add_map_pipeline_options(p: argparse.ArgumentParser) -> None:
    """The MAP pipeline's options beyond starts and steps (global search, source-scale jumps,
    polish), with :mod:`tfhybrid.lens.defaults` as defaults; shared by ``tfhybrid lens fit`` and
    ``scripts/lens_mock_study.py``. :func:`map_pipeline_options` reads them back."""
    p.add_argument("--coarse-starts", type=int, default=DEFAULT_COARSE_STARTS,
                   help="global search: starts per system on a 4x coarser grid "
                        "(0: none, start from prior medians and draws)")
    p.add_argument("--coarse-steps", type=int, default=DEFAULT_COARSE_STEPS)
    p.add_argument("--coarse-prune-after", type=int, default=0,
                   help="global search: after this many steps only the --coarse-keep best "
                        "coarse starts of each system go on (0: all run every step)")
    p.add_argument("--coarse-keep", type=int, default=5)
    p.add_argument("--prune-after", type=int, default=DEFAULT_PRUNE_AFTER,
                   help="full-resolution Adam: from this step on, only the leading start of "
                        "each system goes on once it leads by --prune-margin nats in every "
                        "system (0: all run every step)")
    p.add_argument("--prune-margin", type=float, default=DEFAULT_PRUNE_MARGIN)
    p.add_argument("--scale-jumps", type=float, nargs="*", default=[0.6, 1.6, 2.6],
                   help="source-scale factors tried (s -> k s with the source redrawn; "
                        "none: off), where --jump-stage says")
    p.add_argument("--jump-stage", choices=("coarse", "full"), default=DEFAULT_JUMP_STAGE,
                   help="coarse: the jumps run on the coarse grid after the global search; "
                        "full: after the full-resolution fit (slowest). Default: %(default)s")
    p.add_argument("--newton-iter", type=int, default=DEFAULT_NEWTON_ITER,
                   help="damped Newton iterations with the full Hessian after Adam "
                        "(0: no polish)")
    p.add_argument("--lbfgs-iter", type=int, default=DEFAULT_LBFGS_ITER,
                   help="L-BFGS iterations after the Newton iterations, in coordinates "
                        "whitened by the Hessian (0: none)")
    p.add_argument("--lbfgs-cycles", type=int, default=DEFAULT_LBFGS_CYCLES,
                   help="at most this many L-BFGS runs, each re-whitened where the last "
                        "stopped, until a run gains < 1 nat in every system")
    p.add_argument("--source-residual", type=int, default=DEFAULT_SOURCE_RESIDUAL_GRID,
                   metavar="M",
                   help="after the MAP, integrate out a source-plane residual on an M x M grid "
                        "(its sigma chosen by the evidence) and polish again; sampling then uses "
                        "that posterior (0: the paper's white likelihood; default %(default)s)")
    p.add_argument("--residual-rounds", type=int, default=DEFAULT_RESIDUAL_ROUNDS,
                   help="rounds of (sigma by the evidence, polish) with the residual; later "
                        "ones re-choose sigma where the last moved the lens (one L-BFGS run)")
    p.add_argument("--residual-pixel-factor", type=float,
                   default=DEFAULT_RESIDUAL_PIXEL_FACTOR,
                   help="node spacing of the residual grid in source-stamp pixels")


def map_pipeline_options(args) -> dict:
    """:func:`tfhybrid.lens.fit.fit_map` keyword arguments of :func:`add_map_pipeline_options`."""
    from tfhybrid.physics.source_residual import SourceResidualConfig
    from tfhybrid.validation import TfhybridInputError

    residual = None
    if args.residual_rounds < 1:
        raise _error(f"--residual-rounds must be >= 1; got {args.residual_rounds}")
    if args.source_residual:
        try:
            residual = SourceResidualConfig(args.source_residual, args.residual_pixel_factor)
        except TfhybridInputError as err:
            raise _error(f"--source-residual / --residual-pixel-factor: {err}") from err
    for flag, value, low in (("--coarse-prune-after", args.coarse_prune_after, 0),
                             ("--prune-after", args.prune_after, 0),
                             ("--coarse-keep", args.coarse_keep, 1)):
        if value < low:
            raise _error(f"{flag} must be >= {low}; got {value}")
    if not (args.prune_margin >= 0 and args.prune_margin < float("inf")):
        raise _error(f"--prune-margin must be finite and >= 0 (nats); got {args.prune_margin}")
    return dict(coarse_starts=args.coarse_starts, coarse_steps=args.coarse_steps,
                coarse_prune_after=args.coarse_prune_after or None,
                coarse_keep=args.coarse_keep, prune_after=args.prune_after or None,
                prune_margin=args.prune_margin,
                scale_jumps=args.scale_jumps, jump_stage=args.jump_stage,
                newton_iter=args.newton_iter, lbfgs_iter=args.lbfgs_iter,
                lbfgs_cycles=args.lbfgs_cycles, source_residual=residual,
                residual_rounds=args.residual_rounds)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "lens", help="strong lensing: mocks, MAP fits, HMC posteriors, reports",
        description="Strong-lensing pipeline (Chianese et al. 2020). Run "
                    "`tfhybrid lens ACTION --help` for the options of each action.",
    )
    sub = parser.add_subparsers(dest="lens_command", metavar="ACTION")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("mock", help="make mock lens systems (FITS)", formatter_class=fmt,
                       description="Held-out simulated galaxies lensed by SPLE + shear lenses "
                                   "drawn from the priors, at σ = 0.333 / 0.1 / 0.0333.")
    p.add_argument("--n", type=int, default=1, help="number of systems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", nargs="+", default=["low", "medium", "high"],
                   help="noise levels (preset names or sigmas)")
    p.add_argument("--min-snr", type=float, default=0.0,
                   help="redraw lenses whose S/N at the last level is below this")
    p.add_argument("--min-images", type=int, default=0,
                   help="redraw lenses while the source has fewer images than this (2: strong "
                        "lenses only; singly imaged sources barely constrain r_Ein)")
    p.add_argument("--psf", default=None, metavar="FITS",
                   help="the PSF as a FITS image instead of the paper's Gaussian (odd sides, "
                        "centred; at 0.04 arcsec per pixel or a whole number of times finer); "
                        "kept in each mock file, where fit and sample find it")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_mock)

    for name, helptext in (("fit", "MAP fit (Adam or L-BFGS, multi-start); an interrupted fit "
                                   "resumes from OUT/checkpoint when run again"),
                           ("sample", "HMC / NUTS posterior from a MAP fit; an interrupted run "
                                      "resumes from OUT/chunks when run again")):
        p = sub.add_parser(name, help=helptext, formatter_class=fmt, description=helptext)
        inputs = p.add_mutually_exclusive_group(required=True)
        inputs.add_argument("--mock", nargs="+",
                            help="mock FITS files (tfhybrid lens mock); fitted together, "
                                 "batched")
        inputs.add_argument("--image", nargs="+", metavar="FITS",
                            help="observed lens images instead: FITS files of one square 2-D "
                                 "image each, the lens light subtracted, same size, pixel "
                                 "scale and PSF; fitted together, batched. They and their "
                                 "noise are divided by their peak after a 3x3 median filter "
                                 "(the model's units; ι is then relative to it)")
        p.add_argument("--level", default="high", help="noise level extension to fit (--mock)")
        p.add_argument("--noise-sigma", nargs="+", default=None, metavar="SIGMA",
                       help="with --image (required): pixel noise σ in the images' units, one "
                            "value or one per image, or 'auto' (from the median absolute "
                            "deviation of neighbouring pixels' differences, away from the "
                            "arcs)")
        p.add_argument("--noise-map", nargs="+", default=None, metavar="FITS",
                       help="with --image, instead of --noise-sigma: σ per pixel, one FITS "
                            "map per image in its units; NaN, inf or <= 0 masks a pixel (the "
                            "image may be NaN there)")
        p.add_argument("--weight-map", nargs="+", default=None, metavar="FITS",
                       help="with --image, instead of --noise-sigma: inverse variance per "
                            "pixel (e.g. a drizzled image's WHT), one per image; 0 masks a "
                            "pixel")
        p.add_argument("--pixel-scale", type=float, default=None, metavar="ARCSEC",
                       help="with --image: pixel side in arcsec (default: from the header's "
                            "celestial WCS, else its PIXSCALE card)")
        p.add_argument("--psf-sigma", type=float, default=None, metavar="ARCSEC",
                       help="with --image (this or --psf required): σ of a Gaussian PSF in "
                            "arcsec (0: no PSF)")
        p.add_argument("--psf", default=None, metavar="FITS",
                       help="with --image: the PSF as a FITS image instead (odd sides, centred; "
                            "at the images' pixel scale, or a whole number of times finer, "
                            "then binned to their pixels)")
        p.add_argument("--vae", default=None,
                       help="VAE directory (default: the shipped model)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--no-progress", action="store_true")
        if name == "fit":
            p.add_argument("--method", choices=("adam", "lbfgs"), default="adam")
            p.add_argument("--steps", type=int, default=DEFAULT_MAP_STEPS)
            p.add_argument("--starts", type=int, default=DEFAULT_NUM_STARTS,
                           help="full-resolution starts per system (the best coarse ones)")
            add_map_pipeline_options(p)
            p.add_argument("--robust-block", type=int, default=DEFAULT_ROBUST_BLOCK,
                           metavar="B",
                           help="after the MAP, model-robust (sandwich) 68 %% intervals from "
                                "the residuals summed over sliding B x B pixel windows, in "
                                "map_summary.json and the table (0: none; ~10 s per system)")
            p.set_defaults(func=run_fit)
        else:
            p.add_argument("--map", required=True,
                           help="map.json of tfhybrid lens fit (its map_hessian.npy beside it, "
                                "if its digest matches, whitens HMC instead of a new Hessian)")
            p.add_argument("--kernel", choices=("hmc", "nuts"), default="hmc")
            p.add_argument("--num-results", type=int, default=500)
            p.add_argument("--num-burnin", type=int, default=50)
            p.add_argument("--chains", type=int, default=1)
            p.add_argument("--whitening-step", type=float, default=None, metavar="H",
                           help="re-measure the Hessian's whitening at the posterior's scale "
                                "(central differences at H Laplace widths; helps some "
                                "systems' mixing, hurts others'; default: the Laplace "
                                "whitening alone)")
            p.add_argument("--whitening-floor", type=float, default=DEFAULT_WHITENING_FLOOR,
                           help="with --whitening-step: the smallest curvature taken "
                                "(Laplace-whitened units; width <= 1/sqrt of it)")
            p.add_argument("--pilot-draws", type=int, default=0, metavar="N",
                           help="first run a pilot chain of N draws and re-whiten by their "
                                "covariance (the posterior is wider than its curvature at the "
                                "MAP along some directions); 150 raised the ESS of r_Ein and "
                                "q ~2-4x on two test systems and cut it ~10x on a third: "
                                "compare (0: none)")
            p.add_argument("--robust-block", type=int, default=DEFAULT_ROBUST_BLOCK,
                           metavar="B",
                           help="also write the draws with the model-robust (sandwich) "
                                "covariance at the MAP, from B x B pixel windows "
                                "(samples_adjusted.npz, *_adjusted table columns; 0: none; "
                                "~10 s per system)")
            p.set_defaults(func=run_sample)

    p = sub.add_parser("report", help="table and coverage over fitted mocks",
                       formatter_class=fmt,
                       description="Pool the summary.json / map_summary.json of one or more "
                                   "output directories (lens fit / sample, or a study's "
                                   "posterior/ folder) over all their systems: median MAP "
                                   "error and fraction within 1 % per parameter, r_Ein and γ "
                                   "both within 1 %, and how often the 68 % intervals cover "
                                   "the truth, with an exact binomial test of calibration "
                                   "(p < 0.05: not consistent with 68 %); for a fit's "
                                   "directory, its model-robust (sandwich) intervals' "
                                   "coverage; for a posterior's, also that of the "
                                   "sandwich-adjusted draws.")
    p.add_argument("dirs", nargs="+", help="output directories of fit / sample")
    p.add_argument("--out", default=None, help="write the report JSON here")
    p.set_defaults(func=run_report)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _error(message: str):
    from tfhybrid.validation import TfhybridInputError

    return TfhybridInputError(message)


def _positive(flag: str, value) -> None:
    if value is None or value < 1:
        raise _error(f"{flag} must be >= 1; got {value}")


def run_mock(args) -> int:
    from tfhybrid.lens.mocks import make_mocks, write_mock_fits

    _positive("--n", args.n)
    if args.min_images < 0:
        raise _error(f"--min-images must be >= 0; got {args.min_images}")
    levels = [lv if lv in ("low", "medium", "high") else float(lv) for lv in args.levels]
    out = Path(args.out)
    existing = [p for p in (out / f"mock_{i:03d}.fits" for i in range(args.n)) if p.exists()]
    if existing and not args.overwrite:
        raise _error(f"{existing[0]} exists; pass --overwrite to replace it")
    psf_image = None
    if args.psf is not None:
        from tfhybrid.lens.observations import read_psf_image
        from tfhybrid.physics.lensing import LensingConfig

        psf_image, oversampling = read_psf_image(args.psf, LensingConfig().pixel_scale_arcsec)
        binned = f", binned {oversampling}x to the mocks' pixels" if oversampling > 1 else ""
        print(f"{args.psf}: PSF image {psf_image.shape[0]} x {psf_image.shape[1]}{binned}")
    mocks = make_mocks(args.n, seed=args.seed, noise_levels=levels, min_snr_high=args.min_snr,
                       min_images=args.min_images, psf_image=psf_image)
    paths = write_mock_fits(mocks, out, overwrite=True)
    print(mocks.snr_table())
    counts = mocks.image_counts()
    print("images of each source: " + " ".join(str(int(k)) for k in counts))
    print(f"wrote {len(paths)} mock system(s) to {out}/")
    return 0


def _load_images(args):
    """``--image``: the observed images, their noise and grid, in the model's units."""
    import numpy as np

    from tfhybrid.lens.observations import flux_scale, read_lens_image

    maps = [m for m in (args.noise_map, args.weight_map) if m is not None]
    if args.noise_sigma is None and not maps or (args.psf_sigma is None and args.psf is None):
        raise _error("--image needs --noise-sigma (a value, one per image, or auto) or a "
                     "--noise-map / --weight-map, and --psf-sigma (arcsec; 0 for none) or "
                     "--psf (a FITS image)")
    if len(maps) + (args.noise_sigma is not None) > 1:
        raise _error("give one of --noise-sigma, --noise-map and --weight-map")
    if maps and len(maps[0]) != len(args.image):
        raise _error(f"{len(maps[0])} noise / weight maps for {len(args.image)} images; give "
                     "one per image")
    if args.psf_sigma is not None and args.psf is not None:
        raise _error("give --psf-sigma or --psf, not both")
    if args.psf_sigma is not None and not (args.psf_sigma >= 0 and np.isfinite(args.psf_sigma)):
        raise _error(f"--psf-sigma must be >= 0 arcsec; got {args.psf_sigma}")
    if args.noise_sigma is not None and len(args.noise_sigma) not in (1, len(args.image)):
        raise _error(f"{len(args.noise_sigma)} --noise-sigma values for {len(args.image)} "
                     "images; give one, one per image, or auto")
    images = [read_lens_image(p, args.pixel_scale, allow_nan=bool(maps)) for p in args.image]
    grids = {(im.image.shape[0], round(im.pixel_scale_arcsec, 9)) for im in images}
    if len(grids) != 1:
        raise _error(f"the images have different sizes / pixel scales {sorted(grids)}; fit "
                     "them separately")
    n, scale = grids.pop()
    observed = np.stack([im.image for im in images]).astype(np.float64)
    if maps:
        sigma = _noise_maps(args, maps[0], observed, n)
        observed = np.where(np.isfinite(sigma), observed, 0.0)
    else:
        sigma = _noise_values(args, observed)
    scales = np.array([flux_scale(im) for im in observed])
    print("images divided by their peak (3x3 median filtered; the model's units): "
          + ", ".join(f"{v:.4g}" for v in scales))
    observed = observed / scales[:, None, None]
    sigma = sigma / scales.reshape((-1,) + (1,) * (sigma.ndim - 1))
    reference = [np.median(x[np.isfinite(x)]) for x in sigma] if maps else sigma
    posterior, labels = _lens_posterior(args, observed, sigma, n, scale, reference)
    return posterior, None, labels, (images, scales)


def _noise_values(args, observed):
    """``--noise-sigma``: σ per image ``(S,)``, given or estimated (auto)."""
    import numpy as np

    from tfhybrid.data.preprocess import estimate_noise_sigma

    sigma = []
    for i, value in enumerate(args.noise_sigma * (len(observed) // len(args.noise_sigma))):
        if value.strip().lower() == "auto":
            sigma.append(float(estimate_noise_sigma(observed[i], mask_sources=True)))
            print(f"{args.image[i]}: noise σ estimated at {sigma[-1]:.4g}")
            continue
        try:
            sigma.append(float(value))
        except ValueError:
            raise _error(f"--noise-sigma must be numbers or auto; got {value!r}") from None
    sigma = np.asarray(sigma)
    if not np.all(np.isfinite(sigma) & (sigma > 0)):
        raise _error(f"the noise σ must be finite and > 0; got {sigma.tolist()}")
    return sigma


def _noise_maps(args, paths, observed, n: int):
    """``--noise-map`` / ``--weight-map``: σ per pixel ``(S, n, n)``, inf where masked; the
    images' NaN pixels must be masked."""
    import numpy as np

    from tfhybrid.lens.observations import read_noise_map

    kind = "rms" if args.noise_map is not None else "weight"
    sigma = np.stack([read_noise_map(p, (n, n), kind) for p in paths])
    masked = ~np.isfinite(sigma)
    unmasked_nan = ~np.isfinite(observed) & ~masked
    if unmasked_nan.any():
        i = int(np.flatnonzero(unmasked_nan.any(axis=(1, 2)))[0])
        raise _error(f"{args.image[i]}: {int(unmasked_nan[i].sum())} NaN or inf pixel(s) "
                     f"that {paths[i]} does not mask")
    for path, m in zip(args.image, masked, strict=True):
        print(f"{path}: {int(m.sum())} pixel(s) masked by the noise map")
    return sigma


def _lens_posterior(args, observed, noise, n: int, scale: float, reference):
    """``--image``'s posterior and labels, from images and noise in the model's units;
    ``reference``: σ per image for the labels."""
    from tfhybrid.lens.model import LensPosterior
    from tfhybrid.lens.observations import read_psf_image
    from tfhybrid.physics.lensing import LensingConfig
    from tfhybrid.priors.vae import load_default_vae, load_vae

    psf_image = None
    if args.psf is not None:
        psf_image, oversampling = read_psf_image(args.psf, scale)
        binned = f", binned {oversampling}x to the images' pixels" if oversampling > 1 else ""
        print(f"{args.psf}: PSF image {psf_image.shape[0]} x {psf_image.shape[1]}{binned}")
        if psf_image.shape[0] > n or psf_image.shape[1] > n:
            raise _error(f"the PSF image ({psf_image.shape[0]} x {psf_image.shape[1]} pixels) "
                         f"is larger than the images ({n} x {n}); crop it")
    config = LensingConfig(n_pix=int(n), pixel_scale_arcsec=float(scale),
                           psf_sigma_arcsec=float(args.psf_sigma or 0.0) or None)
    vae = load_default_vae() if args.vae is None else load_vae(args.vae)
    posterior = LensPosterior(observed, noise, vae, config, psf_image=psf_image)
    labels = [f"{Path(p).stem} (σ/peak={s:.3g})"
              for p, s in zip(args.image, reference, strict=True)]
    return posterior, labels


def _load(args):
    """``(posterior, mocks or None, labels, (images, flux scales) or None)`` from
    ``--mock`` or ``--image``."""
    import numpy as np

    from tfhybrid.lens.mocks import read_mock_fits

    if args.image is not None:
        return _load_images(args)
    for flag in ("noise_sigma", "noise_map", "weight_map", "pixel_scale", "psf_sigma", "psf"):
        if getattr(args, flag) is not None:
            raise _error(f"--{flag.replace('_', '-')} applies to --image only (a mock file "
                         "records its own)")
    from tfhybrid.lens.model import LensPosterior
    from tfhybrid.priors.vae import load_default_vae, load_vae

    mocks = [read_mock_fits(p) for p in args.mock]
    configs = {m.config for m in mocks}
    psfs = {None if m.psf_image is None else m.psf_image.tobytes() for m in mocks}
    if len(configs) != 1 or len(psfs) != 1:
        raise _error("the mock files have different grids / PSFs; fit them separately")
    for path, m in zip(args.mock, mocks, strict=True):
        if args.level not in m.observed:
            raise _error(f"{path} has no noise level {args.level!r}; it has {list(m.observed)}")
    observed = np.concatenate([m.observed[args.level] for m in mocks])
    sigma = np.array([m.noise_sigma[args.level] for m in mocks])
    vae = load_default_vae() if args.vae is None else load_vae(args.vae)
    posterior = LensPosterior(observed, sigma, vae, configs.pop(),
                              psf_image=mocks[0].psf_image)
    truth = {k: np.concatenate([m.params[k] for m in mocks]) for k in mocks[0].params}
    merged = mocks[0]
    if len(mocks) > 1:
        from tfhybrid.lens.mocks import MockSystems

        merged = MockSystems(
            truth, np.concatenate([m.sources for m in mocks]),
            np.concatenate([m.noiseless for m in mocks]),
            {args.level: observed}, {args.level: float(sigma[0])},
            {args.level: np.concatenate([m.snr[args.level] for m in mocks])}, mocks[0].config,
            None if any(m.n_images is None for m in mocks)
            else np.concatenate([m.n_images for m in mocks]), mocks[0].psf_image,
        )
    labels = [f"{Path(p).stem} ({args.level}, S/N={m.snr[args.level][0]:.0f})"
              for p, m in zip(args.mock, mocks, strict=True)]
    return posterior, merged, labels, None


def run_fit(args) -> int:
    import shutil

    import numpy as np

    from tfhybrid.lens.fit import fit_map
    from tfhybrid.lens.pipeline import write_fit_outputs

    _positive("--steps", args.steps)
    _positive("--starts", args.starts)
    for flag in ("coarse_starts", "newton_iter", "lbfgs_iter", "lbfgs_cycles"):
        if getattr(args, flag) < 0:
            name = "--" + flag.replace("_", "-")
            raise _error(f"{name} must be >= 0; got {getattr(args, flag)}")
    if args.robust_block < 0:
        raise _error(f"--robust-block must be >= 0 (pixels; 0: none); got {args.robust_block}")
    if args.coarse_starts and args.coarse_starts < args.starts:
        raise _error(f"--coarse-starts ({args.coarse_starts}) must be 0 or >= --starts "
                     f"({args.starts})")
    if args.coarse_starts and args.coarse_prune_after > 0 and args.coarse_keep < args.starts:
        raise _error(f"--coarse-keep ({args.coarse_keep}) must be >= --starts ({args.starts}) "
                     "with --coarse-prune-after")
    options = map_pipeline_options(args)  # checks --source-residual before loading anything
    posterior, mocks, labels, observations = _load(args)
    if args.robust_block > posterior.config.n_pix:  # before the fit, not after it
        raise _error(f"--robust-block ({args.robust_block}) must not exceed the image's side "
                     f"({posterior.config.n_pix} pixels)")
    checkpoint = Path(args.out) / "checkpoint"
    fit = fit_map(posterior, num_starts=args.starts, method=args.method, num_steps=args.steps,
                  seed=args.seed, progress=not args.no_progress, checkpoint_dir=checkpoint,
                  **options)
    if fit.resumed_stages:
        print(f"resumed from {checkpoint}: {', '.join(fit.resumed_stages)} loaded, not rerun")
    robust = None
    if args.robust_block:
        from tfhybrid.lens.robust import sandwich_intervals

        robust = sandwich_intervals(posterior, fit.state(), block_size=args.robust_block)
    summary = write_fit_outputs(args.out, posterior, fit, mocks, labels=labels, robust=robust)
    if observations is not None:  # the model and residual in each image's units and WCS
        from tfhybrid.lens.pipeline import write_observed_model_fits

        written = write_observed_model_fits(args.out, posterior, fit, *observations)
        print("MAP model and residual / σ per image: " + ", ".join(p.name for p in written))
    shutil.rmtree(checkpoint, ignore_errors=True)  # the outputs hold the result now
    chi2 = ", ".join(f"{c:.3f}" for c in summary["chi2_per_pixel"])
    print(f"MAP of {len(labels)} system(s) in {fit.wall_time_s:.1f} s; chi2/pixel {chi2}; "
          f"{fit.message} -> {args.out}/")
    if robust is not None:
        infl = robust.inflation()
        print("sandwich / Laplace width (the source misfit's inflation): " + ", ".join(
            f"{k} {np.median(infl[k]):.2f}" for k in ("r_ein", "theta_e", "gamma", "q")))
    return 0


def run_sample(args) -> int:
    import numpy as np

    from tfhybrid.lens.fit import sample_lens_posterior
    from tfhybrid.lens.pipeline import (
        load_map_hessian,
        load_map_json,
        posterior_of_map,
        write_sample_outputs,
    )
    from tfhybrid.physics.lensing import PARAM_NAMES

    _positive("--num-results", args.num_results)
    _positive("--chains", args.chains)
    if args.pilot_draws < 0:
        raise _error(f"--pilot-draws must be >= 0; got {args.pilot_draws}")
    for flag, value in (("--whitening-step", args.whitening_step),
                        ("--whitening-floor", args.whitening_floor)):
        if value is not None and not (value > 0 and value < float("inf")):
            raise _error(f"{flag} must be finite and > 0; got {value}")
    if args.robust_block < 0:
        raise _error(f"--robust-block must be >= 0 (pixels; 0: none); got {args.robust_block}")
    posterior, mocks, labels, _ = _load(args)
    data = load_map_json(args.map)
    if data["z"].shape[0] != posterior.num_systems:
        raise _error(f"{args.map} holds {data['z'].shape[0]} systems but "
                     f"{posterior.num_systems} were given")
    if args.robust_block > posterior.config.n_pix:  # before sampling, not after it
        raise _error(f"--robust-block ({args.robust_block}) must not exceed the image's side "
                     f"({posterior.config.n_pix} pixels)")
    import tensorflow as tf

    posterior = posterior_of_map(posterior, data)  # the residual the MAP was polished under
    start = [tf.constant(np.asarray(data["params"][k], np.float32)) for k in PARAM_NAMES]
    start.append(tf.constant(data["z"]))
    samples = sample_lens_posterior(
        posterior, start, num_results=args.num_results, num_burnin=args.num_burnin,
        kernel=args.kernel, num_chains=args.chains, seed=args.seed,
        checkpoint_dir=Path(args.out) / "chunks", progress=not args.no_progress,
        hessian=load_map_hessian(args.map, data),  # None: evaluated at the MAP
        whitening_step=args.whitening_step, whitening_floor=args.whitening_floor,
        pilot_draws=args.pilot_draws,
    )
    from tfhybrid.lens.fit import LensMap

    fit = LensMap(data["params"], data["z"], np.asarray(data["log_prob"]),
                  np.asarray(data["best_start"]), None, float(data["wall_time_s"]))
    adjusted = None
    if args.robust_block:
        from tfhybrid.lens.robust import sandwich_adjusted_samples, sandwich_intervals

        robust = sandwich_intervals(posterior, start, block_size=args.robust_block)
        adjusted = sandwich_adjusted_samples(samples, robust, posterior)
    summary = write_sample_outputs(args.out, samples, fit,
                                   None if mocks is None else mocks.params, labels=labels,
                                   posterior=posterior, adjusted=adjusted)
    pilot = (f" after a pilot of {summary['pilot_draws']} ({summary['pilot_sampling_s']:.1f} s)"
             if summary["pilot_draws"] else "")
    print(f"{args.kernel.upper()}: {args.num_results} draws x {args.chains} chain(s) in "
          f"{summary['wall_time_s']:.1f} s{pilot}; acceptance {summary['acceptance_rate']:.2f}, "
          f"min ESS {summary['min_ess']:.0f}, max R-hat {summary['max_r_hat']:.3f} "
          f"-> {args.out}/")
    if adjusted is not None:
        sd = np.asarray(summary["std"]["r_ein"], dtype=np.float64)
        sd_adj = np.asarray(summary["std_adjusted"]["r_ein"], dtype=np.float64)
        ratio = sd_adj[sd > 0] / sd[sd > 0]  # a chain that never moved has no sd to compare
        widths = (f"their r_Ein sd / the posterior's: median {np.median(ratio):.2f}, range "
                  f"{ratio.min():.2f}-{ratio.max():.2f}" if ratio.size else
                  "no chain moved in r_Ein, so their widths cannot be compared")
        print(f"model-robust (sandwich, {args.robust_block}-pixel windows) draws -> "
              f"{args.out}/samples_adjusted.npz; {widths}")
    low = summary["low_ess_systems"]
    if low:
        names = [labels[i] for i in low]
        print(f"warning: ESS < 100 for r_ein, gamma, phi or q in {len(low)} system(s) {names}: "
              "their posterior means, widths and intervals are unreliable; draw more "
              "(--num-results) or run more chains (--chains)")
    above = summary["above_map_systems"]
    if above:
        gaps = [f"{labels[i]} +{summary['mode_gap'][i]:.0f}" for i in above]
        print(f"warning: draws reached a higher log p than the MAP in {len(above)} system(s) "
              f"({', '.join(gaps)} nats): the MAP was a local optimum and the chain may still be "
              "climbing; its means and intervals describe a chain in transit: draw more "
              "(--num-burnin, --num-results)")
    return 0


def _add_interval_flags(rows: list[dict], samples_path: Path) -> None:
    """Fill ``covered_68`` of table rows from the run's ``samples.npz``, with the intervals of
    :meth:`tfhybrid.lens.fit.LensSamples.interval` (the rows' ``true`` is already on φ's
    nearest branch). Leaves the rows alone when the draws are missing or unreadable."""
    import numpy as np

    from tfhybrid.lens.fit import LensSamples

    if not samples_path.is_file():
        return
    try:
        with np.load(samples_path) as f:
            draws = {k: f[k] for k in f.files if k != "z"}
        intervals = LensSamples(draws, None, None).interval(0.68)
    except (OSError, ValueError, KeyError):
        return
    for r in rows:
        lo_hi = intervals.get(r["parameter"])
        if "true" not in r or lo_hi is None or r["system"] >= len(lo_hi[0]):
            continue
        lo, hi = (float(v[r["system"]]) for v in lo_hi)
        r["covered_68"] = bool(lo <= r["true"] <= hi)


def run_report(args) -> int:
    import json

    import numpy as np

    from tfhybrid.inference.diagnostics import coverage_test
    from tfhybrid.io import write_json_atomic

    rows = []
    for d in args.dirs:
        d = Path(d)
        src = d / "summary.json" if (d / "summary.json").exists() else d / "map_summary.json"
        if not src.exists():
            raise _error(f"{d} has no summary.json or map_summary.json (run lens fit / sample)")
        try:
            data = json.loads(src.read_text())
        except ValueError as err:
            raise _error(f"{src} is not valid JSON: {err}") from err
        table = [dict(r, run=str(d)) for r in data.get("table", [])]
        if any("covered_68" not in r and "true" in r and "std" in r for r in table):
            _add_interval_flags(table, d / "samples.npz")  # runs from before covered_68
        rows += table
    if not rows:
        raise _error("no parameter rows found (were the fits made on mocks with known truth?)")
    report = {}
    for name in sorted({r["parameter"] for r in rows}):
        sel = [r for r in rows if r["parameter"] == name]
        err = np.array([abs(r["error_map_pct"]) for r in sel if "error_map_pct" in r])
        if err.size == 0:
            continue
        entry = dict(n=len(sel), median_abs_map_error_pct=float(np.median(err)),
                     fraction_within_1pct=float(np.mean(err < 1.0)))
        flags = [r["covered_68"] for r in sel if "covered_68" in r]
        if len(flags) == len(sel):  # every row has its exact 68 % interval (MAP-only: none)
            test = coverage_test(flags, 0.68)
            entry.update(coverage_68=test.fraction, coverage_68_p_value=test.p_value,
                         coverage_68_text=str(test))
        for key in ("robust", "adjusted"):  # the MAP's sandwich intervals (lens fit
            # --robust-block) and the sandwich-adjusted draws' (lens sample --robust-block)
            flags_k = [r[f"covered_68_{key}"] for r in sel if f"covered_68_{key}" in r]
            if len(flags_k) == len(sel):
                test = coverage_test(flags_k, 0.68)
                entry.update({f"coverage_68_{key}": test.fraction,
                              f"coverage_68_{key}_p_value": test.p_value,
                              f"coverage_68_{key}_text": str(test)})
        cov = [abs(r["bias_sigma"]) <= 1.0 for r in sel if "bias_sigma" in r]
        if cov:
            entry["fraction_truth_within_1sd"] = float(np.mean(cov))
        report[name] = entry
    if not report:
        raise _error("no row has a true value (were the fits made on mocks with known truth?)")
    # the headline: r_Ein and γ both within 1 % of the truth, per system
    pairs = {}
    for r in rows:
        if r["parameter"] in ("r_ein", "gamma") and "error_map_pct" in r:
            pairs.setdefault((r["run"], r["system"]), {})[r["parameter"]] = abs(r["error_map_pct"])
    both = [max(v.values()) < 1.0 for v in pairs.values() if len(v) == 2]
    width = max(len(k) for k in report)
    for name, e in report.items():
        if "coverage_68_text" in e:
            extra = f", 68 % interval covers the truth: {e['coverage_68_text']}"
        elif "fraction_truth_within_1sd" in e:
            extra = f", truth within ±1 sd: {e['fraction_truth_within_1sd']:.0%}"
        else:
            extra = ""
        if "coverage_68_robust_text" in e:
            extra += f", sandwich 68 % interval covers: {e['coverage_68_robust_text']}"
        if "coverage_68_adjusted_text" in e:
            extra += f", sandwich-adjusted draws' 68 % interval: {e['coverage_68_adjusted_text']}"
        print(f"{name:<{width}}  n={e['n']:3d}  median |MAP error| "
              f"{e['median_abs_map_error_pct']:.2f} %, within 1 %: "
              f"{e['fraction_within_1pct']:.0%}{extra}")
    if both:
        print(f"r_ein and gamma both within 1 %: {sum(both)}/{len(both)} systems")
        report["r_ein_and_gamma_within_1pct"] = dict(n=len(both), count=int(sum(both)))
    if args.out:
        write_json_atomic(args.out, report)
    return 0

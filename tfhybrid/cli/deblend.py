"""``tfhybrid deblend``: multi-band deblending of FITS scenes (000_* §3, eq. 7).

Inputs (multi-extension FITS, pixel coordinates 0-based, pixel centres at integers):

* ``--image``: one file per scene. The bands are either the first 3-d image HDU
  ``(bands, ny, nx)`` or every 2-d image HDU in order (EXTNAME = band name). Optional
  extensions ``WEIGHTS`` (inverse variances, the image shape) or ``SIGMA`` (per-band σ,
  ``(bands,)``); without either, σ is estimated per band from the data. NaN pixels are masked
  (weight 0) with a warning.
* ``--psf``: one file shared by all scenes or one per scene; ``(bands, py, px)`` (odd sizes),
  or one 2-d HDU per band, each summing to a positive number.
* ``--centres``: one FITS table per scene with columns ``X`` and ``Y`` (pixels), or
  ``--detect`` for the built-in peak detection.
* ``--simulate``: ignore the inputs and deblend a simulated HSC-like grizy scene (its input
  FITS files and its truth are written to the output directory too).

Outputs in ``--out``, written atomically (temporary file renamed on success; nothing is
written before every input has been read and checked): ``<name>_deblend.fits`` (primary: the
model ``(bands, ny, nx)``; ``SEDS``, ``FLUXES`` ``(K, bands)``; ``MORPHS`` ``(K, h, w)``;
``COMPONENTS`` ``(K, bands, ny, nx)``; ``RESIDUAL``; ``CATALOG`` table with centres, fluxes,
log-prior; header: method, χ²/pixel, convergence) and ``<name>_deblend.png`` (Fig. 1-like).
One summary line per scene goes to stdout, the progress bar to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "deblend",
        help="deblend multi-band scenes (PixelCNN++ prior or SCARLET baseline)",
        description=__doc__.split("\n\n")[0] + " Inputs and outputs: see the module docstring "
        "(python -m pydoc tfhybrid.cli.deblend).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--image", nargs="+", metavar="FITS", help="scene FITS file(s)")
    p.add_argument("--psf", nargs="+", metavar="FITS",
                   help="PSF FITS file: one for all scenes or one per scene")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--centres", nargs="+", metavar="FITS",
                     help="FITS table(s) with X, Y columns (pixels), one per scene")
    src.add_argument("--detect", action="store_true",
                     help="find the sources with the built-in detection (default without "
                          "--centres)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--baseline", choices=("scarlet",), default=None,
                   help="fit the SCARLET baseline (symmetry + monotonicity + positivity) "
                        "instead of the deep prior")
    p.add_argument("--prior", metavar="DIR", default=None,
                   help="PixelCNN++ prior directory (default: the shipped prior)")
    p.add_argument("--simulate", action="store_true",
                   help="deblend a simulated HSC-like scene instead of --image")
    p.add_argument("--seed", type=int, default=0, help="seed of --simulate")
    p.add_argument("--noise-factor", type=float, default=1.0,
                   help="--simulate: multiply the HSC-Wide noise by this (3 for Fig. 3)")
    p.add_argument("--max-iter", type=int, default=300, help="proximal-gradient iterations")
    p.add_argument("--init-iter", type=int, default=50,
                   help="deep mode: baseline iterations run first as a warm start")
    p.add_argument("--box", type=int, default=32, help="source box side (pixels)")
    p.add_argument("--detect-threshold", type=float, default=5.0, help="detection σ")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_deblend)


# ----------------------------------------------------------------------------------- reading
def _error(msg: str):
    from tfhybrid.validation import TfhybridInputError

    return TfhybridInputError(msg)


def _open(path: str):
    from astropy.io import fits

    p = Path(path)
    if not p.is_file():
        raise _error(f"input file {p} does not exist")
    try:
        return fits.open(p, memmap=False)
    except OSError as err:
        raise _error(f"{p} is not a readable FITS file: {err}") from err


def _read_bands(path: str, what: str):
    """(array (B, y, x), band names, hdul) from a cube HDU or a sequence of 2-d HDUs."""
    import numpy as np

    hdul = _open(path)
    cubes, planes, names = [], [], []
    for hdu in hdul:
        if getattr(hdu, "data", None) is None or not hasattr(hdu, "shape"):
            continue
        name = hdu.name.upper()
        if name in ("WEIGHTS", "SIGMA") or hdu.data.dtype.names is not None:
            continue
        if hdu.data.ndim == 3:
            cubes.append(hdu.data)
        elif hdu.data.ndim == 2:
            planes.append(hdu.data)
            names.append(hdu.name if hdu.name not in ("PRIMARY", "") else str(len(names)))
    if cubes:
        arr = np.asarray(cubes[0], dtype=np.float64)
        names = None
    elif planes:
        shapes = {p.shape for p in planes}
        if len(shapes) != 1:
            raise _error(f"{what} {path}: 2-d HDUs of different shapes {sorted(shapes)}")
        arr = np.stack([np.asarray(p, dtype=np.float64) for p in planes])
    else:
        raise _error(f"{what} {path} has no 2-d or 3-d image HDU (expected (bands, ny, nx) or "
                     "one 2-d HDU per band)")
    return arr, names, hdul


def _read_centres(path: str):
    import numpy as np

    hdul = _open(path)
    for hdu in hdul:
        cols = getattr(getattr(hdu, "columns", None), "names", None)
        if cols:
            upper = {c.upper(): c for c in cols}
            if "X" in upper and "Y" in upper:
                return np.stack([np.asarray(hdu.data[upper["X"]], float),
                                 np.asarray(hdu.data[upper["Y"]], float)], axis=1)
    raise _error(f"centres file {path} has no table with X and Y columns")


def _load_inputs(args):
    """Read and validate every scene before anything is computed or written."""
    import numpy as np

    from tfhybrid.deblend.scene import Observation, validate_centres

    if not args.image:
        raise _error("give --image FITS (or --simulate)")
    if not args.psf:
        raise _error("give --psf FITS (one for all scenes or one per scene)")
    if len(args.psf) not in (1, len(args.image)):
        raise _error(f"{len(args.psf)} PSF files for {len(args.image)} images; give one or "
                     "one per image")
    if args.centres and len(args.centres) != len(args.image):
        raise _error(f"{len(args.centres)} centre files for {len(args.image)} images")
    scenes = []
    for i, path in enumerate(args.image):
        images, names, hdul = _read_bands(path, "image")
        weights = sigma = None
        if "WEIGHTS" in hdul:
            weights = np.asarray(hdul["WEIGHTS"].data, dtype=np.float64)
        elif "SIGMA" in hdul:
            sigma = np.asarray(hdul["SIGMA"].data, dtype=np.float64).ravel()
        psfs, _, _ = _read_bands(args.psf[i if len(args.psf) > 1 else 0], "psf")
        obs = Observation.create(images, psfs, weights=weights, noise_sigma=sigma, bands=names)
        centres = None
        if args.centres:
            centres = validate_centres(_read_centres(args.centres[i]), obs.shape)
        scenes.append((Path(path).stem, obs, centres, None))
    return scenes


def _simulated_inputs(args, out: Path):
    import numpy as np
    from astropy.io import fits

    from tfhybrid.deblend.mocks import simulate_scene
    from tfhybrid.deblend.scene import ModelFrame
    from tfhybrid.io import write_fits_atomic

    sim = simulate_scene(args.seed, noise_factor=args.noise_factor,
                         frame=ModelFrame(box_size=args.box))
    obs = sim.observation
    name = f"simulated_seed{args.seed}"
    hdus = [fits.PrimaryHDU(obs.images)]
    hdus.append(fits.ImageHDU(np.asarray(sim.noise_sigma, np.float32), name="SIGMA"))
    write_fits_atomic(out / f"{name}.fits", fits.HDUList(hdus))
    write_fits_atomic(out / f"{name}_psf.fits", fits.HDUList([fits.PrimaryHDU(obs.psfs)]))
    cat = fits.BinTableHDU.from_columns([
        fits.Column(name="X", format="D", array=sim.centres_xy[:, 0]),
        fits.Column(name="Y", format="D", array=sim.centres_xy[:, 1]),
    ])
    write_fits_atomic(out / f"{name}_centres.fits", fits.HDUList([fits.PrimaryHDU(), cat]))
    truth = fits.HDUList([
        fits.PrimaryHDU(sim.noiseless),
        fits.ImageHDU(sim.true_morphs, name="MORPHS"),
        fits.ImageHDU(sim.true_fluxes.astype(np.float32), name="FLUXES"),
    ])
    write_fits_atomic(out / f"{name}_truth.fits", truth)
    centres = None if args.detect else sim.centres_xy
    return [(name, obs, centres, sim.true_morphs)]


# ----------------------------------------------------------------------------------- writing
def _result_hdul(res, obs):
    import numpy as np
    from astropy.io import fits

    prim = fits.PrimaryHDU(res.model)
    h = prim.header
    h["METHOD"] = (res.method, "deep = PixelCNN++ prior, scarlet = baseline")
    h["NSOURCES"] = (len(res.seds), "number of sources K")
    h["BANDS"] = (",".join(res.bands), "band order of all cubes")
    h["CHI2PIX"] = (float(res.chi2_per_pixel), "residual chi2 per unmasked pixel")
    h["NITER"] = (int(res.num_iter), "proximal-gradient iterations")
    h["CONVERGE"] = (bool(res.converged), "relative-change test met (see NITER)")
    cols = [
        fits.Column(name="X", format="D", array=res.centres_xy[:, 0]),
        fits.Column(name="Y", format="D", array=res.centres_xy[:, 1]),
    ]
    for b, band in enumerate(res.bands):
        cols.append(fits.Column(name=f"FLUX_{band}", format="D", array=res.fluxes[:, b]))
    if res.log_prior is not None:
        cols.append(fits.Column(name="LOGPRIOR", format="D", array=np.asarray(res.log_prior)))
    return fits.HDUList([
        prim,
        fits.ImageHDU(res.seds, name="SEDS"),
        fits.ImageHDU(res.fluxes.astype(np.float32), name="FLUXES"),
        fits.ImageHDU(res.morphs, name="MORPHS"),
        fits.ImageHDU(res.components, name="COMPONENTS"),
        fits.ImageHDU(res.residual, name="RESIDUAL"),
        fits.BinTableHDU.from_columns(cols, name="CATALOG"),
    ])


def run_deblend(args) -> int:
    import numpy as np

    from tfhybrid.deblend.fit import DeblendConfig, deblend_batch
    from tfhybrid.deblend.scene import ModelFrame
    from tfhybrid.io import savefig_atomic, write_fits_atomic
    from tfhybrid.plotting.deblend import plot_scene

    if args.init_iter < 0:
        raise _error(f"--init-iter must be >= 0; got {args.init_iter}")
    if args.max_iter < 1 or args.box < 3:
        raise _error(f"--max-iter must be >= 1 and --box >= 3; got {args.max_iter}, {args.box}")
    if args.simulate and (args.image or args.psf or args.centres):
        raise _error("--simulate makes its own scene: do not combine it with --image/--psf/"
                     "--centres")
    out = Path(args.out)
    method = "scarlet" if args.baseline == "scarlet" else "deep"
    prior = None
    if method == "deep" or args.prior:
        from tfhybrid.priors.pixelcnn import load_default_pixelcnn, load_pixelcnn

        prior = load_pixelcnn(args.prior) if args.prior else load_default_pixelcnn()

    if args.simulate:
        names = [f"simulated_seed{args.seed}"]
    else:
        scenes = _load_inputs(args)
        names = [s[0] for s in scenes]
    targets = [(out / f"{n}_deblend.fits", out / f"{n}_deblend.png") for n in names]
    if len(set(names)) != len(names):
        raise _error(f"scene names (file stems) must be distinct; got {names}")
    if not args.overwrite:
        for pair in targets:
            for t in pair:
                if t.exists():
                    raise _error(f"output {t} already exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if args.simulate:
        scenes = _simulated_inputs(args, out)

    config = DeblendConfig(method=method, frame=ModelFrame(box_size=args.box),
                           max_iter=args.max_iter, init_iter=args.init_iter)
    # Scenes of the same shape are fitted together in one batched graph.
    groups: dict = {}
    for i, (_, obs, _, _) in enumerate(scenes):
        groups.setdefault(obs.images.shape, []).append(i)
    results = [None] * len(scenes)
    for idx in groups.values():
        centres = [scenes[i][2] for i in idx]
        if any(c is None for c in centres):
            from tfhybrid.deblend.detection import detect_sources

            centres = [c if c is not None else detect_sources(scenes[i][1],
                                                              threshold=args.detect_threshold)
                       for c, i in zip(centres, idx, strict=True)]
        t0 = time.perf_counter()
        fitted = deblend_batch([scenes[i][1] for i in idx], centres, config, prior,
                               progress=not args.no_progress)
        dt = (time.perf_counter() - t0) / len(idx)
        for i, res in zip(idx, fitted, strict=True):
            results[i] = (res, dt)

    for (name, obs, _, truth), (res, dt), (fits_path, png_path) in zip(
        scenes, results, targets, strict=True
    ):
        write_fits_atomic(fits_path, _result_hdul(res, obs))
        fig = plot_scene(obs, res, title=f"{name}: {res.summary()}", true_morphs=truth)
        savefig_atomic(fig, png_path, dpi=110)
        flux_i = np.round(res.fluxes[:, min(2, res.fluxes.shape[1] - 1)], 1).tolist()
        state = "converged" if res.converged else "NOT converged"
        print(f"{name}: {method}, {len(res.seds)} sources, chi2/pixel {res.chi2_per_pixel:.3f}, "
              f"{res.num_iter} iterations ({state}), {dt:.1f} s; "
              f"flux[{res.bands[min(2, len(res.bands) - 1)]}] {flux_i} -> {fits_path}")
    sys.stdout.flush()
    return 0

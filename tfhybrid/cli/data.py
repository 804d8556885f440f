"""``tfhybrid data simulate|cosmos|preprocess|show``: make, convert, preprocess and look at data.

* ``simulate``   simulate COSMOS-like GalSim galaxies into ``DIR/stamps.fits`` (or a TFDS
                 dataset) plus a ``DIR/mosaic.png`` quick look;
* ``cosmos``     copy galaxies of GalSim's real COSMOS release into a stamp FITS file;
* ``preprocess`` run the lensing (crop / S/N cut / normalise / split) or deblending
                 (reconvolve to an HSC-like survey, augment, split) training-set pipeline;
* ``show``       draw a mosaic of the stamps of a FITS file.

Every output is written atomically (a temporary file renamed on success), so an error never
leaves a partial file; existing outputs are kept unless ``--overwrite`` is given. Arguments are
checked before any work starts and errors are raised as ``TfhybridInputError`` (one line, via
``tfhybrid.cli.main``). Heavy modules are imported inside the command functions so that
``tfhybrid --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

#: Stamps drawn in the quick-look mosaics.
MOSAIC_MAX_STAMPS = 36



def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="simulate, import (COSMOS), preprocess and view galaxy stamps",
        description="Simulate, import (COSMOS), preprocess and look at galaxy stamps. "
                    "Run `tfhybrid data ACTION --help` for the options of each action.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    _register_simulate(sub)
    _register_cosmos(sub)
    _register_preprocess(sub)
    _register_show(sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


# ----------------------------------------------------------------------------------- parsers


def _register_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate COSMOS-like galaxy stamps (GalSim bulge + disk + knots)",
        description=(
            "Simulate galaxy stamps with GalSim (population fitted to COSMOS F814W) and write "
            "DIR/stamps.fits (or a TFDS dataset under DIR) and DIR/mosaic.png (first 36 "
            "stamps). Prints one summary line; a progress bar goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=64, help="number of stamps (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (>= 0); same seed, same stamps")
    p.add_argument("--stamp-size", type=int, default=64, help="stamp side in pixels (>= 8)")
    p.add_argument("--pixel-scale", type=float, default=0.03, metavar="ARCSEC",
                   help="pixel side in arcsec (> 0)")
    p.add_argument("--psf-fwhm", type=float, default=None, metavar="ARCSEC",
                   help="Gaussian PSF FWHM in arcsec (default: ACS-like HST PSF, Airy at 814 nm "
                        "convolved with a 0.087\" Gaussian)")
    p.add_argument("--moffat-beta", type=float, default=None,
                   help="use a Moffat PSF of this index with --psf-fwhm (default: Gaussian)")
    p.add_argument("--noise-sigma", type=float, default=None,
                   help="per-pixel noise sigma in e-/s (default: COSMOS F814W depth scaled to "
                        "the pixel size; 0 for noiseless)")
    p.add_argument("--workers", type=int, default=None,
                   help="simulation processes (default: all cores)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--format", choices=("fits", "tfds"), default="fits",
                   help="fits: DIR/stamps.fits; tfds: a tensorflow-datasets build under DIR "
                        "(train/validation/test = 80/10/10 %%)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_simulate)


def _register_cosmos(sub) -> None:
    p = sub.add_parser(
        "cosmos",
        help="copy galaxies of GalSim's real COSMOS release into a stamp FITS file",
        description=(
            "Read GalSim's COSMOS real-galaxy release (get it with `galsim_download_cosmos -s "
            "25.2 -d DIR`), centre-crop every galaxy stamp at least --stamp-size pixels wide "
            "to that size (smaller ones are skipped and counted), crop the PSFs to a common "
            "size, and write them with their noise sigma, IDENT and magnitude to a stamp FITS "
            "file (read it with tfhybrid.data.fits_io.read_stamps_fits)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dir", required=True, metavar="COSMOS_DIR",
                   help="directory holding real_galaxy_catalog_<sample>.fits (or the -d "
                        "directory given to galsim_download_cosmos)")
    p.add_argument("--sample", choices=("25.2", "23.5", "23.5_example"), default=None,
                   help="COSMOS sample (default: the first found of 25.2, 23.5, 23.5_example)")
    p.add_argument("--max", type=int, default=None, metavar="N",
                   help="read at most the first N galaxies of the catalog")
    p.add_argument("--stamp-size", type=int, default=64, help="output stamp side, pixels (>= 8)")
    p.add_argument("--out", required=True, metavar="FILE", help="output FITS file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run_cosmos)


def _register_preprocess(sub) -> None:
    p = sub.add_parser(
        "preprocess",
        help="build the lensing or deblending training set (train/validation/test FITS)",
        description=(
            "lensing: the Chianese et al. (2020) pipeline: crop / downscale to --size pixels, "
            "keep S/N in [--snr-min, --snr-max], normalise, split train/validation/test. "
            "deblending: reconvolve to an HSC-like survey (0.168\"/px, FWHM 0.6\" by default) "
            "at --size 32 or 64 pixels with random rotations and flips, then split. Input: a "
            "stamp FITS file (--in, from `data simulate` or `data cosmos`) or --simulate N "
            "fresh galaxies. Output: one FITS file with TRAIN, VALIDATION and TEST extensions "
            "(tfhybrid.data.fits_io.read_image_sets_fits)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=("lensing", "deblending"),
                   help="which application's training set to build")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--in", dest="input", metavar="FITS", help="input stamp FITS file")
    src.add_argument("--simulate", type=int, metavar="N", help="simulate N galaxies instead")
    p.add_argument("--seed", type=int, default=0, help="seed of simulation, augmentation, split")
    p.add_argument("--size", type=int, default=None,
                   help="output stamp side, pixels (default: 64 lensing, 32 deblending)")
    p.add_argument("--snr-min", type=float, default=15.0, help="lensing: lowest kept S/N")
    p.add_argument("--snr-max", type=float, default=50.0, help="lensing: highest kept S/N")
    p.add_argument("--pixel-scale", type=float, default=0.168, metavar="ARCSEC",
                   help="deblending: survey pixel side, arcsec")
    p.add_argument("--psf-fwhm", type=float, default=0.6, metavar="ARCSEC",
                   help="deblending: survey (Gaussian) PSF FWHM, arcsec")
    p.add_argument("--no-augment", action="store_true",
                   help="deblending: no random rotations / flips")
    p.add_argument("--fractions", type=float, nargs=3, default=None,
                   metavar=("TRAIN", "TEST", "VALIDATION"),
                   help="relative sizes of the train / test / validation splits (default: the "
                        "lensing paper's 15500 500 1543)")
    p.add_argument("--workers", type=int, default=None, help="simulation processes")
    p.add_argument("--out", required=True, metavar="FILE", help="output FITS file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run_preprocess)


def _register_show(sub) -> None:
    p = sub.add_parser(
        "show",
        help="draw a mosaic PNG of the stamps of a FITS file",
        description=(
            "Draw the first --n stamps of a stamp FITS file (data simulate / data cosmos) or of "
            "one set of a preprocessed file (data preprocess) as a mosaic image."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--in", dest="input", required=True, metavar="FITS", help="input FITS file")
    p.add_argument("--out", required=True, metavar="PNG", help="output image (PNG, PDF, ...)")
    p.add_argument("--n", type=int, default=MOSAIC_MAX_STAMPS, help="number of stamps to draw")
    p.add_argument("--scale", choices=("asinh", "linear"), default="asinh", help="stretch")
    p.add_argument("--set", dest="image_set", default="train",
                   help="for preprocessed files: which set to draw")
    p.add_argument("--noiseless", action="store_true",
                   help="for stamp files: draw the noiseless stamps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run_show)


# ------------------------------------------------------------------------------- validation


def _error(message: str):
    from tfhybrid.validation import TfhybridInputError

    return TfhybridInputError(message)


def _check_int(flag: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise _error(f"{flag} must be >= {minimum}; got {value}")


def _check_positive(flag: str, value: float | None, unit: str = "") -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        u = f" {unit}" if unit else ""
        raise _error(f"{flag} must be a finite number > 0{u}; got {value}")


def _check_pixel_scale(value: float, high: float) -> None:
    _check_positive("--pixel-scale", value, "arcsec")
    if not 1e-3 < value <= high:
        raise _error(f"--pixel-scale must be in (0.001, {high:g}] arcsec; got {value:g}")


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise _error(f"output {path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise _error(f"output {path} already exists; pass --overwrite to replace it")


def _check_input(path: Path) -> None:
    if not path.exists():
        raise _error(f"input {path} does not exist")
    if not path.is_file():
        raise _error(f"input {path} is not a file")


@contextlib.contextmanager
def _created_dir(directory: Path, remove_on_failure: list[Path] | tuple = ()):
    """Create ``directory`` if needed; if the block fails, remove what it created.

    On failure ``directory`` itself is removed if this call created it (with what the failed
    block left in it: outputs are written atomically, so that is never a finished file of an
    earlier run); otherwise only the paths of ``remove_on_failure`` (folders the caller knows
    are new) are removed.
    """
    import shutil

    existed = directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield directory
    except BaseException:
        if not existed:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for path in remove_on_failure:
                shutil.rmtree(path, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------- commands


def _format_count(value: float) -> str:
    if not math.isfinite(value):
        return "inf"
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def run_simulate(args) -> int:
    _check_int("--n", args.n, 1)
    _check_int("--seed", args.seed, 0)
    _check_int("--stamp-size", args.stamp_size, 8)
    _check_int("--workers", args.workers, 1)
    _check_pixel_scale(args.pixel_scale, 2.0)
    _check_positive("--psf-fwhm", args.psf_fwhm, "arcsec")
    if args.noise_sigma is not None and not (math.isfinite(args.noise_sigma)
                                             and args.noise_sigma >= 0):
        raise _error(f"--noise-sigma must be a finite number >= 0; got {args.noise_sigma}")
    if args.moffat_beta is not None and args.psf_fwhm is None:
        raise _error("--moffat-beta needs --psf-fwhm (the default ACS-like PSF is not a Moffat)")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise _error(f"--out {out_dir} exists and is not a directory")
    mosaic_path = out_dir / "mosaic.png"
    _check_output(mosaic_path, args.overwrite)
    if args.format == "fits":
        fits_path = out_dir / "stamps.fits"
        _check_output(fits_path, args.overwrite)
        return _simulate_fits(args, out_dir, fits_path, mosaic_path)
    return _simulate_tfds(args, out_dir, mosaic_path)


def _psf_description(psf_fwhm, moffat_beta) -> str:
    from tfhybrid.data.simulate import ACS_PSF_JITTER_FWHM_ARCSEC

    if psf_fwhm is None:
        return (f"ACS-like: Airy(814 nm, D=2.4 m, obscuration 0.33) * Gaussian(FWHM "
                f"{ACS_PSF_JITTER_FWHM_ARCSEC} arcsec)")
    if moffat_beta is None:
        return f"Gaussian FWHM {psf_fwhm:g} arcsec"
    return f"Moffat beta {moffat_beta:g} FWHM {psf_fwhm:g} arcsec"


def _simulate_fits(args, out_dir: Path, fits_path: Path, mosaic_path: Path) -> int:
    import numpy as np

    from tfhybrid.data.fits_io import write_stamps_fits
    from tfhybrid.data.preprocess import matched_filter_snr
    from tfhybrid.data.simulate import simulate_galaxy_stamps
    from tfhybrid.io import atomic_path
    from tfhybrid.plotting.mosaic import plot_mosaic

    start = time.perf_counter()
    stamps = simulate_galaxy_stamps(
        args.n,
        args.seed,
        stamp_size=args.stamp_size,
        pixel_scale_arcsec=args.pixel_scale,
        psf_fwhm_arcsec=args.psf_fwhm,
        noise_sigma=args.noise_sigma,
        num_workers=args.workers,
        progress=not args.no_progress,
        moffat_beta=args.moffat_beta,
    )
    elapsed = time.perf_counter() - start
    snr = matched_filter_snr(stamps.noiseless, stamps.noise_sigma)
    fig = plot_mosaic(stamps.images[:MOSAIC_MAX_STAMPS],
                      suptitle=f"simulated stamps (seed {args.seed})")
    with _created_dir(out_dir):
        # Both files are renamed into place only once both are written.
        with atomic_path(fits_path) as tmp_fits, atomic_path(mosaic_path) as tmp_png:
            write_stamps_fits(tmp_fits, stamps, seed=args.seed, overwrite=True,
                              psf_description=_psf_description(args.psf_fwhm, args.moffat_beta))
            fig.savefig(tmp_png, dpi=100)
    s = args.stamp_size
    print(
        f"simulated {args.n} stamps {s}x{s} at {stamps.pixel_scale_arcsec:g}\"/px in "
        f"{elapsed:.1f} s ({args.n / elapsed:.1f} stamps/s), median hlr "
        f"{np.median(stamps.params['hlr_arcsec']):.2f}\", median S/N "
        f"{_format_count(float(np.median(snr)))} -> {fits_path}, {mosaic_path}"
    )
    return 0


def _simulate_tfds(args, out_dir: Path, mosaic_path: Path) -> int:
    import shutil

    import numpy as np
    import tensorflow_datasets as tfds

    from tfhybrid.data.tfds_builders import (
        SimulatedGalaxies,
        SimulatedGalaxiesConfig,
        offline_download_config,
    )
    from tfhybrid.io import atomic_path
    from tfhybrid.plotting.mosaic import plot_mosaic

    n_val = n_test = args.n // 10
    n_train = args.n - n_val - n_test
    setup = dict(stamp_size=args.stamp_size, pixel_scale_arcsec=args.pixel_scale,
                 psf_fwhm_arcsec=args.psf_fwhm, moffat_beta=args.moffat_beta,
                 noise_sigma=args.noise_sigma)
    # A registered config with the same imaging set-up keeps `tfds.load` by name working.
    config = next(
        (c.name for c in SimulatedGalaxies.BUILDER_CONFIGS
         if all(getattr(c, k) == v for k, v in setup.items())),
        None,
    ) or SimulatedGalaxiesConfig(name="custom", description="tfhybrid data simulate", **setup)
    builder = SimulatedGalaxies(data_dir=str(out_dir), config=config, n_train=n_train,
                                n_validation=n_val, n_test=n_test, seed=args.seed,
                                num_workers=args.workers)
    version_dir = Path(builder.data_dir)
    if version_dir.exists():
        if not args.overwrite:
            raise _error(f"output {version_dir} already exists; pass --overwrite to replace it")
        shutil.rmtree(version_dir)
        builder = SimulatedGalaxies(data_dir=str(out_dir), config=config, n_train=n_train,
                                    n_validation=n_val, n_test=n_test, seed=args.seed,
                                    num_workers=args.workers)
    if args.no_progress:
        tfds.disable_progress_bar()
    # Folders this build creates; a failed build removes them again (tfds leaves metadata and
    # empty folders behind), so no half-written dataset remains.
    new_paths = [p for p in (out_dir / SimulatedGalaxies.name, version_dir.parent,
                             out_dir / "downloads") if not p.exists()]
    start = time.perf_counter()
    with _created_dir(out_dir, remove_on_failure=new_paths):
        builder.download_and_prepare(download_config=offline_download_config())
        elapsed = time.perf_counter() - start
        images, hlr, snr = [], [], []
        for split in builder.info.splits:
            ds = builder.as_dataset(split=split)
            for ex in tfds.as_numpy(ds):
                if len(images) < MOSAIC_MAX_STAMPS:
                    images.append(ex["image"][..., 0])
                hlr.append(ex["hlr_arcsec"])
                snr.append(ex["snr"])
        fig = plot_mosaic(np.stack(images), suptitle=f"simulated stamps (seed {args.seed})")
        with atomic_path(mosaic_path) as tmp_png:
            fig.savefig(tmp_png, dpi=100)
    s = args.stamp_size
    name = builder.builder_config.name
    print(
        f"simulated {args.n} stamps {s}x{s} at {args.pixel_scale:g}\"/px in {elapsed:.1f} s "
        f"({args.n / elapsed:.1f} stamps/s), median hlr {np.median(hlr):.2f}\", median S/N "
        f"{_format_count(float(np.median(snr)))} -> {version_dir} "
        f"(tfds {SimulatedGalaxies.name}/{name}), {mosaic_path}"
    )
    return 0


def _centre_crop(image, size: int):
    """Central ``size`` x ``size`` cut of a (ny, nx) image (pixel ny // 2 stays the centre)."""
    ny, nx = image.shape
    y0 = ny // 2 - size // 2
    x0 = nx // 2 - size // 2
    return image[y0 : y0 + size, x0 : x0 + size]


def run_cosmos(args) -> int:
    import numpy as np

    from tfhybrid.data.cosmos import read_cosmos_catalog
    from tfhybrid.data.fits_io import write_stamps_fits

    _check_int("--max", args.max, 1)
    _check_int("--stamp-size", args.stamp_size, 8)
    out = Path(args.out)
    _check_output(out, args.overwrite)
    catalog = read_cosmos_catalog(args.dir, sample=args.sample)
    with catalog:
        n = len(catalog) if args.max is None else min(len(catalog), args.max)
        scales = np.unique(catalog.pixel_scale_arcsec[:n])
        if scales.size != 1:
            raise _error(f"COSMOS galaxies have several pixel scales {scales.tolist()} arcsec; "
                         "a stamp file holds one")
        size = args.stamp_size
        images, psfs, kept = [], [], []
        for gal in _progress(catalog.iter_galaxies(range(n)), n, "galaxies"):
            if min(gal["image"].shape) < size:
                continue
            images.append(_centre_crop(gal["image"], size))
            psfs.append(gal["psf"])
            kept.append(gal["index"])
        if not kept:
            raise _error(f"none of the {n} galaxies read has a stamp of at least {size} pixels; "
                         "lower --stamp-size")
        # A common odd PSF size: the smallest stored one (COSMOS PSFs are centred).
        psf_size = min(min(p.shape) for p in psfs)
        psf_size -= 1 - psf_size % 2
        psf = np.stack([_centre_crop(p, psf_size) for p in psfs])
        psf /= psf.sum(axis=(1, 2), keepdims=True)
        idx = np.asarray(kept)
        params = {
            "ident": catalog.ident[idx],
            "index": idx,
            "mag": catalog.mag[idx],
        }
        write_stamps_fits(
            out, np.stack(images), noise_sigma=catalog.noise_sigma[idx], psf=psf,
            pixel_scale_arcsec=float(scales[0]), params=params, overwrite=args.overwrite,
            psf_description="COSMOS ACS F814W PSF per galaxy",
            header={"ORIGIN": ("COSMOS", "GalSim real-galaxy release"),
                    "SAMPLE": (catalog.sample, "COSMOS sample")},
        )
    print(
        f"read {n} COSMOS galaxies (sample {catalog.sample}), kept {len(kept)} with stamps >= "
        f"{size} px, cropped to {size}x{size} at {scales[0]:g}\"/px, PSFs {psf_size}x{psf_size} "
        f"-> {out}"
    )
    return 0


def _progress(iterable, total: int, unit: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, unit=unit, desc=unit, leave=False, file=sys.stderr)


def run_preprocess(args) -> int:
    import numpy as np

    from tfhybrid.data.fits_io import write_image_sets_fits

    size = args.size if args.size is not None else (64 if args.task == "lensing" else 32)
    _check_int("--size", size, 8)
    _check_int("--simulate", args.simulate, 1)
    _check_int("--seed", args.seed, 0)
    _check_int("--workers", args.workers, 1)
    from tfhybrid.data.preprocess import LENSING_SPLIT

    fractions = tuple(float(f) for f in (args.fractions or LENSING_SPLIT))
    if any(not math.isfinite(f) or f < 0 for f in fractions) or sum(fractions) <= 0:
        raise _error(f"--fractions must be >= 0 with a positive sum; got {fractions}")
    if args.task == "lensing" and not 0 <= args.snr_min < args.snr_max:
        raise _error(f"--snr-min must be >= 0 and < --snr-max; got {args.snr_min}, {args.snr_max}")
    if args.task == "deblending":
        _check_pixel_scale(args.pixel_scale, 5.0)
        _check_positive("--psf-fwhm", args.psf_fwhm, "arcsec")
    out = Path(args.out)
    _check_output(out, args.overwrite)
    if args.input is not None:
        _check_input(Path(args.input))

    start = time.perf_counter()
    if args.task == "lensing":
        sets, tables, n_in = _preprocess_lensing(args, size, fractions)
        header = {"TASK": ("lensing", "Chianese et al. 2020 VAE training set"),
                  "SNRMIN": (args.snr_min, "lowest kept S/N"),
                  "SNRMAX": (args.snr_max, "highest kept S/N")}
    else:
        sets, tables, n_in = _preprocess_deblending(args, size, fractions)
        header = {"TASK": ("deblending", "PixelCNN++ morphology training set"),
                  "PIXSCALE": (args.pixel_scale, "[arcsec] pixel side"),
                  "PSFFWHM": (args.psf_fwhm, "[arcsec] survey PSF FWHM"),
                  "AUGMENT": (not args.no_augment, "random rotations and flips")}
    header["SEED"] = (args.seed, "seed of simulation, augmentation and split")
    header["SOURCE"] = (str(args.input) if args.input else f"simulated {args.simulate}",
                        "input stamps")
    if sum(len(v) for v in sets.values()) == 0:
        raise _error(f"no stamp of the {n_in} inputs passed the {args.task} cuts; nothing to write")
    write_image_sets_fits(out, sets, tables=tables, header=header, overwrite=args.overwrite)
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{k} {len(v)}" for k, v in sets.items())
    shape = next(np.shape(v)[1:] for v in sets.values())
    print(
        f"preprocessed {n_in} stamps for {args.task} in {elapsed:.1f} s: {counts} "
        f"({shape[0]}x{shape[1]} px) -> {out}"
    )
    return 0


SPLITS = ("train", "validation", "test")


def _split(images, fractions, seed, source_index):
    """Split (n, ny, nx) images with ``split_indices``.

    Returns (sets, tables): set name -> images, and set name -> {"index": row of each image in
    the input file}, where ``source_index[i]`` is the input row of ``images[i]``.
    """
    from tfhybrid.data.preprocess import split_indices

    parts = split_indices(len(images), fractions=fractions, seed=seed)
    sets = {k: images[parts[k]] for k in SPLITS}
    return sets, {k: {"index": source_index[parts[k]]} for k in SPLITS}


def _preprocess_lensing(args, size, fractions):
    import numpy as np

    from tfhybrid.data.preprocess import make_lensing_training_set, preprocess_lensing

    snr_range = (args.snr_min, args.snr_max)
    if args.simulate is not None:
        made = make_lensing_training_set(args.simulate, args.seed, size=size,
                                         snr_range=snr_range, fractions=fractions,
                                         num_workers=args.workers, progress=True)
        sets = {k: np.asarray(made[k], np.float32) for k in SPLITS}
        tables = {k: {"noise_sigma": made[f"{k}_noise_sigma"]} for k in SPLITS}
        return sets, tables, args.simulate
    from tfhybrid.data.fits_io import read_stamps_fits

    stamps = read_stamps_fits(args.input)
    images, kept = preprocess_lensing(stamps.images, stamps.noise_sigma, size=size,
                                      snr_range=snr_range, min_size=size)
    sets, tables = _split(np.asarray(images, np.float32), fractions, args.seed,
                          np.asarray(kept, np.int64))
    return sets, tables, len(stamps)


def _preprocess_deblending(args, size, fractions):
    import numpy as np

    from tfhybrid.data.preprocess import make_survey_stamps, reconvolve_to_survey

    augment = not args.no_augment
    if args.simulate is not None:
        images = make_survey_stamps(
            args.simulate, args.seed, stamp_size=size, pixel_scale_arcsec=args.pixel_scale,
            psf_fwhm_arcsec=args.psf_fwhm, augment=augment, noiseless=True,
            num_workers=args.workers, progress=True,
        )
        sets, _ = _split(np.asarray(images, np.float32), fractions, args.seed,
                         np.arange(args.simulate))
        return sets, None, args.simulate
    from tfhybrid.data.fits_io import read_stamps_fits

    stamps = read_stamps_fits(args.input)
    # Reconvolve the noiseless stamps when the file has them (simulations): the survey noise is
    # then the only noise; real COSMOS stamps carry their (much smaller) HST noise.
    source = stamps.noiseless if stamps.noiseless is not None else stamps.images
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 1]))
    out = np.empty((len(stamps), size, size), np.float32)
    for i in _progress(range(len(stamps)), len(stamps), "stamps"):
        rotation = float(rng.uniform(0.0, 2.0 * np.pi)) if augment else 0.0
        flip = bool(rng.random() < 0.5) if augment else False
        psf = stamps.psf[i] if stamps.psf.ndim == 3 else stamps.psf
        out[i] = reconvolve_to_survey(
            source[i], psf, stamps.pixel_scale_arcsec, target_psf_fwhm_arcsec=args.psf_fwhm,
            target_pixel_scale_arcsec=args.pixel_scale, stamp_size=size, rotation_rad=rotation,
            flip=flip,
        )
    sets, tables = _split(out, fractions, args.seed, np.arange(len(stamps)))
    return sets, tables, len(stamps)


def run_show(args) -> int:
    from tfhybrid.data.fits_io import (
        IMAGE_SETS_FORMAT,
        STAMPS_FORMAT,
        read_image_sets_fits,
        read_stamps_fits,
        read_stamps_header,
    )
    from tfhybrid.plotting.mosaic import save_mosaic

    _check_int("--n", args.n, 1)
    src, out = Path(args.input), Path(args.out)
    _check_input(src)
    _check_output(out, args.overwrite)
    fmt = read_stamps_header(src).get("FORMAT")
    if fmt == STAMPS_FORMAT:
        stamps = read_stamps_fits(src)
        if args.noiseless and stamps.noiseless is None:
            raise _error(f"{src} has no NOISELESS extension; drop --noiseless")
        images = stamps.noiseless if args.noiseless else stamps.images
        title = f"{src.name}: {'noiseless' if args.noiseless else 'images'}"
    elif fmt == IMAGE_SETS_FORMAT:
        sets = {k: v for k, v in read_image_sets_fits(src).items() if v.ndim == 3}
        if args.image_set not in sets:
            raise _error(f"{src} has no set {args.image_set!r}; it has {sorted(sets)}")
        images = sets[args.image_set]
        if len(images) == 0:
            raise _error(f"set {args.image_set!r} of {src} is empty")
        title = f"{src.name}: {args.image_set}"
    else:
        raise _error(f"{src} is not a tfhybrid stamp or image-set file (FORMAT={fmt!r})")
    shown = images[: args.n]
    save_mosaic(shown, out, suptitle=title, scale=args.scale)
    print(f"drew {len(shown)} of {len(images)} stamps -> {out}")
    return 0

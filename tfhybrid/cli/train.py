"""``tfhybrid train vae|pixelcnn``: train a prior (subcommands registered by their modules)."""

from __future__ import annotations

import importlib

TRAIN_MODULES = ("tfhybrid.cli.train_vae", "tfhybrid.cli.train_pixelcnn")


def add_run_arguments(p) -> None:
    """Options shared by every ``tfhybrid train`` model: checkpoints, strategy, export, seed."""
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="checkpoint every epoch here; rerun with the same dir to resume",
    )
    p.add_argument(
        "--mirrored",
        action="store_true",
        help="train under tf.distribute.MirroredStrategy (all local devices)",
    )
    p.add_argument("--export", default=None, help="also write a SavedModel here")
    p.add_argument("--seed", type=int, default=0)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a galaxy prior (VAE source model or PixelCNN++ morphology prior)"
    )
    sub = parser.add_subparsers(dest="model", metavar="MODEL")
    for name in TRAIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def read_training_data(path) -> tuple:
    """(train, validation or None) images from a FITS image-set file, .npz or .npy."""
    from pathlib import Path

    import numpy as np

    from tfhybrid.validation import TfhybridInputError

    path = Path(path)
    if not path.is_file():
        raise TfhybridInputError(f"--data {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".fits", ".fit", ".fz") or path.name.lower().endswith(".fits.gz"):
        from tfhybrid.data.fits_io import read_image_sets_fits

        sets = read_image_sets_fits(path)
    elif suffix == ".npy":
        try:
            sets = {"train": np.load(path, allow_pickle=False)}
        except ValueError as err:
            raise TfhybridInputError(f"--data {path} is not a plain .npy array: {err}") from err
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as loaded:
                sets = {k: loaded[k] for k in loaded.files if k in ("train", "validation")}
        except Exception as err:  # noqa: BLE001 - BadZipFile, pickled objects, truncation
            raise TfhybridInputError(f"--data {path} is not a readable .npz: {err}") from err
    else:
        raise TfhybridInputError(f"--data must be a .fits, .npz or .npy file; got {path.name!r}")
    if "train" not in sets:
        raise TfhybridInputError(f"--data {path} has no 'train' image set; it has {sorted(sets)}")
    val = sets.get("validation")
    return sets["train"], (val if val is not None and len(val) else None)

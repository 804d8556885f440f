"""``tfhybrid train vae|pixelcnn``: train a prior (subcommands registered by their modules)."""

from __future__ import annotations

import importlib

TRAIN_MODULES = ("tfhybrid.cli.train_vae", "tfhybrid.cli.train_pixelcnn")


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

"""Entry point of the ``tfhybrid`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed
arguments, returning an exit code or ``None``). Errors print one line and exit non-zero; the
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: ``--compile-cache`` / ``$TFHYBRID_COMPILE_CACHE`` values that turn the cache off
COMPILE_CACHE_OFF = ("off", "none", "0", "")


def default_compile_cache() -> str:
    """Where ``tfhybrid`` keeps XLA's compiled programs unless told otherwise:
    ``$TFHYBRID_COMPILE_CACHE`` if set (``off`` turns the cache off), else
    ``$XDG_CACHE_HOME/tfhybrid/xla`` (``~/.cache/tfhybrid/xla``)."""
    if "TFHYBRID_COMPILE_CACHE" in os.environ:
        return os.environ["TFHYBRID_COMPILE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tfhybrid", "xla")


# Subcommand modules, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = (
    "tfhybrid.cli.demo",
    "tfhybrid.cli.data",
    "tfhybrid.cli.train",
    "tfhybrid.cli.lens",
    "tfhybrid.cli.deblend",
    "tfhybrid.cli.cache",
)


def build_parser() -> argparse.ArgumentParser:
    from tfhybrid import __version__

    parser = argparse.ArgumentParser(
        prog="tfhybrid",
        description=(
            "Hybrid physical / deep-learning inference for astronomical images: "
            "strong-lensing source reconstruction with a VAE prior and multi-band deblending "
            "with a PixelCNN++ prior."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tfhybrid {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks and TensorFlow logging"
    )
    parser.add_argument(
        "--compile-cache", metavar="DIR", default=None,
        help="keep XLA's compiled programs in DIR for later runs: a second lens fit of the "
             "same size skips ~20 s of compilation (default: $TFHYBRID_COMPILE_CACHE, else "
             "~/.cache/tfhybrid/xla; 'off' for none)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # subcommand not part of this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        # TensorFlow's C++ log at ERROR level too: with the compile cache (on by default)
        # TensorFlow logs "Error parsing text-format tensorflow.XlaSerializedCacheEntry" for
        # every program it loads (it tries the text format before the binary one, which then
        # loads), and on a machine without a GPU "failed call to cuInit"; a real failure
        # raises, and the command prints it. Your own TF_CPP_MIN_LOG_LEVEL, or --debug, wins.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        if args.command != "cache":  # that one looks at the cache, it does not compile
            _enable_compile_cache(args.compile_cache)
        code = args.func(args)
    except KeyboardInterrupt:
        print("tfhybrid: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line for the user, traceback on --debug
        if debug:
            raise
        kind = type(err).__name__
        print(
            f"tfhybrid {args.command}: error: {err} ({kind}; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 2
    return int(code or 0)


def _enable_compile_cache(requested: str | None) -> None:
    """The compile cache of ``--compile-cache`` (an error if it cannot be used), else the
    default one (:func:`default_compile_cache`), skipped with a one-line note when its
    directory cannot be used and silently when TensorFlow already runs in this process (the
    CLI called from Python)."""
    from tfhybrid.physics.xla import enable_compile_cache, runtime_started
    from tfhybrid.validation import TfhybridInputError

    directory = default_compile_cache() if requested is None else requested
    if directory.strip().lower() in COMPILE_CACHE_OFF:
        return
    if requested is None and "TFHYBRID_COMPILE_CACHE" not in os.environ:
        if runtime_started():
            return
        try:
            enable_compile_cache(directory)
        except TfhybridInputError as err:
            print(f"tfhybrid: note: no compile cache ({err}); --compile-cache DIR to choose "
                  "one, off to silence this", file=sys.stderr)
        return
    enable_compile_cache(directory)


if __name__ == "__main__":
    sys.exit(main())

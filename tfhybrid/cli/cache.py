"""``tfhybrid cache info|clear``: the compile cache where ``tfhybrid`` keeps XLA's programs.

The directory is ``--compile-cache DIR`` (a global option, before ``cache``), else
``$TFHYBRID_COMPILE_CACHE``, else ``~/.cache/tfhybrid/xla``
(:func:`tfhybrid.cli.main.default_compile_cache`).
"""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache", help="show or clear the compile cache (XLA programs kept between runs)",
        description="Show or clear the compile cache, where the tfhybrid command keeps XLA's "
                    "compiled programs for later runs: --compile-cache DIR (before `cache`), "
                    "else $TFHYBRID_COMPILE_CACHE, else ~/.cache/tfhybrid/xla.",
    )
    sub = parser.add_subparsers(dest="cache_command", metavar="ACTION")
    info = sub.add_parser("info", help="the directory, and programs and megabytes per key")
    info.set_defaults(func=run_info)
    clear = sub.add_parser("clear", help="delete the cached programs (later runs recompile)")
    clear.set_defaults(func=run_clear)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _directory(args) -> str | None:
    from tfhybrid.cli.main import COMPILE_CACHE_OFF, default_compile_cache

    directory = default_compile_cache() if args.compile_cache is None else args.compile_cache
    return None if directory.strip().lower() in COMPILE_CACHE_OFF else directory


def run_info(args) -> int:
    from tfhybrid.physics.xla import compile_cache_contents

    directory = _directory(args)
    if directory is None:
        print("compile cache: off")
        return 0
    rows = compile_cache_contents(directory)
    total = sum(r["bytes"] for r in rows)
    print(f"compile cache {directory}: {sum(r['programs'] for r in rows)} programs, "
          f"{total / 1e6:.1f} MB")
    for r in rows:
        extra = f", {r['staging']} staging" if r["staging"] else ""
        print(f"  {r['key']}: {r['programs']} programs, {r['bytes'] / 1e6:.1f} MB{extra}")
    return 0


def run_clear(args) -> int:
    from tfhybrid.physics.xla import clear_compile_cache

    directory = _directory(args)
    if directory is None:
        print("compile cache: off (nothing to clear)")
        return 0
    removed, size = clear_compile_cache(directory)
    print(f"compile cache {directory}: removed {removed} programs, {size / 1e6:.1f} MB")
    return 0

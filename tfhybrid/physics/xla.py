"""Where a traced graph runs: whether XLA compiles it; functions that are safe to nest in it.

A layer that wraps its core in a ``tf.function`` of its own (a compiled cluster, or a graph
that eager callers trace once) must inline that core when its caller is itself compiled by
XLA (:func:`nestable_function` does both): a nested function call hides the core's static
shapes from XLA's constant analysis, so its gradient's shape arguments (those of the slice
and FFT gradients, of a gather's) become "must be constant" inputs of the caller's cluster,
traced back to the caller's arguments. XLA then compiles the caller once per argument
*value*: every call recompiles (measured: the lensing posterior's value and gradient, 4–5 s
per call instead of 20 ms).

:func:`enable_compile_cache` keeps compiled programs on disk, for later processes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def in_xla_context() -> bool:
    """Whether the graph being traced (or one it is nested in) is compiled by XLA.

    TensorFlow's internal API (there is no public one). Should it go away, the answer is
    True: callers then inline their cores everywhere, the plain graph of earlier releases
    (slower outside XLA, but never the nested call whose gradient XLA cannot compile once).
    """
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))
    except (ImportError, AttributeError):
        return True


class NestableFunction:
    """``core`` as a ``tf.function``, except inside a graph XLA compiles, where it is inlined.

    Made by :func:`nestable_function`. ``core`` is the plain Python function, ``function`` its
    ``tf.function``. The choice is made when the caller is traced, so it costs nothing per
    call.
    """

    def __init__(self, core, **tf_function_kwargs):
        import functools

        import tensorflow as tf

        self.core = core
        self.function = tf.function(core, **tf_function_kwargs)
        functools.update_wrapper(self, core)

    def __call__(self, *args, **kwargs):
        return (self.core if in_xla_context() else self.function)(*args, **kwargs)


def nestable_function(core, **tf_function_kwargs) -> NestableFunction:
    """``tf.function(core, **tf_function_kwargs)`` that callers compiled by XLA inline.

    Every compiled layer of :mod:`tfhybrid.physics` is built with it (the PSF convolutions,
    the interpolation, the lens equation's cluster, the source residual's gram and block
    scans), so nesting one in a ``jit_compile=True`` caller never makes the caller recompile
    per call (see the module docstring). Outside XLA (eager callers, plain graphs), the
    ``tf.function`` runs, with its own ``jit_compile`` if asked for.
    """
    return NestableFunction(core, **tf_function_kwargs)


#: The XLA flag that makes TensorFlow keep compiled programs on disk between processes.
_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def _host_key() -> str:
    """TensorFlow version, machine and a hash of the CPU's feature flags: compiled programs are
    specific to all three, so each combination gets a cache directory of its own."""
    import hashlib
    import platform

    import tensorflow as tf

    features = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            features = next((line for line in f if line.startswith("flags")), features)
    except OSError:
        pass
    digest = hashlib.sha256(features.encode()).hexdigest()[:12]
    return f"tf{tf.__version__}-{platform.machine()}-{digest}"


#: Staging directories of processes that died without publishing are removed after this long
#: (seconds) when their owner cannot be checked (another host).
_STALE_STAGING_S = 7 * 86400
_enabled: dict = {}


def runtime_started() -> bool:
    """Whether TensorFlow's runtime is initialised (it parses TF_XLA_FLAGS then, once)."""
    try:
        from tensorflow.python.eager import context

        return bool(context.context()._initialized)
    except (ImportError, AttributeError):  # internal API gone: cannot tell, assume not
        return False


def _host_name() -> str:
    """This host's name as it appears in staging directory names (no '-')."""
    import socket

    return socket.gethostname().replace("-", "_")


def _remove_stale_staging(path: Path) -> None:
    """Remove the staging directories of processes that are gone (killed before publishing:
    what they hold may be half-written, so it is dropped, never published). The owner is
    checked by process id on this host; another host's are removed after a week."""
    host = _host_name()
    for staging in path.glob(".staging-*"):
        try:
            _, owner_host, pid, _ = staging.name.split("-", 3)
        except ValueError:
            owner_host, pid = "", ""
        gone = False
        if owner_host == host and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                gone = True
            except OSError:  # exists, owned by another user
                pass
        else:
            try:
                gone = time.time() - staging.stat().st_mtime > _STALE_STAGING_S
            except OSError:
                continue
        if gone:
            shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        try:
            os.symlink(source, target)
        except OSError:
            shutil.copyfile(source, target)


def _publish(staging: Path, path: Path, linked: set) -> int:
    """Move the programs this process compiled from ``staging`` into the shared ``path``, each
    with one atomic rename, then remove ``staging``. Returns how many were published."""
    published = 0
    try:
        for entry in staging.glob("*.pb"):
            if entry.name in linked or entry.is_symlink():
                continue
            try:
                os.replace(entry, path / entry.name)
                published += 1
            except OSError:
                pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return published


def enable_compile_cache(directory) -> Path:
    """Keep XLA's compiled programs in ``directory`` so later processes reuse them.

    Each ``jit_compile`` graph (the lensing fit with the source residual compiles twelve,
    ~20 s of its wall time on a 2-core CPU) is then compiled once per input shape and
    machine, not once per process: a second MAP of the benchmark system with the residual
    took 83.3 s instead of 102–104 s on the same machine, with bit-identical results
    (``fit_map``, fresh processes, 2026-11-26). Programs go to a subdirectory keyed by the
    TensorFlow version, the machine and its CPU features (a program compiled for one CPU
    must not run on another).

    TensorFlow (``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory``) writes each program
    straight to its final name and fails every later compile of that graph if it finds a
    half-written one ("Read less bytes than requested"): a run killed while writing, or one
    reading while another writes, would break the cache for good. So each process reads and
    writes a staging directory of its own (the shared programs hard-linked into it), and at
    exit moves the programs it compiled into the shared directory, each with one atomic
    rename. A process killed before exiting publishes nothing; its staging directory is
    removed by a later call. Concurrent processes are safe (the last to publish a program
    wins; both copies are complete). Processes this one starts afterwards inherit
    ``TF_XLA_FLAGS``, so they share its staging directory (what they compile is published
    with this process's programs, at its exit); one that calls this function gets its own.

    Call it before TensorFlow runs its first operation: TensorFlow reads the flag once, when
    its runtime starts (a :class:`TfhybridInputError` says so otherwise). Calling it again
    with the same directory returns the same path. The cache is never pruned (~25 MB per
    fit configuration): :func:`clear_compile_cache` (``tfhybrid cache clear``) empties it.
    TensorFlow logs a harmless "Error parsing text-format tensorflow.XlaSerializedCacheEntry"
    for each program it reads back (it tries the text format first, then loads the binary
    one); ``TF_CPP_MIN_LOG_LEVEL=3``, set before TensorFlow is imported, hides it (the
    ``tfhybrid`` command does so by default).
    Returns the shared subdirectory.
    """
    import atexit
    import shlex
    import tempfile

    from tfhybrid.validation import TfhybridInputError

    root = Path(directory).expanduser()
    path = root / _host_key()
    if _enabled.get("path") == path:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TfhybridInputError(f"cannot create the compile cache directory {path}: {err}") \
            from err
    if not os.access(path, os.W_OK):
        raise TfhybridInputError(f"the compile cache directory {path} is not writable")
    if _enabled or runtime_started():
        raise TfhybridInputError(
            "enable_compile_cache must be called before TensorFlow runs its first operation "
            "(it reads TF_XLA_FLAGS once, when its runtime starts), and once per process: "
            "call it at the top of the script or notebook, or use `tfhybrid --compile-cache "
            "DIR ...`"
        )
    _remove_stale_staging(path)
    staging = Path(tempfile.mkdtemp(
        prefix=f".staging-{_host_name()}-{os.getpid()}-", dir=path))
    linked = set()
    for entry in path.glob("*.pb"):
        _link_or_copy(entry, staging / entry.name)
        linked.add(entry.name)
    flags = [f for f in shlex.split(os.environ.get("TF_XLA_FLAGS", ""))
             if not f.startswith(_CACHE_FLAG)]
    flags.append(f"{_CACHE_FLAG}={staging}")
    os.environ["TF_XLA_FLAGS"] = " ".join(shlex.quote(f) for f in flags)
    atexit.register(_publish, staging, path, linked)
    _enabled.update(path=path, staging=staging)
    return path


def _key_directories(directory) -> list[Path]:
    """The TensorFlow-version / machine / CPU key directories of a compile cache (none if
    ``directory`` does not exist)."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("tf"))


def compile_cache_contents(directory) -> list[dict]:
    """What a compile cache holds: one dict per TensorFlow-version / machine / CPU key
    (``key``, ``programs``, ``bytes``, ``staging``: the staging directories of running or
    killed processes). Empty if ``directory`` does not exist."""
    out = []
    for keyed in _key_directories(directory):
        programs = [p for p in keyed.glob("*.pb") if p.is_file()]
        out.append(dict(key=keyed.name, programs=len(programs),
                        bytes=sum(p.stat().st_size for p in programs),
                        staging=len(list(keyed.glob(".staging-*")))))
    return out


def clear_compile_cache(directory) -> tuple[int, int]:
    """Delete a compile cache's programs (every key) and the staging directories of processes
    that are gone; a running process's staging directory is left to it. Only the cache's own
    layout is touched (``<key>/*.pb``, ``<key>/.staging-*``). Returns (programs, bytes)."""
    removed = size = 0
    for keyed in _key_directories(directory):
        for program in keyed.glob("*.pb"):
            if program.is_file():
                size += program.stat().st_size
                program.unlink()
                removed += 1
        _remove_stale_staging(keyed)
        try:
            keyed.rmdir()  # only if nothing (a live staging directory) is left in it
        except OSError:
            pass
    return removed, size

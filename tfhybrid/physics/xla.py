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


def enable_compile_cache(directory) -> Path:
    """Keep XLA's compiled programs in ``directory`` so later processes reuse them.

    Each ``jit_compile`` graph (the lensing fit compiles five, ~24 s on a 2-core CPU) is then
    compiled once per input shape and machine, not once per process: a second MAP of a
    system of the same size (with the source residual) took 64.3 s instead of 77.2 s on the
    same machine, with bit-identical results (measured 2026-11-25). Programs go to a
    subdirectory keyed by the TensorFlow version, the machine and its CPU features (a program
    compiled for one CPU must not run on another). Sets TensorFlow's
    ``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory``, which TensorFlow reads once, when
    the process first compiles with XLA: call this before any compiled function runs. The
    cache is never pruned (~25 MB per fit configuration); delete the directory to clear it.
    Returns the subdirectory used.
    """
    import os
    import shlex

    from tfhybrid.validation import TfhybridInputError

    root = Path(directory).expanduser()
    path = root / _host_key()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TfhybridInputError(f"cannot create the compile cache directory {path}: {err}") \
            from err
    if not os.access(path, os.W_OK):
        raise TfhybridInputError(f"the compile cache directory {path} is not writable")
    flags = [f for f in shlex.split(os.environ.get("TF_XLA_FLAGS", ""))
             if not f.startswith(_CACHE_FLAG)]
    flags.append(f"{_CACHE_FLAG}={path}")
    os.environ["TF_XLA_FLAGS"] = " ".join(shlex.quote(f) for f in flags)
    return path

"""XLA graphs that call the physics layers compile once, not once per argument value.

A layer's core wrapped in a nested ``tf.function`` hides its gradient's static shapes from
XLA's constant analysis, which then bakes the caller's arguments into the program as constants:
every call with new values recompiled (4–5 s each for the lensing posterior). The check: in
the HLO of a jit-compiled value-and-gradient, the input is an entry *parameter* (with the
bug, the entry computation had none). No timing is involved.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tests.hlo import entry_parameter_shapes, hlo_shape
from tfhybrid.physics import psf as P
from tfhybrid.physics import source_residual as sr
from tfhybrid.physics.lensing import PARAM_NAMES, LensingConfig, LensingSimulator
from tfhybrid.physics.xla import in_xla_context, nestable_function


def test_in_xla_context_only_inside_compiled_graphs():
    seen = {}

    def probe(key):
        seen[key] = in_xla_context()
        return tf.constant(0.0)

    probe("eager")
    tf.function(lambda: probe("graph"))()
    tf.function(lambda: probe("xla"), jit_compile=True)()
    assert seen == {"eager": False, "graph": False, "xla": True}


def test_nestable_function_is_inlined_in_xla_graphs_and_a_function_elsewhere():
    """Inside a jit-compiled caller, the core is traced into the caller's graph (no nested
    function call); in a plain graph it is a call of its own tf.function, traced once."""
    traced = []

    def core(x):
        traced.append(in_xla_context())
        return tf.sin(x) * 2.0

    nested = nestable_function(core, autograph=False)
    assert nested.__name__ == "core" and nested.core is core

    def ops_of(fn, x):
        graph = tf.function(fn, **fn_kwargs).get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}

    x = tf.constant([0.5, 1.0])
    fn_kwargs = dict(jit_compile=True, autograph=False)
    inlined = ops_of(lambda x: nested(x) + 1.0, x)
    assert "Sin" in inlined and not inlined & {"StatefulPartitionedCall", "PartitionedCall"}
    fn_kwargs = dict(autograph=False)
    called = ops_of(lambda x: nested(x) + 1.0, x)
    assert "Sin" not in called and called & {"StatefulPartitionedCall", "PartitionedCall"}
    assert traced == [True, False]
    np.testing.assert_allclose(nested(x), np.sin([0.5, 1.0]) * 2.0, rtol=1e-6)


def test_psf_convolution_gradient_compiles_with_the_image_as_a_parameter():
    conv = P.FFTConvolution(np.ones((1, 25, 25), np.float32), (32, 32))

    @tf.function(jit_compile=True, autograph=False)
    def value_and_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(conv(x) ** 2)
        return y, tape.gradient(y, x)

    x = tf.random.stateless_normal([2, 1, 32, 32], seed=[1, 2])
    assert hlo_shape(x) in entry_parameter_shapes(value_and_gradient, x)
    # and the inlined kernel is the same convolution as the eager one
    np.testing.assert_allclose(value_and_gradient(x)[0], tf.reduce_sum(conv(x) ** 2), rtol=1e-5)


def test_residual_gram_and_correction_gradients_compile_with_the_positions_as_parameters():
    m = 6
    rng = np.random.default_rng(0)
    col = tf.constant(rng.uniform(-1, m, (1, 200)), tf.float32)
    row = tf.constant(rng.uniform(-1, m, (1, 200)), tf.float32)
    resid = tf.constant(rng.normal(size=(1, 200)), tf.float32)
    sigma, sigma_res = tf.constant([0.1]), tf.constant([0.3])

    def correction(c, r):
        return tf.reduce_sum(sr.marginal_log_likelihood_correction(
            *sr.bilinear_gram(c, r, resid, m), sigma, sigma_res))

    @tf.function(jit_compile=True, autograph=False)
    def value_and_gradient(c, r):
        with tf.GradientTape() as tape:
            tape.watch([c, r])
            y = correction(c, r)
        return y, tape.gradient(y, [c, r])

    shapes = entry_parameter_shapes(value_and_gradient, col, row)
    assert shapes.count(hlo_shape(col)) >= 2
    y, (g_col, _) = value_and_gradient(col, row)
    with tf.GradientTape() as tape:  # outside XLA: the nested compiled functions
        tape.watch(col)
        y_ref = correction(col, row)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4)
    np.testing.assert_allclose(g_col, tape.gradient(y_ref, col), rtol=1e-3, atol=1e-3)


def test_lensing_simulator_gradient_compiles_with_the_parameters_as_parameters():
    config = LensingConfig(n_pix=32, pixel_scale_arcsec=0.3, psf_sigma_arcsec=0.3)
    sim = LensingSimulator(config)
    source = tf.random.stateless_uniform([1, 64, 64], seed=[3, 4])
    values = dict(r_ein=1.2, gamma=2.0, q=0.8, phi=0.3, theta_lens1=0.0, theta_lens2=0.0,
                  gamma1=0.01, gamma2=0.0, theta_src1=0.0, theta_src2=0.0, s=2.0, iota=1.0)
    x = tf.constant([[values[k] for k in PARAM_NAMES]], tf.float32)

    @tf.function(jit_compile=True, autograph=False)
    def value_and_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            inputs = {k: x[:, i] for i, k in enumerate(PARAM_NAMES)}
            y = tf.reduce_sum(sim(dict(source=source, **inputs)) ** 2)
        return y, tape.gradient(y, x)

    assert hlo_shape(x) in entry_parameter_shapes(value_and_gradient, x)


def _run_with_cache(cache, compile_twice: bool = False, exit_hard: bool = False):
    """A fresh process that enables the cache in ``cache`` and runs one XLA-compiled function
    (two of different shapes with ``compile_twice``); ``exit_hard`` ends it with ``os._exit``
    (no atexit handlers, as a killed process). Returns the shared subdirectory it printed."""
    import os
    import subprocess
    import sys

    script = (
        "import os, sys, tensorflow as tf\n"
        "from tfhybrid.physics.xla import enable_compile_cache\n"
        f"path = enable_compile_cache({str(cache)!r})\n"
        "assert enable_compile_cache(" + repr(str(cache)) + ") == path  # idempotent\n"
        "assert '--tf_xla_auto_jit=0' in os.environ['TF_XLA_FLAGS']\n"
        "f = tf.function(lambda x: tf.reduce_sum(tf.sin(x) ** 2), jit_compile=True)\n"
        "f(tf.ones([8]))\n"
        + ("f(tf.ones([5]))\n" if compile_twice else "")
        + "print(path, flush=True)\n"
        + ("os._exit(0)\n" if exit_hard else "")
    )
    env = dict(os.environ, TF_XLA_FLAGS="--tf_xla_auto_jit=0", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    return cache / os.path.basename(out)


def test_compile_cache_keeps_compiled_programs_for_later_processes(tmp_path):
    """A fresh process with the cache enabled publishes its compiled program under a
    TensorFlow-version / machine / CPU key when it exits (other TF_XLA_FLAGS are kept); a
    second process reuses it (publishes nothing new), a third compiling one more shape adds
    exactly that program, and no staging directory is left behind."""
    path = _run_with_cache(tmp_path / "cache")
    assert path.is_dir() and path.name.startswith(f"tf{tf.__version__}-")
    programs = {p.name: p.stat().st_mtime_ns for p in path.glob("*.pb")}
    assert len(programs) == 1
    assert not list(path.glob(".staging-*"))

    assert _run_with_cache(tmp_path / "cache") == path
    assert {p.name: p.stat().st_mtime_ns for p in path.glob("*.pb")} == programs  # a hit

    _run_with_cache(tmp_path / "cache", compile_twice=True)
    after = {p.name: p.stat().st_mtime_ns for p in path.glob("*.pb")}
    assert len(after) == 2 and all(after[name] == t for name, t in programs.items())
    assert not list(path.glob(".staging-*"))


def test_compile_cache_never_publishes_what_a_killed_process_wrote(tmp_path):
    """TensorFlow fails every later compile of a graph whose cached program is half-written
    ("Read less bytes than requested"), so a process that dies before exiting cleanly must
    publish nothing: its staging directory stays aside, and the next process removes it
    and runs normally (it compiles the program again and publishes it)."""
    import os

    from tfhybrid.physics.xla import _remove_stale_staging

    path = _run_with_cache(tmp_path / "cache", exit_hard=True)
    assert not list(path.glob("*.pb"))
    (staging,) = path.glob(".staging-*")
    assert list(staging.glob("*.pb"))  # written there, never published
    for program in staging.glob("*.pb"):  # as a write cut short would leave it
        program.write_bytes(program.read_bytes()[:100])
    # a staging directory of another host, too recent to be judged stale, is left alone
    other = path / ".staging-otherhost-1-abc"
    other.mkdir()
    (other / "x.pb").write_bytes(b"partial")

    _run_with_cache(tmp_path / "cache")
    assert not staging.exists() and other.exists()
    (program,) = path.glob("*.pb")
    assert program.stat().st_size > 1000
    old = os.stat(other).st_mtime - 8 * 86400
    os.utime(other, (old, old))
    _remove_stale_staging(path)  # what the next call does first
    assert not other.exists()


def test_compile_cache_refuses_a_late_call(tmp_path):
    """After TensorFlow's runtime has started (this test process ran ops), the flag would be
    ignored: a clear error instead of a silently unused cache."""
    import pytest

    from tfhybrid.physics.xla import enable_compile_cache
    from tfhybrid.validation import TfhybridInputError

    tf.constant(1.0) + 1.0
    with pytest.raises(TfhybridInputError, match="before TensorFlow runs its first operation"):
        enable_compile_cache(tmp_path / "late")


def test_compile_cache_refuses_an_unusable_directory(tmp_path):
    import pytest

    from tfhybrid.physics.xla import enable_compile_cache
    from tfhybrid.validation import TfhybridInputError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TfhybridInputError, match="cannot create the compile cache"):
        enable_compile_cache(blocker)

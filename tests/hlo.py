"""Test helper: read what an XLA-compiled ``tf.function`` takes as program parameters."""

from __future__ import annotations

import re

import tensorflow as tf


def entry_parameter_shapes(fn, *args) -> list[str]:
    """Shapes (HLO text, e.g. ``f32[2,16]``) of the entry parameters of ``fn``'s XLA program.

    An input that XLA had to turn into a compile-time constant is missing from this list: the
    program is then recompiled for every new value of that input.
    """
    hlo = fn.experimental_get_compiler_ir(*args)(stage="hlo")
    entry = hlo[hlo.index("ENTRY"):]
    return re.findall(r"= (\w+\[[\d,]*\])\S* parameter\(\d+\)", entry)


def hlo_shape(x) -> str:
    """``x``'s shape as HLO text, e.g. ``f32[2,16]``."""
    kind = {tf.float32: "f32", tf.float64: "f64"}[x.dtype]
    return f"{kind}[{','.join(str(d) for d in x.shape)}]"

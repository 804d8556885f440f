"""Where a traced graph runs: whether XLA compiles it.

A layer that wraps its core in a ``tf.function`` of its own (a compiled cluster, or a graph
that eager callers trace once) must inline that core when its caller is itself compiled by
XLA: a nested function call hides the core's static shapes from XLA's constant analysis, so
its gradient's shape arguments (those of the slice and FFT gradients, of a gather's) become
"must be constant" inputs of the caller's cluster, traced back to the caller's arguments. XLA
then compiles the caller once per argument *value*: every call recompiles (measured: the
lensing posterior's value and gradient, 4–5 s per call instead of 20 ms).
"""

from __future__ import annotations


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

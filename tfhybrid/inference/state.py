"""Validation of the state (parameter blocks) the inference engines start from."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfhybrid.validation import TfhybridInputError


def as_state_parts(
    value, name: str = "initial_state", *, cast_integers: bool = False,
    allow_python_scalars: bool = False,
) -> tuple[list[tf.Tensor], bool]:
    """A tensor or a list of tensors → (list of floating tensors, whether it was a single one).

    Checks that the list is non-empty, every part is floating point (integers are cast to
    float32 when ``cast_integers``; an error otherwise) and, when executing eagerly, finite.
    """
    single_types = (tf.Tensor, tf.Variable, np.ndarray)
    if allow_python_scalars:
        single_types += (float, int)
    single = isinstance(value, single_types)
    parts = [value] if single else value
    if not isinstance(parts, Sequence) or len(parts) == 0:
        raise TfhybridInputError(
            f"{name} must be a tensor or a non-empty list of tensors; got "
            f"{type(parts).__name__}"
        )
    out = []
    for i, p in enumerate(parts):
        t = tf.convert_to_tensor(p)
        if not t.dtype.is_floating:
            if not cast_integers:
                raise TfhybridInputError(
                    f"{name}[{i}] must be floating point; got dtype {t.dtype.name}"
                )
            t = tf.cast(t, tf.float32)
        if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(t))):
            raise TfhybridInputError(f"{name}[{i}] contains NaN or inf")
        out.append(t)
    return out, single

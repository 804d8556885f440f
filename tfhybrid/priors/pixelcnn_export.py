"""SavedModel export of the Gaussian PixelCNN++ prior.

The exported directory is a plain TensorFlow SavedModel: a fresh process can use it with
nothing but TensorFlow (no tfhybrid, no Keras)::

    m = tf.saved_model.load(path)
    m.log_prob(x)              # x (K, ny, nx) float32 -> (K,)
    m.log_prob_and_grad(x)     # -> {"log_prob": (K,), "grad": (K, ny, nx)}
    m.sample(n, seed)          # int32 scalars -> (n, ny, nx)

The same three are registered as serving signatures (``m.signatures[...]``). Inputs must be
peak-normalised stamps (see ``tfhybrid.priors.pixelcnn``); the exported graph does no input
checking beyond the static shape.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from tfhybrid.io import atomic_directory
from tfhybrid.priors.pixelcnn import GaussianPixelCNN
from tfhybrid.validation import TfhybridInputError


class _ExportModule(tf.Module):
    def __init__(self, model: GaussianPixelCNN):
        super().__init__(name="gaussian_pixelcnn")
        self._model = model
        # Track the raw TF variables so the SavedModel owns them (Keras 3 wraps them).
        self.weights = [v.value for v in model.network.weights]
        n = model.config.image_size
        self.image_size = tf.constant(n, tf.int32)
        self.log_prob = tf.function(
            self._log_prob, input_signature=[tf.TensorSpec([None, n, n], tf.float32, "x")]
        )
        self.log_prob_and_grad = tf.function(
            self._log_prob_and_grad,
            input_signature=[tf.TensorSpec([None, n, n], tf.float32, "x")],
        )
        self.sample = tf.function(
            self._sample,
            input_signature=[
                tf.TensorSpec([], tf.int32, "n"),
                tf.TensorSpec([], tf.int32, "seed"),
            ],
        )

    def _log_prob(self, x):
        return self._model._log_prob(x)

    def _log_prob_and_grad(self, x):
        lp, grad = self._model._value_and_grad_impl(x)
        return {"log_prob": lp, "grad": grad}

    def _sample(self, n, seed):
        return self._model._sample_impl(n, tf.stack([seed, tf.zeros_like(seed)]))


def export_pixelcnn_savedmodel(model: GaussianPixelCNN, path: str | os.PathLike) -> Path:
    """Export ``model`` as a SavedModel at ``path`` (written to a temp dir, then renamed).

    ``sample(n, seed)`` of the export equals ``model.sample(n, seed=(seed, 0))``.
    """
    if not isinstance(model, GaussianPixelCNN):
        raise TfhybridInputError(f"model must be a GaussianPixelCNN; got {type(model).__name__}")
    path = Path(path)
    module = _ExportModule(model)
    with atomic_directory(path) as tmp:
        tf.saved_model.save(
            module,
            str(tmp),
            signatures={
                "log_prob": module.log_prob,
                "log_prob_and_grad": module.log_prob_and_grad,
                "sample": module.sample,
            },
        )
    return path


def load_pixelcnn_savedmodel(path: str | os.PathLike):
    """Load an exported prior (``tf.saved_model.load``) with a clear error when unusable."""
    path = Path(path)
    if not (path / "saved_model.pb").exists():
        raise TfhybridInputError(f"{path} is not a SavedModel directory (no saved_model.pb)")
    try:
        return tf.saved_model.load(str(path))
    except Exception as err:  # noqa: BLE001 - TF raises many types for corrupted files
        raise TfhybridInputError(f"could not load SavedModel {path}: {err}") from err

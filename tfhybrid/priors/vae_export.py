"""SavedModel export of the VAE galaxy source model (Chianese et al. 2020, section 2).

The exported directory is a plain TensorFlow SavedModel: a fresh process can use it with
nothing but TensorFlow (no tfhybrid, no Keras, no TFP)::

    m = tf.saved_model.load(path)
    m.decode(z)                     # z (batch, latent_dim) float32 -> (batch, 64, 64)
    m.encode(x)                     # x (batch, 64, 64) -> {"mean", "scale"} (batch, latent_dim)
    m.latent_log_prob(z)            # log p(z) under the fitted MVN prior -> (batch,)
    m.log_prob_elbo(x)              # ELBO (eq. 4), M = config's num_mc_samples, seed (0, 0)
    m.log_prob_elbo_with_noise(x, eps)  # ELBO for given reparametrisation noise (M, batch, d)
    m.sample(n, seed)               # decoded draws of the latent prior -> (n, 64, 64)
    m.latent_prior_parameters()     # {"loc": (d,), "scale_tril": (d, d)}

All of them are also registered as serving signatures (``m.signatures[name]``, keyword
arguments ``z``, ``x``, ``eps``, ``n``, ``seed``). ``log_prob_elbo(x)`` equals
``GalaxyVAE.log_prob_elbo(x, seed=0)`` and ``sample(n, s)`` equals ``GalaxyVAE.sample(n, seed=s)``.
Inputs must be peak-normalised images (see :mod:`tfhybrid.priors.vae`); the exported graph does no
input checking beyond the static shape - :func:`load_prior` wraps it with the checks.

``m.export_info()`` returns ``format_name``, ``format_version``, ``config_json``, ``latent_dim``
and ``image_size``, read by :func:`load_prior` to reject other files and other configs. Loading a
SavedModel restores a graph of TensorFlow ops and variable values; no Python code is
deserialised or run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.io import atomic_directory
from tfhybrid.priors.vae import (
    IMAGE_SIZE,
    GalaxyVAE,
    VAEConfig,
    _check_latent,
    check_images,
    resolve_config,
)
from tfhybrid.validation import TfhybridInputError

tfd = tfp.distributions

EXPORT_FORMAT_NAME = "tfhybrid.GalaxyVAE.SavedModel"
EXPORT_FORMAT_VERSION = 1
SIGNATURES = (
    "decode",
    "encode",
    "latent_log_prob",
    "log_prob_elbo",
    "log_prob_elbo_with_noise",
    "sample",
    "latent_prior_parameters",
    "export_info",
)


class _ExportModule(tf.Module):
    """tf.Module owning the VAE's variables and the traced functions of the export."""

    def __init__(self, model: GalaxyVAE):
        super().__init__(name="galaxy_vae")
        self._model = model
        # Track the raw TF variables so the SavedModel owns them (Keras 3 wraps them).
        self.model_variables = [v.value for v in model.weights]
        d = model.latent_dim
        self._config_json = json.dumps(model.config.to_dict(), sort_keys=True)
        x_spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.float32, "x")
        z_spec = tf.TensorSpec([None, d], tf.float32, "z")
        self.decode = tf.function(self._decode, input_signature=[z_spec])
        self.encode = tf.function(self._encode, input_signature=[x_spec])
        self.latent_log_prob = tf.function(self._latent_log_prob, input_signature=[z_spec])
        self.log_prob_elbo = tf.function(self._log_prob_elbo, input_signature=[x_spec])
        self.log_prob_elbo_with_noise = tf.function(
            self._log_prob_elbo_with_noise,
            input_signature=[x_spec, tf.TensorSpec([None, None, d], tf.float32, "eps")],
        )
        self.sample = tf.function(
            self._sample,
            input_signature=[tf.TensorSpec([], tf.int32, "n"), tf.TensorSpec([], tf.int32, "seed")],
        )
        self.latent_prior_parameters = tf.function(
            self._latent_prior_parameters, input_signature=[]
        )
        self.export_info = tf.function(self._export_info, input_signature=[])

    def _export_info(self):
        return {
            "format_name": tf.constant(EXPORT_FORMAT_NAME),
            "format_version": tf.constant(EXPORT_FORMAT_VERSION, tf.int32),
            "config_json": tf.constant(self._config_json),
            "latent_dim": tf.constant(self._model.latent_dim, tf.int32),
            "image_size": tf.constant(IMAGE_SIZE, tf.int32),
        }

    def _decode(self, z):
        return self._model._decode(z)

    def _encode(self, x):
        mean, scale = self._model._encode(x)
        return {"mean": mean, "scale": scale}

    def _latent_log_prob(self, z):
        return self._model.latent_prior.log_prob(z)

    def _log_prob_elbo(self, x):
        return self._model._elbo_terms(x, self._model._fixed_noise(tf.shape(x)[0], 0))[0]

    def _log_prob_elbo_with_noise(self, x, eps):
        return self._model._elbo_terms(x, eps)[0]

    def _sample(self, n, seed):
        return self._model._sample_impl(n, seed)

    def _latent_prior_parameters(self):
        return {
            "loc": tf.convert_to_tensor(self._model.prior_loc),
            "scale_tril": tf.convert_to_tensor(self._model.prior_scale_tril),
        }


def export_prior(model: GalaxyVAE, path: str | os.PathLike) -> Path:
    """Export ``model`` (with its latent prior) as a SavedModel directory at ``path``.

    Written to a temporary directory next to ``path`` and renamed on success, so an
    interrupted export never leaves a half-written model; an existing ``path`` is replaced.
    """
    if not isinstance(model, GalaxyVAE):
        raise TfhybridInputError(f"model must be a GalaxyVAE; got {type(model).__name__}")
    path = Path(path)
    module = _ExportModule(model)
    with atomic_directory(path) as tmp:
        tf.saved_model.save(
            module, str(tmp), signatures={name: getattr(module, name) for name in SIGNATURES}
        )
    return path


class SavedVAEPrior:
    """A VAE source model loaded from an exported SavedModel (see :func:`load_prior`).

    Same public interface as :class:`~tfhybrid.priors.vae.GalaxyVAE` for inference: ``decode``,
    ``encode``, ``latent_prior``, ``latent_log_prob``, ``log_prob_elbo``, ``sample``, with the
    same input checks; ``decode`` and ``latent_log_prob`` are differentiable (usable under
    ``tf.GradientTape`` and inside ``tf.function``).
    """

    def __init__(self, module, config: VAEConfig, path: Path):
        self._module = module
        self.config = config
        self.latent_dim = config.latent_dim
        self.path = path
        params = module.latent_prior_parameters()
        self._prior_loc = params["loc"]
        self._prior_scale_tril = params["scale_tril"]

    def decode(self, z):
        """Decoder mean mu_d(z): z (..., latent_dim) -> (..., 64, 64) float32."""
        z = _check_latent(z, self.latent_dim)
        lead = tf.shape(z)[:-1]
        out = self._module.decode(tf.reshape(z, (-1, self.latent_dim)))
        return tf.reshape(out, tf.concat([lead, [IMAGE_SIZE, IMAGE_SIZE]], axis=0))

    def encode(self, x):
        """Encoder of eq. 2: images (batch, 64, 64) -> (mu_e, sigma_e), each (batch, latent_dim)."""
        out = self._module.encode(tf.convert_to_tensor(check_images("x", x)))
        return out["mean"], out["scale"]

    @property
    def latent_prior(self):
        """The fitted latent prior of section 2.1 as a ``tfd.MultivariateNormalTriL``."""
        return tfd.MultivariateNormalTriL(loc=self._prior_loc, scale_tril=self._prior_scale_tril)

    def latent_log_prob(self, z):
        """log p(z) under the latent prior; z (batch, latent_dim) -> (batch,)."""
        return self._module.latent_log_prob(_check_latent(z, self.latent_dim))

    def log_prob_elbo(self, x, eps=None):
        """ELBO (eq. 4) per image (nats): fixed noise of seed 0, or the given eps (M, batch, d)."""
        x = tf.convert_to_tensor(check_images("x", x))
        if eps is None:
            return self._module.log_prob_elbo(x)
        eps = tf.convert_to_tensor(eps, tf.float32)
        if eps.shape.rank != 3 or eps.shape[1:] != (x.shape[0], self.latent_dim):
            raise TfhybridInputError(
                f"eps must have shape (M, {x.shape[0]}, {self.latent_dim}); got {tuple(eps.shape)}"
            )
        return self._module.log_prob_elbo_with_noise(x, eps)

    def sample(self, n: int, seed: int = 0):
        """n decoded draws mu_d(z), z ~ latent prior: (n, 64, 64) float32."""
        if not isinstance(n, int | np.integer) or n < 1:
            raise TfhybridInputError(f"n must be a positive int; got {n!r}")
        return self._module.sample(tf.constant(n, tf.int32), tf.constant(seed, tf.int32))


def load_prior(
    path: str | os.PathLike, expected_config: str | VAEConfig | dict | None = None
) -> SavedVAEPrior:
    """Load a SavedModel written by :func:`export_prior` as a :class:`SavedVAEPrior`.

    Raises ``TfhybridInputError`` naming what was expected when ``path`` is not a SavedModel,
    is corrupted or truncated, was not written by :func:`export_prior`, or (with
    ``expected_config``) holds another architecture.
    """
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise TfhybridInputError(
            f"expected a VAE SavedModel directory (saved_model.pb + variables/) written by "
            f"export_prior; {path / 'saved_model.pb'} does not exist"
        )
    try:
        module = tf.saved_model.load(str(path))
    except Exception as err:  # noqa: BLE001 - TF raises many types for corrupted files
        raise TfhybridInputError(
            f"could not load the SavedModel {path} (corrupted or truncated?): {err}"
        ) from err
    info_fn = getattr(module, "export_info", None)
    info = info_fn() if callable(info_fn) else {}
    fmt = info["format_name"].numpy().decode() if "format_name" in info else None
    if fmt != EXPORT_FORMAT_NAME:
        raise TfhybridInputError(
            f"{path} is a SavedModel but not a tfhybrid VAE export (format {fmt!r}, expected "
            f"{EXPORT_FORMAT_NAME!r})"
        )
    version = int(info["format_version"].numpy())
    if version != EXPORT_FORMAT_VERSION:
        raise TfhybridInputError(
            f"{path} has export format version {version}; this tfhybrid reads "
            f"{EXPORT_FORMAT_VERSION}"
        )
    missing = [name for name in SIGNATURES if not hasattr(module, name)]
    if missing:
        raise TfhybridInputError(
            f"{path} lacks the function(s) {missing}; expected {list(SIGNATURES)}"
        )
    config = VAEConfig.from_dict(json.loads(info["config_json"].numpy().decode()))
    if expected_config is not None and resolve_config(expected_config) != config:
        raise TfhybridInputError(
            f"{path} holds a VAE with config {config}; expected {resolve_config(expected_config)}"
        )
    return SavedVAEPrior(module, config, path)

"""Variational autoencoder source-galaxy model (Chianese et al. 2020, section 2, appendices C, D).

Model
-----
Decoder likelihood (eq. 1) ``d(x|z) = N(x | mu_d(z), sigma_d)`` with ``sigma_d = 1/50`` fixed
(optionally trainable, as the paper also tried); encoder (eq. 2)
``e(z|x) = N(z | mu_e(x), sigma_e(x))`` diagonal; training maximises the ELBO (eq. 4)
``E_e[log d(x|z)] - KL[e(z|x) || N(0, I)]``, the expectation estimated with M reparametrised
samples ``z_j = mu_e + eps_j sigma_e`` (eqs. C2, C3) and the KL analytic. Adam with
``(beta_1, beta_2) = (0.5, 0.999)``; the validation negative ELBO is monitored with early
stopping and the best weights restored.

Architecture (Tables D1, D2, PyTorch notation in the paper): encoder = 5 bias-free strided
convolutions (kernel 4; strides 2, 2, 2, 2, 1; the last one 'valid' 4x4 -> 1x1), BatchNorm on
blocks 2-4, LeakyReLU(0.2) after each, then two dense heads giving ``mu_e`` and
``sigma_e = exp(.)``; decoder = the mirror image with transposed convolutions, BatchNorm + ReLU
on blocks 1-4 and ``tanh`` output, so ``mu_d`` lies in [-1, 1]. Keras 'same' padding with kernel
4 / stride 2 on even sizes pads one pixel each side, identical to the paper's ``padding=1``.
Initialisation: the paper says "all weights were initialized to 0.02"; we read this as the DCGAN
convention of Radford et al. (which the paper cites for its design) - kernels ~ N(0, 0.02),
BatchNorm scales ~ N(1, 0.02), BatchNorm offsets and the dense-head biases 0 - because a
constant initialisation would make every filter identical. BatchNorm uses PyTorch's defaults
(momentum 0.1, i.e. Keras ``momentum=0.9``, ``epsilon=1e-5``).

Configs: ``"paper"`` (widths 64-128-256-512, 4096-channel bottleneck, 64-d latent, M = 10,
~37.4 M encoder + 3.3 M decoder parameters) and ``"small"`` (the same graph with a width
multiplier of 1/4 and a 256-channel bottleneck, M = 2; trains on a 2-core CPU and is shipped).

Latent prior (section 2.1): after training, a multivariate normal is fitted to the encoded means
of the training set and its covariance multiplied by 9 (``prior_covariance_factor``); it is
stored in the model (``prior_loc``, ``prior_scale_tril``) and returned by ``latent_prior`` as a
``tfd.MultivariateNormalTriL``.

Conventions: images are (batch, 64, 64) float32, axis order (y, x), each divided by its maximum
pixel (lensing paper section 2.2, values roughly in [-1, 1]); latents are (batch, latent_dim).

Files: :func:`save_vae` writes ``config.json`` + ``weights.npz`` (network variables by path) +
``latent_prior.npz`` (``loc``, ``scale_tril``); :func:`load_vae` rebuilds the architecture from
code and assigns plain arrays (no pickles, no deserialised code, no Keras model files, so no
Lambda layers to unsafe-load). :func:`load_default_vae` loads the small model shipped in
``tfhybrid/assets/vae_default`` (made by ``scripts/train_default_vae.py``).
:mod:`tfhybrid.priors.vae_export` writes and reads a TensorFlow SavedModel of the same model
(``export_prior`` / ``load_prior``) usable without tfhybrid.

Public API used by the lensing application: ``load_default_vae()`` -> :class:`GalaxyVAE` with
``decode(z)`` (differentiable, (..., 64) -> (..., 64, 64)), ``latent_prior``
(``tfd.MultivariateNormalTriL``), ``latent_log_prob(z)``, ``encode(x)``, ``sample(n, seed)``,
``log_prob_elbo(x)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.io import write_json_atomic
from tfhybrid.priors.training import (
    assign_arrays,
    fit_resumable,
    load_arrays_npz,
    resolve_strategy,
    save_arrays_npz,
    variables_to_arrays,
)
from tfhybrid.validation import TfhybridInputError, check_finite

tfb = tfp.bijectors

tfd = tfp.distributions

IMAGE_SIZE = 64
FORMAT_NAME = "tfhybrid.GalaxyVAE"
FORMAT_VERSION = 1
_PRIOR_VARIABLES = ("prior_loc", "prior_scale_tril")


# =========================================================================== configuration
@dataclass(frozen=True)
class VAEConfig:
    """Architecture and likelihood settings of :class:`GalaxyVAE`.

    Attributes
    ----------
    name : str
        Label ("paper", "small" or custom).
    latent_dim : int
        Dimension of z (paper: 64).
    base_filters : int
        Channels of the first encoder convolution; the encoder uses 1x, 2x, 4x, 8x of it and the
        decoder the mirror image (paper: 64). This is the width multiplier.
    bottleneck_channels : int
        Channels of the last ('valid', 4x4 -> 1x1) encoder convolution (paper: 4096).
    decoder_sigma : float
        sigma_d of eq. 1 in the units of the peak-normalised images (paper: 1/50).
    trainable_sigma : bool
        Learn log sigma_d (initialised at ``decoder_sigma``), as Dai & Wipf (2019) suggest.
    num_mc_samples : int
        M, latent samples per image in the ELBO estimate (eq. C3; paper: 10).
    init_std : float
        Standard deviation of the normal weight initialisation (paper: 0.02).
    prior_covariance_factor : float
        Factor multiplying the covariance of the encoded means in the latent prior (paper: 9).
    """

    name: str = "small"
    latent_dim: int = 64
    base_filters: int = 16
    bottleneck_channels: int = 256
    decoder_sigma: float = 1.0 / 50.0
    trainable_sigma: bool = False
    num_mc_samples: int = 2
    init_std: float = 0.02
    prior_covariance_factor: float = 9.0

    def __post_init__(self):
        for field in ("latent_dim", "base_filters", "bottleneck_channels", "num_mc_samples"):
            value = getattr(self, field)
            if not isinstance(value, int | np.integer) or value < 1:
                raise TfhybridInputError(f"VAEConfig.{field} must be a positive int; got {value!r}")
        for field in ("decoder_sigma", "init_std", "prior_covariance_factor"):
            value = getattr(self, field)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise TfhybridInputError(
                    f"VAEConfig.{field} must be a positive number; got {value!r}"
                )

    @classmethod
    def paper(cls) -> VAEConfig:
        """Tables D1/D2: widths 64..512, 4096 bottleneck, 64-d latent, M = 10."""
        return cls(name="paper", base_filters=64, bottleneck_channels=4096, num_mc_samples=10)

    @classmethod
    def small(cls) -> VAEConfig:
        """Width multiplier 1/4 (16..128 channels), 256 bottleneck, 64-d latent, M = 2."""
        return cls(name="small")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VAEConfig:
        if not isinstance(data, dict):
            raise TfhybridInputError(f"VAE config must be a JSON object; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TfhybridInputError(
                f"unknown VAE config field(s) {unknown}; expected {sorted(known)}"
            )
        return cls(**data)


def resolve_config(config: str | VAEConfig | dict) -> VAEConfig:
    """``"paper"`` / ``"small"`` / a dict / a :class:`VAEConfig` -> :class:`VAEConfig`."""
    if isinstance(config, VAEConfig):
        return config
    if isinstance(config, dict):
        return VAEConfig.from_dict(config)
    if config == "paper":
        return VAEConfig.paper()
    if config == "small":
        return VAEConfig.small()
    raise TfhybridInputError(
        f"config must be 'paper', 'small', a dict or a VAEConfig; got {config!r}"
    )


# =========================================================================== pure functions
def gaussian_log_likelihood(x, mu, sigma):
    """log N(x | mu, sigma) summed over the image pixels (eq. 1 of Chianese et al. 2020).

    Parameters
    ----------
    x : (..., ny, nx) images; mu : (..., ny, nx) decoder means, broadcastable to ``x``;
    sigma : scalar decoder standard deviation (same units as ``x``).

    Returns
    -------
    (...,) log-density in nats, including the ``-log(sigma sqrt(2 pi))`` constant per pixel.
    """
    x = tf.convert_to_tensor(x)
    mu = tf.convert_to_tensor(mu, dtype=x.dtype)
    # A Python float goes straight to x's dtype (tf.cast would round it through float32 first).
    sigma = tf.cast(sigma, x.dtype) if tf.is_tensor(sigma) else tf.constant(sigma, x.dtype)
    resid = (x - mu) / sigma
    per_pixel = -0.5 * tf.square(resid) - tf.math.log(sigma) - 0.5 * math.log(2.0 * math.pi)
    return tf.reduce_sum(per_pixel, axis=[-2, -1])


def kl_normal_standard_normal(mean, scale):
    """Analytic KL[N(mean, diag(scale^2)) || N(0, I)] summed over the latent axis (eq. 4, C1).

    ``0.5 * sum(mean^2 + scale^2 - 1 - 2 log scale)``; mean, scale (..., latent_dim) -> (...,).
    """
    return 0.5 * tf.reduce_sum(
        tf.square(mean) + tf.square(scale) - 1.0 - 2.0 * tf.math.log(scale), axis=-1
    )


def reparametrize(mean, scale, eps):
    """z_j = mu_e + eps_j * sigma_e (eq. C2).

    mean, scale (batch, d), eps (M, batch, d) -> (M, batch, d).
    """
    return mean[None] + eps * scale[None]


def elbo_estimate(log_likelihoods, kl):
    """Monte Carlo ELBO (eqs. 4, C3): mean over the M samples of log d(x|z_j), minus the KL.

    log_likelihoods (M, batch), kl (batch,) -> (batch,).
    """
    return tf.reduce_mean(log_likelihoods, axis=0) - kl


def fit_latent_prior(encoded_means, covariance_factor: float = 9.0):
    """Fit the latent prior of section 2.1: MVN of the encoded means, covariance x factor.

    Parameters
    ----------
    encoded_means : (n, latent_dim) array of mu_e(x_i) over the training set (n > latent_dim).
    covariance_factor : factor multiplying the sample covariance (paper: 9).

    Returns
    -------
    loc (latent_dim,), scale_tril (latent_dim, latent_dim) float64 with
    ``scale_tril @ scale_tril.T = covariance_factor * np.cov(encoded_means, rowvar=False)``.
    """
    z = check_finite("encoded_means", np.asarray(encoded_means, dtype=np.float64))
    if z.ndim != 2:
        raise TfhybridInputError(f"encoded_means must be (n, latent_dim); got shape {z.shape}")
    n, d = z.shape
    if n <= d:
        raise TfhybridInputError(
            f"fitting a {d}-d latent prior needs more than {d} encoded images; got {n}"
        )
    loc = z.mean(axis=0)
    cov = covariance_factor * np.cov(z, rowvar=False)
    try:
        scale_tril = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        # A degenerate latent direction (collapsed posterior): regularise minimally.
        jitter = 1e-9 * max(float(np.trace(cov)) / d, 1e-12)
        scale_tril = np.linalg.cholesky(cov + jitter * np.eye(d))
    return loc, scale_tril


# =========================================================================== validation
def fit_latent_map(decode, latent_prior, images, noise_sigma, z_init, num_steps: int,
                   learning_rate=0.05, use_prior: bool = True) -> tf.Tensor:
    """argmax_z log N(x | decode(z), σ) + log p(z) for a batch of images (unvalidated core).

    ``decode``: ``(batch, latent_dim)`` → ``(batch, ny, nx)``; ``images`` ``(batch, ny, nx)``;
    ``noise_sigma`` scalar or ``(batch,)``; ``z_init`` ``(batch, latent_dim)``;
    ``learning_rate`` a float or a Keras schedule. Adam (``num_steps`` steps) runs in the
    prior's whitened coordinates w, z = loc + L w, where every direction has unit prior width
    whatever the fitted covariance. Used by :meth:`GalaxyVAE.fit_latent` and by the lens fit's
    source-scale jumps (on any source model with ``decode`` and ``latent_prior``).
    """
    x = tf.cast(images, tf.float32)
    sigma = tf.broadcast_to(tf.cast(noise_sigma, tf.float32), tf.shape(x)[:1])
    inv_var = (1.0 / sigma**2)[:, None, None]
    whiten = tfb.Shift(latent_prior.loc)(tfb.ScaleMatvecTriL(latent_prior.scale_tril))
    w = tf.Variable(whiten.inverse(tf.cast(z_init, tf.float32)))
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build([w])  # its variables exist before the loop is traced

    def loss():
        z = whiten.forward(w)
        resid = x - tf.cast(decode(z), tf.float32)
        nll = 0.5 * tf.reduce_sum(resid * resid * inv_var)
        if use_prior:
            nll = nll - tf.reduce_sum(latent_prior.log_prob(z))
        return nll

    # the loop as one graph: run eagerly, each of the steps paid Python and per-op overhead
    # (3 stamps, 300 steps, 2-core CPU: 2.2-2.8 s with tracing instead of 3.4 s; same result)
    tf.function(lambda: tfp.math.minimize(loss, int(num_steps), optimizer,
                                          trainable_variables=[w]), autograph=False)()
    return whiten.forward(tf.convert_to_tensor(w))


def check_images(name: str, images, allow_single: bool = True) -> np.ndarray:
    """Validate peak-normalised galaxy images; return a float32 (batch, 64, 64) array."""
    arr = np.asarray(images)
    if arr.dtype.kind not in "f":
        raise TfhybridInputError(
            f"{name} must be floating-point images divided by their maximum; got dtype {arr.dtype}"
        )
    if allow_single and arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise TfhybridInputError(
            f"{name} must have shape (batch, {IMAGE_SIZE}, {IMAGE_SIZE}) (axes y, x); "
            f"got {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise TfhybridInputError(
            f"{name} is empty; expected at least one {IMAGE_SIZE}x{IMAGE_SIZE} image"
        )
    check_finite(name, arr)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -2.0 or hi > 2.0:
        raise TfhybridInputError(
            f"{name} must be peak-normalised (each image divided by its maximum, values in about "
            f"[-1, 1]); got values in [{lo:g}, {hi:g}]"
        )
    return arr.astype(np.float32)


def _check_latent(z, latent_dim: int):
    z = tf.convert_to_tensor(z, dtype=tf.float32)
    if z.shape.rank is not None and (z.shape.rank < 1 or z.shape[-1] not in (None, latent_dim)):
        raise TfhybridInputError(f"z must have shape (..., {latent_dim}); got {tuple(z.shape)}")
    if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(z))):
        raise TfhybridInputError("z contains NaN or inf; expected finite latent vectors")
    return z


# =========================================================================== networks
def _init(config: VAEConfig):
    return keras.initializers.RandomNormal(0.0, config.init_std)


def _batch_norm(config: VAEConfig, name: str):
    return keras.layers.BatchNormalization(
        momentum=0.9,
        epsilon=1e-5,
        gamma_initializer=keras.initializers.RandomNormal(1.0, config.init_std),
        name=name,
    )


def build_encoder(config: VAEConfig, seed: int | None = None) -> keras.Model:
    """Encoder of Table D1: (batch, 64, 64, 1) -> (mu_e, sigma_e), each (batch, latent_dim)."""
    f = config.base_filters
    x_in = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
    h = x_in
    widths = (f, 2 * f, 4 * f, 8 * f)
    for i, width in enumerate(widths, start=1):
        h = keras.layers.Conv2D(
            width,
            4,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer=_init(config),
            name=f"enc_conv{i}",
        )(h)
        if i > 1:
            h = _batch_norm(config, f"enc_bn{i}")(h)
        h = keras.layers.LeakyReLU(0.2, name=f"enc_lrelu{i}")(h)
    h = keras.layers.Conv2D(
        config.bottleneck_channels,
        4,
        strides=1,
        padding="valid",
        use_bias=False,
        kernel_initializer=_init(config),
        name="enc_conv5",
    )(h)
    h = keras.layers.LeakyReLU(0.2, name="enc_lrelu5")(h)
    h = keras.layers.Flatten(name="enc_flatten")(h)
    mean = keras.layers.Dense(
        config.latent_dim,
        kernel_initializer=_init(config),
        bias_initializer="zeros",
        name="enc_mean",
    )(h)
    log_scale = keras.layers.Dense(
        config.latent_dim,
        kernel_initializer=_init(config),
        bias_initializer="zeros",
        name="enc_log_scale",
    )(h)
    scale = keras.layers.Activation("exponential", name="enc_scale")(log_scale)
    return keras.Model(x_in, [mean, scale], name="encoder")


def build_decoder(config: VAEConfig) -> keras.Model:
    """Decoder of Table D2: z (batch, latent_dim) -> mu_d (batch, 64, 64, 1) in [-1, 1]."""
    f = config.base_filters
    z_in = keras.Input((config.latent_dim,), name="z")
    h = keras.layers.Reshape((1, 1, config.latent_dim), name="dec_reshape")(z_in)
    h = keras.layers.Conv2DTranspose(
        8 * f,
        4,
        strides=1,
        padding="valid",
        use_bias=False,
        kernel_initializer=_init(config),
        name="dec_convt1",
    )(h)
    h = _batch_norm(config, "dec_bn1")(h)
    h = keras.layers.ReLU(name="dec_relu1")(h)
    for i, width in enumerate((4 * f, 2 * f, f), start=2):
        h = keras.layers.Conv2DTranspose(
            width,
            4,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer=_init(config),
            name=f"dec_convt{i}",
        )(h)
        h = _batch_norm(config, f"dec_bn{i}")(h)
        h = keras.layers.ReLU(name=f"dec_relu{i}")(h)
    h = keras.layers.Conv2DTranspose(
        1,
        4,
        strides=2,
        padding="same",
        use_bias=False,
        kernel_initializer=_init(config),
        name="dec_convt5",
    )(h)
    out = keras.layers.Activation("tanh", name="dec_tanh")(h)
    return keras.Model(z_in, out, name="decoder")


# =========================================================================== model
class GalaxyVAE(keras.Model):
    """Keras 3 VAE galaxy source model (Chianese et al. 2020, section 2; Tables D1, D2).

    Parameters
    ----------
    config : "paper", "small", dict or VAEConfig
    seed : int, optional
        Seed of the reparametrisation noise used by ``fit`` (weights are initialised from the
        Keras global seed: call ``keras.utils.set_random_seed`` first for reproducibility).

    Public methods take and return (batch, 64, 64) peak-normalised images (axes y, x) and
    (batch, latent_dim) latents. ``fit`` expects a dataset / array of images only (no labels);
    it logs ``loss`` (= negative ELBO per image, nats), ``reconstruction`` (-E[log d(x|z)]) and
    ``kl``.
    """

    def __init__(self, config: str | VAEConfig | dict = "small", seed: int | None = None, **kwargs):
        kwargs.setdefault("name", "galaxy_vae")
        super().__init__(**kwargs)
        self.config = resolve_config(config)
        self.latent_dim = self.config.latent_dim
        self.encoder = build_encoder(self.config)
        self.decoder = build_decoder(self.config)
        self.log_decoder_sigma = self.add_weight(
            shape=(),
            name="log_decoder_sigma",
            initializer=keras.initializers.Constant(math.log(self.config.decoder_sigma)),
            trainable=self.config.trainable_sigma,
        )
        d = self.latent_dim
        self.prior_loc = self.add_weight(
            shape=(d,), name="prior_loc", initializer="zeros", trainable=False
        )
        self.prior_scale_tril = self.add_weight(
            shape=(d, d), name="prior_scale_tril", initializer="identity", trainable=False
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.encoder.build((None, IMAGE_SIZE, IMAGE_SIZE, 1))
        self.decoder.build((None, d))
        self.built = True

    # ------------------------------------------------------------------ core graph (no checks)
    @property
    def decoder_sigma(self):
        """sigma_d of eq. 1 (a scalar tensor; fixed 1/50 unless ``trainable_sigma``)."""
        return tf.exp(tf.convert_to_tensor(self.log_decoder_sigma))

    def _encode(self, x, training=False):
        mean, scale = self.encoder(x[..., None], training=training)
        return mean, scale

    def _decode(self, z, training=False):
        return self.decoder(z, training=training)[..., 0]

    def _elbo_terms(self, x, eps, training=False):
        """(elbo, expected log-likelihood, kl), each (batch,), for noise eps (M, batch, d)."""
        mean, scale = self._encode(x, training=training)
        z = reparametrize(mean, scale, eps)
        m = tf.shape(eps)[0]
        b = tf.shape(x)[0]
        mu = self._decode(tf.reshape(z, (-1, self.latent_dim)), training=training)
        mu = tf.reshape(mu, tf.concat([[m, b], tf.shape(mu)[1:]], axis=0))
        loglik = gaussian_log_likelihood(x[None], mu, self.decoder_sigma)
        kl = kl_normal_standard_normal(mean, scale)
        return elbo_estimate(loglik, kl), tf.reduce_mean(loglik, axis=0), kl

    def _fixed_noise(self, batch, seed):
        """Deterministic noise (M, batch, d): stateless normals of ``(seed, 0)``."""
        return tf.random.stateless_normal(
            tf.stack([self.config.num_mc_samples, batch, self.latent_dim]),
            seed=tf.stack([tf.cast(seed, tf.int32), tf.constant(0, tf.int32)]),
        )

    def _sample_impl(self, n, seed):
        """n decoded draws of the latent prior, stateless from ``(seed, 1)``; (n, 64, 64)."""
        eps = tf.random.stateless_normal(
            tf.stack([n, self.latent_dim]),
            seed=tf.stack([tf.cast(seed, tf.int32), tf.constant(1, tf.int32)]),
        )
        z = tf.convert_to_tensor(self.prior_loc) + tf.linalg.matvec(
            tf.convert_to_tensor(self.prior_scale_tril), eps
        )
        return self._decode(z)

    def _noise(self, x, num_samples):
        return keras.random.normal(
            (num_samples, tf.shape(x)[0], self.latent_dim), seed=self.seed_generator
        )

    def call(self, x, training=False):
        """Reconstruction mu_d(mu_e(x)) of (batch, 64, 64) images (deterministic, mean latent)."""
        mean, _ = self._encode(x, training=training)
        return self._decode(mean, training=training)

    def train_step(self, data):
        x = data[0] if isinstance(data, tuple | list) else data
        x = tf.cast(x, tf.float32)
        with tf.GradientTape() as tape:
            elbo, loglik, kl = self._elbo_terms(
                x, self._noise(x, self.config.num_mc_samples), training=True
            )
            loss = -tf.reduce_mean(elbo)
            # Gradients are summed over replicas by the optimizer under a distribution strategy.
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return self._update_metrics(loss, loglik, kl)

    def test_step(self, data):
        x = data[0] if isinstance(data, tuple | list) else data
        x = tf.cast(x, tf.float32)
        elbo, loglik, kl = self._elbo_terms(
            x, self._noise(x, self.config.num_mc_samples), training=False
        )
        return self._update_metrics(-tf.reduce_mean(elbo), loglik, kl)

    def _update_metrics(self, loss, loglik, kl):
        self.loss_tracker.update_state(loss)
        self.reconstruction_tracker.update_state(-tf.reduce_mean(loglik))
        self.kl_tracker.update_state(tf.reduce_mean(kl))
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        return [self.loss_tracker, self.reconstruction_tracker, self.kl_tracker]

    # ------------------------------------------------------------------ public API
    def encode(self, x):
        """Encoder of eq. 2: images (batch, 64, 64) -> (mu_e, sigma_e), each (batch, latent_dim)."""
        x = tf.convert_to_tensor(check_images("x", x))
        return self._encode(x, training=False)

    def decode(self, z):
        """Decoder mean mu_d(z): z (batch, latent_dim) -> (batch, 64, 64) float32 in [-1, 1].

        Differentiable in z and usable inside ``tf.function`` (inference-mode BatchNorm).
        """
        z = _check_latent(z, self.latent_dim)
        lead = tf.shape(z)[:-1]
        out = self._decode(tf.reshape(z, (-1, self.latent_dim)), training=False)
        return tf.reshape(out, tf.concat([lead, [IMAGE_SIZE, IMAGE_SIZE]], axis=0))

    def reconstruct(self, x, sample: bool = True, seed: int | None = None):
        """mu_d(z) with z ~ e(z|x) (``sample=True``, as in Fig. 2) or z = mu_e(x)."""
        mean, scale = self.encode(x)
        if sample:
            eps = tf.random.stateless_normal(tf.shape(mean), seed=[0, 0 if seed is None else seed])
            mean = mean + eps * scale
        return self._decode(mean, training=False)

    def log_prob_elbo(self, x, eps=None, num_samples: int | None = None, seed: int = 0):
        """ELBO (eq. 4) per image, a lower bound on log p(x) in nats; x (batch, 64, 64) -> (batch,).

        ``eps`` (M, batch, latent_dim) fixes the reparametrisation noise (eq. C2); by default
        M = ``num_samples`` or the config's ``num_mc_samples`` stateless normals from ``seed``.
        The KL is taken against N(0, I), the prior used in training (not ``latent_prior``).
        """
        x = tf.convert_to_tensor(check_images("x", x))
        if eps is None:
            m = num_samples or self.config.num_mc_samples
            eps = tf.random.stateless_normal(
                (m, x.shape[0], self.latent_dim), seed=tf.constant([seed, 0], tf.int32)
            )
        eps = tf.convert_to_tensor(eps, tf.float32)
        if not bool(tf.reduce_all(tf.math.is_finite(eps))):
            raise TfhybridInputError("eps contains NaN or inf; expected finite standard normals")
        if eps.shape.rank != 3 or eps.shape[1:] != (x.shape[0], self.latent_dim):
            raise TfhybridInputError(
                f"eps must have shape (M, {x.shape[0]}, {self.latent_dim}); got {tuple(eps.shape)}"
            )
        return self._elbo_terms(x, eps, training=False)[0]

    def sample(self, n: int, seed: int = 0):
        """n decoded draws mu_d(z) with z from :attr:`latent_prior`: (n, 64, 64) float32."""
        if not isinstance(n, int | np.integer) or n < 1:
            raise TfhybridInputError(f"n must be a positive int; got {n!r}")
        return self._sample_impl(tf.constant(n, tf.int32), tf.constant(seed, tf.int32))

    @property
    def latent_prior(self):
        """The fitted latent prior p(z) of section 2.1, a ``tfd.MultivariateNormalTriL``."""
        return tfd.MultivariateNormalTriL(
            loc=tf.convert_to_tensor(self.prior_loc),
            scale_tril=tf.convert_to_tensor(self.prior_scale_tril),
        )

    def latent_log_prob(self, z):
        """log p(z) under :attr:`latent_prior`; z (..., latent_dim) -> (...)."""
        return self.latent_prior.log_prob(_check_latent(z, self.latent_dim))

    def fit_latent(
        self,
        images,
        noise_sigma,
        num_steps: int = 300,
        learning_rate: float = 0.05,
        use_prior: bool = True,
    ) -> tf.Tensor:
        """MAP latent of each image: argmax_z log N(x | mu_d(z), sigma) + log p(z).

        This is how the lensing model uses the VAE (eq. 26 with the lens removed): the source
        is ``mu_d(z)`` with ``z`` fitted to the data under :attr:`latent_prior`, not the
        encoder's amortised guess. Adam from the encoder means, all images at once.

        Parameters
        ----------
        images : (batch, 64, 64) peak-normalised images.
        noise_sigma : float or (batch,) pixel noise sigma of each image (same units).
        use_prior : include log p(z) (False: maximum likelihood in z).

        Returns (batch, latent_dim) float32 latents; ``decode`` gives the reconstructions.
        """
        x = tf.convert_to_tensor(check_images("images", images))
        sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float32), (x.shape[0],))
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise TfhybridInputError(f"noise_sigma must be finite and > 0; got {noise_sigma!r}")
        if not isinstance(num_steps, int | np.integer) or num_steps < 1:
            raise TfhybridInputError(f"num_steps must be a positive int; got {num_steps!r}")
        return fit_latent_map(
            lambda z: self._decode(z, training=False), self.latent_prior, x, sigma,
            self._encode(x)[0], int(num_steps), learning_rate, use_prior,
        )

    def encoded_means(self, images, batch_size: int = 256) -> np.ndarray:
        """mu_e(x) for many images, in batches; (n, 64, 64) -> (n, latent_dim) float32 numpy."""
        images = check_images("images", images)
        out = [
            self._encode(tf.convert_to_tensor(images[i : i + batch_size]))[0].numpy()
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out, axis=0)

    def fit_latent_prior(
        self, images, covariance_factor: float | None = None, batch_size: int = 256
    ):
        """Fit :attr:`latent_prior` to the encoded means of ``images`` (section 2.1); returns it."""
        factor = (
            self.config.prior_covariance_factor if covariance_factor is None else covariance_factor
        )
        loc, scale_tril = fit_latent_prior(self.encoded_means(images, batch_size), factor)
        self.prior_loc.assign(loc.astype(np.float32))
        self.prior_scale_tril.assign(scale_tril.astype(np.float32))
        return self.latent_prior

    def compile(
        self, learning_rate: float = 2e-4, beta_1: float = 0.5, beta_2: float = 0.999, **kwargs
    ):
        """Compile with Adam(beta_1 = 0.5, beta_2 = 0.999) as in the paper, unless given one."""
        kwargs.setdefault(
            "optimizer", keras.optimizers.Adam(learning_rate, beta_1=beta_1, beta_2=beta_2)
        )
        super().compile(**kwargs)


# =========================================================================== training
def dihedral_transform(image, k):
    """Element ``k`` (0–7) of the dihedral group D4 applied to a (64, 64) image.

    ``k mod 4`` quarter turns counter-clockwise, then a left-right flip if ``k >= 4``. For an
    even side the turns are about the image centre (between the four central pixels), where the
    preprocessing puts the galaxy, so the galaxy stays centred.
    """
    image = tf.image.rot90(image[..., None], k % 4)[..., 0]
    return tf.cond(k >= 4, lambda: tf.reverse(image, [1]), lambda: image)


def images_dataset(
    images: np.ndarray,
    batch_size: int,
    shuffle_seed: int | None = None,
    augment: bool = False,
):
    """A ``tf.data`` pipeline of (batch, 64, 64) float32 images, reshuffled each epoch.

    ``augment`` applies a random element of D4 (quarter turns and flips, which leave a
    population of randomly oriented galaxies and white noise unchanged in distribution) to
    every image, seeded by ``shuffle_seed``: 8× the distinct training images at no cost.
    """
    ds = tf.data.Dataset.from_tensor_slices(images)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    if augment:
        ks = tf.data.Dataset.random(seed=shuffle_seed).map(lambda r: tf.cast(r % 8, tf.int32))
        ds = tf.data.Dataset.zip((ds, ks)).map(
            dihedral_transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def train_vae(
    train_images,
    config: str | VAEConfig | dict = "small",
    validation_images=None,
    epochs: int = 20,
    batch_size: int = 32,
    learning_rate: float = 2e-4,
    patience: int | None = 5,
    checkpoint_dir: str | os.PathLike | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    max_seconds: float | None = None,
    strategy=None,
    seed: int = 0,
    fit_prior: bool = True,
    callbacks: list | None = None,
    verbose: int | str = "auto",
    augment: bool = False,
    initial_model: GalaxyVAE | str | os.PathLike | None = None,
) -> tuple[GalaxyVAE, dict]:
    """Train a :class:`GalaxyVAE` with Keras ``fit`` and fit its latent prior.

    Parameters
    ----------
    train_images, validation_images : (n, 64, 64) peak-normalised float images.
    config : "small", "paper", dict or VAEConfig.
    epochs, batch_size, learning_rate : Adam(beta_1 = 0.5, beta_2 = 0.999) settings (paper: batch
        32, lr 1e-6 over ~450 epochs; we default to 2e-4 to converge in a few CPU minutes).
    patience : early stopping on the validation negative ELBO (best weights restored);
        ``None`` disables it.
    checkpoint_dir : checkpoint every epoch here; calling again with the same directory resumes
        at the first unfinished epoch.
    tensorboard_dir : optional TensorBoard log directory.
    max_seconds : stop after the first epoch ending beyond this wall time.
    strategy : None, "mirrored" or a ``tf.distribute.Strategy``.
    seed : seeds weight initialisation, shuffling and the reparametrisation noise.
    fit_prior : fit the section 2.1 latent prior on the training set after training.
    augment : random quarter turns and flips of the training images (:func:`images_dataset`).
    initial_model : a :class:`GalaxyVAE` or a directory written by :func:`save_vae`, of the same
        config but perhaps another ``decoder_sigma``, whose network weights start the training
        (fine-tuning); a checkpoint in ``checkpoint_dir`` still takes precedence when resuming.

    Returns
    -------
    (model, history) with history a dict of per-epoch lists (all epochs, across resumes).
    """
    config = resolve_config(config)
    train_images = check_images("train_images", train_images, allow_single=False)
    n_min = max(2, config.latent_dim + 1 if fit_prior else 2)
    if len(train_images) < n_min:
        raise TfhybridInputError(
            f"train_images has {len(train_images)} image(s); need at least {n_min} "
            f"(more than latent_dim={config.latent_dim} to fit the latent prior)"
        )
    val_ds = None
    if validation_images is not None:
        validation_images = check_images("validation_images", validation_images, allow_single=False)
        val_ds = images_dataset(validation_images, batch_size)
    strategy = resolve_strategy(strategy)
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = GalaxyVAE(config, seed=seed)
        model.compile(learning_rate=learning_rate)
        if initial_model is not None:
            if not isinstance(initial_model, GalaxyVAE):
                initial_model = load_vae(initial_model)
            # sigma_d may change (fine-tuning at a new likelihood width); the networks may not
            same = dataclasses.replace(initial_model.config, decoder_sigma=config.decoder_sigma)
            if same != config:
                raise TfhybridInputError(
                    f"initial_model has config {initial_model.config}; expected {config} "
                    "(only decoder_sigma may differ)"
                )
            model(tf.zeros((1, IMAGE_SIZE, IMAGE_SIZE), tf.float32))
            for target, source in zip(model.weights, initial_model.weights, strict=True):
                if target.path != model.log_decoder_sigma.path:
                    target.assign(source)
    train_ds = images_dataset(train_images, batch_size, shuffle_seed=seed, augment=augment)
    with warnings.catch_warnings():
        # The dataset is shuffled by images_dataset; Keras warns that fit's shuffle is unused.
        warnings.filterwarnings("ignore", message=".*shuffle=True.*", category=UserWarning)
        history, _ = fit_resumable(
            model,
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            checkpoint_dir=checkpoint_dir,
            monitor="val_loss" if val_ds is not None else None,
            patience=patience if val_ds is not None else None,
            tensorboard_dir=tensorboard_dir,
            max_seconds=max_seconds,
            callbacks=callbacks,
            verbose=verbose,
        )
    if fit_prior:
        model.fit_latent_prior(train_images)
    return model, history


# =========================================================================== save / load
def save_vae(model: GalaxyVAE, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``config.json``, ``weights.npz`` and ``latent_prior.npz`` into ``directory``.

    Plain float32 arrays keyed by variable path plus JSON: loading never runs stored code.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = variables_to_arrays(model.weights)
    prior_keys = {v.path for v in (model.prior_loc, model.prior_scale_tril)}
    save_arrays_npz(
        directory / "weights.npz", {k: v for k, v in arrays.items() if k not in prior_keys}
    )
    save_arrays_npz(
        directory / "latent_prior.npz",
        {
            "loc": np.asarray(model.prior_loc.numpy()),
            "scale_tril": np.asarray(model.prior_scale_tril.numpy()),
            "covariance_factor": np.float64(model.config.prior_covariance_factor),
        },
    )
    write_json_atomic(
        directory / "config.json",
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "metadata": metadata or {},
        },
    )
    return directory


def read_vae_config(directory: str | os.PathLike) -> tuple[VAEConfig, dict]:
    """Read and check ``config.json`` of a saved VAE; returns (config, metadata)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise TfhybridInputError(
            f"expected a saved GalaxyVAE directory with config.json, weights.npz and "
            f"latent_prior.npz; {path} does not exist"
        )
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise TfhybridInputError(
            f"{path} is not valid JSON (corrupted or truncated?): {err}"
        ) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise TfhybridInputError(
            f"{path} is not a {FORMAT_NAME} config (format={data.get('format')!r})"
            if isinstance(data, dict)
            else f"{path} is not a {FORMAT_NAME} config"
        )
    if data.get("version") != FORMAT_VERSION:
        raise TfhybridInputError(
            f"{path} has format version {data.get('version')!r}; "
            f"this tfhybrid reads {FORMAT_VERSION}"
        )
    return VAEConfig.from_dict(data.get("config")), data.get("metadata", {})


def load_vae(
    directory: str | os.PathLike, expected_config: str | VAEConfig | dict | None = None
) -> GalaxyVAE:
    """Rebuild a :class:`GalaxyVAE` from code and load the arrays written by :func:`save_vae`.

    ``expected_config``, if given, must equal the stored config (a clear error otherwise).
    """
    directory = Path(directory)
    config, metadata = read_vae_config(directory)
    if expected_config is not None and resolve_config(expected_config) != config:
        raise TfhybridInputError(
            f"{directory} holds a VAE with config {config}; "
            f"expected {resolve_config(expected_config)}"
        )
    model = GalaxyVAE(config)
    net = [v for v in model.weights if v.name not in _PRIOR_VARIABLES]
    assign_arrays(
        net, load_arrays_npz(directory / "weights.npz"), source=str(directory / "weights.npz")
    )
    prior = load_arrays_npz(directory / "latent_prior.npz")
    d = config.latent_dim
    if prior.get("loc", np.empty(0)).shape != (d,) or prior.get(
        "scale_tril", np.empty(0)
    ).shape != (d, d):
        raise TfhybridInputError(
            f"{directory / 'latent_prior.npz'} must hold loc ({d},) and scale_tril ({d}, {d}); "
            f"got { {k: v.shape for k, v in prior.items()} }"
        )
    check_finite("latent prior loc", prior["loc"])
    check_finite("latent prior scale_tril", prior["scale_tril"])
    model.prior_loc.assign(prior["loc"].astype(np.float32))
    model.prior_scale_tril.assign(prior["scale_tril"].astype(np.float32))
    model.metadata = metadata
    return model


DEFAULT_VAE_ASSET = "assets/vae_default"


def default_vae_path() -> Path:
    """Directory of the shipped default VAE inside the installed package."""
    return Path(str(resources.files("tfhybrid") / DEFAULT_VAE_ASSET))


def load_default_vae() -> GalaxyVAE:
    """The shipped small VAE trained on the simulated galaxy set (no network access)."""
    path = default_vae_path()
    if not (path / "config.json").is_file():
        raise TfhybridInputError(
            f"the default VAE is missing from {path}; regenerate it with "
            "`python scripts/train_default_vae.py`"
        )
    return load_vae(path)

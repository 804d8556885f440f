"""PixelCNN++ morphology prior with Gaussian conditionals (Lanusse, Melchior & Moolekamp 2019).

The deblending paper (000_*, §3) uses PixelCNN++ (Salimans et al. 2017) as the prior
``log p_theta(S_k)`` of eq. 7, with the quantized-logistic output replaced by a continuous
per-pixel Gaussian::

    p(x) = prod_i N(x_i ; mu_i(x_<i), sigma_i(x_<i)),   sigma_i = softplus(s_i) + sigma_floor

(raster order: row 0 first, left to right), optionally a mixture of K Gaussians per pixel.

Public API
----------
* :class:`PixelCNNConfig` - frozen architecture/training settings; ``PixelCNNConfig.paper()``
  (2 gated resnet blocks per level, 64 filters, dropout 0.5, 32x32) and
  ``PixelCNNConfig.small()`` (the shipped default, trains on a 2-core CPU).
* :class:`PixelCNNNetwork` - the Keras 3 network, ``(b, ny, nx)`` -> ``(b, ny, nx, n_params)``.
* :class:`GaussianPixelCNN` - a ``tfd.Distribution`` over ``(ny, nx)`` images with exact
  ``log_prob(x)``, autoregressive ``sample(n, seed=)`` and the compiled
  ``log_prob_and_grad(x)`` used by the deblender.
* :func:`normalize_morphology` - the input normalisation the prior expects (below).
* :func:`make_artificial_blends` - the artificial blends of the paper's Fig. 2 test.
* :func:`train_pixelcnn`, :func:`save_pixelcnn`, :func:`load_pixelcnn`,
  :func:`load_default_pixelcnn`; SavedModel export lives in ``pixelcnn_export``.

Normalisation convention
------------------------
The prior is a density over **peak-normalised** morphologies: each stamp is divided by its
maximum, so the brightest pixel is 1 (:func:`normalize_morphology`). This is scarlet's
morphology normalisation (``prox_normalize_max``): the scene model ``A_k^T S_k`` is invariant
under ``(A_k, S_k) -> (c A_k, S_k / c)``, and fixing ``max S_k = 1`` removes that degeneracy
so the flux lives entirely in the SED ``A_k``. Peak normalisation (rather than unit sum) keeps
the pixel values O(1) whatever the galaxy's size, which suits a Gaussian head with an absolute
scale floor. Training stamps are centred galaxies at survey resolution (0.168"/px) with one
reference PSF (FWHM 0.6"), i.e. the deblender's model frame.

Because the training stamps are noiseless, exactly-flat background pixels would let the
Gaussian scales collapse to the floor and make the density useless for anything not exactly
zero. Training therefore adds white Gaussian noise of ``config.noise_sigma`` (default 0.005,
i.e. 0.5 % of the peak; a fresh draw every epoch). The prior consequently models morphologies
"up to 0.5 % noise": at the noise levels of real blends (a few % of a source's peak) the data
likelihood dominates such a small smoothing.

Input checks (``log_prob``, ``log_prob_and_grad`` called eagerly): a stamp shape other than
the model's ``(ny, nx)`` and NaN/inf raise :class:`~tfhybrid.validation.TfhybridInputError`;
a stamp with ``max |x| > 10`` is clearly not peak-normalised and raises; values outside the
trained range ``[-0.25, 1.25]`` (but within that bound) only warn (``UserWarning``), because a
deblender's morphology may transiently overshoot during its iterations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.io import atomic_path, write_json_atomic
from tfhybrid.priors.pixelcnn_layers import (
    DownRightShiftedConv2D,
    DownRightShiftedConv2DTranspose,
    DownShiftedConv2D,
    DownShiftedConv2DTranspose,
    GatedResnet,
    NetworkInNetwork,
    down_shift,
    right_shift,
)
from tfhybrid.priors.training import fit_resumable, resolve_strategy
from tfhybrid.validation import TfhybridInputError, check_finite, check_rank

tfd = tfp.distributions

FORMAT_VERSION = 1
NORMALIZATION = "peak"
#: Values outside this range (for peak-normalised inputs) trigger a warning.
TRAINED_RANGE = (-0.25, 1.25)
#: Inputs with ``max |x|`` above this are certainly not peak-normalised: error.
HARD_LIMIT = 10.0
_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)


@dataclasses.dataclass(frozen=True)
class PixelCNNConfig:
    """Architecture and training settings of the Gaussian PixelCNN++ prior.

    Attributes
    ----------
    image_size : stamp side in pixels (square stamps ``(image_size, image_size)``); must be a
        multiple of ``2 ** (num_hierarchies - 1)``.
    num_resnet : gated resnet blocks per resolution level (paper: 2).
    num_hierarchies : resolution levels (paper: 3).
    num_filters : channels of every stream (paper: 64).
    dropout : dropout rate inside the resnet blocks during training (paper: 0.5).
    num_mixtures : Gaussian components per pixel (1 = the paper's single Gaussian).
    scale_floor : additive floor of the Gaussian scales (1e-4 in the authors' code), in units
        of the peak-normalised image.
    noise_sigma : std of the white noise added to training stamps (peak units), see module doc.
    """

    image_size: int = 32
    num_resnet: int = 1
    num_hierarchies: int = 3
    num_filters: int = 16
    dropout: float = 0.0
    num_mixtures: int = 1
    scale_floor: float = 1e-4
    noise_sigma: float = 0.005

    def __post_init__(self):
        factor = 2 ** (self.num_hierarchies - 1)
        if self.image_size < factor or self.image_size % factor:
            raise TfhybridInputError(
                f"image_size must be a positive multiple of 2**(num_hierarchies-1) = {factor}; "
                f"got {self.image_size}"
            )
        for name in ("num_resnet", "num_hierarchies", "num_filters", "num_mixtures"):
            if int(getattr(self, name)) < 1:
                raise TfhybridInputError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise TfhybridInputError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.scale_floor <= 0 or self.noise_sigma < 0:
            raise TfhybridInputError(
                f"scale_floor must be > 0 and noise_sigma >= 0; got {self.scale_floor}, "
                f"{self.noise_sigma}"
            )

    @classmethod
    def paper(cls) -> PixelCNNConfig:
        """The deblending paper's network: 2 blocks/level, 64 filters, dropout 0.5, 32x32."""
        return cls(image_size=32, num_resnet=2, num_hierarchies=3, num_filters=64, dropout=0.5)

    @classmethod
    def small(cls) -> PixelCNNConfig:
        """The shipped default: 1 block/level, 16 filters, no dropout (2-core CPU budget)."""
        return cls()

    @property
    def num_params(self) -> int:
        """Output channels per pixel: (loc, scale) or (logit, loc, scale) per component."""
        return 2 if self.num_mixtures == 1 else 3 * self.num_mixtures

    @property
    def row_block(self) -> int:
        """Rows whose outputs are unchanged when the image is cropped below them."""
        return 2 ** (self.num_hierarchies - 1)


# --------------------------------------------------------------------------- the head (pure)
def gaussian_head(params: tf.Tensor, num_mixtures: int, scale_floor: float):
    """Split raw network outputs into the per-pixel Gaussian (mixture) parameters.

    Parameters
    ----------
    params : ``(..., n_params)`` raw outputs; ``n_params = 2`` for one Gaussian
        ``(loc, s)``, else ``3 K`` as ``(logits[K], loc[K], s[K])``.

    Returns
    -------
    (logits, loc, scale) each ``(..., K)``; ``scale = softplus(s) + scale_floor``
    (paper's code, Gaussian head); ``logits`` are zeros for ``K = 1``.
    """
    if num_mixtures == 1:
        loc = params[..., 0:1]
        logits = tf.zeros_like(loc)
        raw = params[..., 1:2]
    else:
        k = num_mixtures
        logits, loc, raw = params[..., :k], params[..., k : 2 * k], params[..., 2 * k : 3 * k]
    return logits, loc, tf.nn.softplus(raw) + scale_floor


def gaussian_pixel_log_prob(
    x: tf.Tensor, params: tf.Tensor, num_mixtures: int, scale_floor: float
) -> tf.Tensor:
    """Per-pixel conditional log-density ``log p(x_i | x_<i)`` (000_* §3 Gaussian head).

    ``log p = logsumexp_k [log pi_k - (x - mu_k)^2 / (2 sigma_k^2) - log sigma_k - log(2 pi)/2]``
    (a single Gaussian for ``K = 1``).

    Parameters
    ----------
    x : ``(b, ny, nx)`` image values (peak-normalised).
    params : ``(b, ny, nx, n_params)`` network outputs for the same images.

    Returns
    -------
    ``(b, ny, nx)`` log-densities in nats.
    """
    logits, loc, scale = gaussian_head(params, num_mixtures, scale_floor)
    z = (x[..., None] - loc) / scale
    comp = -0.5 * tf.square(z) - tf.math.log(scale) - _HALF_LOG_2PI
    if num_mixtures == 1:
        return comp[..., 0]
    return tf.reduce_logsumexp(comp + tf.nn.log_softmax(logits, axis=-1), axis=-1)


def pixelcnn_nll_per_pixel(config: PixelCNNConfig):
    """Keras loss ``(x, params) -> (b,)``: negative log-likelihood per pixel in nats."""

    def loss(x, params):
        lp = gaussian_pixel_log_prob(
            tf.cast(x, params.dtype), params, config.num_mixtures, config.scale_floor
        )
        return -tf.reduce_mean(lp, axis=[1, 2])

    return loss


# --------------------------------------------------------------------------- the network
class PixelCNNNetwork(keras.Model):
    """PixelCNN++ network (Salimans et al. 2017) with a Gaussian-parameter output.

    Up pass: per level ``num_resnet`` gated resnets on both streams, then stride-2 shifted
    convolutions between levels; down pass: the mirrored blocks (one more per level below the
    top) fed with the up pass's activations as skip connections, stride-2 shifted transposed
    convolutions between levels; output ``nin(elu(ul))``. The input gets a constant channel
    of ones so the zero padding at the borders is distinguishable from zero-valued pixels.

    Call with ``(b, ny, nx)`` (or ``(b, ny, nx, 1)``) float32 images; returns
    ``(b, ny, nx, config.num_params)``. The output at pixel (i, j) depends only on pixels
    before it in raster order (tested through the Jacobian).
    """

    def __init__(self, config: PixelCNNConfig, name: str = "pixelcnn", **kwargs):
        super().__init__(name=name, **kwargs)
        self.config = config
        c = config
        f = c.num_filters
        self.init_u = DownShiftedConv2D(f, (2, 3), name="init_u")
        self.init_ul_a = DownShiftedConv2D(f, (1, 3), name="init_ul_down")
        self.init_ul_b = DownRightShiftedConv2D(f, (2, 1), name="init_ul_right")
        self.up_u, self.up_ul, self.down_u, self.down_ul = [], [], [], []
        self.up_sample_u, self.up_sample_ul, self.down_sample_u, self.down_sample_ul = (
            [],
            [],
            [],
            [],
        )
        for lvl in range(c.num_hierarchies):
            for r in range(c.num_resnet):
                self.up_u.append(GatedResnet(f, "down", c.dropout, name=f"up{lvl}_u{r}"))
                self.up_ul.append(
                    GatedResnet(f, "down_right", c.dropout, True, name=f"up{lvl}_ul{r}")
                )
            if lvl < c.num_hierarchies - 1:
                self.up_sample_u.append(DownShiftedConv2D(f, strides=2, name=f"up{lvl}_su"))
                self.up_sample_ul.append(DownRightShiftedConv2D(f, strides=2, name=f"up{lvl}_sul"))
        for lvl in range(c.num_hierarchies):
            n = c.num_resnet if lvl == 0 else c.num_resnet + 1
            for r in range(n):
                self.down_u.append(GatedResnet(f, "down", c.dropout, True, name=f"dn{lvl}_u{r}"))
                self.down_ul.append(
                    GatedResnet(f, "down_right", c.dropout, True, name=f"dn{lvl}_ul{r}")
                )
            if lvl < c.num_hierarchies - 1:
                self.down_sample_u.append(DownShiftedConv2DTranspose(f, name=f"dn{lvl}_tu"))
                self.down_sample_ul.append(DownRightShiftedConv2DTranspose(f, name=f"dn{lvl}_tul"))
        self.head = NetworkInNetwork(c.num_params, name="head")

    def initialize_head_bias(self) -> None:
        """Start every Gaussian scale at ``4 * noise_sigma`` (or 0.02 without noise).

        Most pixels of a stamp are background at the training-noise level; starting the scales
        there (instead of softplus(0) = 0.69) saves several epochs on a small CPU budget.
        """
        c = self.config
        target = 4.0 * c.noise_sigma if c.noise_sigma > 0 else 0.02
        raw = float(np.log(np.expm1(target - c.scale_floor)))
        bias = np.zeros(c.num_params, np.float32)
        k = c.num_mixtures
        if k == 1:
            bias[1] = raw
        else:
            bias[2 * k :] = raw
        self.head.dense.bias.assign(bias)

    def call(self, x, training=None):
        if x.shape.rank == 3:
            x = x[..., None]
        x = tf.concat([x, tf.ones_like(x)], axis=-1)
        c = self.config
        u_list = [down_shift(self.init_u(x))]
        ul_list = [down_shift(self.init_ul_a(x)) + right_shift(self.init_ul_b(x))]
        k = 0
        for lvl in range(c.num_hierarchies):
            for _ in range(c.num_resnet):
                u_list.append(self.up_u[k](u_list[-1], training=training))
                ul_list.append(self.up_ul[k](ul_list[-1], u_list[-1], training=training))
                k += 1
            if lvl < c.num_hierarchies - 1:
                u_list.append(self.up_sample_u[lvl](u_list[-1]))
                ul_list.append(self.up_sample_ul[lvl](ul_list[-1]))
        u, ul = u_list.pop(), ul_list.pop()
        k = 0
        for lvl in range(c.num_hierarchies):
            n = c.num_resnet if lvl == 0 else c.num_resnet + 1
            for _ in range(n):
                u = self.down_u[k](u, u_list.pop(), training=training)
                ul = self.down_ul[k](ul, tf.concat([u, ul_list.pop()], -1), training=training)
                k += 1
            if lvl < c.num_hierarchies - 1:
                u = self.down_sample_u[lvl](u)
                ul = self.down_sample_ul[lvl](ul)
        return self.head(tf.nn.elu(ul))

    def build_weights(self) -> PixelCNNNetwork:
        """Create the variables by one call on a zero batch; returns ``self``."""
        n = self.config.image_size
        self(tf.zeros([1, n, n], tf.float32))
        self.initialize_head_bias()
        return self


# --------------------------------------------------------------------------- normalisation
def normalize_morphology(stamps, return_peak: bool = False):
    """Divide each stamp by its maximum so that its brightest pixel is 1 (the prior's input).

    This is the normalisation the prior was trained with (module docstring): scarlet's
    ``max S_k = 1`` convention, which moves all flux into the SED and fixes the
    SED/morphology degeneracy of eq. 6 of the deblending paper.

    Parameters
    ----------
    stamps : ``(..., ny, nx)`` array or tensor of morphologies (any positive flux scale).
    return_peak : also return the ``(...,)`` peaks that were divided out.

    Raises
    ------
    TfhybridInputError : non-finite values, rank < 2, or a stamp whose maximum is not > 0.
    """
    arr = check_finite("stamps", np.asarray(stamps, dtype=np.float32))
    if arr.ndim < 2:
        raise TfhybridInputError(f"stamps must be (..., ny, nx); got shape {arr.shape}")
    peak = arr.max(axis=(-2, -1))
    if np.any(peak <= 0):
        raise TfhybridInputError(
            f"every stamp needs a positive maximum to be peak-normalised; "
            f"{int(np.sum(peak <= 0))} stamp(s) have max <= 0"
        )
    out = (arr / peak[..., None, None]).astype(np.float32)
    return (out, peak) if return_peak else out


def shift_zero_fill(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift a ``(ny, nx)`` image by integer ``(dy, dx)`` pixels (axis order (y, x)), zero-filled.

    No wrap-around: light shifted out of the stamp is lost, pixels shifted in are 0.
    """
    out = np.zeros_like(image)
    ny, nx = image.shape
    ys, yd = (slice(0, ny - dy), slice(dy, ny)) if dy >= 0 else (slice(-dy, ny), slice(0, ny + dy))
    xs, xd = (slice(0, nx - dx), slice(dx, nx)) if dx >= 0 else (slice(-dx, nx), slice(0, nx + dx))
    out[yd, xd] = image[ys, xs]
    return out


def make_artificial_blends(
    stamps: np.ndarray, n_pairs: int, seed: int, offset_px: tuple[float, float] = (4.0, 8.0)
):
    """Artificial blends of the deblending paper's Fig. 2 (000_*, §3) from isolated stamps.

    Draws ``n_pairs`` disjoint pairs ``(g1, g2)`` of distinct stamps from ``stamps``
    ``(n, ny, nx)`` (``n >= 2 n_pairs``), and forms ``blend = g1 + shift(g2)`` with ``g2``
    moved by a distance uniform in ``offset_px`` (pixels) in a uniformly random direction,
    rounded to whole pixels, zero-filled (:func:`shift_zero_fill`). ``g1`` stays centred, as a
    detection would centre the box on the brighter component.

    Returns
    -------
    ``(g1, g2, blend, pairs, offsets)``: the three ``(n_pairs, ny, nx)`` stacks each put in
    the prior's convention (peak-normalised, :func:`normalize_morphology`), the
    ``(n_pairs, 2)`` indices into ``stamps`` of ``(g1, g2)``, and the integer ``(n_pairs, 2)``
    offsets ``(dy, dx)`` of ``g2``.
    """
    stamps = np.asarray(stamps, np.float32)
    if stamps.ndim != 3 or len(stamps) < 2 * n_pairs:
        raise TfhybridInputError(
            f"stamps must be (n, ny, nx) with n >= 2 * n_pairs = {2 * n_pairs}; "
            f"got shape {stamps.shape}"
        )
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(stamps))[: 2 * n_pairs].reshape(n_pairs, 2)
    g1, g2 = stamps[idx[:, 0]], stamps[idx[:, 1]]
    radius = rng.uniform(offset_px[0], offset_px[1], n_pairs)
    angle = rng.uniform(0, 2 * np.pi, n_pairs)
    offsets = np.stack(
        [np.round(radius * np.sin(angle)), np.round(radius * np.cos(angle))], axis=1
    ).astype(int)
    blend = np.stack([g1[k] + shift_zero_fill(g2[k], *offsets[k]) for k in range(n_pairs)])
    return (
        normalize_morphology(g1),
        normalize_morphology(g2),
        normalize_morphology(blend),
        idx,
        offsets,
    )


# --------------------------------------------------------------------------- distribution
class GaussianPixelCNN(tfd.Distribution):
    """Autoregressive Gaussian PixelCNN++ density over ``(ny, nx)`` peak-normalised stamps.

    ``event_shape = (ny, nx)``, scalar batch shape; ``log_prob`` accepts any leading sample
    dimensions ``(..., ny, nx)`` and returns ``(...)`` in nats. ``sample(n, seed=)`` draws
    pixels in raster order; each step re-evaluates the network only on the rows it needs
    (the output of row ``r`` is exact on the image cropped to the next multiple of
    ``2**(num_hierarchies-1)`` rows), batched over samples, inside one ``tf.function``.

    Parameters
    ----------
    network : a built :class:`PixelCNNNetwork`.
    jit_compile : compile ``log_prob_and_grad`` with XLA (measured slower on CPU for the
        shipped net, see the report; default False).
    """

    def __init__(
        self,
        network: PixelCNNNetwork,
        jit_compile: bool = False,
        validate_args: bool = False,
        allow_nan_stats: bool = True,
        name: str = "GaussianPixelCNN",
    ):
        parameters = dict(locals())
        if not isinstance(network, PixelCNNNetwork):
            raise TfhybridInputError(
                f"network must be a PixelCNNNetwork; got {type(network).__name__}"
            )
        self._network = network
        self._config = network.config
        self._jit_compile = bool(jit_compile)
        n = self._config.image_size
        self._value_and_grad_fn = tf.function(
            self._value_and_grad_impl,
            input_signature=[tf.TensorSpec([None, n, n], tf.float32)],
            jit_compile=self._jit_compile,
            reduce_retracing=True,
        )
        self._sample_fn = tf.function(
            self._sample_impl,
            input_signature=[tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int32)],
        )
        super().__init__(
            dtype=tf.float32,
            reparameterization_type=tfd.NOT_REPARAMETERIZED,
            validate_args=validate_args,
            allow_nan_stats=allow_nan_stats,
            parameters=parameters,
            name=name,
        )

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return {}

    @property
    def network(self) -> PixelCNNNetwork:
        return self._network

    @property
    def config(self) -> PixelCNNConfig:
        return self._config

    # shapes
    def _event_shape(self):
        n = self._config.image_size
        return tf.TensorShape([n, n])

    def _event_shape_tensor(self):
        n = self._config.image_size
        return tf.constant([n, n], tf.int32)

    def _batch_shape(self):
        return tf.TensorShape([])

    def _batch_shape_tensor(self):
        return tf.constant([], tf.int32)

    # validation at the public boundary
    def check_stamps(self, x, name: str = "x") -> None:
        """Raise/warn for inputs outside the prior's domain (see module docstring)."""
        if tf.is_tensor(x) and not tf.executing_eagerly():
            shape = x.shape
            if (
                shape.rank is not None
                and (shape.rank < 2 or tuple(shape[-2:]) != tuple(self.event_shape))
                and None not in tuple(shape[-2:])
            ):
                raise TfhybridInputError(
                    f"{name} must have trailing shape {tuple(self.event_shape)} "
                    f"(ny, nx); got {tuple(shape)}"
                )
            return
        arr = np.asarray(x)
        n = self._config.image_size
        if arr.ndim < 2 or arr.shape[-2:] != (n, n):
            raise TfhybridInputError(
                f"{name} must be (..., {n}, {n}) stamps (the model was built for {n}x{n}); "
                f"got shape {arr.shape}"
            )
        check_finite(name, arr)
        amax = float(np.max(np.abs(arr))) if arr.size else 0.0
        if amax > HARD_LIMIT:
            raise TfhybridInputError(
                f"{name} is not peak-normalised: max |x| = {amax:g} > {HARD_LIMIT:g}; "
                "divide each stamp by its maximum (normalize_morphology) first"
            )
        lo, hi = TRAINED_RANGE
        if arr.size and (arr.min() < lo or arr.max() > hi):
            warnings.warn(
                f"{name} has values in [{arr.min():.3g}, {arr.max():.3g}], outside the range "
                f"[{lo}, {hi}] the prior was trained on (peak-normalised stamps); the "
                "log-density there is an extrapolation",
                UserWarning,
                stacklevel=3,
            )

    # densities
    def pixel_params(self, x, training: bool = False) -> tf.Tensor:
        """Raw network outputs ``(b, ny, nx, n_params)`` for images ``(b, ny, nx)``."""
        return self._network(x, training=training)

    def pixel_log_prob(self, x) -> tf.Tensor:
        """Per-pixel conditional log-densities ``(..., ny, nx)`` (nats)."""
        x = tf.convert_to_tensor(x, tf.float32)
        n = self._config.image_size
        flat = tf.reshape(x, [-1, n, n])
        lp = gaussian_pixel_log_prob(
            flat,
            self._network(flat, training=False),
            self._config.num_mixtures,
            self._config.scale_floor,
        )
        return tf.reshape(lp, tf.shape(x))

    def log_prob(self, value, name="log_prob", **kwargs):
        """Exact ``log p(x)`` in nats for ``(..., ny, nx)`` stamps; checks inputs when eager."""
        self.check_stamps(value, "x")
        return super().log_prob(value, name=name, **kwargs)

    def _log_prob(self, x):
        return tf.reduce_sum(self.pixel_log_prob(x), axis=[-2, -1])

    def _value_and_grad_impl(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            lp = tf.reduce_sum(
                gaussian_pixel_log_prob(
                    x,
                    self._network(x, training=False),
                    self._config.num_mixtures,
                    self._config.scale_floor,
                ),
                axis=[-2, -1],
            )
        # log p of distinct stamps are independent, so d(sum)/dx_k = d(log p_k)/dx_k.
        return lp, tape.gradient(lp, x)

    def log_prob_and_grad(self, x, validate: bool = True):
        """``(log p(x_k), d log p(x_k) / d x_k)`` for a batch of K stamps, one compiled call.

        Parameters
        ----------
        x : ``(K, ny, nx)`` (or one ``(ny, nx)``) peak-normalised morphologies.
        validate : check shape / finiteness / range first (set False inside tight loops once
            the inputs are known to be valid).

        Returns
        -------
        ``(K,)`` log-densities (nats) and ``(K, ny, nx)`` gradients (float32 tensors).
        """
        if validate:
            self.check_stamps(x, "x")
        x = tf.convert_to_tensor(x, tf.float32)
        single = x.shape.rank == 2
        if single:
            x = x[None]
        lp, grad = self._value_and_grad_fn(x)
        return (lp[0], grad[0]) if single else (lp, grad)

    # sampling
    def _sample_impl(self, n, seed):
        cfg = self._config
        size = cfg.image_size
        block = cfg.row_block
        x = tf.zeros([n, size, size], tf.float32)
        for top in range(0, size, block):
            rows = top + block

            # Rows >= `rows` cannot influence the outputs of rows < `rows` (causal convs with
            # strides aligned on `block`), so the network runs on the cropped image only.
            def body(p, x, rows=rows):
                i, j = p // size, p % size
                params = self._network(x[:, :rows], training=False)[:, i, j, :]
                logits, loc, scale = gaussian_head(params, cfg.num_mixtures, cfg.scale_floor)
                step_seed = tf.random.experimental.stateless_fold_in(seed, p)
                seeds = tf.random.experimental.stateless_split(step_seed, 2)
                if cfg.num_mixtures == 1:
                    loc, scale = loc[:, 0], scale[:, 0]
                else:
                    comp = tf.random.stateless_categorical(logits, 1, seeds[0])[:, 0]
                    loc = tf.gather(loc, comp, batch_dims=1)
                    scale = tf.gather(scale, comp, batch_dims=1)
                value = loc + scale * tf.random.stateless_normal([n], seeds[1])
                mask = tf.one_hot(p, size * size, dtype=x.dtype)
                mask = tf.reshape(mask, [1, size, size])
                return p + 1, x + mask * (value[:, None, None] - x)

            _, x = tf.while_loop(
                lambda p, x, rows=rows: p < rows * size,
                body,
                [tf.constant(top * size), x],
                parallel_iterations=1,
            )
        return x

    def _sample_n(self, n, seed=None):
        # An int seed means the stateless pair (seed, 0), so that equal seeds give equal
        # samples (TFP's own int seeds are stateful); None draws a fresh random seed.
        if isinstance(seed, (int, np.integer)):
            seed = (int(seed), 0)
        seed = tfp.random.sanitize_seed(seed)
        return self._sample_fn(tf.cast(n, tf.int32), tf.cast(seed, tf.int32))


# --------------------------------------------------------------------------- build / io
def build_pixelcnn(
    config: PixelCNNConfig | None = None, jit_compile: bool = False, seed: int | None = None
) -> GaussianPixelCNN:
    """A freshly initialised (untrained) :class:`GaussianPixelCNN` for ``config``."""
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    net = PixelCNNNetwork(config or PixelCNNConfig.small()).build_weights()
    return GaussianPixelCNN(net, jit_compile=jit_compile)


def save_pixelcnn(
    model: GaussianPixelCNN | PixelCNNNetwork,
    directory: str | os.PathLike,
    metadata: dict | None = None,
) -> Path:
    """Write ``config.json`` + ``weights.npz`` (plain arrays, no pickles) into ``directory``.

    The architecture is rebuilt from code at load time; the JSON holds the config, the
    normalisation convention, the format version and ``metadata`` (training provenance).
    """
    net = model.network if isinstance(model, GaussianPixelCNN) else model
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"w{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(net.weights)}
    with atomic_path(directory / "weights.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    write_json_atomic(
        directory / "config.json",
        {
            "format": "tfhybrid.GaussianPixelCNN",
            "format_version": FORMAT_VERSION,
            "normalization": NORMALIZATION,
            "config": dataclasses.asdict(net.config),
            "weight_paths": [v.path for v in net.weights],
            "weight_shapes": [list(v.shape) for v in net.weights],
            "metadata": metadata or {},
        },
    )
    for name in ("weights.npz", "config.json"):  # mkstemp creates 0600 files
        os.chmod(directory / name, 0o644)
    return directory


def read_pixelcnn_metadata(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a saved prior (raises a clear error when unusable)."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise TfhybridInputError(f"PixelCNN directory {directory} does not exist")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise TfhybridInputError(f"{path} is missing; expected a saved PixelCNN prior") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TfhybridInputError(f"{path} is not valid JSON (corrupted?): {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != "tfhybrid.GaussianPixelCNN":
        raise TfhybridInputError(f"{path} does not describe a tfhybrid GaussianPixelCNN")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TfhybridInputError(
            f"{path} has format_version {meta.get('format_version')!r}; this tfhybrid reads "
            f"version {FORMAT_VERSION}"
        )
    return meta


def load_pixelcnn(directory: str | os.PathLike, jit_compile: bool = False) -> GaussianPixelCNN:
    """Rebuild a :class:`GaussianPixelCNN` from :func:`save_pixelcnn` output.

    Only JSON and ``np.load(..., allow_pickle=False)`` are read: loading never executes
    code. Every mismatch (missing file, corrupted archive, unknown config field, wrong number
    or shape of weights) raises :class:`TfhybridInputError`.
    """
    meta = read_pixelcnn_metadata(directory)
    try:
        config = PixelCNNConfig(**meta["config"])
    except (TypeError, KeyError) as err:
        raise TfhybridInputError(
            f"config in {directory} is incompatible with PixelCNNConfig: {err}"
        ) from err
    net = PixelCNNNetwork(config).build_weights()
    wpath = Path(directory) / "weights.npz"
    try:
        with np.load(wpath, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError as err:
        raise TfhybridInputError(f"{wpath} is missing") from err
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise TfhybridInputError(f"{wpath} is corrupted or not an npz archive: {err}") from err
    if len(arrays) != len(net.weights):
        raise TfhybridInputError(
            f"{wpath} holds {len(arrays)} arrays but the {config} network has "
            f"{len(net.weights)} weights (incompatible weights)"
        )
    for i, var in enumerate(net.weights):
        key = f"w{i:04d}"
        if key not in arrays:
            raise TfhybridInputError(f"{wpath} lacks array {key} ({var.path})")
        if tuple(arrays[key].shape) != tuple(var.shape):
            raise TfhybridInputError(
                f"{wpath}: weight {key} ({var.path}) has shape {arrays[key].shape}, the "
                f"network expects {tuple(var.shape)} (incompatible weights)"
            )
        if not np.all(np.isfinite(arrays[key])):
            raise TfhybridInputError(f"{wpath}: weight {key} ({var.path}) is not finite")
        var.assign(arrays[key].astype(np.float32))
    model = GaussianPixelCNN(net, jit_compile=jit_compile)
    model.metadata = meta.get("metadata", {})
    return model


def default_pixelcnn_dir() -> Path:
    """Directory of the shipped trained default prior (``tfhybrid/assets/pixelcnn_default``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "pixelcnn_default"


def load_default_pixelcnn(jit_compile: bool = False) -> GaussianPixelCNN:
    """The shipped trained prior (made by ``scripts/train_default_pixelcnn.py``); no network."""
    directory = default_pixelcnn_dir()
    if not (directory / "weights.npz").exists():
        raise TfhybridInputError(
            f"no shipped PixelCNN weights in {directory}; run scripts/train_default_pixelcnn.py"
        )
    return load_pixelcnn(directory, jit_compile=jit_compile)


# --------------------------------------------------------------------------- training
def add_training_noise(images: np.ndarray, noise_sigma: float, seed: int) -> np.ndarray:
    """Return ``images`` plus white Gaussian noise of std ``noise_sigma`` (seeded)."""
    rng = np.random.default_rng(seed)
    return (images + noise_sigma * rng.standard_normal(images.shape)).astype(np.float32)


def diagonal_gaussian_baseline(train: np.ndarray, test: np.ndarray) -> float:
    """Held-out NLL per pixel (nats) of an independent per-pixel Gaussian fitted on ``train``."""
    mu = train.mean(axis=0)
    sd = train.std(axis=0) + 1e-12
    z = (test - mu) / sd
    return float(np.mean(0.5 * z**2 + np.log(sd) + _HALF_LOG_2PI))


def _noisy_dataset(images, noise_sigma, batch_size, seed, shuffle):
    ds = tf.data.Dataset.from_tensor_slices(images)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    gen = tf.random.Generator.from_seed(seed)

    def add_noise(x):
        noisy = x + noise_sigma * gen.normal(tf.shape(x))
        return noisy, noisy

    if noise_sigma > 0 and shuffle:
        ds = ds.map(add_noise)
    else:
        ds = ds.map(lambda x: (x, x))
    return ds.prefetch(2)


def train_pixelcnn(
    images: np.ndarray,
    config: PixelCNNConfig | None = None,
    *,
    validation_images: np.ndarray | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    checkpoint_dir: str | os.PathLike | None = None,
    strategy: tf.distribute.Strategy | str | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
    verbose: int | str = "auto",
    callbacks: list | None = None,
    model: GaussianPixelCNN | None = None,
    jit_compile: bool | str = "auto",
):
    """Train the Gaussian PixelCNN++ with Keras ``fit`` on peak-normalised stamps.

    Training noise of ``config.noise_sigma`` is drawn afresh every epoch (module docstring);
    validation stamps are noised once, deterministically from ``seed``, so the validation
    loss is comparable across epochs. The loss is the NLL per pixel in nats.

    Parameters
    ----------
    images : ``(n, ny, nx)`` peak-normalised training stamps (``normalize_morphology``).
    validation_images : optional held-out stamps, same normalisation.
    checkpoint_dir : if given, weights + optimizer state are saved after every epoch
        (``tfhybrid.priors.training.fit_resumable``); calling again with the same directory
        resumes at the first unfinished epoch. With validation stamps the best epoch (lowest
        ``val_loss``) is restored at the end.
    strategy : ``None``, ``"mirrored"`` or a ``tf.distribute.Strategy``; the network is built
        in its scope.
    max_seconds : stop after the first epoch that ends past this wall time.
    model : continue training this prior instead of a fresh one.
    jit_compile : Keras ``compile(jit_compile=...)`` of the train step; ``"auto"`` (Keras'
        default) or False: same speed per step on CPU, False traces faster (short runs, tests).

    Returns
    -------
    (GaussianPixelCNN, history dict of per-epoch lists, all epochs including resumed ones)
    """
    config = config or (model.config if model is not None else PixelCNNConfig.small())
    images = check_rank("images", check_finite("images", images), 3, "(n, ny, nx)")
    n = config.image_size
    if images.shape[1:] != (n, n):
        raise TfhybridInputError(
            f"images must be (n, {n}, {n}) for this config; got {images.shape}"
        )
    images = images.astype(np.float32)
    keras.utils.set_random_seed(int(seed))
    with resolve_strategy(strategy).scope():
        net = model.network if model is not None else PixelCNNNetwork(config).build_weights()
        net.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=pixelcnn_nll_per_pixel(config),
            jit_compile=jit_compile,
        )
    train_ds = _noisy_dataset(images, config.noise_sigma, batch_size, seed, shuffle=True)
    val_ds = None
    if validation_images is not None:
        val = check_finite("validation_images", validation_images).astype(np.float32)
        val = add_training_noise(val, config.noise_sigma, seed + 1)
        val_ds = _noisy_dataset(val, 0.0, batch_size, seed, shuffle=False)
    history, _ = fit_resumable(
        net,
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        checkpoint_dir=checkpoint_dir,
        monitor="val_loss" if val_ds is not None else None,
        restore_best=val_ds is not None,
        max_seconds=max_seconds,
        callbacks=callbacks,
        verbose=verbose,
    )
    return GaussianPixelCNN(net), history


def make_pixelcnn_training_set(
    n: int, seed: int, config: PixelCNNConfig | None = None
) -> np.ndarray:
    """Peak-normalised survey stamps ``(n, size, size)`` for training / evaluating the prior.

    Galaxies from ``tfhybrid.data.preprocess.make_survey_stamps`` (HSC pixel 0.168", one
    reference PSF of FWHM 0.6", random rotations/flips, noiseless), each divided by its peak
    (:func:`normalize_morphology`). Training noise is added later, per epoch.
    """
    from tfhybrid.data.preprocess import make_survey_stamps

    size = (config or PixelCNNConfig.small()).image_size
    kwargs = {"stamp_size": size, "augment": True, "noiseless": True}
    stamps = make_survey_stamps(int(n), int(seed), **kwargs)
    return normalize_morphology(stamps)

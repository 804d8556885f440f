"""The lensing posterior of Chianese et al. 2020 (file ``003_*``), eq. 26, as TFP objects.

``p(Θ_lens, Θ_src | I_obs) ∝ N(I_obs | I_pred(Θ_lens, Θ_src), σ_noise) p(Θ_lens) p(Θ_src)``

* lens parameters Θ_lens = (γ₁, γ₂, φ, q, γ, r_Ein, θ_lens,1, θ_lens,2) with the priors of
  eqs. 18–23, source parameters (θ_src,1, θ_src,2, s, ι) with eqs. 14–16 (both from
  :func:`tfhybrid.physics.lensing.mock_prior`, truncated where the paper's normals leave the
  physical range), and the VAE latent ``z`` (64-d) with the fitted latent prior of section 2.1;
* the source image is the VAE decoder mean ``d(z)`` (eq. 17), the prediction the lensing
  simulator of :mod:`tfhybrid.physics.lensing` (SPLE table deflection by default, the exact EPL
  with ``LensingConfig(deflection="epl")``), and the likelihood independent Gaussian pixels.

Beyond the paper, ``LensPosterior(source_residual=SourceResidualConfig(), residual_sigma=σ_δ)``
adds a pixelated source-plane residual to ``d(z)`` and integrates it out analytically
(:mod:`tfhybrid.physics.source_residual`): the likelihood becomes
``N(I_obs | I_pred, σ² I + σ_δ² B Bᵀ)``, which gives the source model's misfit to the source
instead of to the lens parameters.

:class:`LensPosterior` holds one observation or a batch of ``S`` independent lens systems and
gives the three things the inference engines need: the joint distribution
(:meth:`LensPosterior.joint_distribution`, a ``tfd.JointDistributionNamed`` whose ``log_prob``
is eq. 26 up to a constant), the same density as a function of a list of state parts
(:meth:`LensPosterior.target_log_prob`, batched: any leading shape ending in ``S``), and the
bijectors mapping ℝ to each parameter's support (:meth:`LensPosterior.bijectors`).

State layout (:data:`STATE_NAMES`): the 12 scalar parameters of :data:`PARAM_NAMES`, each of
shape ``(..., S)``, then ``z`` of shape ``(..., S, latent_dim)``. Units: arcsec and radians.
Precision: float32 (the prior and the likelihood are summed in float32; over 65 536 pixels
their relative rounding error, ~1e-6, is far below the posterior's curvature scale).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.physics import interpolation
from tfhybrid.physics import source_residual as residual_model
from tfhybrid.physics.lensing import (
    PARAM_NAMES,
    LensingConfig,
    mock_prior,
    noise_sigma,
    shared_simulator,
)
from tfhybrid.physics.source_residual import SourceResidualConfig
from tfhybrid.priors.vae import IMAGE_SIZE
from tfhybrid.validation import TfhybridInputError

tfd, tfb = tfp.distributions, tfp.bijectors

__all__ = [
    "STATE_NAMES",
    "LensPriorConfig",
    "LensPosterior",
    "normal_log_density",
    "parameter_prior",
]

#: Order of the state parts used by MAP and HMC: 12 scalars then the latent vector.
STATE_NAMES = PARAM_NAMES + ("z",)


@dataclass(frozen=True)
class LensPriorConfig:
    """Choices of the parameter priors that the paper leaves open.

    Attributes
    ----------
    shear_std : float
        Standard deviation of γ₁ and γ₂. The paper's eq. 18 reads N(0, 1); shears of order unity
        are an order of magnitude beyond real galaxy-scale lenses (|γ_ext| ≲ 0.1) and turn the
        mock images into unrecognisable streaks, so the default is 0.05 (set 1.0 for the text).
    q_range, gamma_range : (float, float) or None
        Truncation of the q and γ normals (default: the SPLE table's extent).
    """

    shear_std: float = 0.05
    q_range: tuple[float, float] | None = None
    gamma_range: tuple[float, float] | None = None

    def __post_init__(self):
        if not (np.isfinite(self.shear_std) and self.shear_std > 0):
            raise TfhybridInputError(f"shear_std must be > 0; got {self.shear_std!r}")


def parameter_prior(prior: LensPriorConfig | None = None, dtype=tf.float32):
    """Priors of the 12 lens and source parameters (eqs. 14–16, 18–23) as a JointDistributionNamed.

    :func:`tfhybrid.physics.lensing.mock_prior` with the shear width of ``prior`` (see
    :class:`LensPriorConfig`); the mocks are drawn from, and the fits use, this same object.
    """
    prior = LensPriorConfig() if prior is None else prior
    base = mock_prior(dtype, q_range=prior.q_range, gamma_range=prior.gamma_range)
    parts = dict(base.model)
    zero, std = tf.constant(0.0, dtype), tf.constant(prior.shear_std, dtype)
    parts["gamma1"] = tfd.Normal(zero, std)
    parts["gamma2"] = tfd.Normal(zero, std)
    return tfd.JointDistributionNamed(parts)


def _constant(value):
    """A tensor's value as a float64 array when it is known without running a graph, else None."""
    static = tf.get_static_value(value)
    return None if static is None else np.asarray(static, np.float64)


def _log_normal_cdf_difference(a: float, b: float) -> float:
    """log(Φ(b) − Φ(a)) for a < b, in float64, from the tail that keeps its precision."""
    if a > 0.0:  # both in the upper tail: Φ(b) − Φ(a) = Φ(−a) − Φ(−b)
        a, b = -b, -a
    return math.log(0.5 * math.erfc(-b / math.sqrt(2.0)) - 0.5 * math.erfc(-a / math.sqrt(2.0)))


def normal_log_density(dist) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """``x ↦ dist.log_prob(x)`` in closed form for a ``tfd.Normal`` or ``tfd.TruncatedNormal``
    of constant scalar parameters, else None.

    ``−½((x − μ)/σ)² + c`` with ``c = −log σ − ½ log 2π − log Z`` computed once, in float64
    (``Z = Φ((high − μ)/σ) − Φ((low − μ)/σ)`` for the truncated normal, which is −inf outside
    ``[low, high]``, as TFP's is). The same density as TFP's ``log_prob`` to float32 rounding
    (tested), in 18 graph operations or fewer (constants included) instead of ~100 per prior
    through the joint distribution's ``log_prob`` (1 156 for the 12 parameter priors, traced
    in 0.6 s: TFP evaluates the truncated normal's log normaliser in the graph); every traced
    posterior (each optimiser stage, the polish, HMC) carries them, and their gradient.
    """
    if type(dist) not in (tfd.Normal, tfd.TruncatedNormal):
        return None
    loc, scale = _constant(dist.loc), _constant(dist.scale)
    if loc is None or scale is None or loc.ndim or scale.ndim or not scale > 0:
        return None
    const = -math.log(float(scale)) - 0.5 * math.log(2.0 * math.pi)
    bounds = None
    if isinstance(dist, tfd.TruncatedNormal):
        low, high = _constant(dist.low), _constant(dist.high)
        if low is None or high is None or low.ndim or high.ndim or not low < high:
            return None
        const -= _log_normal_cdf_difference(float((low - loc) / scale),
                                            float((high - loc) / scale))
        bounds = (float(low), float(high))
    dtype = dist.dtype
    np_dtype = dtype.as_numpy_dtype
    loc_c, scale_c, const_c = (np_dtype(v) for v in (float(loc), float(scale), const))

    def log_density(x):
        x = tf.convert_to_tensor(x, dtype)
        lp = const_c - np_dtype(0.5) * tf.square((x - loc_c) / scale_c)
        if bounds is None:
            return lp
        outside = (x < np_dtype(bounds[0])) | (x > np_dtype(bounds[1]))
        return tf.where(outside, np_dtype(-np.inf), lp)

    return log_density


@dataclass
class LensPosterior:
    """Eq. 26 of 003_* for ``S`` observed lens systems, batched in one graph.

    Parameters
    ----------
    observed : array ``(n_pix, n_pix)`` or ``(S, n_pix, n_pix)``
        Observed images (surface brightness, the units of the simulator; axis order (y, x)).
        NaN only in pixels the noise map masks.
    noise : float, str, array ``(S,)`` or a noise map ``(n_pix, n_pix)`` / ``(S, n_pix, n_pix)``
        Pixel noise σ: a number, one per system, a preset name of
        :data:`tfhybrid.physics.lensing.NOISE_SIGMA_PRESETS`, or σ per pixel (an rms map, e.g.
        from a drizzled image's weight map as ``1 / sqrt(w)``), ``inf`` where a pixel is
        masked (a cosmic ray, a bad column, a neighbour's light): the likelihood is then
        ``N(I_obs | I_pred, diag(σ_p²))`` over the unmasked pixels.
    vae : tfhybrid.priors.vae.GalaxyVAE
        Source model: ``decode(z)`` and ``latent_prior``.
    config : LensingConfig
        Grid, PSF and deflection (must match the observation's size).
    prior : LensPriorConfig
    source_residual : SourceResidualConfig, optional
        Adds a pixelated source-plane residual ``δ ~ N(0, σ_δ² I)`` to the VAE source and
        integrates it out analytically (:mod:`tfhybrid.physics.source_residual`): the
        likelihood becomes ``N(I_obs | I_pred, σ² I + σ_δ² B Bᵀ)``. Needs ``residual_sigma``
        and ``config.supersampling == 1``. Default None: the paper's white likelihood.
    residual_sigma : float or array ``(S,)``, optional
        σ_δ per system (source surface-brightness units), > 0; see
        :func:`tfhybrid.lens.fit.residual_sigma_by_evidence`.
    psf_image : array ``(py, px)``, optional
        The PSF as an image at the observation's pixel scale (odd sides, centred on the central
        pixel, normalised here), e.g. a TinyTim or star-stack PSF; replaces the configuration's
        Gaussian. The coarse global search bins it (:func:`tfhybrid.physics.psf.bin_psf_image`).
    """

    observed: object
    noise: object
    vae: object
    config: LensingConfig = field(default_factory=LensingConfig)
    prior: LensPriorConfig = field(default_factory=LensPriorConfig)
    source_residual: SourceResidualConfig | None = None
    residual_sigma: object = None
    psf_image: object = None

    def __post_init__(self):
        if not isinstance(self.config, LensingConfig):
            raise TfhybridInputError(f"config must be a LensingConfig; got {self.config!r}")
        obs = np.asarray(self.observed, dtype=np.float64)
        if obs.ndim == 2:
            obs = obs[None]
        n = self.config.n_pix
        if obs.ndim != 3 or obs.shape[1:] != (n, n):
            raise TfhybridInputError(
                f"observed must have shape ({n}, {n}) or (S, {n}, {n}) for this LensingConfig "
                f"(n_pix={n}); got {np.shape(self.observed)}"
            )
        self.num_systems = obs.shape[0]
        sigma, weights = self._checked_noise(n)
        valid = np.ones(obs.shape, bool) if weights is None else weights > 0
        bad = ~np.isfinite(obs) & valid
        if bad.any():
            raise TfhybridInputError(
                f"observed contains {int(bad.sum())} NaN or inf pixels; mask them (noise map "
                "σ = inf there) or inpaint them before fitting"
            )
        obs = np.where(valid, obs, 0.0)
        for attr in ("decode", "latent_prior", "latent_dim"):
            if not hasattr(self.vae, attr):
                raise TfhybridInputError(
                    f"vae must be a tfhybrid GalaxyVAE (load_default_vae()); it has no {attr!r}"
                )
        dtype = self.config.tf_dtype
        self.dtype = dtype
        self.latent_dim = int(self.vae.latent_dim)
        self._observed = tf.constant(obs, dtype)
        self._sigma = tf.constant(np.array(sigma), dtype)
        # per-pixel weights w = (σ / σ_p)² relative to the system's σ (0: masked), or None
        self._weights = None if weights is None else tf.constant(weights, dtype)
        if weights is not None:
            self._num_valid = tf.constant(np.sum(valid, axis=(1, 2)), dtype)
            self._log_weight_sum = tf.constant(
                np.sum(np.log(np.where(valid, weights, 1.0)), axis=(1, 2)), dtype)
        self._simulator = shared_simulator(self.config, self.psf_image)
        self._source_shape = (IMAGE_SIZE, IMAGE_SIZE)  # the VAE decoder's stamp
        self._param_prior = parameter_prior(self.prior, dtype)
        # the parameter priors in closed form where they are constant normals (all 12 of the
        # paper's): log_prior sums them instead of calling the joint distribution's log_prob
        terms = {k: normal_log_density(d) for k, d in self._param_prior.model.items()}
        closed = set(terms) == set(PARAM_NAMES) and all(t is not None for t in terms.values())
        self._prior_terms = terms if closed else None
        self._latent_prior = self.vae.latent_prior
        self._residual_sigma = None
        if self.source_residual is not None:
            if not isinstance(self.source_residual, SourceResidualConfig):
                raise TfhybridInputError(
                    f"source_residual must be a SourceResidualConfig or None; got "
                    f"{self.source_residual!r}"
                )
            if self.config.supersampling != 1:
                raise TfhybridInputError(
                    "source_residual needs LensingConfig(supersampling=1); got supersampling="
                    f"{self.config.supersampling}"
                )
            if self.residual_sigma is None:
                raise TfhybridInputError(
                    "source_residual needs residual_sigma (σ_δ per system, > 0); "
                    "tfhybrid.lens.fit.residual_sigma_by_evidence picks it from the data"
                )
            # a variable, so that a polish can re-choose σ_δ without retracing its graphs
            # (:meth:`_assign_residual_sigma`)
            self._residual_sigma = tf.Variable(self._checked_residual_sigma(self.residual_sigma),
                                               dtype=dtype, trainable=False,
                                               name="residual_sigma")
        elif self.residual_sigma is not None:
            raise TfhybridInputError("residual_sigma was given without source_residual")

    def _checked_noise(self, n: int):
        """``(σ (S,), weights (S, n, n) or None)`` from ``noise``; σ of a noise map is its
        median over the unmasked pixels, and the weights are ``(σ / σ_p)²``, 0 where masked."""
        s = self.num_systems
        if isinstance(self.noise, str):
            return np.full(s, noise_sigma(self.noise)), None
        arr = np.asarray(self.noise, dtype=np.float64)
        if arr.ndim >= 2 and arr.shape[-2:] == (n, n):
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3 or arr.shape[0] not in (1, s):
                raise TfhybridInputError(
                    f"a noise map must have shape ({n}, {n}) or ({s}, {n}, {n}); got "
                    f"{np.shape(self.noise)}")
            arr = np.broadcast_to(arr, (s, n, n))
            if np.isnan(arr).any() or (arr <= 0).any():
                raise TfhybridInputError(
                    "the noise map must be > 0 everywhere (inf for a masked pixel); it has "
                    f"{int(np.isnan(arr).sum())} NaN and {int((arr <= 0).sum())} pixels <= 0")
            valid = np.isfinite(arr)
            empty = np.flatnonzero(~valid.any(axis=(1, 2)))
            if empty.size:
                raise TfhybridInputError(
                    f"the noise map masks every pixel of system(s) {empty.tolist()}")
            sigma = np.array([np.median(a[v]) for a, v in zip(arr, valid, strict=True)])
            return sigma, np.where(valid, (sigma[:, None, None] / arr) ** 2, 0.0)
        try:
            sigma = np.broadcast_to(arr, (s,))
        except ValueError:
            raise TfhybridInputError(
                f"noise must be a number, one per system ({s}), or a noise map ({n}, {n}) / "
                f"({s}, {n}, {n}); got shape {arr.shape}") from None
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise TfhybridInputError(f"noise sigma must be finite and > 0; got {self.noise!r}")
        return sigma.copy(), None

    # -- the model ----------------------------------------------------------------------------
    def parameter_prior(self):
        """The JointDistributionNamed over the 12 scalar parameters (eqs. 14–16, 18–23)."""
        return self._param_prior

    @property
    def latent_prior(self):
        """p(z): the VAE's fitted ``tfd.MultivariateNormalTriL`` (section 2.1)."""
        return self._latent_prior

    @property
    def observed_images(self) -> np.ndarray:
        """The validated observed images, ``(S, n_pix, n_pix)`` (``observed`` as given)."""
        return self._observed.numpy()

    @property
    def psf_kernel(self) -> np.ndarray | None:
        """The PSF image the model convolves with, ``(py, px)`` float64 with unit sum (the
        configuration's Gaussian or ``psf_image``); None without a PSF."""
        return self._simulator.psf_kernel

    @property
    def noise_sigma(self) -> np.ndarray:
        """Pixel noise σ per system, ``(S,)`` (of a noise map: its median over the unmasked
        pixels)."""
        return self._sigma.numpy()

    @property
    def has_noise_map(self) -> bool:
        """Whether the noise varies from pixel to pixel (a noise map, masks included)."""
        return self._weights is not None

    @property
    def noise_map(self) -> np.ndarray:
        """σ of every pixel, ``(S, n_pix, n_pix)``; ``inf`` where a pixel is masked."""
        s, n = self.num_systems, self.config.n_pix
        sigma = np.broadcast_to(self.noise_sigma[:, None, None], (s, n, n))
        if self._weights is None:
            return sigma.copy()
        w = self._weights.numpy()
        with np.errstate(divide="ignore"):
            return np.where(w > 0, sigma / np.sqrt(w), np.inf)

    @property
    def inverse_variance(self) -> np.ndarray:
        """``1 / σ_p²`` of every pixel, ``(S, n_pix, n_pix)``; 0 where a pixel is masked."""
        s, n = self.num_systems, self.config.n_pix
        weights = np.ones((s, n, n)) if self._weights is None else self._weights.numpy()
        return weights.astype(np.float64) / self.noise_sigma.astype(np.float64)[:, None, None] ** 2

    def source_images(self, z) -> tf.Tensor:
        """Decoder means ``d(z)``: ``(..., latent_dim)`` → ``(..., 64, 64)``."""
        return tf.cast(self.vae.decode(tf.cast(z, tf.float32)), self.dtype)

    def predict(self, params: Mapping, z) -> tf.Tensor:
        """Noise-free model image ``I_pred`` (eqs. 7–13, 17, PSF): ``(..., n_pix, n_pix)``.

        ``params``: the 12 parameters, each of shape ``lead``; ``z``: ``lead + (latent_dim,)``.
        """
        return self._predict(params, z)[0]

    def _predict(self, params: Mapping, z, grid_coordinates: bool = False):
        """``(I_pred, coordinates)``: :meth:`predict`, and with ``grid_coordinates`` each image
        pixel's position on the source residual's grid from the same ray trace
        (:meth:`_grid_coordinates`; flattened over ``lead``), else None."""
        z = tf.convert_to_tensor(z, self.dtype)
        lead = tf.shape(z)[:-1]
        flat = {k: tf.reshape(tf.cast(params[k], self.dtype), [-1]) for k in PARAM_NAMES}
        source = self.source_images(tf.reshape(z, [-1, self.latent_dim]))
        inputs = dict(source=source, **flat)
        coordinates = None
        if grid_coordinates:
            image, (col, row) = self._simulator.image_and_source_coordinates(
                inputs, self._source_shape)
            coordinates = residual_model.grid_coordinates(col, row, self._source_shape,
                                                          self.source_residual)
        else:
            image = self._simulator(inputs)
        n = self.config.n_pix
        return tf.reshape(image, tf.concat([lead, [n, n]], 0)), coordinates

    @property
    def residual_sigma_values(self) -> np.ndarray | None:
        """σ_δ per system ``(S,)``, or None without a source residual."""
        return None if self._residual_sigma is None else self._residual_sigma.numpy()

    def _checked_residual_sigma(self, residual_sigma) -> np.ndarray:
        """σ_δ as a finite, positive ``(S,)`` float64 array (a number applies to every system)."""
        res = np.asarray(residual_sigma, dtype=np.float64)
        if res.ndim > 1 or (res.ndim == 1 and res.shape[0] not in (1, self.num_systems)):
            raise TfhybridInputError(
                f"residual_sigma must be a number or have shape ({self.num_systems},); got "
                f"shape {res.shape}"
            )
        res = np.broadcast_to(res, (self.num_systems,))
        if not np.all(np.isfinite(res) & (res > 0)):
            raise TfhybridInputError(
                f"residual_sigma must be finite and > 0; got {residual_sigma!r}")
        return np.array(res)

    def _assign_residual_sigma(self, residual_sigma) -> None:
        """Set σ_δ ``(S,)`` in place: graphs already traced on this posterior (the polish's
        value-and-gradient function) read the new value without being retraced. Private: a
        posterior is otherwise immutable; :func:`tfhybrid.lens.fit.polish_with_source_residual`
        uses it on a posterior of its own between its rounds."""
        if self._residual_sigma is None:
            raise TfhybridInputError("this posterior has no source residual")
        res = self._checked_residual_sigma(residual_sigma)
        self._residual_sigma.assign(res.astype(self._residual_sigma.dtype.as_numpy_dtype))
        self.residual_sigma = res

    def with_source_residual(self, source_residual: SourceResidualConfig | None,
                             residual_sigma=None) -> LensPosterior:
        """The same observations and priors with another source residual (None: white)."""
        return dataclasses.replace(self, source_residual=source_residual,
                                   residual_sigma=residual_sigma)

    def log_likelihood(self, params: Mapping, z) -> tf.Tensor:
        """log N(I_obs | I_pred, σ) summed over pixels, shape ``lead`` (ends in ``S``).

        With a source residual, the marginal ``log N(I_obs | I_pred, σ² I + σ_δ² B Bᵀ)``
        (:func:`tfhybrid.physics.source_residual.marginal_log_likelihood_correction`).
        """
        with_residual = self._residual_sigma is not None
        model, coordinates = self._predict(params, z, grid_coordinates=with_residual)
        resid = (model - self._observed) / self._sigma[:, None, None]
        if self._weights is None:
            n_pix = float(self.config.n_pix**2)
            const = -0.5 * n_pix * np.log(2.0 * np.pi) - n_pix * tf.math.log(self._sigma)
            white = -0.5 * tf.reduce_sum(resid * resid, axis=[-2, -1]) + const
        else:  # σ_p² = σ² / w over the unmasked pixels
            const = (-0.5 * self._num_valid * np.log(2.0 * np.pi)
                     - self._num_valid * tf.math.log(self._sigma) + 0.5 * self._log_weight_sum)
            white = -0.5 * tf.reduce_sum(self._weights * resid * resid, axis=[-2, -1]) + const
        if not with_residual:
            return white
        gram = self.residual_gram(params, model, coordinates)
        return white + self.residual_correction(gram, self._residual_sigma,
                                                tf.shape(white))

    def residual_gram(self, params: Mapping, model, coordinates=None):
        """``(diagonal, lower, projected)``: the blocks of ``BᵀB`` and ``Bᵀ(I_obs − model)`` of
        the source residual (:func:`tfhybrid.physics.source_residual.bilinear_gram`), flattened
        over ``lead``.

        ``coordinates``: :meth:`_grid_coordinates` at ``params`` when the caller has them
        (from :meth:`_predict`'s ray trace); computed here otherwise.
        """
        n = self.config.n_pix
        col, row = self._grid_coordinates(params) if coordinates is None else coordinates
        flat_col, flat_row = (tf.reshape(c, [-1, n * n]) for c in (col, row))
        data = tf.reshape(self._observed - model, [-1, n * n])
        weights = None
        if self._weights is not None:
            weights = tf.reshape(tf.broadcast_to(self._weights, tf.shape(model)), [-1, n * n])
        return residual_model.bilinear_gram(flat_col, flat_row, data,
                                            self.source_residual.grid_size, weights=weights)

    def residual_correction(self, gram, residual_sigma, lead) -> tf.Tensor:
        """The marginal's correction to the white log-likelihood at σ_δ ``(S,)``, shape ``lead``;
        ``gram`` from :meth:`residual_gram`."""
        sigma = tf.reshape(tf.broadcast_to(self._sigma, lead), [-1])
        sigma_res = tf.reshape(tf.broadcast_to(tf.cast(residual_sigma, self.dtype), lead), [-1])
        delta = residual_model.marginal_log_likelihood_correction(*gram, sigma, sigma_res)
        return tf.reshape(delta, lead)

    def _grid_coordinates(self, params: Mapping):
        """Each image pixel's position on the residual grid, ``(lead·, n_pix, n_pix)`` each."""
        flat = {k: tf.reshape(tf.cast(params[k], self.dtype), [-1]) for k in PARAM_NAMES}
        col, row = self._simulator.traced_source_coordinates(flat, self._source_shape)
        return residual_model.grid_coordinates(col, row, self._source_shape,
                                               self.source_residual)

    def residual_image(self, params: Mapping, residual) -> tf.Tensor:
        """``B δ``: the residual ``δ`` ``(S, m, m)`` lensed into the image plane (no PSF).

        ``params``: each ``(S,)``. Bilinear interpolation with the zero border of the grid
        (the ``"grid-constant"`` rule of eq. 17): the explicit form of the term
        :meth:`log_likelihood` integrates out, used by :meth:`joint_distribution`.
        """
        col, row = self._grid_coordinates(params)
        return interpolation.bilinear_interpolate_core(
            tf.cast(residual, self.dtype), col, row, "grid-constant"
        )

    def log_prior(self, params: Mapping, z) -> tf.Tensor:
        """log p(Θ_lens) + log p(θ_src, s, ι) + log p(z), shape ``lead``.

        The parameter priors' ``log_prob`` (:meth:`parameter_prior`); for the paper's priors,
        which are independent constant normals, summed in closed form
        (:func:`normal_log_density`), the same density to float32 rounding.
        """
        values = {k: tf.cast(params[k], self.dtype) for k in PARAM_NAMES}
        if self._prior_terms is None:
            lp = self._param_prior.log_prob(values)
        else:
            terms = [self._prior_terms[k](values[k]) for k in PARAM_NAMES]
            lp = terms[0]
            for term in terms[1:]:  # broadcasting, as the joint distribution's sum does
                lp = lp + term
        return lp + tf.cast(self._latent_prior.log_prob(tf.cast(z, tf.float32)), self.dtype)

    def target_log_prob(self, *parts) -> tf.Tensor:
        """Eq. 26 (unnormalised log posterior) of the state parts in :data:`STATE_NAMES` order."""
        if len(parts) != len(STATE_NAMES):
            raise TfhybridInputError(
                f"expected {len(STATE_NAMES)} state parts {STATE_NAMES}; got {len(parts)}"
            )
        params = dict(zip(PARAM_NAMES, parts[:-1], strict=True))
        z = parts[-1]
        return self.log_likelihood(params, z) + self.log_prior(params, z)

    def joint_distribution(self) -> tfd.JointDistributionNamed:
        """The full generative model of the ``S`` systems: parameters, ``z`` and the images.

        Every part has the systems as its (rightmost) event axis, so ``log_prob`` is the SUM over
        systems of :meth:`target_log_prob` (at ``observed=`` the observed images) and
        ``sample(seed=...)`` draws ``S`` complete mock systems (parameters, latent, noisy image).

        With a source residual the model has one more part, ``residual`` ``(S, m, m)``
        ~ N(0, σ_δ²), added to the image as :meth:`residual_image`; :meth:`target_log_prob`
        is then this model's density with ``residual`` integrated out (analytically), not
        ``log_prob`` at one value of it.
        """
        s = self.num_systems
        parts = {k: tfd.Sample(d, s) for k, d in self._param_prior.model.items()}
        parts["z"] = tfd.Sample(self._latent_prior, s)
        if self._residual_sigma is not None:
            m = self.source_residual.grid_size
            parts["residual"] = tfd.Independent(
                tfd.Normal(tf.zeros([s, m, m], self.dtype),
                           tf.broadcast_to(self._residual_sigma[:, None, None], [s, m, m])), 3
            )

        def observed(r_ein, gamma, q, phi, theta_lens1, theta_lens2, gamma1, gamma2,
                     theta_src1, theta_src2, s, iota, z):
            # JointDistributionNamed finds a part's parents from these argument names
            values = dict(r_ein=r_ein, gamma=gamma, q=q, phi=phi, theta_lens1=theta_lens1,
                          theta_lens2=theta_lens2, gamma1=gamma1, gamma2=gamma2,
                          theta_src1=theta_src1, theta_src2=theta_src2, s=s, iota=iota)
            return self._image_distribution(self.predict(values, z))

        def observed_with_residual(r_ein, gamma, q, phi, theta_lens1, theta_lens2, gamma1,
                                   gamma2, theta_src1, theta_src2, s, iota, z, residual):
            values = dict(r_ein=r_ein, gamma=gamma, q=q, phi=phi, theta_lens1=theta_lens1,
                          theta_lens2=theta_lens2, gamma1=gamma1, gamma2=gamma2,
                          theta_src1=theta_src1, theta_src2=theta_src2, s=s, iota=iota)
            return self._image_distribution(self.predict(values, z)
                                            + self.residual_image(values, residual))

        parts["observed"] = observed if self._residual_sigma is None else observed_with_residual
        return tfd.JointDistributionNamed(parts)

    def _image_distribution(self, mean) -> tfd.Distribution:
        """The noise model of the images around ``mean``: masked pixels (noise map σ = inf)
        are left out (``tfd.Masked``: no density, and zeros when sampled)."""
        if self._weights is None:
            return tfd.Independent(tfd.Normal(mean, self._sigma[:, None, None]), 3)
        valid = self._weights > 0
        scale = self._sigma[:, None, None] / tf.sqrt(tf.where(valid, self._weights, 1.0))
        return tfd.Independent(tfd.Masked(tfd.Normal(mean, scale), valid), 3)

    def bijectors(self) -> list:
        """Bijectors ℝ → support of each state part, in :data:`STATE_NAMES` order.

        The priors' default event-space bijectors: sigmoids onto the truncation intervals of
        r_Ein, γ, q, s and ι; ``None`` (identity) for the unbounded parameters and ``z``.
        """
        out = []
        for name in PARAM_NAMES:
            b = self._param_prior.model[name].experimental_default_event_space_bijector()
            out.append(None if isinstance(b, tfb.Identity) else b)
        return out + [None]

    # -- state helpers ------------------------------------------------------------------------
    def state_from_dict(self, values: Mapping, lead_shape=None) -> list[tf.Tensor]:
        """State parts (constrained) from a dict of parameter values and ``z``."""
        lead = (self.num_systems,) if lead_shape is None else tuple(lead_shape)
        parts = []
        for name in PARAM_NAMES:
            v = tf.cast(tf.convert_to_tensor(values[name]), self.dtype)
            parts.append(tf.broadcast_to(v, lead))
        z = tf.cast(tf.convert_to_tensor(values["z"]), self.dtype)
        parts.append(tf.broadcast_to(z, lead + (self.latent_dim,)))
        return parts

    def initial_states(self, num_starts: int = 1, seed: int = 0) -> list[tf.Tensor]:
        """Starting points for MAP, shape ``(num_starts, S)`` per scalar part.

        Start 0 sits at the prior medians (r_Ein = 1.5″, γ = 2, q at the truncated normal's
        median, φ = 0, no shear, source at the origin with s = 5 and ι = 1, z at the latent
        prior mean); the others are independent draws from the parameter priors with z at the
        latent prior mean (z draws from the ×9 prior are mostly unrealistic sources).
        """
        if not isinstance(num_starts, int | np.integer) or num_starts < 1:
            raise TfhybridInputError(f"num_starts must be a positive int; got {num_starts!r}")
        s = self.num_systems
        medians = {
            name: tf.fill([1, s], tf.cast(self._param_prior.model[name].quantile(0.5), self.dtype))
            for name in PARAM_NAMES
        }
        if num_starts > 1:
            draws = self._param_prior.sample([num_starts - 1, s], seed=(int(seed), 17))
            start = {
                k: tf.concat([medians[k], tf.cast(draws[k], self.dtype)], 0) for k in PARAM_NAMES
            }
        else:
            start = medians
        z0 = tf.cast(self._latent_prior.mean(), self.dtype)
        start["z"] = tf.broadcast_to(z0, [num_starts, s, self.latent_dim])
        return [start[k] for k in PARAM_NAMES] + [start["z"]]

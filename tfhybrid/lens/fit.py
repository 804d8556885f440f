"""MAP fits and posterior samples of lens systems (sections 5.2–5.3 of 003_*).

Both read the same :class:`tfhybrid.lens.model.LensPosterior` (eq. 26) through the generic
engines of :mod:`tfhybrid.inference`: :func:`fit_map` runs multi-start Adam (the paper's
optimiser) or L-BFGS in the unconstrained space of the priors' bijectors, all starts and all
systems in one batched graph, and keeps the best start of each system; :func:`sample_lens_posterior`
runs HMC (the paper: 50 adaptation steps then 500 draws from the MAP) or NUTS, chunked and
resumable. :func:`parameter_table` and :func:`coverage` turn the results into the paper's
comparisons (true vs MAP vs posterior mean ± std, per cent errors, interval coverage).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.inference.map import MapResult, find_map
from tfhybrid.inference.mcmc import PosteriorResult, sample_posterior
from tfhybrid.io import array_digest
from tfhybrid.lens.defaults import (
    DEFAULT_COARSE_STARTS,
    DEFAULT_COARSE_STEPS,
    DEFAULT_JUMP_STAGE,
    DEFAULT_LBFGS_CYCLES,
    DEFAULT_LBFGS_ITER,
    DEFAULT_MAP_STEPS,
    DEFAULT_NEWTON_ITER,
    DEFAULT_NUM_STARTS,
    DEFAULT_PRUNE_AFTER,
    DEFAULT_PRUNE_MARGIN,
    DEFAULT_RESIDUAL_LATER_CYCLES,
    DEFAULT_RESIDUAL_ROUNDS,
    DEFAULT_WHITENING_FLOOR,
    DEFAULT_WHITENING_STEP,
)
from tfhybrid.lens.map_checkpoint import (
    MapCheckpoint,
    map_result_arrays,
    map_result_from_arrays,
    posterior_fingerprint,
)
from tfhybrid.lens.model import STATE_NAMES, LensPosterior
from tfhybrid.physics.lens_profiles import circularised_einstein_radius
from tfhybrid.physics.lensing import PARAM_NAMES, resample_source_stamp
from tfhybrid.physics.psf import bin_psf_image
from tfhybrid.physics.source_residual import SourceResidualConfig
from tfhybrid.priors.vae import fit_latent_map
from tfhybrid.validation import TfhybridInputError

tfb = tfp.bijectors

__all__ = [
    "LensMap",
    "LensSamples",
    "fit_map",
    "coarse_posterior",
    "scale_jump_candidates",
    "source_scale_jumps",
    "laplace_hessian",
    "laplace_whitening",
    "posterior_scale_whitening",
    "newton_polish",
    "residual_sigma_by_evidence",
    "polish_with_source_residual",
    "sample_lens_posterior",
    "parameter_table",
    "coverage",
    "coverage_flags",
    "equivalent_truth",
    "with_derived",
    "format_table",
]

#: Parameters defined modulo a period: the lens's major-axis angle φ (rad) describes the same
#: ellipse at φ + kπ, and its N(0, 1) prior (eq. 19) does not fold it, so a fit may land on any
#: branch.
PERIODIC_PARAMS = {"phi": np.pi}


def equivalent_truth(name: str, truth, reference):
    """The true value of ``name`` on the branch nearest ``reference`` (same shapes, broadcast).

    φ is only defined modulo π (an ellipse rotated by π is the same lens): an estimate of
    φ_true ± π is exact, and errors, pulls and interval coverage must be measured against
    ``φ_true + kπ`` with the k nearest the estimate. Other parameters are returned unchanged.
    """
    truth = np.asarray(truth, dtype=np.float64)
    period = PERIODIC_PARAMS.get(name)
    if period is None:
        return truth
    reference = np.asarray(reference, dtype=np.float64)
    return truth + period * np.round((reference - truth) / period)


def with_derived(params: dict) -> dict:
    """``params`` plus ``theta_e = sqrt(q) r_ein`` (arcsec,
    :func:`tfhybrid.physics.lens_profiles.circularised_einstein_radius`) when both are present.

    The multiply imaged arcs fix the area of the critical curve, so ``theta_e`` is the Einstein
    radius the data measure; the paper's major-axis ``r_ein`` inherits ``q``'s uncertainty.
    Arrays of any shape (MAP ``(S,)``, draws ``(n, chains, S)``); ``params`` is not modified.
    """
    out = dict(params)
    if "r_ein" in params and "q" in params:
        out["theta_e"] = circularised_einstein_radius(params["r_ein"], params["q"])
    return out


@dataclass
class LensMap:
    """Best MAP estimate of each of the ``S`` systems.

    Attributes
    ----------
    params : dict name → (S,) float64, the 12 parameters.
    z : (S, latent_dim) float32 latent of the source.
    log_prob : (S,) log posterior (eq. 26, unnormalised) at the estimate.
    best_start : (S,) index of the start that won.
    result : the engine's :class:`tfhybrid.inference.map.MapResult` over all starts.
    wall_time_s : seconds spent in the optimiser (all stages).
    hessian : (S, D, D) Hessian of −log p in unconstrained space at the estimate, when
        :func:`newton_polish` ran (``newton_iter > 0``); :func:`sample_lens_posterior` reuses it.
    scale_jump : (S,) source-scale factor of the winning :func:`source_scale_jumps` candidate
        (1.0 where the optimiser's own best start won), when the jumps ran; with
        ``jump_stage="coarse"``, the factor of the coarse jump the winning full-resolution
        start came from (1.0: a coarse start).
    jump_gain : (S,) log p gained by the jumps (0 where none won), when they ran after the
        full-resolution optimiser (None with ``jump_stage="coarse"``).
    source_residual, residual_sigma : the source-plane residual the estimate was polished
        under (``fit_map(source_residual=...)``) and its σ_δ per system ``(S,)``; None with
        the white likelihood. :meth:`posterior_of` rebuilds that posterior for sampling.
    residual_gain : (S,) log evidence gained by the residual at σ_δ, relative to the white
        likelihood, where the polish started (:func:`residual_sigma_by_evidence`).
    stage_seconds : wall seconds of each stage :func:`fit_map` ran, in order (``"global
        search"``, ``"adam"``, ``"source-scale jumps"`` with ``jump_stage="full"``,
        ``"polish"``, ``"source residual"``), tracing and compilation included; they sum to
        ``wall_time_s``. With a source residual its polish graph compiles in a background
        thread during ``"polish"`` (see :func:`fit_map`).
    resumed_stages : the stages :func:`fit_map` loaded from its ``checkpoint_dir`` instead of
        running them (``"global_search"``, ``"adam"``, ``"polish"``); empty otherwise.
    """

    params: dict
    z: np.ndarray
    log_prob: np.ndarray
    best_start: np.ndarray
    result: MapResult
    wall_time_s: float
    hessian: np.ndarray | None = None
    scale_jump: np.ndarray | None = None
    jump_gain: np.ndarray | None = None
    source_residual: SourceResidualConfig | None = None
    residual_sigma: np.ndarray | None = None
    residual_gain: np.ndarray | None = None
    stage_seconds: dict = field(default_factory=dict)
    resumed_stages: tuple = ()

    def posterior_of(self, posterior: LensPosterior) -> LensPosterior:
        """``posterior`` with the source residual this estimate was made under (if any)."""
        if self.source_residual is None:
            return posterior
        return posterior.with_source_residual(self.source_residual, self.residual_sigma)

    def state(self) -> list[tf.Tensor]:
        """State parts (constrained), each with leading axis ``S``."""
        return [tf.constant(self.params[k], tf.float32) for k in PARAM_NAMES] + [
            tf.constant(self.z, tf.float32)
        ]

    @property
    def message(self) -> str:
        """The optimiser's message, plus the source-scale jumps' and the Newton polish's
        outcomes when they ran."""
        msg = self.result.message if self.result is not None else ""
        kept = getattr(self.result, "kept_starts", None)
        if kept is not None:
            dropped = np.isnan(np.asarray(self.result.loss_trace)).reshape(
                len(self.result.loss_trace), -1).any(axis=1)
            msg += (f"; from step {int(np.argmax(dropped))} only the leading "
                    f"{len(kept)} start(s) of each system went on")
        jump_gain = np.zeros(len(self.log_prob)) if self.jump_gain is None else self.jump_gain
        if self.scale_jump is not None:
            won = np.flatnonzero(self.scale_jump != 1.0)
            where = "" if self.jump_gain is not None else " on the coarse grid"
            gains = (f", log p +{np.round(jump_gain[won], 1).tolist()}"
                     if self.jump_gain is not None else "")
            msg += (f"; source-scale jumps{where} won in {len(won)}/{len(self.log_prob)} "
                    "system(s)" + (f" {won.tolist()} (factors "
                                   f"{np.round(self.scale_jump[won], 2).tolist()}{gains})"
                                   if len(won) else ""))
        if self.hessian is not None and self.result is not None:
            gain = self.log_prob - jump_gain - np.asarray(self.result.log_prob).reshape(
                -1, len(self.log_prob)).max(0)
            if self.source_residual is None:
                msg += (f"; Newton + whitened L-BFGS polish: log p raised by {np.min(gain):.3g}"
                        f" to {np.max(gain):.3g} over {len(gain)} system(s)")
        if self.residual_sigma is not None:
            msg += (f"; source residual ({self.source_residual.grid_size}² nodes) σ_δ "
                    f"{np.round(self.residual_sigma, 4).tolist()}, log evidence gained over "
                    f"the white likelihood {np.round(self.residual_gain, 1).tolist()} nats")
        return msg


@dataclass
class LensSamples:
    """Posterior draws of the ``S`` systems.

    Attributes
    ----------
    params : dict name → (num_results, num_chains, S) draws of each parameter.
    z : (num_results, num_chains, S, latent_dim) draws of the latent.
    result : the engine's :class:`tfhybrid.inference.mcmc.PosteriorResult`.
    pilot : the pilot chain's result when ``pilot_draws`` re-whitened the sampler, else None
        (its time is not in ``result``'s).
    """

    params: dict
    z: np.ndarray
    result: PosteriorResult
    pilot: PosteriorResult | None = None

    def mean(self) -> dict:
        """Posterior mean of each parameter and of the derived ``theta_e``: name → (S,)."""
        return {k: v.reshape(-1, v.shape[-1]).mean(0) for k, v in with_derived(self.params).items()}

    def std(self) -> dict:
        """Posterior standard deviation, as :meth:`mean`."""
        return {k: v.reshape(-1, v.shape[-1]).std(0, ddof=1)
                for k, v in with_derived(self.params).items()}

    def ess(self, names=("r_ein", "gamma", "phi", "q")) -> dict:
        """Effective sample size of each parameter per system: name → (S,), summed over chains
        (:func:`tfhybrid.inference.diagnostics.effective_sample_size`)."""
        from tfhybrid.inference.diagnostics import effective_sample_size

        params = self.params if set(names) <= set(self.params) else with_derived(self.params)
        return {k: np.asarray(effective_sample_size(params[k]), dtype=np.float64)
                for k in names}

    def low_ess_systems(self, threshold: float = 100.0, names=("r_ein", "gamma", "phi", "q"),
                        ess: dict | None = None) -> list[int]:
        """Systems where any of ``names`` has an ESS below ``threshold``: their means, widths
        and intervals rest on too few independent draws to be trusted (on the 10-mock study,
        500 draws gave ESS 3–286 for these parameters, below 100 in 9 of 10 systems). A chain
        that never moved has an undefined (NaN) ESS and is listed too.
        ``ess``: the output of :meth:`ess`, when already computed."""
        ess = self.ess(names) if ess is None else ess
        ess = np.stack([ess[k] for k in names])
        low = ~np.all(np.isfinite(ess) & (ess >= threshold), axis=0)
        return np.flatnonzero(low).tolist()

    def mode_gap(self, posterior: LensPosterior, map_log_prob, every: int = 10) -> np.ndarray:
        """(S,) highest log p (eq. 26) among every ``every``-th draw (all chains) minus the
        MAP's ``map_log_prob`` (e.g. :attr:`LensMap.log_prob`).

        Well above zero (tens of nats), the chain found a higher region than the MAP: the MAP
        was a local optimum of a rough posterior (bilinear source interpolation and the
        decoder's ReLUs make it only piecewise smooth), and the draws may still be moving
        away from it, so their means and intervals describe a chain in transit. On study v8
        the chains climbed 121 nats above the MAP in one system and ~11 in two others; from
        the benchmark system's MAP, NUTS reached +140 nats at an Einstein radius 7.2 % off the
        truth (the MAP's: 4.9 %), so there the posterior's mode itself is biased by the
        source model.
        Were the MAP the mode of a Gaussian posterior, the best of 50 draws in D = 76
        dimensions would sit about D/2 − 2 √(D/2) ≈ 26 nats below it: any positive gap means
        the MAP is not the mode.
        """
        if not isinstance(every, int | np.integer) or every < 1:
            raise TfhybridInputError(f"every must be an int >= 1; got {every!r}")
        idx = np.arange(0, self.z.shape[0], int(every))
        parts = [self.params[k][idx] for k in PARAM_NAMES] + [self.z[idx]]
        r, c, s = parts[0].shape
        flat = [tf.constant(np.reshape(p, (r * c, s) + p.shape[3:]), posterior.dtype)
                for p in parts]
        lp = np.concatenate([  # (r c, S), 8 draws per batch bound the memory
            posterior.target_log_prob(*[p[i:i + 8] for p in flat]).numpy()
            for i in range(0, r * c, 8)
        ])
        return lp.max(axis=0).astype(np.float64) - np.asarray(map_log_prob, np.float64)

    def interval(self, probability: float = 0.68) -> dict:
        """Central credible interval of each parameter and theta_e: name → ((S,) low, (S,) high)."""
        lo, hi = 50.0 * (1.0 - probability), 50.0 * (1.0 + probability)
        return {
            k: (np.percentile(v.reshape(-1, v.shape[-1]), lo, axis=0),
                np.percentile(v.reshape(-1, v.shape[-1]), hi, axis=0))
            for k, v in with_derived(self.params).items()
        }


#: Forward models × optimiser steps of a coarse-grid run below which the simulator's own XLA
#: cluster for the lens equation (:class:`tfhybrid.physics.lensing.LensingSimulator`) costs more
#: to compile than it saves. On the 4× coarser grid of the benchmark system (2-core CPU) it
#: saves ~0.5 ms per forward model and step and costs ~2 s of compilation per batch shape:
#: the 16-start search of one system (8 000) keeps it (13.8 s instead of 15.0 s), its 3 source-
#: scale jumps (1 500) run faster without it (5.5 s instead of 7.5 s).
CLUSTER_MIN_MODEL_STEPS = 4000


def _check_counts(**counts):
    """Raise a clear error unless every keyword is an int >= 0 (iteration counts)."""
    for name, value in counts.items():
        if not isinstance(value, int | np.integer) or value < 0:
            raise TfhybridInputError(f"{name} must be an int >= 0; got {value!r}")


def _default_learning_rate(num_steps: int):
    # Adam moves every unconstrained coordinate by ~lr per step: 0.03 crosses the prior
    # range of r_Ein, q, γ (logit units) in a few hundred steps, and the decay to 3e-4 lets it
    # settle to the noise-limited optimum instead of orbiting it (tested on the mocks).
    return keras.optimizers.schedules.PolynomialDecay(0.03, max(1, int(0.9 * num_steps)), 3e-4)


def _coarse_for(posterior: LensPosterior, factor: int, num_models: int,
                num_steps: int) -> LensPosterior:
    """:func:`coarse_posterior` for an optimiser run of ``num_models`` forward models per step
    and ``num_steps`` steps: without the simulator's XLA cluster below
    :data:`CLUSTER_MIN_MODEL_STEPS`, otherwise with the fine posterior's setting."""
    if int(num_models) * int(num_steps) < CLUSTER_MIN_MODEL_STEPS:
        return coarse_posterior(posterior, factor, jit_compile=False)
    return coarse_posterior(posterior, factor)


def coarse_posterior(posterior: LensPosterior, factor: int = 4,
                     supersampling: int = 1, jit_compile: bool | None = None) -> LensPosterior:
    """The same systems on a grid ``factor`` times coarser: a cheap posterior for global search.

    The observed images are averaged over ``factor × factor`` blocks (noise σ / factor; with a
    noise map, inverse-variance weighted, and a block of masked pixels masked), and the
    model is ray-traced on the coarse pixels (``supersampling`` rays per side), with the same
    PSF (a ``psf_image`` binned by :func:`tfhybrid.physics.psf.bin_psf_image`), prior and VAE.
    With ``factor = 4`` and ``supersampling = 1`` a forward model costs 1/16
    of the full one, so 16 coarse starts cost about one full start. The coarse optimum is
    biased by the coarser sampling; it only has to land in the right basin. ``jit_compile``
    overrides the configuration's (whether the simulator compiles the lens equation as an
    XLA cluster of its own; default: the fine posterior's setting).
    """
    import dataclasses

    cfg = posterior.config
    if not isinstance(factor, int | np.integer) or factor < 1 or cfg.n_pix % factor:
        raise TfhybridInputError(
            f"factor must be a positive integer dividing n_pix={cfg.n_pix}; got {factor!r}"
        )
    n = cfg.n_pix // factor
    coarse = dataclasses.replace(cfg, n_pix=n, pixel_scale_arcsec=cfg.pixel_scale_arcsec * factor,
                                 supersampling=int(supersampling))
    if jit_compile is not None:
        coarse = dataclasses.replace(coarse, jit_compile=bool(jit_compile))
    obs = posterior.observed_images
    binned = obs.reshape(obs.shape[0], n, factor, n, factor).mean(axis=(2, 4))
    noise = posterior.noise_sigma / factor
    if posterior.has_noise_map:
        # inverse-variance weighted block means, σ = 1 / sqrt(Σ 1/σ_p²); a block with every
        # pixel masked is masked
        ivar = posterior.inverse_variance.reshape(obs.shape[0], n, factor, n, factor)
        total = ivar.sum(axis=(2, 4))
        weighted = (ivar * obs.reshape(ivar.shape)).sum(axis=(2, 4))
        binned = np.where(total > 0, weighted / np.where(total > 0, total, 1.0), 0.0)
        with np.errstate(divide="ignore"):
            noise = np.where(total > 0, 1.0 / np.sqrt(total), np.inf)
    psf_image = None
    if posterior.psf_image is not None:  # a Gaussian keeps its σ in arcsec; an image is binned
        psf_image = bin_psf_image(posterior.psf_kernel, factor)
        crop = [max((side - n) // 2 + (n % 2 == 0), 0) for side in psf_image.shape]
        psf_image = psf_image[crop[0]:psf_image.shape[0] - crop[0],
                              crop[1]:psf_image.shape[1] - crop[1]]  # no larger than the grid
    return LensPosterior(binned, noise, posterior.vae, coarse, posterior.prior,
                         psf_image=psf_image)


def _prior_upper(posterior: LensPosterior, name: str) -> float:
    high = getattr(posterior.parameter_prior().model[name], "high", None)
    return np.inf if high is None else float(high)


def _fit_latent(posterior: LensPosterior, images, z_init, num_steps: int) -> tf.Tensor:
    """MAP latents of peak-normalised source images (the decoder's σ, p(z)), as the VAE's
    ``fit_latent`` computes them, on any source model :class:`LensPosterior` accepts: from the
    encoder's means when it has an encoder, else from ``z_init``."""
    vae = posterior.vae
    if hasattr(vae, "encode"):
        z_init = vae.encode(images)[0]
    # the rate decays tenfold: at a constant 0.05 Adam jitters by a few 0.01 around the optimum
    lr = keras.optimizers.schedules.PolynomialDecay(0.05, max(1, num_steps), 0.005)
    return fit_latent_map(posterior.source_images, posterior.latent_prior, images,
                          float(getattr(vae, "decoder_sigma", 0.02)), z_init, num_steps, lr)


def scale_jump_candidates(posterior: LensPosterior, state, factors=(0.6, 1.6, 2.6),
                          latent_steps: int = 300) -> list[tf.Tensor]:
    """Starting points of :func:`source_scale_jumps`: ``state`` with its source at scale ``k s``.

    For each factor ``k``, the current source ``d(z)`` is redrawn on a stamp ``k`` times wider
    (:func:`tfhybrid.physics.lensing.resample_source_stamp`, so the lensed image is kept up to
    interpolation), its latent refitted as :meth:`GalaxyVAE.fit_latent` does (peak-normalised,
    the decoder's σ, ``latent_steps`` Adam steps), ``ι`` multiplied by the peak and ``s`` by
    ``k`` (both kept inside the prior's support); the lens parameters are unchanged.
    ``state``: constrained state parts with leading axis ``S``. Returns state parts with
    leading shape ``(len(factors), S)``.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.size == 0 or not np.all(np.isfinite(factors) & (factors > 0)):
        raise TfhybridInputError(f"factors must be finite and > 0; got {factors!r}")
    state = [tf.convert_to_tensor(x, tf.float32) for x in state]
    n_k, n_sys = len(factors), int(state[0].shape[0])
    source = tf.cast(posterior.source_images(state[-1]), tf.float32)  # (S, n, n)
    tiled = tf.reshape(tf.tile(source[None], [n_k, 1, 1, 1]), [-1] + source.shape[1:].as_list())
    zoomed = resample_source_stamp(tiled, np.repeat(factors, n_sys))  # (K S, n, n)
    peak = tf.maximum(tf.reduce_max(zoomed, axis=[1, 2]), 1e-6)
    z_init = tf.reshape(tf.tile(state[-1][None], [n_k, 1, 1]), [n_k * n_sys, -1])
    z_new = _fit_latent(posterior, zoomed / peak[:, None, None], z_init, int(latent_steps))
    z_new = tf.reshape(z_new, [n_k, n_sys, -1])
    peak = tf.reshape(peak, [n_k, n_sys])
    k = tf.constant(factors, tf.float32)[:, None]
    cand = []
    for name, part in zip(PARAM_NAMES, state[:-1], strict=True):
        v = tf.broadcast_to(part[None], [n_k, n_sys])
        if name == "s":
            v = tf.minimum(v * k, 0.98 * _prior_upper(posterior, "s"))
        elif name == "iota":
            v = tf.minimum(v * peak, 0.98 * _prior_upper(posterior, "iota"))
        cand.append(v)
    return cand + [z_new]


def source_scale_jumps(posterior: LensPosterior, state, factors=(0.6, 1.6, 2.6),
                       num_steps: int = 1000, method: str = "adam", learning_rate=None,
                       jit_compile: bool = True, rtol: float = 1e-6, progress: bool = False,
                       latent_steps: int = 300) -> MapResult:
    """Jumps between source-scale modes: the same source refitted at scale ``k s`` for each k.

    The source's physical size is set twice, by ``s`` (eq. 17's stamp half-side) and by the
    galaxy's extent on the VAE stamp, and the optimiser, started from the latent prior's mean
    galaxy, settles in one of several modes along the valley where ``s`` and the galaxy's
    extent trade off: on a 10-mock study, in two systems the optimum near the true ``s`` (2.5×
    the MAP's) has a log posterior higher by 370–600 nats, which no local step reaches (``s``
    and all of ``z`` must move together); with jumps by 0.6, 1.6 and 2.6 the MAP's log p rose
    in 7 of 10 systems, by 8–405 nats. A jump keeps the lensed image and
    moves along that valley in one go (:func:`scale_jump_candidates`); every candidate of
    every system is then refined by ``num_steps`` steps of ``method`` on the full posterior,
    in one batched :func:`find_map`.

    ``state``: constrained state parts with leading axis ``S`` (e.g. :meth:`LensMap.state`).
    Returns the engine's :class:`MapResult` over the ``(len(factors), S)`` candidates.
    """
    cand = scale_jump_candidates(posterior, state, factors, latent_steps)
    lr = _default_learning_rate(num_steps) if learning_rate is None else learning_rate
    return find_map(
        posterior.target_log_prob, cand, bijectors=posterior.bijectors(), method=method,
        num_steps=int(num_steps), learning_rate=lr, rtol=rtol, progress=progress,
        jit_compile=jit_compile,
    )


#: σ_δ values tried by :func:`residual_sigma_by_evidence` (source surface-brightness units;
#: the VAE's stamps peak at 1 and ι is ~1): 3e-4 … 0.3 in steps of ×1.26.
RESIDUAL_SIGMA_GRID = np.geomspace(3e-4, 0.3, 31)


def residual_sigma_by_evidence(posterior: LensPosterior, state,
                               source_residual: SourceResidualConfig | None = None,
                               grid=RESIDUAL_SIGMA_GRID) -> tuple[np.ndarray, np.ndarray]:
    """σ_δ of the source-plane residual that maximises the marginal likelihood at ``state``.

    Type-II maximum likelihood (the "evidence" of Suyu et al. 2006, MNRAS 371, 983, for a
    regularised pixelated source): the residual's amplitude is a hyperparameter, chosen per
    system by the data. The marginal log-likelihood
    (:meth:`LensPosterior.log_likelihood` with ``source_residual``) is evaluated at ``state``
    (constrained parts, leading axis ``S``) for each σ_δ of ``grid`` and refined by a parabola
    through the best value and its neighbours in log σ_δ. A misfit-free model prefers the
    smallest σ_δ (the Occam factor ``−½ log det A`` only costs), so the grid's lower end
    means "no residual needed".

    Returns ``(sigma, gain)``, both ``(S,)``: σ_δ and the log-likelihood gained over the white
    likelihood at the best grid value (nats).
    """
    if not isinstance(posterior, LensPosterior):
        raise TfhybridInputError(f"posterior must be a LensPosterior; got {type(posterior)}")
    source_residual = SourceResidualConfig() if source_residual is None else source_residual
    grid = np.sort(np.asarray(grid, dtype=np.float64).ravel())
    if grid.size < 3 or not np.all(np.isfinite(grid) & (grid > 0)):
        raise TfhybridInputError(f"grid must hold >= 3 finite values > 0; got {grid!r}")
    white = posterior.with_source_residual(None)
    params = dict(zip(PARAM_NAMES, state[:-1], strict=True))
    base = white.log_likelihood(params, state[-1]).numpy().astype(np.float64)
    # BᵀB and Bᵀr do not depend on σ_δ: computed once, then only the block factorisation
    with_res = white.with_source_residual(source_residual, float(grid[0]))
    gram = with_res.residual_gram(params, with_res.predict(params, state[-1]))
    lead = tf.constant([posterior.num_systems])
    loglik = base + np.stack([
        with_res.residual_correction(gram, tf.fill([posterior.num_systems], sd),
                                     lead).numpy().astype(np.float64)
        for sd in grid
    ])  # (K, S)
    loglik = np.where(np.isfinite(loglik), loglik, -np.inf)
    best = np.argmax(loglik, axis=0)
    log_grid = np.log(grid)
    sigma = grid[best].copy()
    for i, k in enumerate(best):
        if 0 < k < len(grid) - 1:
            x0, x1, x2 = log_grid[k - 1:k + 2]
            y0, y1, y2 = loglik[k - 1:k + 2, i]
            den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
            if np.isfinite(den) and den != 0:  # the parabola's vertex, kept near the best
                x = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den
                sigma[i] = np.exp(np.clip(x, 0.5 * (x0 + x1), 0.5 * (x1 + x2)))
    gain = loglik[best, np.arange(loglik.shape[1])] - base
    return sigma, gain


def _global_search(posterior: LensPosterior, num_starts, seed, rtol, progress, coarse_starts,
                   coarse_steps, coarse_factor, coarse_prune_after, coarse_keep, scale_jumps,
                   jump_steps, jump_stage):
    """:func:`fit_map`'s global search on the coarse grid (with the coarse source-scale jumps
    when ``jump_stage == "coarse"``): the ``num_starts`` best starts of each system, state
    parts ``(num_starts, S, ...)`` as NumPy arrays, and the source-scale factor each came
    from ``(num_starts, S)`` (1: a coarse start)."""
    jumps = len(scale_jumps) > 0
    coarse = _coarse_for(posterior, coarse_factor, coarse_starts * posterior.num_systems,
                         coarse_steps)
    res_c = find_map(
        coarse.target_log_prob, list(coarse.initial_states(coarse_starts, seed)),
        bijectors=coarse.bijectors(), method="adam", num_steps=coarse_steps,
        learning_rate=_default_learning_rate(coarse_steps), rtol=rtol, progress=progress,
        jit_compile=False, prune_after=coarse_prune_after, prune_keep=int(coarse_keep),
    )
    lp_c = np.asarray(res_c.log_prob).reshape(-1, posterior.num_systems)  # kept starts
    pool = [np.asarray(part) for part in res_c.state]
    # the source-scale factor each start of the pool carries (1: a coarse start)
    slot_factor = np.ones(lp_c.shape)
    if jumps and jump_stage == "coarse":
        best_c = np.argmax(np.where(np.isfinite(lp_c), lp_c, -np.inf), axis=0)
        cols_c = np.arange(lp_c.shape[1])
        steps_cj = coarse_steps if jump_steps is None else int(jump_steps)
        res_cj = source_scale_jumps(
            _coarse_for(posterior, coarse_factor, len(scale_jumps) * posterior.num_systems,
                        steps_cj),
            [tf.constant(p[best_c, cols_c]) for p in pool], scale_jumps,
            num_steps=steps_cj, jit_compile=False, rtol=rtol, progress=progress,
        )
        lp_c = np.concatenate([lp_c, np.asarray(res_cj.log_prob).reshape(len(scale_jumps),
                                                                       -1)])
        pool = [np.concatenate([p, np.asarray(q)]) for p, q in zip(pool, res_cj.state,
                                                                  strict=True)]
        slot_factor = np.concatenate([slot_factor, np.broadcast_to(
            np.asarray(scale_jumps, np.float64)[:, None], (len(scale_jumps),
                                                           lp_c.shape[1]))])
    order = np.argsort(-np.where(np.isfinite(lp_c), lp_c, -np.inf), axis=0)[:num_starts]
    cols = np.arange(lp_c.shape[1])[None, :]
    initial_state = [part[order, cols] for part in pool]
    # the source-scale factor each full-resolution start came from (1: a coarse start)
    start_factor = slot_factor[order, cols]  # (num_starts, S)
    return initial_state, start_factor


def _schedule_description(learning_rate):
    """A learning rate (None, a number or a Keras schedule) as a JSON value for a checkpoint's
    settings (a schedule by its class and configuration)."""
    if learning_rate is None or isinstance(learning_rate, int | float | np.number):
        return None if learning_rate is None else float(learning_rate)
    if hasattr(learning_rate, "get_config"):
        return [type(learning_rate).__name__, learning_rate.get_config()]
    raise TfhybridInputError(
        "with checkpoint_dir, learning_rate must be None, a number or a Keras schedule; got "
        f"{learning_rate!r}")


def _full_resolution_stage(posterior: LensPosterior, initial_state, num_starts, seed, method,
                           num_steps, learning_rate, rtol, progress, jit_compile, prune_after,
                           prune_margin, t_coarse, global_search, jumps, jump_stage,
                           start_factor, scale_jumps, jump_steps):
    """:func:`fit_map`'s optimiser at full resolution from ``initial_state`` (its best start
    per system), then the source-scale jumps with ``jump_stage="full"``: the :class:`LensMap`
    and the wall seconds of the stages so far."""
    import time

    state = initial_state if initial_state is not None else posterior.initial_states(
        num_starts, seed
    )
    if len(state) != len(STATE_NAMES):
        raise TfhybridInputError(f"initial_state must have {len(STATE_NAMES)} parts {STATE_NAMES}")
    lr = _default_learning_rate(num_steps) if learning_rate is None else learning_rate
    t0 = time.perf_counter()
    res = find_map(
        posterior.target_log_prob, list(state), bijectors=posterior.bijectors(), method=method,
        num_steps=num_steps, learning_rate=lr, rtol=rtol, progress=progress,
        jit_compile=jit_compile, prune_after=prune_after if method == "adam" else None,
        prune_margin=prune_margin, prune_grouped=bool(jit_compile),
    )
    wall = time.perf_counter() - t0 + t_coarse
    stages = {"global search": t_coarse, "adam": wall - t_coarse} if global_search else {
        "adam": wall}
    lp = np.asarray(res.log_prob)  # (starts, S)
    if lp.ndim == 1:
        lp = lp[None]
    best = np.argmax(np.where(np.isfinite(lp), lp, -np.inf), axis=0)
    cols = np.arange(lp.shape[1])
    # the winner's index among the initial starts (the kept ones' after pruning)
    best_start = best if res.kept_starts is None else res.kept_starts.reshape(lp.shape)[
        best, cols]
    params = {}
    for name, part in zip(PARAM_NAMES, res.state[:-1], strict=True):
        arr = np.asarray(part, dtype=np.float64).reshape(lp.shape)
        params[name] = arr[best, cols]
    z = np.asarray(res.state[-1], dtype=np.float32).reshape(lp.shape + (-1,))[best, cols]
    fit = LensMap(params, z, lp[best, cols], best_start, res, wall)
    if jumps and jump_stage == "coarse":
        fit.scale_jump = start_factor[best_start, cols]
    elif jumps:  # jump_stage == "full"
        t1 = time.perf_counter()
        steps = max(1, num_steps // 2) if jump_steps is None else int(jump_steps)
        res_j = source_scale_jumps(posterior, fit.state(), scale_jumps, num_steps=steps,
                                   method=method, jit_compile=jit_compile, rtol=rtol,
                                   progress=progress)
        lp_j = np.asarray(res_j.log_prob).reshape(len(scale_jumps), -1)
        lp_j = np.where(np.isfinite(lp_j), lp_j, -np.inf)
        best_j = np.argmax(lp_j, axis=0)
        win = lp_j[best_j, cols] > fit.log_prob
        jumped = [np.asarray(p)[best_j, cols] for p in res_j.state]  # (K, S, ...) → (S, ...)
        for name, part in zip(PARAM_NAMES, jumped[:-1], strict=True):
            fit.params[name] = np.where(win, part.astype(np.float64), fit.params[name])
        fit.z = np.where(win[:, None], jumped[-1].astype(np.float32), fit.z)
        fit.jump_gain = np.where(win, lp_j[best_j, cols] - fit.log_prob, 0.0)
        fit.log_prob = np.where(win, lp_j[best_j, cols], fit.log_prob)
        fit.scale_jump = np.where(win, np.asarray(scale_jumps, np.float64)[best_j], 1.0)
        stages["source-scale jumps"] = time.perf_counter() - t1
        wall += stages["source-scale jumps"]
        fit.wall_time_s = wall
    return fit, stages


def fit_map(
    posterior: LensPosterior,
    num_starts: int = DEFAULT_NUM_STARTS,
    method: str = "adam",
    num_steps: int = DEFAULT_MAP_STEPS,
    learning_rate=None,
    seed: int = 0,
    initial_state=None,
    progress: bool = True,
    jit_compile: bool = True,
    rtol: float = 1e-6,
    coarse_starts: int = DEFAULT_COARSE_STARTS,
    coarse_steps: int = DEFAULT_COARSE_STEPS,
    coarse_factor: int = 4,
    coarse_prune_after: int | None = None,
    coarse_keep: int = 5,
    prune_after: int | None = DEFAULT_PRUNE_AFTER,
    prune_margin: float = DEFAULT_PRUNE_MARGIN,
    scale_jumps=(0.6, 1.6, 2.6),
    jump_steps: int | None = None,
    newton_iter: int = DEFAULT_NEWTON_ITER,
    lbfgs_iter: int = DEFAULT_LBFGS_ITER,
    lbfgs_cycles: int = DEFAULT_LBFGS_CYCLES,
    jump_stage: str = DEFAULT_JUMP_STAGE,
    source_residual: SourceResidualConfig | None = None,
    residual_rounds: int = DEFAULT_RESIDUAL_ROUNDS,
    checkpoint_dir=None,
) -> LensMap:
    """MAP estimate (eq. 26) of every system, multi-start, in one batched graph.

    Parameters
    ----------
    posterior : LensPosterior of ``S`` systems.
    num_starts : starts per system (:meth:`LensPosterior.initial_states`: prior medians, then
        prior draws). Each start costs one more forward model per step.
    method : "adam" (the paper's) or "lbfgs".
    num_steps : Adam steps or L-BFGS iterations.
    learning_rate : Adam rate or Keras schedule (default: polynomial decay 0.03 → 3e-4).
    initial_state : state parts with leading shape ``(num_starts, S)`` (overrides num_starts).
    jit_compile : XLA-compile the full-resolution optimiser chunks (default): on a 2-core CPU an
        Adam step of one system with 2 starts takes 9.7 ms instead of 18.1 ms (benchmark,
        2026-11-25). The coarse stage's graph always runs without XLA (the lens equation inside
        it runs as the simulator's XLA cluster, unless the run is smaller than
        :data:`CLUSTER_MIN_MODEL_STEPS`, as the source-scale jumps of one system are): its batch
        (``coarse_starts`` × S decodes per step) is dominated by the VAE decoder's convolutions,
        which XLA makes slower on CPU (22.5 ms instead of 17.9 ms per step for 16 starts,
        measured with the simulator's cluster).
    coarse_starts : if > 0 (ignored with ``initial_state``), a global search first:
        ``coarse_starts`` starts per system (prior medians, then prior draws) run
        ``coarse_steps`` Adam steps on :func:`coarse_posterior` (``coarse_factor``), and the
        ``num_starts`` best of each system start the full-resolution fit. The lens
        parameters' posterior is multimodal (a wrong Einstein radius or lens centre can fit
        part of the arcs); at 1/16 of the cost per start, the coarse stage explores many more
        basins than full-resolution starts could.
    coarse_prune_after, coarse_keep : after ``coarse_prune_after`` coarse steps only the
        ``coarse_keep`` best coarse starts of each system go on (``find_map``'s successive
        halving; None, the default: all run every step). The coarse start that ends best
        leads early: on the seed-0 and seed-1 study mocks (20 systems) it ranked within the
        first 4 of 16 at step 150 in every system. It does not pay on a 2-core CPU: a coarse
        step of 5 starts costs ~60 % of one of 16 (the non-XLA graph's per-op overhead
        dominates) and the kept starts need a graph of their own: the benchmark system's
        coarse search took 21.7 s instead of 16.3 s (warm compile cache), 22.7 s instead of
        20.6 s (cold), measured while that graph compiled in a background thread (since
        removed: it slowed the first steps twofold).
    prune_after, prune_margin : from full-resolution Adam step ``prune_after`` on, only the
        leading start of each system goes on, at the first chunk's end where it leads the
        others by ``prune_margin`` nats in every system (None: all ``num_starts`` run every
        step; see :data:`tfhybrid.lens.defaults.DEFAULT_PRUNE_AFTER` for the numbers behind
        the defaults). With ``jit_compile`` the starts run one at a time through the one
        compiled graph of a single start per system, before the pruning as after it
        (``find_map``'s ``prune_grouped``): an XLA step of 2 starts costs about two of 1 on a
        CPU, and no second graph is compiled.
    scale_jumps : source-scale factors of :func:`source_scale_jumps`, run when the global
        search ran (not with ``initial_state``; ``()`` turns them off), where ``jump_stage``
        says. With ``jump_stage="full"`` they start from each system's best full-resolution
        optimum and a candidate replaces the estimate where its log p is higher: on the
        10-mock study a jump won in 7 of 10 systems, raising log p by 8–405 nats (2 150 in
        all), for ~15 s per system.
    jump_steps : optimiser steps of each jump candidate (default ``num_steps // 2``; on the
        coarse grid ``coarse_steps``).
    jump_stage : "coarse" (default): the jumps start from each system's best coarse optimum
        and run on the coarse grid, as part of the global search, and their results compete
        with the coarse starts for the ``num_starts`` full-resolution starts; "full": they
        start from the full-resolution optimum, as described above. On the 10-mock study
        (v12 against v9) "coarse" took 488 s instead of 593 s and ended higher in log p by
        +404 nats in all (5 systems higher by 11–215, 5 lower by 5–38); on the benchmark
        system the MAP took 46 s instead of 73 s. (An "inline" stage, where the jumps from
        each system's best coarse start so far restarted its worst coarse starts within the
        coarse search, was measured and removed: on the seed-1 study, log p −26.5 nats in
        all and θ_E and γ both within 1 % in 8/10 instead of 10/10; with the residual, the
        benchmark system's MAP took 86–88 s against 73–84 s.)
    newton_iter : damped Newton iterations with the full Hessian after the optimiser
        (:func:`newton_polish`), which converge the poorly constrained directions that Adam
        leaves short of the mode, then ``lbfgs_iter`` L-BFGS iterations in coordinates whitened
        by that Hessian, which follow the posterior's curved ridges (see :func:`newton_polish`);
        the last Hessian is kept in :attr:`LensMap.hessian`.
    lbfgs_iter : the polish's whitened L-BFGS iterations per run (0: Newton only).
    lbfgs_cycles : at most this many L-BFGS runs, each re-whitened where the last stopped,
        until a run gains less than 1 nat in every system (:func:`newton_polish`).
    source_residual : SourceResidualConfig, optional
        After the white-likelihood MAP, ``residual_rounds`` rounds (default
        :data:`tfhybrid.lens.defaults.DEFAULT_RESIDUAL_ROUNDS`) of: σ_δ per system by the
        evidence at the current estimate (:func:`residual_sigma_by_evidence`), then the
        Newton + L-BFGS polish (same counts; after the first round, one L-BFGS run and no
        Newton iterations, see :func:`polish_with_source_residual`) of the posterior with
        that source-plane residual integrated out (:mod:`tfhybrid.physics.source_residual`).
        The result records ``source_residual``, ``residual_sigma`` and ``residual_gain``;
        its ``log_prob`` and ``hessian`` are the residual posterior's
        (:meth:`LensMap.posterior_of`). Needs ``newton_iter > 0`` and a white
        ``posterior``. The residual polish's value-and-gradient graph is traced and XLA-compiled in
        a background thread while the white polish runs (:func:`_start_residual_polish_graph`): on
        the benchmark system (fresh process, 2-core CPU) the two polishes took ~44 s instead of
        ~49 s, with the same result to the bit.

    checkpoint_dir : directory, optional
        Write each finished stage (global search; full-resolution optimiser with the jumps;
        white polish) there, atomically, and load the stages a previous call with the same
        directory and the same data, model and settings finished, instead of running them
        again (:mod:`tfhybrid.lens.map_checkpoint`): a killed fit of many systems resumes
        where it stopped. Other data or settings: a :class:`TfhybridInputError` naming them.
        :attr:`LensMap.resumed_stages` lists the stages loaded; their
        :attr:`~LensMap.stage_seconds` are those of the run that computed them.

    The wall time of each stage is in :attr:`LensMap.stage_seconds` (``lens fit`` writes it
    to ``map.json``).
    """
    import time

    if not isinstance(posterior, LensPosterior):
        raise TfhybridInputError(f"posterior must be a LensPosterior; got {type(posterior)}")
    if not isinstance(coarse_starts, int | np.integer) or coarse_starts < 0:
        raise TfhybridInputError(f"coarse_starts must be an int >= 0; got {coarse_starts!r}")
    for name, value in (("coarse_prune_after", coarse_prune_after),
                        ("prune_after", prune_after)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise TfhybridInputError(f"{name} must be None or an int >= 1; got {value!r}")
    if not isinstance(coarse_keep, int | np.integer) or coarse_keep < 1:
        raise TfhybridInputError(f"coarse_keep must be an int >= 1; got {coarse_keep!r}")
    # checked here too, so a bad count fails before the global search, not after it
    _check_counts(newton_iter=newton_iter, lbfgs_iter=lbfgs_iter, lbfgs_cycles=lbfgs_cycles)
    scale_jumps = () if scale_jumps is None else tuple(np.ravel(scale_jumps).tolist())
    if not all(np.isfinite(k) and k > 0 for k in scale_jumps):
        raise TfhybridInputError(f"scale_jumps must be factors > 0; got {scale_jumps!r}")
    if jump_stage not in ("full", "coarse"):
        raise TfhybridInputError(f"jump_stage must be 'coarse' or 'full'; got {jump_stage!r}")
    if source_residual is not None:
        if not isinstance(source_residual, SourceResidualConfig):
            raise TfhybridInputError(
                f"source_residual must be a SourceResidualConfig; got {source_residual!r}")
        if posterior.source_residual is not None:
            raise TfhybridInputError(
                "posterior already has a source residual; pass a white posterior with "
                "source_residual=..., or fit the residual posterior without it")
        if newton_iter < 1:
            raise TfhybridInputError("source_residual needs newton_iter >= 1 (its polish)")
        _check_counts(residual_rounds=residual_rounds)
        if residual_rounds < 1:
            raise TfhybridInputError(f"residual_rounds must be >= 1; got {residual_rounds}")
    global_search = coarse_starts > 0 and initial_state is None
    jumps = global_search and len(scale_jumps) > 0
    if global_search:
        if coarse_starts < num_starts:
            raise TfhybridInputError(
                f"coarse_starts ({coarse_starts}) must be >= num_starts ({num_starts})"
            )
        n_pix = posterior.config.n_pix
        if not isinstance(coarse_factor, int | np.integer) or coarse_factor < 1 or (
                n_pix % coarse_factor):
            raise TfhybridInputError(
                f"coarse_factor must be a positive integer dividing the image's side "
                f"({n_pix} pixels); got {coarse_factor!r}: crop the image to a multiple of it")
        if coarse_prune_after is not None and min(coarse_keep, coarse_starts) < num_starts:
            raise TfhybridInputError(
                f"coarse_keep ({coarse_keep}) must be >= num_starts ({num_starts}): the "
                "full-resolution starts are the best coarse ones kept")
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = MapCheckpoint(checkpoint_dir, dict(
            posterior_fingerprint(posterior), num_starts=int(num_starts), method=method,
            num_steps=int(num_steps), learning_rate=_schedule_description(learning_rate),
            seed=int(seed), rtol=float(rtol), jit_compile=bool(jit_compile),
            initial_state_sha1=(None if initial_state is None else array_digest(
                *[np.asarray(p) for p in initial_state])),
            coarse_starts=int(coarse_starts), coarse_steps=int(coarse_steps),
            coarse_factor=int(coarse_factor), coarse_prune_after=coarse_prune_after,
            coarse_keep=int(coarse_keep), prune_after=prune_after,
            prune_margin=float(prune_margin), scale_jumps=list(scale_jumps),
            jump_steps=jump_steps, jump_stage=jump_stage, newton_iter=int(newton_iter),
            lbfgs_iter=int(lbfgs_iter), lbfgs_cycles=int(lbfgs_cycles)))
    t_coarse = time.perf_counter()
    if global_search:
        saved = ckpt.load("global_search") if ckpt is not None else None
        if saved is None:
            initial_state, start_factor = _global_search(
                posterior, num_starts, seed, rtol, progress, coarse_starts, coarse_steps,
                coarse_factor, coarse_prune_after, coarse_keep, scale_jumps, jump_steps,
                jump_stage)
            t_coarse = time.perf_counter() - t_coarse
            if ckpt is not None:
                ckpt.save("global_search", dict(
                    {f"state_{i}": p for i, p in enumerate(initial_state)},
                    start_factor=start_factor, seconds=t_coarse))
        else:
            initial_state = [saved[f"state_{i}"] for i in range(len(STATE_NAMES))]
            start_factor, t_coarse = saved["start_factor"], float(saved["seconds"])
        initial_state = [tf.constant(p) for p in initial_state]
    else:
        t_coarse, start_factor = 0.0, None
    saved = ckpt.load("adam") if ckpt is not None else None
    if saved is None:
        fit, stages = _full_resolution_stage(
            posterior, initial_state, num_starts, seed, method, num_steps, learning_rate, rtol,
            progress, jit_compile, prune_after, prune_margin, t_coarse, global_search, jumps,
            jump_stage, start_factor, scale_jumps, jump_steps)
        if ckpt is not None:
            ckpt.save("adam", dict(
                {f"param_{k}": v for k, v in fit.params.items()}, z=fit.z,
                log_prob=fit.log_prob, best_start=fit.best_start, wall=fit.wall_time_s,
                scale_jump=fit.scale_jump, jump_gain=fit.jump_gain,
                stage_names=np.array(list(stages)), stage_values=np.array(list(stages.values())),
                **map_result_arrays(fit.result)))
    else:
        stages = dict(zip(saved["stage_names"].tolist(), saved["stage_values"].tolist(),
                          strict=True))
        fit = LensMap({k: saved[f"param_{k}"] for k in PARAM_NAMES}, saved["z"],
                      saved["log_prob"], saved["best_start"], map_result_from_arrays(saved),
                      float(saved["wall"]), None, saved.get("scale_jump"),
                      saved.get("jump_gain"))
    best_start, res, wall = fit.best_start, fit.result, fit.wall_time_s
    post_r, compiled = None, None
    saved = ckpt.load("polish") if ckpt is not None and newton_iter > 0 else None
    if saved is not None:
        stages["polish"] = float(saved["seconds"])
        fit = LensMap({k: saved[f"param_{k}"] for k in PARAM_NAMES}, saved["z"],
                      saved["log_prob"], best_start, res, wall + stages["polish"],
                      saved["hessian"], fit.scale_jump, fit.jump_gain)
    elif newton_iter > 0:
        t1 = time.perf_counter()
        if source_residual is not None:  # its polish's graph compiles while this one runs
            post_r, compiled = _start_residual_polish_graph(posterior, fit.state(),
                                                            source_residual)
        parts, lp_best, hess = newton_polish(posterior, fit.state(), num_iter=newton_iter,
                                             lbfgs_iter=lbfgs_iter, lbfgs_cycles=lbfgs_cycles)
        fit = LensMap(
            {name: np.asarray(p, dtype=np.float64) for name, p in
             zip(PARAM_NAMES, parts[:-1], strict=True)},
            np.asarray(parts[-1], dtype=np.float32), lp_best, best_start, res,
            wall + time.perf_counter() - t1, hess, fit.scale_jump, fit.jump_gain,
        )
        stages["polish"] = time.perf_counter() - t1
        if ckpt is not None:
            ckpt.save("polish", dict({f"param_{k}": v for k, v in fit.params.items()},
                                     z=fit.z, log_prob=fit.log_prob, hessian=hess,
                                     seconds=stages["polish"]))
    if source_residual is not None:
        t1 = time.perf_counter()
        if compiled is not None:
            compiled.result()  # re-raises what went wrong there
        fit = polish_with_source_residual(posterior, fit, source_residual, residual_rounds,
                                          newton_iter, lbfgs_iter, lbfgs_cycles,
                                          _residual_posterior=post_r)
        stages["source residual"] = time.perf_counter() - t1
    fit.stage_seconds = stages
    fit.wall_time_s = float(sum(stages.values()))
    fit.resumed_stages = tuple(ckpt.loaded) if ckpt is not None else ()
    return fit


def _start_residual_polish_graph(posterior: LensPosterior, state,
                                 source_residual: SourceResidualConfig):
    """The residual posterior :func:`polish_with_source_residual` will polish, and a future
    tracing and compiling its value-and-gradient graph (:func:`_log_prob_and_grad`) in another
    thread while the white polish (:func:`newton_polish` of ``posterior`` from ``state``) runs.

    The white polish's graph is traced first, here: tracing is Python, which holds the GIL,
    while XLA compilation (the white graph's ~6 s, the residual's ~11 s on a 2-core CPU)
    releases it. σ_δ is a placeholder: the evidence sets it in place before the first call
    that matters (the graph reads it from a variable). From the benchmark system's Adam
    estimate (fresh process, 2-core CPU, 2026-11-25): the white polish took 28–30 s with the
    residual graph compiling beside it (23.5 s alone, 32–37 s compiling that graph first), and
    the residual stage 14–16 s after it; the polishes and the residual stage together took
    ~44 s instead of ~49 s (``fit_map`` from that state 55–57 s instead of 61 s), with the
    same result to the bit. Tracing the residual graph here too (before the thread compiles
    it) was 1–2 s slower; warming the evidence's eager kernels in the thread was slower still
    (its Python contends with the white polish's).
    """
    grid = np.asarray(RESIDUAL_SIGMA_GRID, np.float64)
    post_r = posterior.with_source_residual(
        source_residual, np.full(posterior.num_systems, grid[len(grid) // 2]))
    bijs, u, sizes, flat = _flat_unconstrained(posterior, state)
    # the white graph is traced here, the residual one in the thread, while the white one
    # compiles (tracing is Python and holds the GIL; XLA compilation releases it)
    _log_prob_and_grad(posterior, bijs, u, sizes, log_det=False).get_concrete_function(flat)
    fn = _log_prob_and_grad(post_r, bijs, u, sizes, log_det=False)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfhybrid-compile")
    compiled = pool.submit(fn, flat)
    pool.shutdown(wait=False)
    return post_r, compiled


def polish_with_source_residual(posterior: LensPosterior, fit: LensMap,
                                source_residual: SourceResidualConfig | None = None,
                                rounds: int = DEFAULT_RESIDUAL_ROUNDS,
                                newton_iter: int = DEFAULT_NEWTON_ITER,
                                lbfgs_iter: int = DEFAULT_LBFGS_ITER,
                                lbfgs_cycles: int = DEFAULT_LBFGS_CYCLES,
                                later_cycles: int = DEFAULT_RESIDUAL_LATER_CYCLES,
                                *, _residual_posterior: LensPosterior | None = None
                                ) -> LensMap:
    """A white-likelihood MAP ``fit`` carried over to the posterior with a source residual.

    ``rounds`` times: σ_δ per system by the evidence at the current estimate
    (:func:`residual_sigma_by_evidence`), then :func:`newton_polish` (Newton + whitened L-BFGS)
    of ``posterior.with_source_residual(source_residual, σ_δ)``.

    The first Newton step uses ``fit.hessian`` (the white polish's, when ``fit`` has one)
    instead of evaluating the residual posterior's: on the 30 study mocks the stage took 438 s
    instead of 535 s for the three sets of 10, log p within 3 nats in 26 systems (−11, +3.1,
    +3.7, +16 in the others), r_Ein and γ both within 1 % in 17/30 either way, 68 % coverage
    the same or one system higher.

    A second round (:data:`tfhybrid.lens.defaults.DEFAULT_RESIDUAL_ROUNDS`) re-chooses σ_δ
    where the first polish moved the lens; as σ_δ moves little (~10 %), later rounds skip the
    Newton iterations and start L-BFGS whitened by the previous round's Hessian
    (``newton_polish(num_iter=0, start_hessian=...)``). On the 30 study mocks this lighter
    round reached the full one's log p to within 1 nat in 29 systems (6 nats higher in the
    other), with r_Ein and γ both within 1 % in 17/30 either way and the same 68 % coverage
    (±1 system), at 26–64 s instead of 72–111 s per 10 systems. They make at most
    ``later_cycles`` L-BFGS runs (:data:`tfhybrid.lens.defaults.DEFAULT_RESIDUAL_LATER_CYCLES`,
    1) instead of ``lbfgs_cycles``: on the 30 study mocks of seeds 0–2 (from the same Adam
    estimates, 2026-11-26) one run gave the same MAPs to the bit in 27 systems and 0.7–2.1
    nats lower in 3, with the same scores (r_Ein and γ both within 1 % in 17/30, sandwich
    68 % coverage of r_Ein, θ_E, γ, φ, q 18, 18, 21, 20, 16 of 30); the stage took 819 s
    instead of 892 s for the three sets of 10; on the benchmark system the stage took
    12.4–12.6 s instead of 15.7–18.2 s, and there the second run had gained 1.6 nats (r_Ein
    1.2590 instead of 1.2540, 0.3 posterior σ).

    Returns a :class:`LensMap` whose ``log_prob`` and ``hessian`` are the residual
    posterior's, with ``residual_sigma`` and ``residual_gain`` (the evidence gained in the
    first round) and ``wall_time_s`` increased by this stage.
    ``fit_map(source_residual=...)`` calls it after its own pipeline.
    """
    import time

    source_residual = SourceResidualConfig() if source_residual is None else source_residual
    if posterior.source_residual is not None:
        raise TfhybridInputError("posterior already has a source residual; pass the white one")
    _check_counts(rounds=rounds, lbfgs_iter=lbfgs_iter, lbfgs_cycles=lbfgs_cycles,
                  later_cycles=later_cycles)
    if newton_iter < 1 or rounds < 1:
        raise TfhybridInputError(
            f"rounds and newton_iter must be >= 1; got {rounds!r} and {newton_iter!r}")
    t1 = time.perf_counter()
    first_gain, post_r = None, _residual_posterior
    for k in range(int(rounds)):
        sigma, gain = residual_sigma_by_evidence(posterior, fit.state(), source_residual)
        first_gain = gain if first_gain is None else first_gain
        if post_r is None:
            post_r = posterior.with_source_residual(source_residual, sigma)
        else:  # in place: the polish's graph, traced in the first round, is reused
            post_r._assign_residual_sigma(sigma)
        # round 1: Newton from the white polish's Hessian (if the fit has one); later rounds:
        # σ_δ moved little, the last round's Hessian still whitens L-BFGS
        parts, lp_best, hess = newton_polish(
            post_r, fit.state(), num_iter=0 if k > 0 else newton_iter, lbfgs_iter=lbfgs_iter,
            lbfgs_cycles=later_cycles if k > 0 else lbfgs_cycles, start_hessian=fit.hessian)
        fit = LensMap(
            {name: np.asarray(p, dtype=np.float64) for name, p in
             zip(PARAM_NAMES, parts[:-1], strict=True)},
            np.asarray(parts[-1], dtype=np.float32), lp_best, fit.best_start, fit.result,
            fit.wall_time_s + time.perf_counter() - t1, hess, fit.scale_jump,
            fit.jump_gain, source_residual, sigma, first_gain,
        )
        t1 = time.perf_counter()
    return fit


def _flat_unconstrained(posterior: LensPosterior, state):
    """Bijectors, unconstrained parts, their sizes, and the flat ``(S, D)`` vector of ``state``."""
    bijs = [b if b is not None else tfb.Identity() for b in posterior.bijectors()]
    state = [tf.convert_to_tensor(x, tf.float32) for x in state]
    u = [b.inverse(x) for b, x in zip(bijs, state, strict=True)]
    s = int(state[0].shape[0])
    sizes = [int(np.prod(x.shape[1:])) for x in u]
    flat = tf.concat([tf.reshape(x, [s, -1]) for x in u], axis=1)
    return bijs, u, sizes, flat


def _unflatten(posterior, bijs, u, sizes, x):
    """Flat unconstrained ``lead + (S, D)`` → constrained parts and the bijectors' log-Jacobian."""
    lead = tf.shape(x)[:-1]
    pieces = tf.split(x, sizes, axis=-1)
    parts, log_det = [], 0.0
    for b, p, u_i in zip(bijs, pieces, u, strict=True):
        p = tf.reshape(p, tf.concat([lead, tf.constant(u_i.shape[1:].as_list(), tf.int32)], 0))
        parts.append(b.forward(p))
        log_det = log_det + b.forward_log_det_jacobian(p, event_ndims=u_i.shape.rank - 1)
    return parts, log_det


def _log_prob_and_grad(posterior: LensPosterior, bijs, u, sizes, log_det: bool = True):
    """Compiled ``x ↦ (log p, ∂ log p / ∂x)`` of flat unconstrained states ``(..., S, D)``.

    Eq. 26, plus the bijectors' log-Jacobian with ``log_det`` (the density of the unconstrained
    coordinates, which HMC samples; without it, the objective whose optimum is the MAP of the
    constrained parameters, as :func:`tfhybrid.inference.map.find_map` uses). Built once per
    posterior and traced once per input shape (the state, which the Hessians also use; a Hessian
    chunk when ``chunk_size > 1``), so the Newton iterations reuse the graphs instead of
    retracing them.

    XLA-compiled. On a 2-core CPU (benchmark system, one ``(1, 76)`` state) a value and
    gradient takes ~10 ms instead of ~20 ms as a plain graph (~15 ms instead of ~27 ms with the
    24² source residual), and the source-residual stage took 17–19 s instead of 28–30 s
    (measured 2026-11-25); compiling costs ~5 s (~7.5 s with the residual) on the first call,
    about what tracing the plain graph cost. Earlier releases kept XLA off here because every
    call recompiled (4–5 s each): the PSF convolution and the residual's gram, called as
    nested functions, hid their gradients' static shapes from XLA's constant analysis
    (:mod:`tfhybrid.physics.xla`); they are inlined inside XLA graphs now. Ten systems
    batched: 67 ms instead of 86 ms a call (111 ms instead of 132 ms with the residual).

    Precision: both graphs are float32; their gradients differ by ~1e-3 relative and lie
    ~0.1–0.3 (norm) from a float64 evaluation, but XLA's forward-difference Hessians are
    noisier along the poorly constrained directions (whitened by the float64 Hessian, its
    eigenvalues span [−3.3, 4.0] instead of [−1.0, 1.06]; 1 is exact). On the 30 study mocks
    (from the same Adam estimates) the polished log p moved by −15 to +16.5 nats per system
    (−35 in all), with r_Ein and γ both within 1 % in 17/30 either way and sandwich 68 %
    coverage r_Ein 19, θ_E 18, γ 20, φ 19, q 18, γ₁ 15, γ₂ 15, θ_lens1 17 of 30 (before: 20,
    18, 20, 23, 18, 16, 14, 14).
    """

    # one function per posterior, sign convention and state shape: a posterior polished again
    # (the source-residual rounds, which re-choose σ_δ in place) reuses its graph
    cache = vars(posterior).setdefault("_value_and_gradient_fns", {})
    key = (bool(log_det), tuple(sizes), tuple(tuple(x.shape.as_list()) for x in u))
    if key in cache:
        return cache[key]

    # no tensor-dependent Python control flow: AutoGraph has nothing to convert (and warned
    # that it could not read this closure's source)
    @tf.function(autograph=False, jit_compile=True)
    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            parts, jac = _unflatten(posterior, bijs, u, sizes, x)
            lp = posterior.target_log_prob(*parts) + (jac if log_det else 0.0)
            total = tf.reduce_sum(lp)
        return lp, tape.gradient(total, x)

    cache[key] = fn
    return fn


def _hessian_at(fn, flat, eps: float, chunk_size: int, scheme: str = "forward") -> np.ndarray:
    """Finite-difference Hessian of −log p at flat ``(S, D)`` from the gradients of ``fn``.

    ``scheme="forward"``: the gradient at ``flat`` and at the D points ``flat + eps e_i``
    (D + 1 gradients, error O(eps) in the third derivatives); ``"central"``: at the 2D points
    ``flat ± eps e_i`` (2D gradients, error O(eps²)). With ``chunk_size == 1`` each
    perturbed state is one call of ``fn`` on a ``(S, D)`` state, the shape the polish's own
    log p and gradient use, so no graph is traced or compiled for the Hessian
    (:data:`HESSIAN_THREADS` calls in flight at once); with more, the
    perturbations of all systems are evaluated in ``ceil(n / chunk_size)`` equal chunks of at
    most ``chunk_size`` (one more compiled graph, ``(chunk, S, D)``). The result is
    symmetrised, float64.
    """
    if scheme not in ("forward", "central"):
        raise TfhybridInputError(f"scheme must be 'forward' or 'central'; got {scheme!r}")
    if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise TfhybridInputError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    flat = tf.convert_to_tensor(flat, tf.float32)
    d = int(flat.shape[1])
    eye = tf.eye(d, dtype=flat.dtype) * eps
    rows = [tf.zeros([1, d]), eye] if scheme == "forward" else [eye, -eye]
    n = d + 1 if scheme == "forward" else 2 * d
    if int(chunk_size) == 1:
        deltas = tf.concat(rows, 0)

        def gradient_at(i):
            return fn(flat + deltas[i][None])[1].numpy().astype(np.float64)

        # the calls are independent: HESSIAN_THREADS of them in flight at once, after a first
        # one alone (which traces fn if nothing has yet)
        first = gradient_at(0)
        with ThreadPoolExecutor(HESSIAN_THREADS) as pool:
            grad = np.stack([first, *pool.map(gradient_at, range(1, n))])  # (n, S, D)
    else:
        n_chunks = -(-n // int(chunk_size))
        size = -(-n // n_chunks)  # equal chunks: the padding is less than one row per chunk
        # zero rows pad the last chunk, so that every call has one shape (one compiled graph)
        deltas = tf.concat(rows + [tf.zeros([n_chunks * size - n, d])], 0)
        grad = np.concatenate([
            fn(flat[None] + deltas[i:i + size, None, :])[1].numpy().astype(np.float64)
            for i in range(0, n_chunks * size, size)
        ])[:n]  # (n, S, D)
    if scheme == "forward":
        hess = -(grad[1:] - grad[:1]) / eps  # hess[i, s, j] = -d2 log p / du_i du_j
    else:
        hess = -(grad[:d] - grad[d:]) / (2.0 * eps)
    hess = np.transpose(hess, (1, 0, 2))
    return 0.5 * (hess + np.transpose(hess, (0, 2, 1)))


#: Perturbations per call of a finite-difference Hessian (:func:`laplace_hessian`): 1, i.e.
#: one ``(S, D)`` gradient per perturbation, through the graph the polish's log p and gradient
#: already compiled. Batching perturbations (``(chunk, S, D)``) needs a graph of its own, whose
#: tracing and compilation (the simulator's XLA cluster and its gradient at the new shape) cost
#: more than the batching saves, measured on a 2-core CPU: one system, white posterior, first
#: Hessian 7.3 s with chunks of 39 instead of 1.1 s one by one (later ones 0.56 s instead of
#: 1.1 s; the Newton + L-BFGS polish 15.4 s instead of 11.1 s, the source-residual stage 42.5 s
#: instead of 38.8 s); ten systems, 27.7 s instead of 5.7 s for the first Hessian and 6.0 s
#: instead of 5.7 s for later ones. One by one also holds one state's forward models in memory
#: instead of a chunk's.
HESSIAN_CHUNK = 1

#: Gradient calls of a finite-difference Hessian in flight at once (from Python threads; each
#: call is independent, so the result is bit-identical to one at a time). One call leaves a
#: 2-core CPU partly idle (small ops, the source residual's Cholesky): a Hessian of the
#: benchmark system took 0.82 s instead of 1.28 s with 2 threads (white posterior) and 1.63 s
#: instead of 2.28 s (with the 24² source residual), 1.51 s with 3 (measured 2026-11-25).
#: With the XLA-compiled gradient: 0.50–0.54 s instead of 0.58–0.65 s (white), 0.77–0.86 s
#: instead of 1.07–1.11 s (residual), 0.50 and 0.67 s with 3 threads.
HESSIAN_THREADS = 2


def laplace_hessian(posterior: LensPosterior, state, eps: float = 1e-3,
                    chunk_size: int | None = None, scheme: str = "forward") -> np.ndarray:
    """Hessian of −log p (eq. 26 + log-Jacobian) at ``state`` in unconstrained space: ``(S, D, D)``.

    Finite differences of the gradient (step ``eps``) along the D = 76 unconstrained
    coordinates of each system (12 parameters, then z), forward (D + 1 gradients, the
    default) or central (2D); the perturbed states of all systems are evaluated
    ``chunk_size`` perturbations at a time (default :data:`HESSIAN_CHUNK`; a chunk
    holds ``chunk_size × S`` forward models); symmetrised, float64. Forward
    differences cost half as much, and their difference from central ones is below the
    central differences' own spread, because the likelihood is only piecewise smooth
    (bilinear source interpolation, the decoder's ReLUs) and finite differences of it depend
    on the step: at the benchmark system's MAP, the central Hessian with step 3e-3, whitened
    by the one with step 1e-3, has eigenvalues in [-47, 169] (1 where they agree), the
    forward one (1e-3) in [-3.4, 6.3].
    The Hessian only shapes the polish's steps and HMC's mass matrix, neither of which
    changes the target.
    """
    bijs, u, sizes, flat = _flat_unconstrained(posterior, state)
    chunk_size = HESSIAN_CHUNK if chunk_size is None else chunk_size
    return _hessian_at(_log_prob_and_grad(posterior, bijs, u, sizes), flat, eps, chunk_size,
                       scheme)


def newton_polish(posterior: LensPosterior, state, num_iter: int = DEFAULT_NEWTON_ITER,
                  rel_floor: float = 1e-6, lbfgs_iter: int = DEFAULT_LBFGS_ITER,
                  lbfgs_cycles: int = DEFAULT_LBFGS_CYCLES, start_hessian=None):
    """Damped Newton steps on eq. 26 in unconstrained space, from ``state`` (e.g. Adam's MAP).

    Adam stops short of the mode along the poorly constrained directions (r_Ein–γ–s–z); each
    iteration solves with the full Hessian (:func:`laplace_hessian`, eigenvalues floored as in
    :func:`laplace_whitening`), damped à la Levenberg–Marquardt: eigenvalues ``|λ| + μ`` with
    ``μ`` raised tenfold while log p would decrease and lowered threefold after a success (per
    system). The likelihood is only piecewise smooth (bilinear interpolation), so convergence
    is linear rather than quadratic; a few iterations still close most of the gap Adam leaves.
    It maximises eq. 26 itself (no log-Jacobian), like the optimiser before it, so the result
    is the MAP of the constrained parameters and its log p compares with Adam's.

    Then up to ``lbfgs_iter`` L-BFGS iterations (``tfp.optimizer.lbfgs_minimize``, batched over
    systems) in coordinates whitened by the last Hessian (:func:`laplace_whitening`). The
    posterior's ridges (lens slope and radius against the source's scale, brightness and shape)
    are curved: Newton steps, which model them as straight, stall, while L-BFGS, starting from
    well-scaled coordinates, follows them. HMC started from the Newton result had climbed
    50–250 nats above it in 5 of the 10 study mocks; on that study the polish raises log p by
    up to 526 nats (~70 s for 10 systems) and moves the median MAP error of γ from 1.1 % to
    0.7 % (r_Ein: 3.4 % to 3.0 %). A system keeps its Newton result where L-BFGS does not
    raise log p. One L-BFGS run can stop short on a long ridge (HMC from that polished MAP
    still climbed up to 43 nats above it in 3 of 10 study systems; a second polish gained 39
    and 76 nats in two of them, a third under 4): up to ``lbfgs_cycles`` runs are made, each
    whitened by the Hessian where the last one stopped, until a run gains less than 1 nat in
    every system; that last run's point is not taken (it is within 1 nat), so the Hessian in
    hand is the returned point's and none is evaluated for it.
    ``start_hessian``: an ``(S, D, D)`` curvature of −log p at ``state`` in these coordinates
    to start from instead of evaluating it (e.g. the previous polish's Hessian, under a
    slightly different likelihood): it sets the first Newton step, or with ``num_iter=0`` the
    first L-BFGS run's whitening; any positive-definite approximation serves.
    Returns ``(state, log_prob, hessian)``: constrained state parts with leading axis ``S``, the
    (S,) log posterior there, and the Hessian at the returned point, ready for
    :func:`sample_lens_posterior` (it lacks the log-Jacobian's curvature, a ~1e-5 relative
    change that only affects HMC's preconditioner, not its target).
    """
    _check_counts(num_iter=num_iter, lbfgs_iter=lbfgs_iter, lbfgs_cycles=lbfgs_cycles)
    bijs, u, sizes, flat = _flat_unconstrained(posterior, state)
    fn = _log_prob_and_grad(posterior, bijs, u, sizes, log_det=False)

    def log_prob(x):
        return fn(tf.constant(x, tf.float32))[0].numpy().astype(np.float64)

    def grad(x):
        return fn(tf.constant(x, tf.float32))[1].numpy().astype(np.float64)

    def hessian(x):
        # at the point the returned (constrained, float32) state maps back to, which is where
        # sample_lens_posterior centres its whitening
        parts, _ = _unflatten(posterior, bijs, u, sizes, tf.constant(x, tf.float32))
        return _hessian_at(fn, _flat_unconstrained(posterior, parts)[3], 1e-3, HESSIAN_CHUNK)

    x = flat.numpy().astype(np.float64)
    if start_hessian is not None:
        start_hessian = np.asarray(start_hessian, dtype=np.float64)
        if start_hessian.shape != (x.shape[0], x.shape[1], x.shape[1]) or not np.isfinite(
                start_hessian).all():
            raise TfhybridInputError(
                f"start_hessian must be a finite {(x.shape[0], x.shape[1], x.shape[1])} "
                f"array; got shape {start_hessian.shape}")
    lp = log_prob(x)
    hess = hessian(x) if start_hessian is None else start_hessian
    mu = None
    for _ in range(num_iter):
        lam, vec = np.linalg.eigh(hess)
        mag = np.maximum(np.abs(lam), rel_floor * np.abs(lam).max(-1, keepdims=True) + 1e-30)
        if mu is None:
            mu = 1e-7 * mag.max(-1)
        g_eig = np.einsum("sji,sj->si", vec, grad(x))  # gradient of log p, Hessian eigenbasis
        accepted = np.zeros(len(x), bool)
        for _ in range(8):  # Levenberg–Marquardt: raise the damping of rejected systems
            step = np.einsum("sij,sj->si", vec, g_eig / (mag + mu[:, None]))
            trial = x + step
            lp_trial = log_prob(trial)
            ok = np.isfinite(lp_trial) & (lp_trial >= lp) & ~accepted
            x[ok], lp[ok] = trial[ok], lp_trial[ok]
            accepted |= ok
            if accepted.all():
                break
            mu = np.where(accepted, mu, 10.0 * mu)
        mu = np.where(accepted, mu / 3.0, mu)
        if not accepted.any():
            break
        hess = hessian(x)
    if lbfgs_iter > 0:
        x, lp, hess = _lbfgs_cycles(fn, log_prob, hessian, x, lp, hess, int(lbfgs_iter),
                                    int(lbfgs_cycles), rel_floor)
    if hess is start_hessian:  # nothing replaced the given curvature: evaluate this one's
        hess = hessian(x)
    parts, _ = _unflatten(posterior, bijs, u, sizes, tf.constant(x, tf.float32))
    return parts, lp, hess


def _lbfgs_cycles(fn, log_prob, hessian, x, lp, hess, max_iterations: int, max_cycles: int,
                  rel_floor: float, min_gain: float = 1.0):
    """Up to ``max_cycles`` runs of :func:`_whitened_lbfgs`, each whitened by the Hessian at the
    point the last one reached, until a run gains less than ``min_gain`` nats in every system
    (that run's point is then not taken). A system keeps its point where a run does not raise
    its log p. ``x`` ``(S, D)``, ``lp`` ``(S,)`` and ``hess``
    ``(S, D, D)`` at ``x``; ``log_prob(x)`` and ``hessian(x)`` evaluate them. Returns the three
    at the final point."""
    run = _lbfgs_runner(fn, max_iterations)  # traced once, reused by every cycle
    for _ in range(max_cycles):
        x_l = _whitened_lbfgs(fn, x, laplace_whitening(hess, rel_floor), max_iterations, run)
        lp_l = log_prob(x_l)
        better = np.isfinite(lp_l) & (lp_l > lp)
        # a run gaining under min_gain nats in every system has converged: its point is not
        # taken, so the Hessian already in hand is the returned point's (no new one is paid)
        if not better.any() or np.max(lp_l[better] - lp[better]) < min_gain:
            break
        x, lp = x.copy(), lp.copy()
        x[better], lp[better] = x_l[better], lp_l[better]
        hess = hessian(x)
    return x, lp, hess


def _whitened_lbfgs(fn, x: np.ndarray, amat: np.ndarray, max_iterations: int,
                    run=None) -> np.ndarray:
    """Maximise ``fn``'s log p by L-BFGS over ``w``, with ``x + A w`` (per system); flat ``(S, D)``.

    The systems are independent problems of one batched ``lbfgs_minimize`` call; a system whose
    line search fails keeps its last point. ``fn`` is the polish's compiled value-and-gradient
    function, reused here: :func:`tfhybrid.inference.map.find_map`'s L-BFGS would trace the
    posterior again inside its own graph, which made the Newton-polish test 4x slower
    (67 s instead of 16 s). The L-BFGS loop itself runs as a graph, ``run`` (built by
    :func:`_lbfgs_runner` when not given), calling ``fn`` through ``tf.py_function``.
    """
    x0 = tf.constant(x, tf.float32)
    a = tf.constant(amat, tf.float32)
    run = _lbfgs_runner(fn, int(max_iterations)) if run is None else run
    position = run(x0, a)
    return (x0 + tf.einsum("sij,sj->si", a, position)).numpy().astype(np.float64)


#: one compiled L-BFGS loop per ``max_iterations``, shared by every polish of the process:
#: ``max_iterations`` → (graph, one-element list holding the objective of the running call)
_LBFGS_RUNNERS: dict[int, tuple] = {}


def _lbfgs_runner(fn, max_iterations: int):
    """Compiled ``(x0, A) ↦ argmin_w −log p(x0 + A w)`` by ``tfp.optimizer.lbfgs_minimize``.

    Run eagerly, TFP's L-BFGS costs ~40 ms of Python and small-op overhead per iteration
    (measured on a 2-core CPU with a trivial 76-d objective: 7.5 s for 200 iterations, 0.4 s
    as a graph), as much as the posterior's own evaluations. As a graph, the loop is traced
    once per input shape and ``max_iterations`` for the whole process: ``fn`` is called
    through ``tf.py_function`` and looked up when the graph runs, so the posterior is not
    traced into (nor optimised with) the loop's graph, and every polish (the white one and
    each round with the source residual) reuses the first one's trace instead of tracing
    its own (~1 s each, and TensorFlow's retracing warnings).
    """
    max_iterations = int(max_iterations)
    if max_iterations not in _LBFGS_RUNNERS:
        current = [None]

        def neg_log_prob_and_grad(x0, a, w):  # eager, inside tf.py_function
            lp, g = current[0](x0 + tf.einsum("sij,sj->si", a, w))
            return -lp, -tf.einsum("sij,si->sj", a, g)

        @tf.function(autograph=False)
        def graph(x0, a):
            def objective(w):
                value, grad = tf.py_function(neg_log_prob_and_grad, [x0, a, w],
                                             [tf.float32, tf.float32])
                value.set_shape(w.shape[:1])
                grad.set_shape(w.shape)
                return value, grad

            res = tfp.optimizer.lbfgs_minimize(
                objective, tf.zeros_like(x0), max_iterations=max_iterations,
                num_correction_pairs=20, tolerance=1e-8,
            )
            return res.position

        _LBFGS_RUNNERS[max_iterations] = (graph, current)
    graph, current = _LBFGS_RUNNERS[max_iterations]

    def run(x0, a):
        previous, current[0] = current[0], fn
        try:
            return graph(x0, a)
        finally:
            current[0] = previous

    return run


def laplace_whitening(hess: np.ndarray, rel_floor: float = 1e-6) -> np.ndarray:
    """Matrices ``A`` (S, D, D) with ``A Aᵀ ≈ H⁻¹``: ``u = u_MAP + A w`` makes ``w`` ~ N(0, I).

    Eigenvalues are replaced by ``max(|λ|, rel_floor · max|λ|)`` (SoftAbs-like: a direction of
    negative or vanishing curvature at an unconverged MAP gets a finite, positive width).
    """
    lam, vec = np.linalg.eigh(hess)
    mag = np.abs(lam)
    mag = np.maximum(mag, rel_floor * mag.max(axis=-1, keepdims=True) + 1e-30)
    return vec / np.sqrt(mag)[..., None, :]


def posterior_scale_whitening(fn, flat, amat, step: float = DEFAULT_WHITENING_STEP,
                              floor: float = DEFAULT_WHITENING_FLOOR) -> np.ndarray:
    """Whitening matrices re-measured at the posterior's own scale: ``(S, D, D)``, float64.

    ``u = flat + A w`` whitens the target by the Laplace curvature at the MAP
    (:func:`laplace_whitening` of a finite-difference Hessian with a step of 1e-3). The lens
    posterior is only piecewise smooth (bilinear source interpolation, the decoder's ReLUs), so
    that curvature describes a neighbourhood much smaller than the posterior: on the seed-2
    study MAPs it had 2–15 negative eigenvalues of 76 per system (down to −24 000, against a
    largest of 0.8–44 × 10⁶), which the whitening takes in absolute value, and HMC's draws
    spread up to 10–50× wider than it along some directions. Here the Hessian of −log p in
    ``w`` is taken again by central differences of the gradient with ``step`` (≈ one posterior
    width: 2D gradients, evaluated as :func:`_hessian_at` does), its eigenvalues are floored at
    ``floor``, and ``A ← A V diag(λ)^(-1/2)``. For a Gaussian target the result whitens it
    exactly whatever ``amat`` was (central differences of a linear gradient are exact).

    Opt-in (:func:`sample_lens_posterior`'s ``whitening_step``; ``tfhybrid lens sample
    --whitening-step 1``): it helps some systems and hurts others. Measured 2026-11-26 with
    the 24² residual, 50 + 500 HMC draws from the MAP, the same seed with and without it (ESS
    of r_Ein / γ / q / φ, Laplace whitening → this with floor 2e-3 → with floor 0.05):

    * seed-2 study system 0: 26 / 324 / 35 / 340 → 48 / 328 / 55 / 226 → 11 / 244 / 13 / 111;
    * system 4: 268 / 151 / 227 / 157 → 261 / 321 / 268 / 492 → 66 / 134 / 74 / 59;
    * system 5: 23 / 56 / 13 / 46 → 30 / 349 / 29 / 45 → 22 / 181 / 19 / 76;
    * the demo's system (150 draws): 6.1 / 57 / 6.2 / 25 → 5.7 / 6.0 / 6.2 / 16 (the step
      size adapted to 0.024 instead of 0.13: a direction the floor widened too much) →
      21 / 21 / 35 / 20 (floor 0.3: 15 / 27 / 16 / 14).

    The widest whitened spread of the study draws fell from 25, 9 and 18 to 10, 7 and 7
    Laplace-whitened units with floor 2e-3 (1 would be exact), for 2D = 152 more gradients
    (~2 s per system). One chain of 500 correlated draws estimates such ESS only to a factor of
    ~2 or worse (system 5 sampled alone with the Laplace whitening, 2026-11-26: 22 / 299 / 17 /
    175 against the 23 / 56 / 13 / 46 above), so no floor is established as better than the
    Laplace whitening. Re-whitening by the covariance of 150 warm-up draws did not help either (ESS
    of r_Ein 16 and 6 in two systems): the chain explores too slowly in the Laplace whitening for
    its draws to measure the posterior's widths.

    ``fn``: compiled ``x ↦ (log p, ∂ log p / ∂x)`` on flat ``(S, D)`` states
    (:func:`_log_prob_and_grad`); ``flat``: ``(S, D)`` centre; ``amat``: ``(S, D, D)``.
    """
    if not (np.isfinite(step) and step > 0 and np.isfinite(floor) and floor > 0):
        raise TfhybridInputError(
            f"step and floor must be finite and > 0; got {step!r} and {floor!r}")
    flat = tf.convert_to_tensor(flat, tf.float32)
    a32 = tf.constant(np.asarray(amat), tf.float32)

    def fn_whitened(w):  # (S, D) whitened offsets -> (log p, gradient in w)
        lp, g = fn(flat + tf.einsum("sij,sj->si", a32, w))
        return lp, tf.einsum("sij,si->sj", a32, g)

    hess_w = _hessian_at(fn_whitened, tf.zeros_like(flat), step, HESSIAN_CHUNK, "central")
    lam, vec = np.linalg.eigh(hess_w)
    return np.einsum("sij,sjk->sik", np.asarray(amat, np.float64),
                     vec / np.sqrt(np.maximum(lam, floor))[:, None, :])


def sample_lens_posterior(
    posterior: LensPosterior,
    start: LensMap | list,
    num_results: int = 500,
    num_burnin: int = 50,
    kernel: str = "hmc",
    num_chains: int = 1,
    seed: int = 0,
    checkpoint_dir=None,
    progress: bool = True,
    num_leapfrog_steps: int = 10,
    step_size: float | None = None,
    jit_compile: bool = True,
    precondition: bool = True,
    hessian: np.ndarray | None = None,
    whitening_step: float | None = None,
    whitening_floor: float = DEFAULT_WHITENING_FLOOR,
    pilot_draws: int = 0,
) -> LensSamples:
    """HMC (or NUTS) draws of all parameters and ``z`` of every system, from ``start``.

    The paper's schedule by default: 50 warm-up draws, then 500 draws, starting from the MAP.
    With ``precondition`` (default) the sampler runs in whitened coordinates ``w`` with
    ``u = u_MAP + A w`` (``u`` the bijectors' unconstrained space, ``A Aᵀ`` the inverse Hessian
    at the MAP from :func:`laplace_hessian`; with a ``whitening_step``, re-measured at the
    posterior's scale by :func:`posterior_scale_whitening` with that step and
    ``whitening_floor``, an option that helps some systems' mixing and hurts others'), where
    the 76 correlated parameters of every system have roughly unit, uncorrelated widths: the
    step size starts at 0.15 (unless ``step_size``) and the ``num_burnin`` warm-up draws (if
    ≥ 20) adapt it per system by dual averaging (no mass-matrix adaptation); they are then
    discarded. Without it,
    the engine adapts step size and diagonal mass matrix during ``num_burnin`` steps, which
    with the paper's 50 steps collapsed the step size on the mocks. Chains after the first start
    from the MAP jittered by 0.1 · N(0, 1) in sampler units. ``checkpoint_dir`` makes the run
    resumable (chunks on disk). ``hessian`` (S, D, D) reuses one computed at ``start`` (e.g. by
    :func:`newton_polish`). A ``start`` fitted with a source residual
    (``fit_map(source_residual=...)``) is sampled under that residual posterior
    (:meth:`LensMap.posterior_of`). ``jit_compile`` (default True) XLA-compiles the sampler's
    chunks: on the benchmark system with the 24² residual (2-core CPU, 2026-11-25) a steady
    draw of 10 leapfrog steps took 0.10 s instead of 0.21 s, for ~4 s more compilation in the
    first chunk (20 s instead of 16 s of tracing); on the tests' 64² problem the two cost the
    same.

    ``pilot_draws`` > 0 (with ``precondition``) first runs a pilot chain of ``num_burnin`` +
    ``pilot_draws`` steps (seed + 1) in the Laplace-whitened coordinates and re-whitens by the
    covariance of its draws, shrunk towards the Laplace one by :data:`PILOT_SHRINKAGE` draws'
    worth (``(n C + k I) / (n + k)`` in whitened units): the posterior is wider than its
    curvature at the MAP along some directions, which the pilot sees. Measured on the demo
    system (2-core CPU, 24² residual, 50 + 500 draws): ESS of r_Ein 11 → 46, γ 30 → 79, q 10 →
    42, φ 232 → 179, for a pilot of 150 draws costing 40 s next to the run's 67–88 s; on a
    second system r_Ein 26 → 49 and q 26 → 47, but on a third r_Ein 178 → 17 and q 133 → 17
    (the pilot sees only part of a sticky posterior): off by default. With
    ``checkpoint_dir`` the pilot's chunks are kept in ``checkpoint_dir/pilot``.
    """
    if isinstance(pilot_draws, bool) or not isinstance(pilot_draws, int | np.integer) or (
            pilot_draws < 0):
        raise TfhybridInputError(f"pilot_draws must be an int >= 0; got {pilot_draws!r}")
    if pilot_draws and not precondition:
        raise TfhybridInputError("pilot_draws re-whitens the Laplace whitening: it needs "
                                 "precondition=True")
    # both checked here, before any Hessian is read or evaluated
    if whitening_step is not None and not (np.isfinite(whitening_step) and whitening_step > 0):
        raise TfhybridInputError(
            f"whitening_step must be None or finite and > 0; got {whitening_step!r}")
    if not (np.isfinite(whitening_floor) and whitening_floor > 0):
        raise TfhybridInputError(
            f"whitening_floor must be finite and > 0; got {whitening_floor!r}")
    if isinstance(start, LensMap):
        state = start.state()
        if hessian is None:
            hessian = start.hessian
        if posterior.source_residual is None:
            posterior = start.posterior_of(posterior)  # the posterior the MAP was made under
    else:
        state = [tf.convert_to_tensor(x, tf.float32) for x in start]
    bijs, u, sizes, flat = _flat_unconstrained(posterior, state)
    if precondition:
        hess = laplace_hessian(posterior, state) if hessian is None else np.asarray(hessian)
        want = (int(flat.shape[0]), int(flat.shape[1]), int(flat.shape[1]))
        if hess.shape != want:
            raise TfhybridInputError(
                f"hessian must have shape {want} (systems, unconstrained dims, same); "
                f"got {hess.shape}"
            )
        amat = laplace_whitening(hess)
        if whitening_step is not None:
            # eq. 26 without the log-Jacobian (whose curvature is ~1e-5 relative): the program
            # the MAP's polish compiled, which XLA's compile cache (on in the CLI) then serves
            amat = posterior_scale_whitening(
                _log_prob_and_grad(posterior, bijs, u, sizes, log_det=False), flat, amat,
                whitening_step, whitening_floor)
        amat = tf.constant(amat, tf.float32)
    else:
        amat = tf.eye(int(flat.shape[1]), batch_shape=[int(flat.shape[0])])

    def whitened(amat):
        """``(to_unconstrained, target)`` for ``u = flat + A w`` (fresh functions per ``A``:
        the sampler's compiled programs are cached by the target function)."""
        def to_unconstrained(w):
            return flat + tf.einsum("sij,...sj->...si", amat, w)

        def target(w):
            parts, log_det = _unflatten(posterior, bijs, u, sizes, to_unconstrained(w))
            return posterior.target_log_prob(*parts) + log_det

        return to_unconstrained, target

    # In whitened coordinates the posterior is close to N(0, I): a step of 0.15 (HMC's optimum
    # scales as d^(-1/4) = 0.34 for d = 76) suits most systems, and adapting the mass matrix
    # from the few, correlated warm-up draws of the paper's schedule is what collapsed the step
    # size (a window without an accepted move estimates zero variance). But the likelihood is
    # only piecewise smooth, and in some systems the Laplace widths are off by a factor of a
    # few: one of 10 study systems never accepted a move at 0.15. So the warm-up adapts the
    # step size alone, per system (dual averaging, TFP's per-chain rule with a (S, 1) step).
    n_sys = int(flat.shape[0])
    adapt_step = precondition and int(num_burnin) >= 20
    if precondition:
        step0 = 0.15 if step_size is None else step_size
        if adapt_step and np.ndim(step0) == 0:
            step0 = np.full((n_sys, 1), float(step0), np.float32)
    else:
        step0 = step_size

    # the sampler's state is the whitened offset from the MAP: the chunks depend on the data,
    # the model, the MAP and the whitening, none of which its start shows (digested once)
    fingerprint = None if checkpoint_dir is None else dict(
        posterior_fingerprint(posterior), map_sha1=array_digest(flat.numpy()))

    def run(amat, num_draws, run_seed, directory):
        to_unconstrained, target = whitened(amat)
        res = sample_posterior(
            target, tf.zeros_like(flat), num_results=num_draws, num_burnin=num_burnin,
            kernel=kernel, num_chains=num_chains, seed=run_seed, checkpoint_dir=directory,
            progress=progress, num_leapfrog_steps=num_leapfrog_steps, jit_compile=jit_compile,
            names=["w"], adapt=("step_size" if adapt_step else False) if precondition else True,
            step_size=step0,
            checkpoint_config=None if directory is None else dict(
                fingerprint, whitening_sha1=array_digest(amat.numpy())),
        )
        return res, to_unconstrained

    pilot = None
    if pilot_draws:
        pilot, _ = run(amat, int(pilot_draws), int(seed) + 1,
                       None if checkpoint_dir is None else Path(checkpoint_dir) / "pilot")
        amat = tf.constant(pilot_whitening(amat.numpy(), pilot.samples[0]), tf.float32)
    res, to_unconstrained = run(amat, num_results, seed, checkpoint_dir)
    draws = tf.constant(res.samples[0], tf.float32)  # (R, C, S, D)
    parts, _ = _unflatten(posterior, bijs, u, sizes, to_unconstrained(draws))
    params = {name: np.asarray(p, dtype=np.float64)
              for name, p in zip(PARAM_NAMES, parts[:-1], strict=True)}
    return LensSamples(params, np.asarray(parts[-1]), res, pilot)


#: how many draws' worth the pilot's covariance is shrunk towards the Laplace whitening
PILOT_SHRINKAGE = 10.0


def pilot_whitening(amat: np.ndarray, draws: np.ndarray,
                    shrinkage: float = PILOT_SHRINKAGE) -> np.ndarray:
    """Whitening matrices ``A L`` ``(S, D, D)`` from a pilot chain run with ``A``: ``L`` the
    Cholesky factor of the draws' covariance in whitened units ``C`` (``draws`` ``(R, C, S,
    D)``, all chains), shrunk as ``(n C + k I) / (n + k)`` with ``n`` the number of draws and
    ``k`` = ``shrinkage``; used by :func:`sample_lens_posterior` (``pilot_draws``)."""
    draws = np.asarray(draws, np.float64)
    flat = draws.reshape((-1,) + draws.shape[2:])  # (n, S, D)
    n, d = flat.shape[0], flat.shape[-1]
    centred = flat - flat.mean(axis=0)
    cov = np.einsum("nsi,nsj->sij", centred, centred) / max(n - 1, 1)
    blended = (n * cov + shrinkage * np.eye(d)) / (n + shrinkage)
    return np.einsum("sij,sjk->sik", np.asarray(amat, np.float64),
                     np.linalg.cholesky(blended))


def parameter_table(truth: dict | None, fit: LensMap, samples: LensSamples | None = None,
                    names=("r_ein", "theta_e", "gamma", "phi", "q", "gamma1", "gamma2",
                           "theta_lens1", "theta_lens2"), robust=None,
                    adjusted: LensSamples | None = None) -> list[dict]:
    """Rows (one per system and parameter): true, MAP, posterior mean ± std, per cent errors.

    ``names`` may include the derived ``theta_e`` (:func:`with_derived`).

    ``error_map_pct`` = 100 (MAP − true) / |true|; ``bias_sigma`` = (mean − true) / std;
    ``lo68, hi68``: the central 68 % interval and ``covered_68`` whether it holds the truth. For
    φ, "true" is the equivalent value φ_true + kπ nearest the estimate
    (:func:`equivalent_truth`). ``robust``: a :class:`tfhybrid.lens.robust.RobustIntervals`
    at the MAP adds ``sd_robust``, ``lo68_robust``, ``hi68_robust`` and ``covered_68_robust``
    (the model-robust sandwich interval). ``adjusted``: the draws of
    :func:`tfhybrid.lens.robust.sandwich_adjusted_samples` add ``std_adjusted``,
    ``lo68_adjusted``, ``hi68_adjusted`` and ``covered_68_adjusted``.
    """
    rows = []
    mean = samples.mean() if samples is not None else None
    std = samples.std() if samples is not None else None
    intervals = samples.interval(0.68) if samples is not None else None
    robust_bounds = robust.interval(0.68) if robust is not None else None
    adj_bounds = adjusted.interval(0.68) if adjusted is not None else None
    adj_std = adjusted.std() if adjusted is not None else None
    adj_mean = adjusted.mean() if adjusted is not None else None
    n = len(fit.log_prob)
    fit_params = with_derived(fit.params)
    truth = None if truth is None else with_derived(truth)
    for i in range(n):
        for name in names:
            row = dict(system=i, parameter=name, map=float(fit_params[name][i]))
            if truth is not None:
                ref = mean[name][i] if mean is not None else row["map"]
                t = float(equivalent_truth(name, np.asarray(truth[name])[i], ref))
                row["true"] = t
                row["error_map_pct"] = 100.0 * (row["map"] - t) / max(abs(t), 1e-12)
            if mean is not None:
                row["mean"] = float(mean[name][i])
                row["std"] = float(std[name][i])
                if truth is not None:
                    row["error_mean_pct"] = 100.0 * (row["mean"] - row["true"]) / max(
                        abs(row["true"]), 1e-12)
                    row["bias_sigma"] = (row["mean"] - row["true"]) / max(row["std"], 1e-30)
                lo, hi = (float(np.asarray(v)[i]) for v in intervals[name])
                row["lo68"], row["hi68"] = lo, hi
                if truth is not None:
                    row["covered_68"] = bool(lo <= row["true"] <= hi)
            if robust_bounds is not None and name in robust_bounds:
                lo, hi = (float(np.asarray(v)[i]) for v in robust_bounds[name])
                row["sd_robust"] = float(robust.sd[name][i])
                row["lo68_robust"], row["hi68_robust"] = lo, hi
                if truth is not None:
                    t = float(equivalent_truth(name, np.asarray(truth[name])[i],
                                               row["map"]))
                    row["covered_68_robust"] = bool(lo <= t <= hi)
            if adj_bounds is not None and name in adj_bounds:
                lo, hi = (float(np.asarray(v)[i]) for v in adj_bounds[name])
                row["std_adjusted"] = float(adj_std[name][i])
                row["lo68_adjusted"], row["hi68_adjusted"] = lo, hi
                if truth is not None:
                    t = float(equivalent_truth(name, np.asarray(truth[name])[i],
                                               adj_mean[name][i]))  # as coverage_flags
                    row["covered_68_adjusted"] = bool(lo <= t <= hi)
            rows.append(row)
    return rows


def coverage_flags(truth: dict, samples: LensSamples, probability: float = 0.68,
                   names=("r_ein", "theta_e", "gamma", "phi", "q")) -> dict:
    """Per name, ``(S,)`` booleans: does system ``i``'s central ``probability`` interval
    contain its truth? φ's truth is taken on the branch (φ_true + kπ) nearest the posterior
    mean; ``theta_e`` is derived (:func:`with_derived`). Pool them over studies and test them
    with :func:`tfhybrid.inference.diagnostics.coverage_test`."""
    truth = with_derived(truth)
    intervals = samples.interval(probability)
    mean = samples.mean()
    out = {}
    for name in names:
        lo, hi = intervals[name]
        t = equivalent_truth(name, truth[name], mean[name])
        out[name] = np.asarray((t >= lo) & (t <= hi), dtype=bool)
    return out


def coverage(truth: dict, samples: LensSamples, probability: float = 0.68,
             names=("r_ein", "theta_e", "gamma", "phi", "q")) -> dict:
    """Fraction of systems whose central ``probability`` interval contains the truth, per name
    (the mean of :func:`coverage_flags`)."""
    return {name: float(np.mean(flags)) for name, flags in
            coverage_flags(truth, samples, probability, names).items()}


def format_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`parameter_table` rows."""
    cols = [c for c in ("system", "parameter", "true", "map", "error_map_pct", "mean", "std",
                        "error_mean_pct", "bias_sigma") if any(c in r for r in rows)]
    lines = ["  ".join(f"{c:>14s}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:>14.5g}" if isinstance(v, float) else f"{v!s:>14s}")
        lines.append("  ".join(cells))
    return "\n".join(lines)

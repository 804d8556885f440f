"""Deblending by block-wise proximal gradient: the deep-prior fit and the SCARLET baseline.

Solves eq. 7 of Lanusse, Melchior & Moolekamp (2019, 000_*)::

    argmin_{A,S} ½‖y − P Σ_k A_kᵀ S_k‖²_Σ⁻¹ − Σ_k log p_θ(S_k) + ι_{≥0}(A) + ι_{≥0}(S)

with :func:`tfhybrid.inference.proximal.proximal_gradient` (eq. 5, FISTA), block-wise: the
SEDs ``A`` (N, K, B) first, then the morphologies ``S`` (N, K, h, w), for N scenes at once
(one graph: the loss is the sum over scenes, so every scene's gradient is its own).

Two methods on the same solver, the same likelihood, the same steps:

* ``"deep"`` — the paper: PixelCNN++ log-prior ``log p_θ(S_k)`` (Gaussian conditionals,
  :mod:`tfhybrid.priors.pixelcnn`) in the smooth part, positivity as proxes.
* ``"scarlet"`` — the baseline of App. A: no learned prior; positivity, 180° symmetry and
  radial monotonicity about the box centre as proxes (:mod:`tfhybrid.inference.proxes`).

Normalisation (the A/S scale degeneracy of eq. 6): the prior is evaluated on
``S_k / max S_k``, i.e. on exactly what it was trained on (peak-normalised 32×32 stamps at
0.168″/pixel with a 0.6″ Gaussian PSF, :class:`tfhybrid.deblend.scene.ModelFrame`), so the
whole loss is invariant under ``(c A_k, S_k / c)``; every ``check_every`` iterations and at the
end the pair is rescaled jointly to ``max S_k = 1`` (:func:`normalize_scale`), which leaves the
loss unchanged and puts all flux in the SED. (SCARLET's own code normalises inside the
morphology prox instead; that changes the loss at every step and we measured χ² rising over
the iterations of a misspecified scene with it, so the exact joint rescaling is used.)

Boxes vs the prior's stamp: every source box has ``ModelFrame.box_size`` pixels (default 32 =
the stamp). A smaller box is zero-padded, centred, to the stamp before the prior sees it (the
prior's stamps have near-zero borders, so this is what it was trained on); for a larger box the
prior sees the central stamp and the outer ring is constrained by positivity only
(:func:`prior_window`).

Step sizes (eq. 5 needs λ ≤ 1/L): per element, from a diagonal majoriser of the likelihood
Hessian. For a quadratic ½xᵀHx whose H is dominated elementwise by a non-negative H⁺,
``D = H⁺·1`` (row sums) satisfies ``diag(D) ⪰ H`` (Gershgorin), and ``H⁺·1`` is one
gradient of the model built with ``|kernel|``: ``∇_x ½‖P⁺ M(1)‖²_W``. This gives SCARLET's
per-source steps (bright sources take small steps, faint ones large) and stays exact as the
sources move, at the cost of one extra backward pass per block. The prior's curvature is added
to the S step, re-estimated every ``check_every`` iterations, in one of two ways
(``DeblendConfig.prior_step``):

* ``"diagonal"`` (default): per pixel, ``safety · w / σ_i²`` with σ_i the PixelCNN's own
  conditional scale at pixel i (its term −log N(x_i; μ_i, σ_i) has curvature 1/σ_i²). The
  shipped prior (trained with noise 0.005 in peak units) has σ ≈ 0.005 on the background but
  σ ≈ 0.025 on the galaxy, so its curvature varies 25× across a stamp. A single Lipschitz
  constant per source (the other option) is set by the stiff background (measured ≈ 7·10⁴,
  ≈ 2× the largest 1/σ²) and makes the steps on the galaxy, where the likelihood must do the
  work, 10–50× too small: with it and 100 iterations the deep fit ended with a HIGHER eq. 7
  loss than the true scene (not converged), which was most of the reason deep mode lagged.
  The off-diagonal part (μ_j depending on x_i) is covered by the safety factor 2.
* ``"lipschitz"``: ``L_prior`` per source from power iteration on finite-difference
  Hessian–vector products of −log p_θ (:func:`tfhybrid.inference.proximal.
  lipschitz_power_iteration`), times the safety factor; the only choice for priors that do not
  expose their conditionals (``pixel_params``).

(Projections such as symmetry and monotonicity are applied in the Euclidean metric, as
SCARLET does.)

Initialisation: the paper takes the number of sources and first positions from an external
detection (§3) and uses "the same code base" as SCARLET (App. A). Deep mode starts from
``init_iter`` (default 50) baseline iterations (SCARLET proxes, no learned prior) run from the
detection cutouts, then fits eq. 7 with the prior. Reason (measured on simulated HSC scenes):
the detection cutout of a blended source contains its neighbours' light, and that blend is a
local minimum of −log p_θ that gradient steps leave only slowly; from the detection start the
deep fit ended at a higher eq. 7 loss than the baseline's own solution on some scenes. The
baseline solution has the neighbours mostly removed, and the prior then refines the
morphologies (asymmetric, non-monotonic structure) from there.

Convergence: the relative change of both blocks below ``rtol``; otherwise the result says
NOT converged and reports χ²/pixel instead of failing (scarlet2's habit).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from tfhybrid.deblend.scene import ModelFrame, Observation, validate_centres
from tfhybrid.inference.proxes import (
    chain_proxes,
    prox_monotonic,
    prox_positive,
    prox_symmetric,
)
from tfhybrid.inference.proximal import lipschitz_power_iteration, proximal_gradient
from tfhybrid.physics.psf import FFTConvolution, difference_kernel
from tfhybrid.physics.scene import box_corners, render_components, scene_model
from tfhybrid.validation import TfhybridInputError

__all__ = [
    "METHODS",
    "DeblendConfig",
    "DeblendResult",
    "prior_window",
    "normalize_scale",
    "deblend",
    "deblend_batch",
    "initial_morphologies",
]

METHODS = ("deep", "scarlet")


@dataclass(frozen=True)
class DeblendConfig:
    """Settings of the eq. 7 fit.

    Attributes
    ----------
    method : "deep" (PixelCNN++ prior + positivity) or "scarlet" (symmetry + monotonicity +
        positivity, no learned prior).
    frame : the model frame (pixel scale, model PSF, box size).
    max_iter : maximum proximal-gradient iterations (both blocks = one iteration).
    rtol : stop when the relative change of A and of S is below this.
    check_every : iterations per compiled chunk; progress, convergence test and the prior's
        Lipschitz estimate are refreshed between chunks (FISTA momentum restarts there).
    prior_weight : multiplies log p_θ (1 = the paper's eq. 7).
    prior_lipschitz_iter : power iterations for the prior's curvature.
    prior_lipschitz_safety : factor applied to the prior's curvature estimate (it is local;
        the loss is not convex in S under the prior).
    prior_step : how the prior's curvature enters the S step (eq. 5 needs λ ≤ 1/L):
        "diagonal" (default) per pixel, ``safety · w / σ_i²`` from the PixelCNN's own
        conditional scales (falls back to "lipschitz" for priors without ``pixel_params``);
        "lipschitz": one number per source from power iteration (``prior_lipschitz_iter``).
    init_iter : deep mode only: iterations of the baseline (SCARLET proxes, no learned prior)
        run from the detection start before the deep fit (its ``max_iter`` come on top);
        0 starts the deep fit from the detection cutouts.
    accelerate : FISTA momentum with adaptive restart.
    jit_compile : XLA-compile the solver chunk (measure; see benchmarks/bench_deblend.py).
    """

    method: str = "deep"
    frame: ModelFrame = field(default_factory=ModelFrame)
    max_iter: int = 300
    rtol: float = 1e-4
    check_every: int = 50
    prior_weight: float = 1.0
    prior_lipschitz_iter: int = 10
    prior_lipschitz_safety: float = 2.0
    prior_step: str = "diagonal"
    init_iter: int = 50
    accelerate: bool = True
    jit_compile: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise TfhybridInputError(f"method must be one of {METHODS}; got {self.method!r}")
        if int(self.max_iter) < 1 or int(self.check_every) < 1:
            raise TfhybridInputError(
                f"max_iter and check_every must be >= 1; got {self.max_iter}, {self.check_every}"
            )
        if self.prior_step not in ("diagonal", "lipschitz") or int(self.init_iter) < 0:
            raise TfhybridInputError(
                "prior_step must be 'diagonal' or 'lipschitz' and init_iter >= 0; got "
                f"{self.prior_step!r}, {self.init_iter}"
            )
        if not self.rtol > 0 or not self.prior_weight >= 0 or not self.prior_lipschitz_safety > 0:
            raise TfhybridInputError(
                "rtol and prior_lipschitz_safety must be > 0 and prior_weight >= 0; got "
                f"{self.rtol}, {self.prior_lipschitz_safety}, {self.prior_weight}"
            )


@dataclass(frozen=True)
class DeblendResult:
    """The fitted scene (NumPy arrays; K sources, B bands, boxes h × w).

    Attributes
    ----------
    seds : (K, B) SEDs A_k (flux per unit peak-normalised morphology).
    morphs : (K, h, w) morphologies S_k in the model frame, max 1.
    fluxes : (K, B) source fluxes per band, A_kb · Σ S_k (model frame, flux-conserving P).
    centres_xy : (K, 2) centres (x, y) pixels used; corners : (K, 2) box corners (y0, x0).
    model : (B, ny, nx) observed-frame model; components : (K, B, ny, nx) per source.
    residual : (B, ny, nx) data − model (0 where masked).
    chi2_per_pixel : Σ w r² / number of unmasked pixels.
    log_prior : (K,) log p_θ(S_k) in nats when a prior was given, else None.
    num_iter, converged, message : solver outcome; loss_trace : (num_iter,) smooth loss.
    method, bands : what was fitted.
    """

    seds: np.ndarray
    morphs: np.ndarray
    fluxes: np.ndarray
    centres_xy: np.ndarray
    corners: np.ndarray
    model: np.ndarray
    components: np.ndarray
    residual: np.ndarray
    chi2_per_pixel: float
    log_prior: np.ndarray | None
    num_iter: int
    converged: bool
    message: str
    loss_trace: np.ndarray
    method: str
    bands: tuple
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: method, sources, iterations, convergence, χ²/pixel, time."""
        state = "converged" if self.converged else "NOT converged"
        return (
            f"{self.method}: {len(self.seds)} sources, {self.num_iter} iterations ({state}), "
            f"chi2/pixel {self.chi2_per_pixel:.3f}, {self.seconds:.1f} s"
        )


def prior_window(morphs: tf.Tensor, stamp: int) -> tf.Tensor:
    """The ``(…, stamp, stamp)`` window of ``(…, h, w)`` boxes that the prior evaluates.

    Box centre pixel ``(h // 2, w // 2)`` goes to the stamp's ``(stamp // 2, stamp // 2)``:
    smaller boxes are zero-padded, larger ones cropped (the ring outside is prior-free).
    """
    h, w = int(morphs.shape[-2]), int(morphs.shape[-1])
    if (h, w) == (stamp, stamp):
        return morphs
    out = morphs
    rank = morphs.shape.rank
    pads = []
    for n in (h, w):
        before = stamp // 2 - n // 2
        pads.append((before, stamp - n - before))
    crop = [(max(-a, 0), max(-b, 0)) for a, b in pads]
    pad = [(max(a, 0), max(b, 0)) for a, b in pads]
    if any(c for pair in crop for c in pair):
        out = out[..., crop[0][0] : h - crop[0][1], crop[1][0] : w - crop[1][1]]
    if any(p for pair in pad for p in pair):
        out = tf.pad(out, [[0, 0]] * (rank - 2) + [list(pad[0]), list(pad[1])])
    return out


def normalize_scale(seds, morphs):
    """Remove the A/S scale degeneracy of eq. 6: ``S_k ← S_k / max S_k``, ``A_k ← A_k max S_k``.

    The model ``A_kᵀ S_k`` and the (scale-free) loss are unchanged; the morphology ends with
    peak 1, the normalisation of the prior's training stamps, and all flux is in the SED.
    Sources whose morphology is identically zero are left as they are.
    """
    peak = tf.reduce_max(morphs, axis=[-2, -1])
    safe = tf.where(peak > 0, peak, tf.ones_like(peak))
    return seds * safe[..., None], morphs / safe[..., None, None]


def _rel_change(new, old) -> float:
    new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
    return float(np.linalg.norm(new - old) / (np.linalg.norm(new) + 1e-30))


def _prior_stamp(prior) -> int:
    shape = prior.event_shape
    if len(shape) != 2 or shape[0] != shape[1]:
        raise TfhybridInputError(f"the prior must be over square stamps; event_shape {shape}")
    return int(shape[0])


def initial_morphologies(detection: np.ndarray, corners: np.ndarray, box: int) -> np.ndarray:
    """SCARLET-style start: the detection-image cutout, positive, symmetric, monotonic, max 1.

    Parameters
    ----------
    detection : (N, ny, nx) detection images; corners : (N, K, 2) box corners (y0, x0).

    Returns
    -------
    (N, K, box, box) float32; a cutout with no positive centre becomes the model-frame-sized
    Gaussian of σ = 2 pixels.
    """
    n, ny, nx = detection.shape
    pad = np.pad(detection, ((0, 0), (box, box), (box, box)))
    k = corners.shape[1]
    iy = corners[..., 0][..., None] + box + np.arange(box)  # (N, K, box)
    ix = corners[..., 1][..., None] + box + np.arange(box)
    cut = pad[np.arange(n)[:, None, None, None], iy[..., :, None], ix[..., None, :]]
    cut = np.clip(cut, 0.0, None).astype(np.float32)
    s = prox_monotonic(prox_symmetric(tf.constant(cut))).numpy()
    peak = s.max(axis=(-2, -1), keepdims=True)
    yy, xx = np.mgrid[:box, :box] - box // 2
    blob = np.exp(-0.5 * (yy**2 + xx**2) / 4.0).astype(np.float32)
    s = np.where(peak > 0, s / np.where(peak > 0, peak, 1.0), blob)
    return s.reshape(n, k, box, box).astype(np.float32)


def _initial_seds(data, weights, morphs, corners, kernels, mask):
    """Weighted least-squares SEDs for fixed morphologies, per scene and band, clipped ≥ 0."""
    n, k = morphs.shape[:2]
    b = data.shape[1]
    comp = render_components(
        np.ones((n, k, b), np.float32), morphs, corners, data.shape[-2:], kernels
    ).numpy().astype(np.float64)  # (N, K, B, ny, nx)
    comp *= mask[:, :, None, None, None]
    w = weights[:, None].astype(np.float64)
    gram = np.einsum("nkbyx,njbyx->nbkj", comp * w, comp)
    rhs = np.einsum("nkbyx,nbyx->nbk", comp * w, data.astype(np.float64))
    ridge = 1e-6 * np.trace(gram, axis1=-2, axis2=-1)[..., None, None] / max(k, 1) + 1e-30
    sol = np.linalg.solve(gram + ridge * np.eye(k), rhs[..., None])[..., 0]  # (N, B, K)
    seds = np.transpose(sol, (0, 2, 1))
    # A source with a non-positive LS amplitude would get no gradient on S: keep a small floor
    # set by the data at its centre.
    peak_comp = comp.max(axis=(-2, -1))  # (N, K, B)
    cy = np.clip(corners[..., 0] + morphs.shape[-2] // 2, 0, data.shape[-2] - 1)
    cx = np.clip(corners[..., 1] + morphs.shape[-1] // 2, 0, data.shape[-1] - 1)
    centre_val = data[np.arange(n)[:, None], :, cy, cx]  # (N, K, B)
    sigma = 1.0 / np.sqrt(np.maximum(weights.max(axis=(-2, -1)), 1e-30))  # (N, B)
    floor = 0.1 * np.maximum(centre_val, sigma[:, None, :]) / np.maximum(peak_comp, 1e-12)
    seds = np.maximum(seds, floor) * mask[..., None]
    return seds.astype(np.float32)


def _has_pixel_scales(prior) -> bool:
    return hasattr(prior, "pixel_params") and hasattr(prior, "config")


def _prior_pixel_scales(prior, x):
    """σ_i(x_<i) of a Gaussian PixelCNN's conditionals, ``(b, n, n)``; the smallest component's
    for a mixture (its largest curvature)."""
    from tfhybrid.priors.pixelcnn import gaussian_head

    cfg = prior.config
    _, _, scale = gaussian_head(prior.pixel_params(x), cfg.num_mixtures, cfg.scale_floor)
    return tf.reduce_min(scale, axis=-1)


@functools.lru_cache(maxsize=32)
def _solver(method: str, prior, frame_shape, config_key, n_iter: int):
    """Compiled chunk of the block proximal gradient, cached per static configuration."""
    (prior_weight, lip_iter, lip_safety, accelerate, jit_compile, stamp, prior_step) = config_key

    # No normalisation inside the prox: the likelihood is invariant under (c A_k, S_k / c) and
    # the prior is evaluated on S_k / max S_k, so the loss is scale-free in S_k and the joint
    # rescaling done between chunks (:func:`normalize_scale`) leaves it exactly unchanged. A
    # normalisation inside the S prox instead would change the loss at every step and break
    # the descent (measured: χ² rising over iterations for a misspecified scene).
    if method == "scarlet":
        prox_s = chain_proxes(prox_positive, prox_symmetric, prox_monotonic)
    else:
        prox_s = prox_positive

    def solve(seds, morphs, data, weights, mask, corners, kernels, abs_kernels):
        conv = FFTConvolution(kernels, frame_shape, normalize_psf=False)
        conv_abs = FFTConvolution(abs_kernels, frame_shape, normalize_psf=False)
        amask = mask[..., None]

        def model(a, s, c=conv):
            return scene_model(a * amask, s, corners, frame_shape, c)

        def prior_value_and_grad(s):
            # log p_θ(S / max S): the prior sees peak-normalised stamps whatever the scale.
            peak = tf.reduce_max(s, axis=[-2, -1], keepdims=True)
            safe = tf.where(peak > 0, peak, tf.ones_like(peak))
            window = prior_window(s / safe, stamp)
            flat = tf.reshape(window, [-1, stamp, stamp])
            if hasattr(prior, "log_prob_and_grad"):
                lp, g = prior.log_prob_and_grad(flat, validate=False)
            else:
                with tf.GradientTape() as tape:
                    tape.watch(flat)
                    lp = prior.log_prob(flat)
                g = tape.gradient(lp, flat)
            lp = tf.reshape(lp, tf.shape(mask))
            g = tf.reshape(g, tf.shape(window))
            # Back from the prior's window to the box: adjoint of pad/crop and of S / max S.
            with tf.GradientTape() as tape:
                tape.watch(s)
                pk = tf.reduce_max(s, axis=[-2, -1], keepdims=True)
                pk = tf.where(pk > 0, pk, tf.ones_like(pk))
                pulled = tf.reduce_sum(prior_window(s / pk, stamp) * tf.stop_gradient(g))
            g_box = tape.gradient(pulled, s)
            return lp, g_box

        @tf.custom_gradient
        def neg_log_prior_term(s):
            # Gradient-only term: the solver uses fixed steps, so the VALUE of −log p is never
            # needed inside the loop; returning 0 skips a network evaluation per loss call
            # (the loss trace is therefore the χ²/2 part, the prior's value is reported apart).
            def grad(upstream):
                _, g = prior_value_and_grad(s)
                return -prior_weight * upstream * g * mask[..., None, None]

            return tf.zeros([], s.dtype), grad

        def smooth_loss(a, s):
            r = data - model(a, s)
            loss = 0.5 * tf.reduce_sum(weights * r * r)
            if prior is not None:
                loss = loss + neg_log_prior_term(s)
            return loss

        def majoriser(a, s, wrt):
            with tf.GradientTape() as tape:
                x = tf.ones_like(a if wrt == 0 else s)
                tape.watch(x)
                m = model(x, s, conv_abs) if wrt == 0 else model(a, x, conv_abs)
                q = 0.5 * tf.reduce_sum(weights * m * m)
            return tape.gradient(q, x)

        if prior is not None and prior_step == "diagonal" and _has_pixel_scales(prior):
            # Per-pixel curvature of −log p from the prior's own conditionals: pixel i's term
            # −log N(x_i; μ_i, σ_i) has curvature 1/σ_i², which is small on the galaxy
            # (σ ~ 0.02–0.03 of the peak) and large on the background (σ ~ training noise
            # 0.005); the off-diagonal part (μ_j depending on x_i) is covered by the safety
            # factor (measured: the largest eigenvalue is ~2× the largest 1/σ²).
            peak = tf.reduce_max(morphs, axis=[-2, -1], keepdims=True)
            peak = tf.where(peak > 0, peak, tf.ones_like(peak))
            window = prior_window(morphs / peak, stamp)
            sig = _prior_pixel_scales(prior, tf.reshape(window, [-1, stamp, stamp]))
            curv = tf.reshape(prior_weight / tf.square(sig), tf.shape(window))
            with tf.GradientTape() as tape:
                tape.watch(morphs)
                pulled = tf.reduce_sum(prior_window(morphs, stamp) * tf.stop_gradient(curv))
            lip_prior = lip_safety * tape.gradient(pulled, morphs) / tf.square(peak)
        elif prior is not None:
            # Curvature of −log p per source by power iteration on finite-difference
            # Hessian–vector products (one prior gradient each; ε relative to the unit peak).
            _, g0 = prior_value_and_grad(morphs)
            eps = 1e-3

            def prior_hvp(v):
                _, g1 = prior_value_and_grad(morphs + eps * v)
                return prior_weight * (g0 - g1) / eps

            lip_prior = lip_safety * tf.abs(
                lipschitz_power_iteration(
                    prior_hvp, morphs.shape, num_iter=lip_iter, self_adjoint=True, batch_ndims=2
                )
            )[..., None, None]
        else:
            lip_prior = tf.zeros([1, 1, 1, 1], morphs.dtype)

        def step_a(a, s):
            d = majoriser(a, s, 0)
            return 1.0 / tf.maximum(d, 1e-6 * tf.reduce_max(d) + 1e-30)

        def step_s(a, s):
            d = majoriser(a, s, 1) + lip_prior
            return 1.0 / tf.maximum(d, 1e-6 * tf.reduce_max(d) + 1e-30)

        def prox_a(a, step=None):
            return prox_positive(a) * amask

        res = proximal_gradient(
            smooth_loss,
            [seds, morphs],
            prox_fns=[prox_a, prox_s],
            step_sizes=[step_a, step_s],
            max_iter=n_iter,
            rtol=1e-30,  # convergence is tested by the caller between chunks
            accelerate=accelerate,
        )
        a_new, s_new = res.blocks
        rel_a = tf.norm(tf.reshape(a_new - seds, [-1])) / (tf.norm(tf.reshape(a_new, [-1])) + 1e-30)
        rel_s = tf.norm(tf.reshape(s_new - morphs, [-1])) / (
            tf.norm(tf.reshape(s_new, [-1])) + 1e-30
        )
        return a_new, s_new, res.loss_trace, res.relative_change, tf.stack([rel_a, rel_s])

    return tf.function(solve, jit_compile=jit_compile, autograph=False)


def _check_batch(observations: Sequence[Observation], frame: ModelFrame):
    if len(observations) == 0:
        raise TfhybridInputError("no observation given")
    first = observations[0]
    for i, obs in enumerate(observations):
        if not isinstance(obs, Observation):
            raise TfhybridInputError(
                f"observation {i} must be a tfhybrid.deblend.scene.Observation (use "
                f"Observation.create); got {type(obs).__name__}"
            )
        if obs.images.shape != first.images.shape:
            raise TfhybridInputError(
                f"scenes fitted together must share their shape (bands, ny, nx); scene {i} is "
                f"{obs.images.shape}, scene 0 is {first.images.shape}"
            )
        if abs(obs.pixel_scale_arcsec - frame.pixel_scale_arcsec) > 1e-6 * frame.pixel_scale_arcsec:
            raise TfhybridInputError(
                f"scene {i} has pixel scale {obs.pixel_scale_arcsec}\" but the model frame "
                f"{frame.pixel_scale_arcsec}\"; the model frame shares the observed grid "
                "(resample the images, or set ModelFrame(pixel_scale_arcsec=...))"
            )


def _iterate(solve, a_t, s_t, args, max_iter, chunk, rtol, bar):
    """Run compiled chunks until ``max_iter`` or relative change < ``rtol`` per iteration."""
    traces, done, rel, converged = [], 0, np.full(2, np.inf), False
    while done < max_iter:
        a_prev, s_prev = a_t, s_t
        a_t, s_t, trace, _, _ = solve(a_t, s_t, *args)
        a_t, s_t = normalize_scale(a_t, s_t)
        done += chunk
        traces.append(trace.numpy())
        # Relative change of the normalised (A, S) over the chunk, per iteration on average
        # (the scale drift inside a chunk is not a change of the solution).
        rel = np.array([_rel_change(a_t, a_prev), _rel_change(s_t, s_prev)]) / chunk
        if bar is not None:
            bar.update(chunk)
            bar.set_postfix(loss=f"{traces[-1][-1]:.4g}", rel=f"{rel.max():.1e}")
        if not np.all(np.isfinite(traces[-1])):
            break
        if np.all(rel < rtol):
            converged = True
            break
    return a_t, s_t, traces, done, converged, rel


def deblend_batch(
    observations: Sequence[Observation],
    centres_xy: Sequence | None = None,
    config: DeblendConfig | None = None,
    prior=None,
    progress: bool = False,
    detect_kwargs: dict | None = None,
) -> list[DeblendResult]:
    """Deblend N scenes of the same shape in one batched, compiled fit (000_* eq. 7).

    Parameters
    ----------
    observations : N :class:`Observation` of identical (B, ny, nx) and pixel scale.
    centres_xy : N arrays (K_n, 2) of source centres (x, y) in pixels, or None to run
        :func:`tfhybrid.deblend.detection.detect_sources` on each scene. Scenes may have
        different K: they are padded with inactive sources (A = 0, no prior term).
    config : :class:`DeblendConfig` (default: deep prior).
    prior : a ``tfd.Distribution`` over peak-normalised ``(stamp, stamp)`` morphologies with
        ``log_prob`` (method "deep"; default
        :func:`tfhybrid.priors.pixelcnn.load_default_pixelcnn`);
        for "scarlet" it is not used in the fit but, when given, ``log_prior`` is reported.
    progress : tqdm bar over iterations.
    detect_kwargs : keyword arguments of ``detect_sources`` when detecting.

    Returns
    -------
    list of N :class:`DeblendResult`.
    """
    config = config or DeblendConfig()
    frame = config.frame
    _check_batch(observations, frame)
    n = len(observations)
    b, ny, nx = observations[0].images.shape
    box = int(frame.box_size)

    if centres_xy is None:
        from tfhybrid.deblend.detection import detect_sources

        centres_list = [detect_sources(obs, **(detect_kwargs or {})) for obs in observations]
    else:
        if len(centres_xy) != n:
            raise TfhybridInputError(f"{len(centres_xy)} centre lists given for {n} scenes")
        centres_list = [validate_centres(c, (ny, nx)) for c in centres_xy]
    k_max = max(len(c) for c in centres_list)
    centres = np.zeros((n, k_max, 2))
    centres[...] = [(nx - 1) / 2, (ny - 1) / 2]
    mask = np.zeros((n, k_max), np.float32)
    for i, c in enumerate(centres_list):
        centres[i, : len(c)] = c
        mask[i, : len(c)] = 1.0
    corners = box_corners(centres[..., ::-1], (box, box))

    if config.method == "deep" and prior is None:
        from tfhybrid.priors.pixelcnn import load_default_pixelcnn

        prior = load_default_pixelcnn()
    stamp = _prior_stamp(prior) if prior is not None else box

    t0 = time.perf_counter()
    model_psf = frame.model_psf()
    kernels = np.stack(
        [difference_kernel(model_psf, obs.psfs).numpy() for obs in observations]
    ).astype(np.float32)  # (N, B, ky, kx)
    data = np.stack([obs.images for obs in observations])
    weights = np.stack([obs.weights for obs in observations])
    morphs = initial_morphologies(
        np.stack([obs.detection_image() for obs in observations]), corners, box
    )
    seds = _initial_seds(data, weights, morphs, corners, kernels, mask)

    fit_prior = prior if config.method == "deep" else None
    key = (
        float(config.prior_weight),
        int(config.prior_lipschitz_iter),
        float(config.prior_lipschitz_safety),
        bool(config.accelerate),
        bool(config.jit_compile),
        stamp,
        str(config.prior_step),
    )
    args = [tf.constant(x) for x in (data, weights, mask, corners, kernels, np.abs(kernels))]
    a_t, s_t = tf.constant(seds), tf.constant(morphs)
    bar = None
    warm = int(config.init_iter) if config.method == "deep" else 0
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(config.max_iter) + warm,
                   desc=f"deblend ({config.method}, {n} scene(s))", unit="it", leave=False)
    try:
        if warm:
            # Warm start (see the module docstring): the baseline's iterations from the same
            # detection start, then the deep fit from there.
            chunk = min(int(config.check_every), warm)
            solve = _solver("scarlet", None, (ny, nx), key, chunk)
            a_t, s_t, _, _, _, _ = _iterate(solve, a_t, s_t, args, warm, chunk, config.rtol, bar)
            a_t, s_t = normalize_scale(a_t, s_t)
        chunk = min(int(config.check_every), int(config.max_iter))
        solve = _solver(config.method, fit_prior, (ny, nx), key, chunk)
        a_t, s_t, traces, done, converged, rel = _iterate(
            solve, a_t, s_t, args, int(config.max_iter), chunk, config.rtol, bar
        )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    loss_trace = np.concatenate(traces).astype(np.float64)
    finite = bool(np.all(np.isfinite(loss_trace)))
    if not finite:
        message = "DIVERGED: the loss became non-finite; lower the step (prior_lipschitz_safety up)"
        converged = False
    elif converged:
        message = f"converged after {done} iterations (relative change {rel.max():.1e} < rtol)"
    else:
        message = (
            f"NOT converged after {done} iterations (relative change per iteration "
            f"{rel.max():.1e} > rtol={config.rtol:g}); raise max_iter"
        )
    return _package(
        observations, centres_list, corners, kernels, a_t.numpy(), s_t.numpy(), prior, stamp,
        done, converged, message, loss_trace, config.method, seconds / n,
    )


def _package(observations, centres_list, corners, kernels, seds, morphs, prior, stamp, done,
             converged, message, loss_trace, method, seconds) -> list[DeblendResult]:
    results = []
    for i, obs in enumerate(observations):
        k = len(centres_list[i])
        a, s, c = seds[i, :k], morphs[i, :k], corners[i, :k]
        comps = render_components(a, s, c, obs.shape, kernels[i]).numpy()
        model = comps.sum(axis=0)
        resid = np.where(obs.weights > 0, obs.images - model, 0.0).astype(np.float32)
        n_valid = max(int(np.count_nonzero(obs.weights > 0)), 1)
        chi2 = float(np.sum(obs.weights * resid**2) / n_valid)
        log_prior = None
        if prior is not None:
            log_prior = prior.log_prob(prior_window(tf.constant(s), stamp)).numpy()
        results.append(
            DeblendResult(
                seds=a, morphs=s, fluxes=a * s.sum(axis=(-2, -1))[:, None],
                centres_xy=centres_list[i], corners=c, model=model.astype(np.float32),
                components=comps.astype(np.float32), residual=resid, chi2_per_pixel=chi2,
                log_prior=log_prior, num_iter=done, converged=converged, message=message,
                loss_trace=loss_trace, method=method, bands=obs.bands, seconds=seconds,
            )
        )
    return results


def deblend(
    observation: Observation,
    centres_xy=None,
    config: DeblendConfig | None = None,
    prior=None,
    progress: bool = False,
    **config_overrides,
) -> DeblendResult:
    """Deblend one scene (see :func:`deblend_batch`); ``config_overrides`` replace config fields.

    Example
    -------
    >>> obs = Observation.create(images, psfs, noise_sigma=sigma)      # doctest: +SKIP
    >>> res = deblend(obs, centres_xy=[[30.2, 31.0], [40.5, 28.1]])     # doctest: +SKIP
    >>> res.fluxes, res.morphs, res.summary()                           # doctest: +SKIP
    """
    config = config or DeblendConfig()
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    centres = None if centres_xy is None else [centres_xy]
    return deblend_batch([observation], centres, config, prior, progress)[0]

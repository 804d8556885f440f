"""Posterior sampling with HMC or NUTS (``tfp.mcmc``), adaptive warm-up and resumable chunks.

003_* §5.3 samples the lens and source parameters with HMC: 50 warm-up steps "during which the
internal HMC parameters are calibrated", then 500 draws started at the MAP.
:func:`sample_posterior` does this with TensorFlow Probability:

* kernels: ``PreconditionedHamiltonianMonteCarlo`` ("hmc") or ``PreconditionedNoUTurnSampler``
  ("nuts"), on unconstrained parameters (TFP bijectors map them to the constrained ones and the
  log-Jacobian is added to the target, so the draws are from the posterior of the constrained
  parameters);
* warm-up (``num_burnin`` steps): TFP's windowed adaptation (Stan's scheme) — dual-averaging
  step-size adaptation throughout, and a diagonal mass matrix estimated from the draws of a
  series of doubling "slow" windows (``DiagonalMassMatrixAdaptation``); adaptation stops at the
  end of warm-up, so the draws come from a fixed, valid Markov kernel;
* chains batched: every state part carries a leading chain dimension (and optionally more batch
  dimensions, e.g. several lens systems) and the target returns one log-probability per batch
  member; one step size is shared by all chains, the mass matrix is per chain;
* the kernel runs in compiled chunks (``tf.function``, XLA by default) of ``chunk_size`` steps;
  with ``checkpoint_dir`` each chunk (its draws, trace, the final state and the FULL kernel
  results including step size, mass matrix and adaptation counters) is written atomically.
  Chunk c uses the stateless seed ``fold_in(seed, c)``, and an uninterrupted run passes the
  state between chunks exactly as a resumed one reads it back, so a run killed midway and
  resumed gives bit-for-bit the draws of an uninterrupted run with the same arguments.
  (Draws depend on ``seed`` and on ``chunk_size``.)

Shapes: draws are returned as ``(num_results, *batch_shape, *event_shape)`` — TFP's
convention, chain axis 1 — in constrained space.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.inference.state import as_state_parts
from tfhybrid.io import array_digest, check_or_write_config, save_arrays_npz
from tfhybrid.validation import TfhybridInputError

tfb = tfp.bijectors

__all__ = ["PosteriorResult", "sample_posterior"]

_CHECKPOINT_FORMAT = 1
_ENGINE_CACHE: dict = {}
_ENGINE_CACHE_SIZE = 8
_IDENTITY = tfb.Identity()  # one instance, so that the compiled-kernel cache recognises it
# |energy error| above this marks an HMC transition as divergent (same as TFP/Stan).
_DIVERGENCE_ENERGY = 1000.0


@dataclass(frozen=True)
class PosteriorResult:
    """Outcome of :func:`sample_posterior`.

    Attributes
    ----------
    samples : list of NumPy arrays, one per state part, shape
        ``(num_results, *batch_shape, *event_shape)`` in constrained space (axis 1 = chains).
    trace : dict of NumPy arrays ``(num_results, *batch_shape)`` for the kept draws:
        ``target_log_prob``, ``accept_ratio``, ``is_accepted``, ``diverging``, ``n_steps``
        (leapfrog steps), and ``step_size`` ``(num_results,)``.
    warmup_trace : the same for the ``num_burnin`` warm-up steps.
    step_size : final (adapted) step size.
    mass_matrix_variance : list per part of the adapted diagonal of the inverse mass matrix
        (the estimated posterior variance in unconstrained space), shape of the part.
    diagnostics : dict — ``acceptance_rate``, ``num_divergences``, ``ess`` and ``r_hat``
        (lists per part, shape ``(*batch_shape[1:], *event_shape)``), ``min_ess``,
        ``max_r_hat``.
    kernel : "hmc" or "nuts".
    wall_time_s : seconds of sampling in this call (excluding chunks read from disk).
    num_gradient_evaluations : leapfrog steps summed over chains and steps (this call).
    chunk_seconds : wall time of each compiled chunk sampled in this call (``chunk_size``
        steps); the first includes tracing and compilation.
    total_sampling_s : seconds of sampling of the whole run: this call's chunks plus those read
        from disk, as they were timed when sampled (NaN if a chunk file predates the timing).
    final_step_size : the kernel's step size at the end, as an array (its batch shape when the
        step size is adapted per batch member).
    """

    samples: list
    trace: dict
    warmup_trace: dict
    step_size: float
    mass_matrix_variance: list
    diagnostics: dict
    kernel: str
    wall_time_s: float
    num_gradient_evaluations: int
    names: list = field(default_factory=list)
    chunk_seconds: list = field(default_factory=list)
    final_step_size: np.ndarray | None = None
    total_sampling_s: float = float("nan")

    def summary(self, names: Sequence[str] | None = None):
        """Per-parameter table (mean, sd, ESS, split R-hat); see ``diagnostics.summarize``."""
        from tfhybrid.inference.diagnostics import summarize

        return summarize(self.samples, names=names or self.names or None)


def sample_posterior(
    target_log_prob_fn: Callable[..., tf.Tensor],
    initial_state,
    num_results: int = 500,
    num_burnin: int = 50,
    kernel: str = "hmc",
    bijectors=None,
    num_chains: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    checkpoint_dir=None,
    progress: bool = True,
    step_size: float | None = None,
    num_leapfrog_steps: int = 10,
    max_tree_depth: int = 8,
    target_accept_prob: float | None = None,
    init_jitter: float = 0.1,
    jit_compile: bool = True,
    names: Sequence[str] | None = None,
    adapt: bool | str = True,
    checkpoint_config: dict | None = None,
) -> PosteriorResult:
    """Draw ``num_results`` posterior samples per chain with HMC or NUTS (003_* §5.3).

    Parameters
    ----------
    target_log_prob_fn : ``log_p(*state) -> tensor`` of shape ``batch_shape`` = (chains, …),
        the unnormalised log posterior of the constrained parameters.
    initial_state : tensor or list of tensors (constrained space). With ``num_chains=None``
        each part is ``(num_chains, …, *event_shape)`` (chains first). With ``num_chains=C``
        each part is unbatched (or has the extra batch dims only) and is tiled to C chains,
        chain c > 0 jittered by ``init_jitter`` · N(0, 1) in unconstrained space.
    num_results, num_burnin : kept draws per chain; warm-up (adaptation) steps, 0 or ≥ 20.
    kernel : "hmc" or "nuts".
    bijectors : TFP bijector per part (``None`` = identity), unconstrained → constrained.
    seed : integer; everything random derives from it statelessly.
    chunk_size : steps per compiled chunk (default: about a tenth of the run, at most 250).
    checkpoint_dir : directory for chunk files; an interrupted run called again with the same
        arguments resumes from its last complete chunk.
    checkpoint_config : what else the chunks depend on, as JSON values (e.g. digests of the
        data and of a change of variables hidden in ``target_log_prob_fn``); recorded with the
        settings, and a resume with other values is refused.
    progress : tqdm progress bar over steps.
    step_size : initial step size (default 0.5 · n_params^(−1/4), TFP's heuristic).
    num_leapfrog_steps : HMC trajectory length in steps.
    max_tree_depth : NUTS maximum tree depth (≤ 2^depth leapfrog steps per draw).
    target_accept_prob : dual-averaging target (default 0.75 HMC, 0.8 NUTS).
    jit_compile : XLA-compile the chunks (faster for small models on CPU; measure).
    names : optional names per part, carried into summaries and ArviZ.
    adapt : adapt step size and diagonal mass matrix during the ``num_burnin`` steps (default).
        ``"step_size"``: dual-averaging step-size adaptation only (unit mass matrix), for
        targets already whitened; a ``step_size`` with batch shape (e.g. ``(S, 1)`` for a
        state ``(chains, S, D)``) is then adapted per batch member (TFP's per-chain rule).
        With False the warm-up steps run the fixed kernel (``step_size``, unit mass matrix)
        and are discarded: for targets already whitened, where a short adaptation from few,
        correlated draws does more harm than good.

    Returns
    -------
    PosteriorResult with draws, traces, adapted step size / mass matrix and diagnostics.
    """
    from tqdm.auto import tqdm

    if kernel not in ("hmc", "nuts"):
        raise TfhybridInputError(f"kernel must be 'hmc' or 'nuts'; got {kernel!r}")
    if int(num_results) < 1:
        raise TfhybridInputError(f"num_results must be >= 1; got {num_results}")
    if adapt not in (True, False, "step_size"):
        raise TfhybridInputError(f"adapt must be True, False or 'step_size'; got {adapt!r}")
    n_adapt = int(num_burnin) if adapt else 0
    if n_adapt != 0 and n_adapt < 20:
        raise TfhybridInputError(
            f"num_burnin must be 0 (no adaptation) or >= 20 (windowed adaptation); got {num_burnin}"
        )
    parts, _ = as_state_parts(initial_state)
    if bijectors is None:
        bijs = [_IDENTITY] * len(parts)
    else:
        bijs = [bijectors] if isinstance(bijectors, tfb.Bijector) else list(bijectors)
        if len(bijs) != len(parts):
            raise TfhybridInputError(
                f"bijectors has {len(bijs)} entries but initial_state has {len(parts)} parts"
            )
        bijs = [_IDENTITY if b is None else b for b in bijs]
    if names is not None and len(names) != len(parts):
        raise TfhybridInputError(f"names has {len(names)} entries; state has {len(parts)} parts")

    unconstrained = []
    for i, (p, b) in enumerate(zip(parts, bijs, strict=True)):
        u = tf.cast(b.inverse(p), p.dtype)
        if not bool(tf.reduce_all(tf.math.is_finite(u))):
            raise TfhybridInputError(
                f"initial_state[{i}] lies outside the support of bijector {b.name}"
            )
        unconstrained.append(u)
    if num_chains is not None:
        if int(num_chains) < 1:
            raise TfhybridInputError(f"num_chains must be >= 1; got {num_chains}")
        keys = tf.random.experimental.stateless_split([int(seed), 1], len(parts))
        tiled = []
        for u, k in zip(unconstrained, keys, strict=True):
            t = tf.tile(u[None], [num_chains] + [1] * u.shape.rank)
            noise = tf.random.stateless_normal(t.shape, seed=k, dtype=u.dtype)
            first = tf.reshape(
                tf.cast(tf.range(num_chains) > 0, u.dtype), [-1] + [1] * u.shape.rank
            )
            tiled.append(t + init_jitter * first * noise)
        unconstrained = tiled

    lp0 = tf.convert_to_tensor(
        target_log_prob_fn(*[b.forward(u) for b, u in zip(bijs, unconstrained, strict=True)])
    )
    batch_shape = lp0.shape
    if batch_shape.rank == 0:
        raise TfhybridInputError(
            "target_log_prob_fn returned a scalar: give initial_state a leading chain dimension "
            "(or pass num_chains=) so that it returns one log-probability per chain"
        )
    if not bool(tf.reduce_all(tf.math.is_finite(lp0))):
        raise TfhybridInputError("target_log_prob_fn is not finite at the initial state")
    batch_ndims = batch_shape.rank
    for i, u in enumerate(unconstrained):
        if u.shape[:batch_ndims] != batch_shape:
            raise TfhybridInputError(
                f"state part {i} has shape {u.shape}; expected it to start with the batch shape "
                f"{batch_shape} returned by target_log_prob_fn"
            )

    def target_unconstrained(*us):
        xs = [b.forward(u) for b, u in zip(bijs, us, strict=True)]
        lp = target_log_prob_fn(*xs)
        for b, u in zip(bijs, us, strict=True):
            lp = lp + b.forward_log_det_jacobian(u, event_ndims=u.shape.rank - batch_ndims)
        return lp

    dtype = unconstrained[0].dtype
    n_params = sum(int(np.prod(u.shape[batch_ndims:].as_list())) for u in unconstrained)
    init_step = step_size if step_size is not None else 0.5 * n_params**-0.25
    if np.ndim(init_step) == 0:
        init_step = float(init_step)
    step_key = tuple(np.ravel(init_step).tolist()) + tuple(np.shape(init_step))
    accept = target_accept_prob or (0.8 if kernel == "nuts" else 0.75)

    total = int(num_burnin) + int(num_results)
    chunk = int(chunk_size) if chunk_size else max(1, min(250, -(-total // 10)))
    n_chunks = -(-total // chunk)
    # the settings the chunks were made with: refused before any tracing if they differ
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir)
        config = dict(
            format=_CHECKPOINT_FORMAT, kernel=kernel, num_results=int(num_results),
            num_burnin=int(num_burnin), adapt=adapt, seed=int(seed), chunk_size=chunk,
            shapes=[list(u.shape) for u in unconstrained], dtype=dtype.name,
            step_size=np.asarray(init_step).tolist(), num_leapfrog_steps=int(num_leapfrog_steps),
            max_tree_depth=int(max_tree_depth), target_accept_prob=float(accept),
            initial_state_sha1=array_digest(*[_to_numpy(u) for u in unconstrained]),
        )
        clash = sorted(set(checkpoint_config or {}) & set(config))
        if clash:
            raise TfhybridInputError(f"checkpoint_config must not set the sampler's own "
                                     f"settings {clash}")
        config.update(checkpoint_config or {})
        check_or_write_config(ckpt, config)
    try:
        fn_key = hash(target_log_prob_fn) and target_log_prob_fn  # bound methods compare equal
    except TypeError:
        fn_key = id(target_log_prob_fn)
    key = (
        fn_key, tuple(id(b) for b in bijs), kernel,
        tuple(tuple(u.shape.as_list()) for u in unconstrained), dtype.name, step_key, str(adapt),
        n_adapt, int(num_burnin), int(num_leapfrog_steps), int(max_tree_depth), float(accept),
        chunk, bool(jit_compile),
    )
    cached = _ENGINE_CACHE.get(key)
    if cached is not None and cached[0] == target_log_prob_fn and all(
        a is b for a, b in zip(cached[1], bijs, strict=True)
    ):
        mcmc_kernel, template, compiled = cached[2:]
    else:
        mcmc_kernel = _make_kernel(
            kernel, target_unconstrained, unconstrained, batch_shape, dtype, init_step,
            n_adapt, int(num_leapfrog_steps), int(max_tree_depth), float(accept),
            mass=adapt is True,
        )
        template = mcmc_kernel.bootstrap_results(unconstrained)
        compiled = _compile_chunk(mcmc_kernel, template, chunk, kernel, init_step, jit_compile)
        # Re-running with the same model (resume, benchmarks, several data sets of one
        # shape) reuses the traced graph: tracing the adaptive kernel costs seconds.
        _ENGINE_CACHE[key] = (target_log_prob_fn, tuple(bijs), mcmc_kernel, template, compiled)
        while len(_ENGINE_CACHE) > _ENGINE_CACHE_SIZE:
            _ENGINE_CACHE.pop(next(iter(_ENGINE_CACHE)))
    flat_template = tf.nest.flatten(
        mcmc_kernel.bootstrap_results(unconstrained), expand_composites=True
    )
    base_seed = tf.constant([int(seed) % (2**31), 12345], tf.int32)

    state = [tf.convert_to_tensor(u) for u in unconstrained]
    flat_kr = [_to_numpy(t) for t in flat_template]
    draws_chunks, trace_chunks, loaded_seconds = [], [], []
    start_chunk = 0
    if ckpt is not None:
        start_chunk, state_np, flat_kr_loaded, draws_chunks, trace_chunks, loaded_seconds = (
            _load_chunks(ckpt, len(unconstrained), len(flat_template))
        )
        if start_chunk > 0:
            state = [tf.convert_to_tensor(s) for s in state_np]
            flat_kr = flat_kr_loaded
    bar = tqdm(total=total, desc=f"{kernel.upper()} sampling", disable=not progress, leave=False)
    bar.update(min(total, start_chunk * chunk))
    t0 = time.perf_counter()
    chunk_seconds = []
    try:
        for c in range(start_chunk, n_chunks):
            chunk_seed = tf.random.experimental.stateless_fold_in(base_seed, c)
            t_chunk = time.perf_counter()
            draws, tr, final_state, final_kr = compiled(state, flat_kr, chunk_seed)
            draws = [d.numpy() for d in draws]
            chunk_seconds.append(time.perf_counter() - t_chunk)
            tr = {k: v.numpy() for k, v in tr.items()}
            state = [s.numpy() for s in final_state]
            flat_kr = [_to_numpy(t) for t in final_kr]
            if ckpt is not None:
                _write_chunk(ckpt, c, draws, tr, state, flat_kr, chunk_seconds[-1])
            draws_chunks.append(draws)
            trace_chunks.append(tr)
            bar.update(min(chunk, total - c * chunk))
    finally:
        bar.close()
    wall = time.perf_counter() - t0

    all_draws = [np.concatenate([d[i] for d in draws_chunks])[:total] for i in range(len(state))]
    all_trace = {k: np.concatenate([t[k] for t in trace_chunks])[:total] for k in trace_chunks[0]}
    nb = int(num_burnin)
    kept_u = [d[nb:] for d in all_draws]
    samples = [np.asarray(b.forward(tf.constant(u))) for b, u in zip(bijs, kept_u, strict=True)]
    trace = {k: v[nb:] for k, v in all_trace.items()}
    warm = {k: v[:nb] for k, v in all_trace.items()}
    kr_final = tf.nest.pack_sequence_as(
        template, [tf.convert_to_tensor(t) for t in flat_kr], expand_composites=True
    )
    variances = _mass_matrix_variance(kr_final, unconstrained)
    n_grad_new = int(np.sum(all_trace["n_steps"][start_chunk * chunk :]))
    diag = _diagnostics(samples, trace)
    return PosteriorResult(
        samples=samples,
        trace=trace,
        warmup_trace=warm,
        step_size=float(np.ravel(trace["step_size"])[-1]),
        mass_matrix_variance=variances,
        diagnostics=diag,
        kernel=kernel,
        wall_time_s=wall,
        num_gradient_evaluations=n_grad_new,
        names=list(names) if names is not None else [],
        chunk_seconds=chunk_seconds,
        final_step_size=_final_step_size(kr_final, init_step),
        total_sampling_s=float(np.sum(loaded_seconds) + np.sum(chunk_seconds)),
    )


def _compile_chunk(mcmc_kernel, template, chunk, kernel, init_step, jit_compile):
    """A compiled function running ``chunk`` kernel steps from (state, flat kernel results)."""

    def trace_fn(_, pkr):
        return _trace(pkr, kernel, init_step)

    def run_chunk(state, flat_kr, chunk_seed):
        kr = tf.nest.pack_sequence_as(template, flat_kr, expand_composites=True)
        out = tfp.mcmc.sample_chain(
            chunk,
            current_state=state,
            previous_kernel_results=kr,
            kernel=mcmc_kernel,
            trace_fn=trace_fn,
            return_final_kernel_results=True,
            seed=chunk_seed,
        )
        final_state = [s[-1] for s in out.all_states]
        return (
            out.all_states,
            out.trace,
            final_state,
            tf.nest.flatten(out.final_kernel_results, expand_composites=True),
        )

    return tf.function(run_chunk, jit_compile=jit_compile, autograph=False)


def _to_numpy(t):
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def _make_kernel(kind, target, state, batch_shape, dtype, step, n_adapt, n_leap, depth, accept,
                 mass=True):
    """Base kernel wrapped in Stan-style windowed adaptation (TFP's building blocks).

    With ``mass=False`` only the step size adapts (dual averaging, per batch member when
    ``step`` has a batch shape).
    """
    from tensorflow_probability.python.experimental.mcmc import (
        preconditioning_utils,
        windowed_sampling,
    )

    momentum = preconditioning_utils.make_momentum_distribution(
        state_parts=state,
        batch_shape=batch_shape,
        running_variance_parts=[tf.ones_like(s) for s in state],
    )
    kwargs = dict(
        target_log_prob_fn=target,
        step_size=tf.constant(step, dtype),
        momentum_distribution=momentum,
    )
    if kind == "hmc":
        base = _JitteredPreconditionedHMC(
            num_leapfrog_steps=n_leap, store_parameters_in_results=True, **kwargs
        )
    else:
        base = tfp.experimental.mcmc.PreconditionedNoUTurnSampler(max_tree_depth=depth, **kwargs)
    if n_adapt == 0:
        return base
    if not mass:
        return tfp.mcmc.DualAveragingStepSizeAdaptation(
            base, num_adaptation_steps=n_adapt, target_accept_prob=tf.constant(accept, dtype)
        )
    running = [
        tfp.experimental.stats.RunningVariance.from_stats(
            num_samples=tf.zeros([], s.dtype), mean=tf.zeros_like(s), variance=tf.ones_like(s)
        )
        for s in state
    ]
    step_adapt = tfp.mcmc.DualAveragingStepSizeAdaptation(
        base, num_adaptation_steps=n_adapt, target_accept_prob=tf.constant(accept, dtype)
    )
    mass_adapt = tfp.experimental.mcmc.DiagonalMassMatrixAdaptation(
        step_adapt, initial_running_variance=running, num_estimation_steps=n_adapt
    )
    return windowed_sampling.WindowedAdaptation(mass_adapt, num_adaptation_steps=n_adapt)


class _JitteredPreconditionedHMC(tfp.experimental.mcmc.PreconditionedHamiltonianMonteCarlo):
    """Preconditioned HMC whose number of leapfrog steps is drawn uniformly in [L/2, 3L/2].

    A fixed trajectory length resonates with the posterior's scales (a direction whose period
    matches ε·L does not move; Neal 2011, §5.4.2.2); a random length per transition, drawn
    independently of the state, keeps detailed balance and removes the resonance.
    """

    def one_step(self, current_state, previous_kernel_results, seed=None):
        from tensorflow_probability.python.internal import samplers

        jitter_seed, step_seed = samplers.split_seed(samplers.sanitize_seed(seed))
        nominal = int(self.parameters["num_leapfrog_steps"])
        low, high = max(1, nominal - nominal // 2), nominal + nominal // 2
        n_leap = tf.random.stateless_uniform(
            [], jitter_seed, minval=low, maxval=high + 1, dtype=tf.int32
        )
        accepted = previous_kernel_results.accepted_results._replace(num_leapfrog_steps=n_leap)
        previous = previous_kernel_results._replace(accepted_results=accepted)
        return super().one_step(current_state, previous, seed=step_seed)


def _trace(pkr, kind, init_step):
    from tensorflow_probability.python.internal import unnest

    log_accept = unnest.get_innermost(pkr, "log_accept_ratio")
    step = unnest.get_innermost(pkr, "step_size")
    if isinstance(step, (list, tuple)):
        step = step[0] if len(step) else init_step  # fixed-step kernels do not store it
    step = tf.reshape(tf.cast(step, log_accept.dtype), [-1])[0]
    if kind == "nuts":
        diverging = unnest.get_innermost(pkr, "has_divergence")
        n_steps = tf.cast(unnest.get_innermost(pkr, "leapfrogs_taken"), tf.int32)
    else:
        diverging = tf.abs(log_accept) > _DIVERGENCE_ENERGY
        n_leap = unnest.get_innermost(pkr, "num_leapfrog_steps")
        n_steps = tf.broadcast_to(tf.cast(n_leap, tf.int32), tf.shape(log_accept))
    return {
        "target_log_prob": unnest.get_innermost(pkr, "target_log_prob"),
        "accept_ratio": tf.minimum(tf.ones_like(log_accept), tf.exp(log_accept)),
        "is_accepted": unnest.get_innermost(pkr, "is_accepted"),
        "diverging": diverging,
        "n_steps": n_steps,
        "step_size": step,
    }


def _final_step_size(kr, init_step) -> np.ndarray:
    from tensorflow_probability.python.internal import unnest

    try:
        step = unnest.get_innermost(kr, "step_size")
    except (AttributeError, ValueError):
        return np.asarray(init_step)
    if isinstance(step, (list, tuple)):
        step = step[0] if len(step) else init_step
    return np.asarray(step)


def _mass_matrix_variance(kr, state):
    from tensorflow_probability.python.internal import unnest

    try:
        momentum = unnest.get_innermost(kr, "momentum_distribution")
        var = momentum.variance()
        var = var if isinstance(var, (list, tuple)) else [var]
        # Momentum variance is the inverse of the estimated posterior variance.
        return [1.0 / np.asarray(v) for v in var]
    except (AttributeError, ValueError):
        return [np.ones(s.shape) for s in state]


def _diagnostics(samples, trace) -> dict:
    from tfhybrid.inference.diagnostics import effective_sample_size, split_r_hat

    ess = [effective_sample_size(s) for s in samples]
    rhat = [split_r_hat(s) for s in samples]
    return dict(
        acceptance_rate=float(np.mean(trace["accept_ratio"])),
        acceptance_rate_per_chain=np.mean(trace["accept_ratio"], axis=0),
        num_divergences=int(np.sum(trace["diverging"])),
        ess=ess,
        r_hat=rhat,
        min_ess=float(min(np.min(e) for e in ess)),
        max_r_hat=float(max(np.max(r) for r in rhat)),
    )


def _write_chunk(ckpt: Path, index: int, draws, trace, state, flat_kr, seconds: float) -> None:
    arrays = {f"draw_{i}": d for i, d in enumerate(draws)}
    arrays["seconds"] = np.float64(seconds)
    arrays.update({f"trace_{k}": v for k, v in trace.items()})
    arrays.update({f"state_{i}": s for i, s in enumerate(state)})
    arrays.update({f"kr_{i}": np.asarray(k) for i, k in enumerate(flat_kr)})
    save_arrays_npz(ckpt / f"chunk_{index:05d}.npz", arrays)


def _load_chunks(ckpt: Path, n_parts: int, n_kr: int):
    files = sorted(ckpt.glob("chunk_*.npz"))
    draws, traces, seconds = [], [], []
    state, flat_kr = None, None
    for expected, f in enumerate(files):
        if f.name != f"chunk_{expected:05d}.npz":
            raise TfhybridInputError(f"checkpoint chunks in {ckpt} are not contiguous at {f.name}")
        with np.load(f) as z:
            draws.append([z[f"draw_{i}"] for i in range(n_parts)])
            traces.append({k[6:]: z[k] for k in z.files if k.startswith("trace_")})
            state = [z[f"state_{i}"] for i in range(n_parts)]
            flat_kr = [z[f"kr_{i}"] for i in range(n_kr)]
            seconds.append(float(z["seconds"]) if "seconds" in z.files else np.nan)
    return len(files), state, flat_kr, draws, traces, seconds

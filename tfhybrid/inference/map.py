"""Maximum a posteriori estimates with Adam or L-BFGS in unconstrained space.

The MAP of 003_* eq. 26 (and 000_* eq. 3) maximises log p(θ | data). Constrained parameters
(positive Einstein radius, axis ratio in (0, 1], …) are optimised through TFP bijectors:
θ = b(u) with u unconstrained, so every iterate stays inside the support. The objective is
−log p(b(u)) WITHOUT the log-Jacobian, so the optimum is the MAP of the constrained posterior
(the quantity the paper reports), not of the density of u.

Several starts (or several lens systems) are optimised at once in one batched graph: every
state part carries the same leading batch shape and ``target_log_prob_fn`` returns one log
probability per batch member. Adam minimises the sum over the batch (the members are
independent, so this is the same as minimising each); L-BFGS runs a batch of independent
searches. The loop runs in compiled chunks (``tf.function``, optionally XLA) between which a
tqdm progress bar advances and convergence is checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfhybrid.inference.state import as_state_parts
from tfhybrid.validation import TfhybridInputError

tfb = tfp.bijectors

__all__ = ["FunctionalAdam", "MapResult", "find_map"]


@dataclass(frozen=True)
class MapResult:
    """Outcome of :func:`find_map`.

    Attributes
    ----------
    state : list of tensors, the MAP estimate in constrained space (shapes of initial_state).
    unconstrained_state : the same, before the bijectors.
    log_prob : NumPy array with the batch shape: log p at ``state``.
    loss_trace : NumPy array (num_recorded, *batch_shape): −log p per start, one row per Adam
        step, or per L-BFGS iteration chunk.
    converged : NumPy bool array with the batch shape.
    num_steps : optimiser steps (Adam) or iterations (L-BFGS) run.
    message : one human-readable line; says which starts did not converge and why.
    best_index : index (tuple) into the batch of the start with the highest log p, or None
        when the state is unbatched.
    chunk_seconds : wall time of each compiled chunk (Adam: ``steps_per_update`` steps; L-BFGS:
        up to that many iterations). The first includes tracing and compilation, the others
        are the steady cost: what benchmarks read.
    kept_starts : with ``prune_after`` (Adam), the ``(prune_keep, *batch_shape[1:])`` indices
        into the leading axis of ``initial_state`` of the starts that were kept; ``state``,
        ``log_prob``, ``converged`` and ``best_index`` follow them, while ``loss_trace`` keeps
        the initial batch shape (NaN for a start's steps after it was dropped). None without
        pruning.
    """

    state: list
    unconstrained_state: list
    log_prob: np.ndarray
    loss_trace: np.ndarray
    converged: np.ndarray
    num_steps: int
    message: str
    best_index: tuple | None
    chunk_seconds: np.ndarray | None = None
    kept_starts: np.ndarray | None = None

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    def best_state(self) -> list:
        """State of the best start (highest log p); the state itself when unbatched."""
        if self.best_index is None:
            return list(self.state)
        return [tf.convert_to_tensor(s)[self.best_index] for s in self.state]


def _as_bijectors(bijectors, n: int) -> list:
    if bijectors is None:
        return [tfb.Identity()] * n
    if isinstance(bijectors, tfb.Bijector):
        bijectors = [bijectors]
    if len(bijectors) != n:
        raise TfhybridInputError(
            f"bijectors has {len(bijectors)} entries but initial_state has {n} parts"
        )
    return [tfb.Identity() if b is None else b for b in bijectors]


def to_unconstrained(parts: list[tf.Tensor], bijectors: list) -> list[tf.Tensor]:
    """Map constrained state parts to unconstrained space, raising if any is outside support."""
    out = []
    for i, (p, b) in enumerate(zip(parts, bijectors, strict=True)):
        u = b.inverse(p)
        if not bool(tf.reduce_all(tf.math.is_finite(u))):
            raise TfhybridInputError(
                f"initial_state[{i}] lies outside the support of its bijector {b.name}: "
                f"its inverse is not finite (values {np.asarray(p).ravel()[:5]} ...)"
            )
        out.append(tf.cast(u, p.dtype))
    return out


def find_map(
    target_log_prob_fn: Callable[..., tf.Tensor],
    initial_state,
    bijectors=None,
    method: str = "adam",
    num_steps: int = 1000,
    learning_rate=0.01,
    rtol: float = 1e-7,
    tolerance: float = 1e-6,
    num_starts: int | None = None,
    init_jitter: float = 0.1,
    seed: int | None = None,
    progress: bool = True,
    steps_per_update: int | None = None,
    jit_compile: bool = False,
    prune_after: int | None = None,
    prune_keep: int = 1,
    prune_margin: float = 0.0,
    prune_grouped: bool = False,
    restart_after: int | None = None,
    restart_fn: Callable | None = None,
) -> MapResult:
    """Maximise ``target_log_prob_fn`` (003_* eq. 26) with Adam or L-BFGS.

    Parameters
    ----------
    target_log_prob_fn : callable ``log_p(*state) -> tensor`` of shape ``batch_shape``
        (scalar for one start; ``(S,)`` for S starts or S lens systems, …).
    initial_state : tensor or list of tensors in constrained space, each with shape
        ``batch_shape + event_shape_i``.
    bijectors : TFP bijector per part (``None`` = identity) mapping unconstrained → constrained,
        e.g. ``tfb.Softplus()`` for a positive radius, ``tfb.Sigmoid(0.2, 1.0)`` for q.
    method : "adam" (:class:`FunctionalAdam`, the update of ``keras.optimizers.Adam``, in
        compiled chunks; the paper's choice)
        or "lbfgs" (``tfp.optimizer.lbfgs_minimize``, a batch of independent searches).
    num_steps : Adam steps, or the L-BFGS iteration budget.
    learning_rate : Adam learning rate: float or a ``keras.optimizers.schedules`` schedule.
    rtol : Adam: converged when a start's loss changes by less than ``rtol · max(1, |loss|)``
        over one chunk of ``steps_per_update`` steps; L-BFGS: relative objective tolerance.
    tolerance : L-BFGS gradient (max-norm) tolerance.
    num_starts : if given, ``initial_state`` (unbatched) is tiled to ``num_starts`` starts and
        jittered by ``init_jitter`` · N(0, 1) in unconstrained space (start 0 is not jittered),
        with a stateless seed from ``seed``.
    progress : tqdm progress bar.
    steps_per_update : steps per compiled chunk (progress/convergence granularity).
    jit_compile : XLA-compile the chunks (measure; helps small models on CPU).
    prune_after, prune_keep, prune_margin : Adam only: after ``prune_after`` steps, keep the
        ``prune_keep`` starts with the lowest loss along the leading batch axis (per position
        of the other axes: with a ``(starts, systems)`` batch, the best starts of each
        system), with their Adam moments, and run the remaining steps on those only
        (successive halving: a start that trails after a few hundred steps rarely ends ahead,
        and each dropped start stops costing a forward model per step). The ranking uses the
        loss recorded at the last step of a chunk. The pruning happens at the first chunk's
        end at or after ``prune_after`` where, in every column, each kept start leads each
        dropped one by at least ``prune_margin`` (loss units, nats for a log density; the
        batch stays rectangular, so one close race holds back every column), and not at all
        if that never comes. ``MapResult.kept_starts`` says which starts were kept. Ignored
        when ``prune_keep`` is at least the number of starts or ``prune_after >= num_steps``.
    prune_grouped : with pruning, run the starts in groups of ``prune_keep`` (the last one
        padded with copies of its first start, whose results are dropped) through one compiled
        graph of the kept starts' shape, before the pruning as after it: no second graph to
        trace and compile, at the price of batching only ``prune_keep`` starts per call. For
        models whose step cost grows in proportion to the batch, as an XLA-compiled posterior
        on a CPU does. Otherwise (default) the whole batch runs together and the chunk's graph
        is traced and compiled again for the kept starts' shapes when the pruning happens.
    restart_after, restart_fn : Adam only: at the end of step ``restart_after`` (a chunk ends
        there), ``restart_fn(state, loss)`` is called once with the constrained state parts
        and the last step's loss (batch shape) as NumPy arrays, and returns ``None`` or
        ``(rows, new_state)``: a boolean array of the batch shape and state parts of the
        state's shapes. The marked starts are replaced by ``new_state``'s and restart there,
        their Adam moments set to zero, within the same compiled loop (no new graph): e.g. new
        starts derived from the best ones so far, in the place of the worst. Not combined
        with ``prune_after``.

    Returns
    -------
    MapResult. A run that did not converge is not an error: ``converged`` is False for those
    starts and ``message`` says so.
    """
    from tqdm.auto import tqdm

    if not callable(target_log_prob_fn):
        raise TfhybridInputError(f"target_log_prob_fn must be callable; got {target_log_prob_fn!r}")
    if method not in ("adam", "lbfgs"):
        raise TfhybridInputError(f"method must be 'adam' or 'lbfgs'; got {method!r}")
    if int(num_steps) < 1:
        raise TfhybridInputError(f"num_steps must be >= 1; got {num_steps}")
    parts, single = as_state_parts(
        initial_state, cast_integers=True, allow_python_scalars=True
    )
    bijs = _as_bijectors(bijectors, len(parts))
    unconstrained = to_unconstrained(parts, bijs)
    if num_starts is not None:
        if int(num_starts) < 1:
            raise TfhybridInputError(f"num_starts must be >= 1; got {num_starts}")
        seeds = tf.random.experimental.stateless_split([0 if seed is None else seed, 7], len(parts))
        jittered = []
        for u, s in zip(unconstrained, seeds, strict=True):
            tiled = tf.tile(u[None], [num_starts] + [1] * u.shape.rank)
            noise = tf.random.stateless_normal(tiled.shape, seed=s, dtype=u.dtype)
            mask = tf.reshape(
                tf.cast(tf.range(num_starts) > 0, u.dtype), [-1] + [1] * u.shape.rank
            )
            jittered.append(tiled + init_jitter * mask * noise)
        unconstrained = jittered

    def log_prob_u(*us):
        return target_log_prob_fn(*[b.forward(u) for b, u in zip(bijs, us, strict=True)])

    lp0 = tf.convert_to_tensor(log_prob_u(*unconstrained))
    batch_shape = lp0.shape
    if not bool(tf.reduce_all(tf.math.is_finite(lp0))):
        raise TfhybridInputError(
            "target_log_prob_fn is not finite at the initial state "
            f"(values {lp0.numpy().ravel()[:5]}); start inside the prior's support"
        )
    for i, u in enumerate(unconstrained):
        if u.shape[: batch_shape.rank] != batch_shape:
            raise TfhybridInputError(
                f"state part {i} has shape {u.shape} but target_log_prob_fn returned batch "
                f"shape {batch_shape}: every part must start with the batch shape"
            )
    prune = None
    if prune_after is not None:
        if method != "adam":
            raise TfhybridInputError("prune_after applies to method='adam' only")
        if not isinstance(prune_after, int | np.integer) or prune_after < 1:
            raise TfhybridInputError(f"prune_after must be an int >= 1; got {prune_after!r}")
        if not isinstance(prune_keep, int | np.integer) or prune_keep < 1:
            raise TfhybridInputError(f"prune_keep must be an int >= 1; got {prune_keep!r}")
        if not np.isfinite(prune_margin) or prune_margin < 0:
            raise TfhybridInputError(f"prune_margin must be finite and >= 0; got "
                                     f"{prune_margin!r}")
        if batch_shape.rank == 0:
            raise TfhybridInputError("prune_after needs batched starts (a leading batch axis)")
        if prune_keep < batch_shape[0] and prune_after < int(num_steps):
            prune = (int(prune_after), int(prune_keep), float(prune_margin))
    restart = None
    if restart_after is not None:
        if method != "adam":
            raise TfhybridInputError("restart_after applies to method='adam' only")
        if not isinstance(restart_after, int | np.integer) or restart_after < 1:
            raise TfhybridInputError(f"restart_after must be an int >= 1; got "
                                     f"{restart_after!r}")
        if not callable(restart_fn):
            raise TfhybridInputError(f"restart_after needs a callable restart_fn; got "
                                     f"{restart_fn!r}")
        if prune_after is not None:
            raise TfhybridInputError("restart_after and prune_after cannot be combined")
        if restart_after < int(num_steps):
            restart = (int(restart_after),
                       _restart_in_unconstrained(restart_fn, bijs, batch_shape))
    per_update = steps_per_update or max(1, min(100, int(num_steps) // 20))
    bar = tqdm(total=int(num_steps), desc=f"MAP ({method})", disable=not progress, leave=False)
    try:
        if method == "adam":
            u_final, trace, conv, steps_run, rel, seconds, kept = _run_adam(
                log_prob_u, unconstrained, batch_shape, num_steps, learning_rate, rtol,
                per_update, jit_compile, bar, prune, bool(prune_grouped) and prune is not None,
                restart,
            )
        else:
            kept = None
            u_final, trace, conv, steps_run, rel, seconds = _run_lbfgs(
                log_prob_u, unconstrained, batch_shape, num_steps, rtol, tolerance,
                per_update, jit_compile, bar,
            )
    finally:
        bar.close()
    lp = tf.convert_to_tensor(log_prob_u(*u_final)).numpy()
    state = [b.forward(u) for b, u in zip(bijs, u_final, strict=True)]
    batch_shape = tf.TensorShape(lp.shape)  # the kept starts' after pruning
    conv = np.broadcast_to(np.asarray(conv, bool), batch_shape).copy()
    conv &= np.isfinite(lp)
    best = None if batch_shape.rank == 0 else np.unravel_index(np.argmax(lp), batch_shape)
    msg = _message(method, conv, lp, steps_run, num_steps, rel)
    return MapResult(
        state=state,
        unconstrained_state=list(u_final),
        log_prob=lp,
        loss_trace=np.asarray(trace),
        converged=conv,
        num_steps=int(steps_run),
        message=msg,
        best_index=None if best is None else tuple(int(i) for i in best),
        chunk_seconds=np.asarray(seconds),
        kept_starts=kept,
    )


def _message(method, conv, lp, steps_run, num_steps, rel) -> str:
    n = conv.size
    if np.all(conv):
        return (
            f"{method}: all {n} start(s) converged in {steps_run} steps; "
            f"best log p {lp.max():.6g}"
        )
    bad = np.flatnonzero(~conv.ravel())
    why = (
        "log p is not finite (diverged; lower the learning rate)"
        if not np.all(np.isfinite(lp))
        else f"still changing (relative change {np.max(np.asarray(rel).ravel()[bad]):.2e})"
        if steps_run >= num_steps
        else "the line search failed (check the gradient or rescale the parameters)"
    )
    return (
        f"{method}: NOT converged for {bad.size}/{n} start(s) (flat indices {bad[:10].tolist()})"
        f" after {steps_run}/{num_steps} steps: {why}; increase num_steps or adjust the "
        "learning rate / parameter scaling"
    )


class FunctionalAdam:
    """Adam (Kingma & Ba 2015) as a pure function of its state, for compiled loops.

    The update of ``keras.optimizers.Adam`` (same defaults, same bias correction folded into
    the step size, ``epsilon`` added to √v as Keras does, not to √v̂), with the optimiser
    state held in tensors instead of variables: ``state = init(params)``, then
    ``updates, state = update(grads, state, params)`` and ``params + updates``. This is the
    optimiser protocol of ``tfp.math.minimize_stateless`` (optax's ``init`` / ``update``), so a
    whole chunk of steps, gradients included, compiles into one XLA while-loop; the Keras
    optimiser's variable updates do not (measured on the lensing posterior: 2.8 s per step
    when a Keras ``apply_gradients`` sits in a compiled loop with an XLA-compiled gradient,
    against 9 ms for this). ``learning_rate`` is a float or a callable of the step (e.g. a
    ``keras.optimizers.schedules`` schedule), evaluated at the 0-based step as Keras does.
    """

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7):
        self.learning_rate = learning_rate
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def init(self, params):
        return (tf.constant(0, tf.int64), [tf.zeros_like(p) for p in params],
                [tf.zeros_like(p) for p in params])

    def update(self, grads, state, params=None):
        step, m, v = state
        dtype = grads[0].dtype
        lr = self.learning_rate(step) if callable(self.learning_rate) else self.learning_rate
        t = tf.cast(step + 1, dtype)
        # a Python float straight to the parameters' dtype (tf.cast would round it to float32)
        lr = tf.cast(lr, dtype) if tf.is_tensor(lr) else tf.constant(lr, dtype)
        alpha = lr * tf.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)
        m = [mi + (g - mi) * (1.0 - self.beta_1) for mi, g in zip(m, grads, strict=True)]
        v = [vi + (g * g - vi) * (1.0 - self.beta_2) for vi, g in zip(v, grads, strict=True)]
        updates = [-alpha * mi / (tf.sqrt(vi) + self.epsilon) for mi, vi in zip(m, v, strict=True)]
        return updates, (step + 1, m, v)


def _restart_in_unconstrained(restart_fn, bijs, batch_shape):
    """``restart_fn`` of :func:`find_map` on unconstrained parts: ``(params, loss) ->
    None | (rows, new_params)``, checked for shapes and finite values."""

    def call(params, loss):
        state = [b.forward(u).numpy() for b, u in zip(bijs, params, strict=True)]
        out = restart_fn(state, np.asarray(loss))
        if out is None:
            return None
        rows, new_state = out
        rows = np.asarray(rows, bool)
        if rows.shape != tuple(batch_shape) or len(new_state) != len(state):
            raise TfhybridInputError(
                f"restart_fn must return (rows of shape {tuple(batch_shape)}, {len(state)} "
                f"state parts); got rows {rows.shape} and {len(new_state)} parts")
        new = []
        for b, old, part in zip(bijs, params, new_state, strict=True):
            part = tf.convert_to_tensor(np.asarray(part), old.dtype)
            if part.shape != old.shape:
                raise TfhybridInputError(
                    f"restart_fn returned a state part of shape {part.shape}; expected "
                    f"{old.shape}")
            u = b.inverse(part)
            if not bool(tf.reduce_all(tf.math.is_finite(tf.boolean_mask(u, rows)))):
                raise TfhybridInputError("restart_fn returned a state outside the support "
                                         "(non-finite in unconstrained space)")
            new.append(u)
        return rows, new

    return call


def _map_moments(opt_state, fn):
    """:class:`FunctionalAdam` state with ``fn`` applied to every first and second moment
    (the step count unchanged)."""
    step, m, v = opt_state
    return step, [fn(x) for x in m], [fn(x) for x in v]


def _where_rows(rows: np.ndarray, new, old) -> tf.Tensor:
    """``new`` where ``rows`` (the batch shape, leading axes), else ``old``."""
    mask = tf.constant(rows.reshape(rows.shape + (1,) * (old.shape.rank - rows.ndim)))
    return tf.where(mask, tf.cast(new, old.dtype), old)


def _run_adam(
    log_prob_u, unconstrained, batch_shape, num_steps, learning_rate, rtol, per_update, jit, bar,
    prune=None, grouped=False, restart=None,
):
    """Adam in compiled chunks of at most ``per_update`` steps (one XLA while-loop each with
    ``jit``).

    Each chunk is the loop of ``tfp.math.minimize`` (loss and gradient at the current point,
    then the update; the trace records the loss before the update) on tensors. The number of
    steps is an argument of the compiled function (the losses fill a ``per_update``-row
    buffer), so one graph serves every chunk, the last, shorter one included.

    With ``prune = (after, keep, margin)`` (see :func:`find_map`) the kept starts go on through
    the same function, traced again for their shapes; with ``grouped`` the starts run in
    groups of ``keep`` from the start, so that one graph serves before and after the pruning.
    (Compiling the kept starts' graph in a background thread before the pruning was tried:
    it slowed the two-start chunks of the lensing MAP by ~70 % on a 2-core CPU and still left
    seconds of waiting.)

    With ``restart = (after, fn)`` (``fn`` from :func:`_restart_in_unconstrained`), the rows it
    marks at step ``after`` take its new values with zeroed Adam moments; the convergence test
    starts afresh there.
    """
    optimizer = FunctionalAdam(learning_rate)
    rank = len(batch_shape)

    def neg_log_prob_and_grads(params):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = -tf.convert_to_tensor(log_prob_u(*params))
        grads = tape.gradient(loss, params)
        return loss, [tf.zeros_like(p) if g is None else g
                      for p, g in zip(params, grads, strict=True)]

    def run_chunk(params, opt_state, n_steps):
        def body(i, params, opt_state, losses):
            loss, grads = neg_log_prob_and_grads(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = [p + u for p, u in zip(params, updates, strict=True)]
            return i + 1, params, opt_state, tf.tensor_scatter_nd_update(
                losses, tf.reshape(i, [1, 1]), tf.cast(loss, losses.dtype)[None])

        buffer = tf.zeros([per_update] + params[0].shape[:rank].as_list(), params[0].dtype)
        _, params, opt_state, losses = tf.while_loop(
            lambda i, *_: i < n_steps, body, (tf.constant(0), list(params), opt_state, buffer),
        )
        return params, opt_state, losses

    params = [tf.convert_to_tensor(u) for u in unconstrained]
    opt_state = optimizer.init(params)
    chunk = tf.function(run_chunk, jit_compile=bool(jit), autograph=False)
    traces, seconds = [], []
    done, prev_end, kept = 0, None, None
    conv = np.zeros(batch_shape, bool)
    rel = np.full(conv.shape, np.inf)
    while done < num_steps:
        n = min(per_update, num_steps - done)
        if prune is not None and done < prune[0]:
            n = min(n, prune[0] - done)  # a chunk ends where the pruning can happen
        if restart is not None and done < restart[0]:
            n = min(n, restart[0] - done)
        t0 = time.perf_counter()
        if grouped and kept is None:
            params, opt_state, losses = _grouped_chunk(chunk, params, opt_state, n, prune[1])
        else:
            params, opt_state, losses = chunk(params, opt_state, tf.constant(n))
            losses = losses.numpy()[:n]
        params = list(params)
        seconds.append(time.perf_counter() - t0)
        traces.append(losses if kept is None else _scatter_starts(losses, kept, batch_shape))
        done += n
        bar.update(n)
        end = losses[-1]
        if restart is not None and done >= restart[0]:
            out = restart[1](params, end)
            restart = None
            if out is not None:
                rows, new = out
                params = [_where_rows(rows, x, p) for x, p in zip(new, params, strict=True)]
                opt_state = _map_moments(opt_state,
                                         lambda x, r=rows: _where_rows(r, tf.zeros_like(x), x))
                prev_end, conv, rel = None, np.zeros(conv.shape, bool), np.full(conv.shape,
                                                                               np.inf)
                continue
        if prev_end is not None:
            rel = np.abs(prev_end - end) / np.maximum(1.0, np.abs(end))
            conv = rel < rtol
            bar.set_postfix(loss=float(np.sum(end)), rel=float(np.max(rel)))
            if np.all(conv) or not np.all(np.isfinite(end)):
                break
        prev_end = end
        if prune is not None and kept is None and done >= prune[0]:
            # the prune[1] lowest losses of each column (NaN last), with their Adam moments,
            # once they lead the others by the margin in every column
            order = np.argsort(np.where(np.isnan(end), np.inf, end), axis=0, kind="stable")
            ranked = np.take_along_axis(end, order, axis=0)
            lead = ranked[prune[1]] - ranked[prune[1] - 1]
            if not np.all(lead >= prune[2]):  # NaN (a diverged kept start) waits too
                continue
            kept = order[:prune[1]]
            params = [_take_starts(p, kept) for p in params]
            opt_state = _map_moments(opt_state, lambda x, k=kept: _take_starts(x, k))
            prev_end = np.take_along_axis(end, kept, axis=0)
            conv, rel = np.zeros(kept.shape, bool), np.full(kept.shape, np.inf)
    return params, np.concatenate(traces), conv, done, rel, seconds, kept


def _grouped_chunk(chunk, params, opt_state, n: int, size: int):
    """One chunk of ``n`` steps of every start, run as groups of ``size`` starts (leading axis)
    through ``chunk``; the last group is padded with copies of its first start, whose results
    are dropped. Returns what ``chunk`` returns for the whole batch, losses ``(n, ...)``."""
    total = int(params[0].shape[0])
    step, m, v = opt_state
    outs = []
    for lo in range(0, total, size):
        idx = np.arange(lo, lo + size)
        idx = np.where(idx < total, idx, lo)  # padding: copies of the group's first start
        take = [tf.gather(x, idx) for x in params]
        state = (step, [tf.gather(x, idx) for x in m], [tf.gather(x, idx) for x in v])
        p, (step_out, m_out, v_out), losses = chunk(take, state, tf.constant(n))
        real = min(size, total - lo)
        outs.append(([x[:real] for x in p], [x[:real] for x in m_out],
                     [x[:real] for x in v_out], losses.numpy()[:n, :real]))
    params = [tf.concat([o[0][i] for o in outs], 0) for i in range(len(params))]
    m = [tf.concat([o[1][i] for o in outs], 0) for i in range(len(m))]
    v = [tf.concat([o[2][i] for o in outs], 0) for i in range(len(v))]
    return params, (step_out, m, v), np.concatenate([o[3] for o in outs], axis=1)


def _take_starts(x, kept: np.ndarray) -> tf.Tensor:
    """``x[kept[i, j...], j...]``: the kept starts (leading axis) of a batched tensor ``x``
    whose batch shape is ``kept``'s but for its leading axis; event axes follow."""
    x = tf.convert_to_tensor(x)
    idx = tf.constant(kept.reshape(kept.shape + (1,) * (x.shape.rank - kept.ndim)), tf.int64)
    idx = tf.broadcast_to(idx, tf.concat([kept.shape[:1], tf.shape(x)[1:]], 0))
    return tf.experimental.numpy.take_along_axis(x, idx, axis=0)


def _scatter_starts(losses: np.ndarray, kept: np.ndarray, batch_shape) -> np.ndarray:
    """Losses ``(steps, *kept.shape)`` of the kept starts placed at their indices of the
    initial ``(steps, *batch_shape)`` batch; NaN for the dropped starts."""
    out = np.full((losses.shape[0],) + tuple(batch_shape), np.nan, losses.dtype)
    np.put_along_axis(out, np.broadcast_to(kept[None], losses.shape), losses, axis=1)
    return out


def _run_lbfgs(
    log_prob_u, unconstrained, batch_shape, num_steps, rtol, tolerance, per_update, jit, bar
):
    nb = batch_shape.rank
    n_batch = int(np.prod(batch_shape.as_list())) if nb else 1
    event_shapes = [u.shape[nb:] for u in unconstrained]
    sizes = [int(np.prod(s.as_list())) for s in event_shapes]
    dtype = unconstrained[0].dtype

    def unpack(flat):
        pieces = tf.split(flat, sizes, axis=-1)
        return [
            tf.reshape(tf.cast(p, u.dtype), batch_shape.concatenate(s))
            for p, u, s in zip(pieces, unconstrained, event_shapes, strict=True)
        ]

    def value_and_grad(flat):
        with tf.GradientTape() as tape:
            tape.watch(flat)
            loss = -tf.reshape(tf.convert_to_tensor(log_prob_u(*unpack(flat))), [n_batch])
        return loss, tape.gradient(loss, flat)

    flat0 = tf.concat(
        [tf.cast(tf.reshape(u, [n_batch, -1]), dtype) for u in unconstrained], axis=-1
    )

    def start():
        return tfp.optimizer.lbfgs_minimize(
            value_and_grad, initial_position=flat0, max_iterations=0, tolerance=tolerance,
            f_relative_tolerance=rtol,
        )

    def resume(results, target):
        return tfp.optimizer.lbfgs_minimize(
            value_and_grad, initial_position=None, previous_optimizer_results=results,
            max_iterations=target,
            tolerance=tolerance, f_relative_tolerance=rtol,
        )

    try:
        # The initial state is one objective evaluation: build it eagerly rather than trace a
        # second L-BFGS graph (tracing lbfgs_minimize costs seconds).
        from tensorflow_probability.python.optimizer import lbfgs as tfp_lbfgs

        results = tfp_lbfgs._get_initial_state(value_and_grad, flat0, 10, tolerance)
    except (ImportError, AttributeError, TypeError):
        results = tf.function(start, autograph=False)()
    step = tf.function(resume, jit_compile=jit, autograph=False)
    traces, seconds, done = [], [], 0
    while done < num_steps:
        target = min(done + per_update, num_steps)
        t0 = time.perf_counter()
        results = step(results, tf.constant(target))
        it = int(tf.reduce_max(results.num_iterations))
        seconds.append(time.perf_counter() - t0)
        bar.update(max(0, it - done))
        traces.append(results.objective_value.numpy().reshape(batch_shape))
        stopped = results.converged.numpy() | results.failed.numpy()
        done = target
        if np.all(stopped) or it < target:
            done = it
            break
    conv = results.converged.numpy().reshape(batch_shape)
    rel = np.where(conv, 0.0, np.inf)
    return unpack(results.position), np.stack(traces), conv, done, rel, seconds

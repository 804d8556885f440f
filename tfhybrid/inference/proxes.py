"""Proximal operators for the non-differentiable terms r(x) of the deblending loss.

Lanusse, Melchior & Moolekamp (2019), eq. 4 splits the loss into L = f(x) + g(x) + r(x), with
f the Gaussian likelihood, g = −log p_θ(x) the deep prior and r = Σ_i R_i(x) the physical
constraints, which enter the proximal-gradient update (eq. 5) only through prox_{λ r}. This
module holds those operators:

* ``prox_positive``: projection onto the non-negative orthant, prox of ι_{≥0} (eq. 7).
* ``prox_symmetric``: SCARLET's 180° rotational symmetry about a centre pixel.
* ``prox_monotonic``: SCARLET's radial monotonicity (Melchior et al. 2018): every pixel is at
  most its reference neighbour towards the centre.
* ``prox_l1`` / ``prox_l0``: sparsity (soft and hard thresholding).
* ``prox_normalize_max`` / ``prox_normalize_sum``: normalisation constraints.
* ``chain_proxes``: compose several of them (applied left to right).

Conventions
-----------
Every operator takes a tensor of stamps with shape ``(..., h, w)`` (axis order ``(y, x)``) and
works independently on each stamp of the leading batch dimensions (sources, scenes); operators
that do not need image structure (positivity, L1, L0) act element-wise on any shape. Every
operator accepts a keyword ``step`` (the gradient step λ_t of eq. 5), so that all of them can
be called as ``prox(x, step=λ)`` by :func:`tfhybrid.inference.proximal.proximal_gradient`;
projections ignore it. Image-structure operators need static ``h, w``; their index maps are
built once per (shape, centre) in NumPy and cached, so a call is a few vectorised gathers
(no Python loop over pixels).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tfhybrid.validation import TfhybridInputError

ProxFn = Callable[..., tf.Tensor]

__all__ = [
    "prox_positive",
    "prox_symmetric",
    "prox_monotonic",
    "prox_l1",
    "prox_l0",
    "prox_normalize_max",
    "prox_normalize_sum",
    "chain_proxes",
    "call_prox",
]


def prox_positive(x: tf.Tensor, step=None) -> tf.Tensor:
    """Projection onto x ≥ 0: prox of the indicator ι_{≥0} (000_* eqs. 4, 7), = max(x, 0).

    Element-wise, any shape. ``step`` is ignored (a projection does not depend on λ).
    """
    x = tf.convert_to_tensor(x)
    return tf.maximum(x, tf.zeros([], x.dtype))


def prox_l1(x: tf.Tensor, threshold, step=None) -> tf.Tensor:
    """Soft thresholding: prox of λ·t·‖x‖₁, i.e. sign(x)·max(|x| − λt, 0).

    Parameters
    ----------
    x : tensor, any shape.
    threshold : t ≥ 0, scalar or broadcastable to ``x`` (e.g. ``(K, 1, 1)`` per source).
    step : λ, the gradient step of eq. 5; ``None`` means 1 (threshold used as is).
    """
    x = tf.convert_to_tensor(x)
    t = tf.cast(threshold, x.dtype)
    if step is not None:
        t = t * tf.cast(step, x.dtype)
    return tf.sign(x) * tf.maximum(tf.abs(x) - t, tf.zeros([], x.dtype))


def prox_l0(x: tf.Tensor, threshold, step=None) -> tf.Tensor:
    """Hard thresholding: the exact prox of λ·t·‖x‖₀.

    argmin_z ½‖z − x‖² + λt‖z‖₀ keeps x_i where x_i² > 2λt and sets it to zero otherwise, so
    the cut is at |x_i| = √(2λt). (scarlet's ``prox_hard`` cuts at λt instead; pass
    ``threshold = c²/(2λ)`` to reproduce a cut at c.) ``step=None`` means λ = 1.
    """
    x = tf.convert_to_tensor(x)
    t = tf.cast(threshold, x.dtype)
    if step is not None:
        t = t * tf.cast(step, x.dtype)
    keep = tf.square(x) > 2.0 * t
    return tf.where(keep, x, tf.zeros_like(x))


def prox_normalize_max(x: tf.Tensor, step=None, eps: float = 1e-30) -> tf.Tensor:
    """Scale each stamp of ``(..., h, w)`` so that its maximum is 1 (SCARLET's morphology norm).

    Stamps whose maximum is ≤ ``eps`` are returned unchanged (nothing to normalise).
    As a prox on one block this is a projection onto {max = 1} along rays; the amplitude it
    removes must be absorbed by the SED block, which the caller does.
    """
    x = tf.convert_to_tensor(x)
    m = tf.reduce_max(x, axis=[-2, -1], keepdims=True)
    safe = m > eps
    return tf.where(safe, x / tf.where(safe, m, tf.ones_like(m)), x)


def prox_normalize_sum(x: tf.Tensor, step=None, eps: float = 1e-30) -> tf.Tensor:
    """Scale each stamp of ``(..., h, w)`` so that it sums to 1 (flux normalisation).

    Stamps whose sum is ≤ ``eps`` are returned unchanged.
    """
    x = tf.convert_to_tensor(x)
    s = tf.reduce_sum(x, axis=[-2, -1], keepdims=True)
    safe = s > eps
    return tf.where(safe, x / tf.where(safe, s, tf.ones_like(s)), x)


def _static_image_shape(x: tf.Tensor, name: str) -> tuple[int, int]:
    if x.shape.rank is None or x.shape.rank < 2:
        raise TfhybridInputError(f"{name} needs stamps of shape (..., h, w); got shape {x.shape}")
    h, w = x.shape[-2], x.shape[-1]
    if h is None or w is None:
        raise TfhybridInputError(f"{name} needs a static stamp size (h, w); got shape {x.shape}")
    return int(h), int(w)


def _resolve_center(h: int, w: int, center, name: str) -> tuple[int, int]:
    if center is None:
        return h // 2, w // 2
    cy, cx = (int(c) for c in center)
    if not (0 <= cy < h and 0 <= cx < w):
        raise TfhybridInputError(
            f"{name}: center (y, x) must lie inside the {h}x{w} stamp; got ({cy}, {cx})"
        )
    return cy, cx


@functools.lru_cache(maxsize=64)
def _symmetry_index_map(h: int, w: int, cy: int, cx: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat index of each pixel's 180° partner about (cy, cx), and whether it is in the stamp."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = 2 * cy - yy, 2 * cx - xx
    valid = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    partner = np.where(valid, np.clip(py, 0, h - 1) * w + np.clip(px, 0, w - 1), 0)
    return partner.reshape(-1).astype(np.int32), valid.reshape(-1)


def prox_symmetric(
    x: tf.Tensor, step=None, center=None, mode: str = "mean", fill: float = 0.0
) -> tf.Tensor:
    """SCARLET's 180° symmetry constraint about a centre pixel.

    Each pixel p and its partner p' = 2c − p are replaced by their mean (``mode="mean"``, the
    Euclidean projection onto symmetric images, scarlet's "soft" symmetry with strength 1) or
    both by their minimum (``mode="min"``, scarlet's "sdss" variant). Pixels whose partner falls
    outside the stamp are set to ``fill`` (scarlet does the same: the symmetric region is the
    largest box centred on c). The result is exactly symmetric and the operator is idempotent.

    Parameters
    ----------
    x : tensor (..., h, w), axis order (y, x); leading dims are independent stamps.
    step : ignored (projection).
    center : (cy, cx) pixel indices of the symmetry centre; default (h // 2, w // 2).
    mode : "mean" or "min".
    fill : value for pixels without a partner inside the stamp.
    """
    x = tf.convert_to_tensor(x)
    h, w = _static_image_shape(x, "prox_symmetric")
    cy, cx = _resolve_center(h, w, center, "prox_symmetric")
    if mode not in ("mean", "min"):
        raise TfhybridInputError(f"prox_symmetric mode must be 'mean' or 'min'; got {mode!r}")
    partner, valid = _symmetry_index_map(h, w, cy, cx)
    flat = tf.reshape(x, tf.concat([tf.shape(x)[:-2], [h * w]], axis=0))
    mirrored = tf.gather(flat, partner, axis=-1)
    sym = 0.5 * (flat + mirrored) if mode == "mean" else tf.minimum(flat, mirrored)
    out = tf.where(tf.constant(valid), sym, tf.cast(fill, x.dtype))
    return tf.reshape(out, tf.shape(x))


@functools.lru_cache(maxsize=64)
def _monotonic_doubling_maps(h: int, w: int, cy: int, cx: int) -> tuple[np.ndarray, ...]:
    """Reference-neighbour map of every pixel and its powers 2, 4, 8, … (pointer doubling).

    The reference of pixel p is, among its 8 neighbours, the one whose direction from p is best
    aligned with the direction from p to the centre (scarlet's "nearest" monotonicity). That
    neighbour is always strictly closer to the centre, so following references from any pixel
    reaches the centre, which is its own reference.
    """
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    vy, vx = (cy - yy).astype(float), (cx - xx).astype(float)
    norm_v = np.hypot(vy, vx)
    best_cos = np.full((h, w), -np.inf)
    ref = np.arange(h * w).reshape(h, w)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            ny, nx = yy + dy, xx + dx
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            cos = (dy * vy + dx * vx) / (np.hypot(dy, dx) * np.where(norm_v > 0, norm_v, 1.0))
            # Exact ties cannot occur on an integer grid (they need tan θ = √2 − 1).
            better = inside & (norm_v > 0) & (cos > best_cos + 1e-12)
            ref = np.where(better, np.clip(ny, 0, h - 1) * w + np.clip(nx, 0, w - 1), ref)
            best_cos = np.where(better, cos, best_cos)
    ref = ref.reshape(-1)
    # Depth of the reference chain bounds the number of doublings needed.
    dist = np.hypot(cy - yy, cx - xx).reshape(-1)
    assert np.all(dist[ref] < dist + (dist == 0)), "reference must be closer to the centre"
    maps = [ref.astype(np.int32)]
    n_doublings = int(np.ceil(np.log2(max(h, w) + 1))) + 1
    for _ in range(n_doublings):
        maps.append(maps[-1][maps[-1]])
    return tuple(maps)


def prox_monotonic(x: tf.Tensor, step=None, center=None) -> tf.Tensor:
    """SCARLET's radial monotonicity: projection onto images non-increasing from the centre.

    Melchior et al. (2018), used as the baseline prior in 000_* (App. A): processing pixels in
    order of distance from the peak, each pixel is clipped to at most its reference neighbour
    towards the centre, ``x[p] ← min(x[p], x[ref(p)])``. The sequential sweep's result is the
    minimum of ``x`` along the reference chain from p to the centre; it is computed here by
    pointer doubling, ``y ← min(y, y[ref^(2^k)])`` for k = 0, 1, …, i.e. ⌈log₂ max(h, w)⌉ + 2
    vectorised gathers, batched over all leading dims. The centre pixel is unchanged, every
    pixel ends ≤ its reference, and the operator is idempotent.

    Parameters
    ----------
    x : tensor (..., h, w), axis order (y, x).
    step : ignored (projection).
    center : (cy, cx) pixel indices of the peak; default the box centre (h // 2, w // 2).
    """
    x = tf.convert_to_tensor(x)
    h, w = _static_image_shape(x, "prox_monotonic")
    cy, cx = _resolve_center(h, w, center, "prox_monotonic")
    maps = _monotonic_doubling_maps(h, w, cy, cx)
    y = tf.reshape(x, tf.concat([tf.shape(x)[:-2], [h * w]], axis=0))
    for idx in maps:  # a fixed ~7 gathers, unrolled at trace time
        y = tf.minimum(y, tf.gather(y, idx, axis=-1))
    return tf.reshape(y, tf.shape(x))


def _accepts_step(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "step" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def call_prox(prox: ProxFn, x: tf.Tensor, step=None) -> tf.Tensor:
    """Call ``prox(x, step=step)`` if it takes a ``step`` keyword, else ``prox(x)``."""
    if _accepts_step(prox):
        return prox(x, step=step)
    return prox(x)


def chain_proxes(*proxes: ProxFn) -> ProxFn:
    """Compose proximal operators, applied left to right: ``chain(a, b)(x) = b(a(x))``.

    Each element is a callable ``prox(x, step=None)`` (or ``prox(x)``); use
    ``functools.partial(prox_l1, threshold=t)`` to fix parameters. A chain of projections is
    not in general the projection onto the intersection, but it is what SCARLET does and is
    exact when the sets are compatible (e.g. positivity then monotonicity then symmetry keeps
    all three; see the tests).
    """
    for i, p in enumerate(proxes):
        if not callable(p):
            raise TfhybridInputError(f"chain_proxes argument {i} must be callable; got {p!r}")

    def chained(x, step=None):
        for p in proxes:
            x = call_prox(p, x, step)
        return x

    chained.__name__ = "chain(" + ", ".join(getattr(p, "__name__", "prox") for p in proxes) + ")"
    return chained

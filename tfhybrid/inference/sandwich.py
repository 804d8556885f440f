"""Model-robust ("sandwich") covariance of an estimate whose likelihood is misspecified.

Why: a posterior's width ``H⁻¹`` (the inverse Hessian of −log p at the mode) is the right
uncertainty only when the model can produce the data. When it cannot (a source model that
misses details of a real galaxy), the residuals are not the likelihood's white noise but
carry structure, the estimate follows that structure, and intervals of width ``H⁻¹`` cover
the truth less often than they say. The sandwich covariance (Huber 1967; White 1982,
Econometrica 50, 1; for Bayesian posteriors Müller 2013, Econometrica 81, 1805)

    Σ = H⁻¹ J H⁻¹,      J = Σ_b g_b g_bᵀ,

replaces the model's Fisher information in the middle by the observed spread of the score:
``g_b`` is the gradient of the log-likelihood of block ``b`` of the data at the estimate. With
a correctly specified likelihood ``E[J] = H`` (up to the prior's curvature) and ``Σ`` ≈
``H⁻¹``; with structured residuals ``J`` is larger along the directions the residuals pull
on, and so is ``Σ``.

Blocks, not pixels: a misfit is correlated over neighbouring pixels, and the scores of
pixels whose residuals are correlated must be summed before they are squared, or ``J``
misses their covariance (the pixel-level estimator is White's, for independent but not
identically distributed errors). Blocks larger than the misfit's correlation length and
numerous enough to average (the spatial analogue of a HAC estimator, Conley 1999,
J. Econometrics 92, 1) give a consistent ``J``.

Draws of a posterior can be given ``Σ`` as their covariance by an affine map per batch
member (:func:`open_faced_adjustment`, the open-faced sandwich of Shaby 2014), which keeps
their mean and, up to that linear map, their shape.

Precision: float64 throughout (``J`` sums squares of scores that nearly cancel).
"""

from __future__ import annotations

import numpy as np

from tfhybrid.validation import TfhybridInputError

__all__ = ["block_scores", "floored_inverse", "sandwich_covariance", "open_faced_adjustment"]


def block_scores(pixel_scores, block_size: int, overlapping: bool = True) -> np.ndarray:
    """Sum per-pixel score vectors over ``block_size × block_size`` blocks of pixels.

    ``pixel_scores``: ``(..., ny, nx, D)``, the gradient of each pixel's log-likelihood
    term (e.g. ``(y − f(θ)) / σ² · ∂f/∂θ`` for a Gaussian). Returns ``(..., B, D)`` float64.

    ``overlapping=True`` (the default): every position of a sliding ``b × b`` window,
    including those that overhang the image (zeros outside), each sum divided by ``b``.
    Then ``Σ_w g_w g_wᵀ = Σ_{p,p'} k(p − p') s_p s_p'ᵀ`` with the Bartlett weights
    ``k = (1 − |Δx|/b)₊ (1 − |Δy|/b)₊`` (a window holds both pixels for that many of its
    positions): the kernel estimator of Conley (1999), positive semi-definite, and less
    noisy than disjoint blocks, which drop the covariance of pixels on either side of a
    block's edge. ``overlapping=False``: disjoint blocks (``ny`` and ``nx`` must be
    multiples of ``b``).
    """
    g = np.asarray(pixel_scores, dtype=np.float64)
    b = block_size
    if isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1:
        raise TfhybridInputError(f"block_size must be an integer >= 1; got {b!r}")
    if g.ndim < 3:
        raise TfhybridInputError(
            f"pixel_scores must have shape (..., ny, nx, D); got {g.shape}")
    ny, nx, d = g.shape[-3:]
    if not np.all(np.isfinite(g)):
        raise TfhybridInputError("pixel_scores contain NaN or inf")
    lead = g.shape[:-3]
    if overlapping:
        if b > min(ny, nx):
            raise TfhybridInputError(
                f"block_size = {b} is larger than the image ({ny} x {nx})")
        # window sums from a summed-area table, the image padded by b − 1 zeros on each side
        pad = [(0, 0)] * len(lead) + [(b, b - 1), (b, b - 1), (0, 0)]
        c = np.cumsum(np.cumsum(np.pad(g, pad), axis=-3), axis=-2)
        win = (c[..., b:, b:, :] - c[..., :-b, b:, :] - c[..., b:, :-b, :]
               + c[..., :-b, :-b, :]) / b
        return win.reshape(lead + (-1, d))
    if ny % b or nx % b:
        raise TfhybridInputError(
            f"the image ({ny} x {nx}) must be a multiple of block_size = {b} on both axes")
    g = g.reshape(lead + (ny // b, b, nx // b, b, d)).sum(axis=(-4, -2))
    return g.reshape(lead + ((ny // b) * (nx // b), d))


def floored_inverse(hessian, rel_floor: float = 1e-10) -> np.ndarray:
    """``H⁻¹`` of symmetric ``(..., D, D)`` (symmetrised first), float64, with eigenvalues
    below ``rel_floor`` × the largest |eigenvalue| raised to that floor: a flat or
    negative-curvature direction gets a large but finite variance instead of a failed or
    negative inversion. The bread of :func:`sandwich_covariance`, and the Laplace
    covariance it is compared with."""
    h = np.asarray(hessian, dtype=np.float64)
    h = 0.5 * (h + np.swapaxes(h, -1, -2))
    w, v = np.linalg.eigh(h)
    top = np.max(np.abs(w), axis=-1, keepdims=True)
    w = np.maximum(w, rel_floor * np.maximum(top, np.finfo(np.float64).tiny))
    return np.einsum("...ij,...j,...kj->...ik", v, 1.0 / w, v)


def sandwich_covariance(hessian, scores, rel_floor: float = 1e-10) -> np.ndarray:
    """``Σ = H⁻¹ (Σ_b g_b g_bᵀ) H⁻¹`` per batch member.

    ``hessian``: ``(..., D, D)``, of −log p at the estimate, inverted by
    :func:`floored_inverse`. ``scores``: ``(..., B, D)``, the
    log-likelihood's gradient per block (:func:`block_scores`). Returns ``(..., D, D)``
    float64.
    """
    h = np.asarray(hessian, dtype=np.float64)
    g = np.asarray(scores, dtype=np.float64)
    if h.ndim < 2 or h.shape[-1] != h.shape[-2]:
        raise TfhybridInputError(f"hessian must have shape (..., D, D); got {h.shape}")
    if g.ndim < 2 or g.shape[-1] != h.shape[-1] or g.shape[:-2] != h.shape[:-2]:
        raise TfhybridInputError(
            f"scores must have shape {h.shape[:-2] + ('B', h.shape[-1])} to match the "
            f"hessian {h.shape}; got {g.shape}")
    if not (np.all(np.isfinite(h)) and np.all(np.isfinite(g))):
        raise TfhybridInputError("hessian or scores contain NaN or inf")
    h_inv = floored_inverse(h, rel_floor)
    meat = np.einsum("...bi,...bj->...ij", g, g)
    out = h_inv @ meat @ h_inv
    return 0.5 * (out + np.swapaxes(out, -1, -2))


def _sqrt_and_inverse_sqrt(cov: np.ndarray, rel_floor: float = 1e-12):
    """Symmetric square root of ``(..., d, d)`` covariances and of their (floored) inverse."""
    w, v = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
    w = np.maximum(w, rel_floor * np.maximum(w.max(-1, keepdims=True), 1e-300))
    vt = np.swapaxes(v, -1, -2)
    return (v * np.sqrt(w)[..., None, :]) @ vt, (v / np.sqrt(w)[..., None, :]) @ vt


def open_faced_adjustment(draws, target_covariance) -> np.ndarray:
    """Draws moved to ``ū + Σ^{1/2} C^{−1/2} (u − ū)``: the open-faced sandwich adjustment.

    Shaby (2014, J. Comput. Graph. Stat. 23, 853); Ribatet, Cooley & Davison (2012) for
    composite likelihoods. ``draws``: ``(N, B, d)``, ``N`` draws of ``B`` independent
    posteriors in ``d`` (unconstrained) coordinates; ``target_covariance``: ``(B, d, d)``,
    e.g. :func:`sandwich_covariance`. ``ū``, ``C``: the draws' mean and covariance per
    batch member. Symmetric square roots, so the result does not depend on the
    coordinates' order. The adjusted draws' mean is the draws' and their sample covariance
    is ``Σ`` exactly; their shape is the draws' up to that linear map. A member whose
    draws never moved in some coordinate (zero variance: a stuck chain) is returned as is.
    Returns ``(N, B, d)`` float64.
    """
    u = np.asarray(draws, dtype=np.float64)
    target = np.asarray(target_covariance, dtype=np.float64)
    if u.ndim != 3 or target.shape != (u.shape[1], u.shape[2], u.shape[2]):
        raise TfhybridInputError(f"draws must be (N, B, d) and target_covariance (B, d, d); "
                                 f"got {u.shape} and {target.shape}")
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(target))):
        raise TfhybridInputError("draws and target_covariance must be finite")
    mean = u.mean(0)
    dev = u - mean
    cov = np.einsum("nbi,nbj->bij", dev, dev) / max(u.shape[0] - 1, 1)
    root_target, _ = _sqrt_and_inverse_sqrt(target)
    _, inv_root_cov = _sqrt_and_inverse_sqrt(cov)
    # exact test on the draws themselves: the mean of equal numbers is not always equal to
    # them in floating point, and C^{-1/2} would blow that rounding up
    moved = np.all(np.ptp(u, axis=0) > 0, axis=-1)
    omega = np.where(moved[:, None, None], root_target @ inv_root_cov, np.eye(u.shape[2]))
    return np.where(moved[None, :, None], mean + np.einsum("bij,nbj->nbi", omega, dev), u)

"""Lens deflection profiles: SPLE / EPL main halo, SIE and external shear.

Implements the lens model of Chianese et al. 2020 (MNRAS 496, 381; file ``003_*`` of the
papers), section 3.2 (eqs. 10-13) and appendix A (eqs. A1-A7).

Conventions
-----------
* Angles (positions, Einstein radius, deflections) are in arcsec; the orientation ``phi`` is in
  radians. ``x`` is the first sky coordinate (image column direction), ``y`` the second.
* Convergence of the SPLE / EPL main halo (eqs. 11-12)::

      kappa = (3 - gamma) / 2 * (rho / r_ein) ** (1 - gamma),
      rho   = sqrt(x'**2 + y'**2 / q**2),

  where ``(x', y')`` are coordinates centred on the lens ``(x0, y0)`` and rotated by ``phi``::

      x' =  cos(phi) (x - x0) + sin(phi) (y - y0)
      y' = -sin(phi) (x - x0) + cos(phi) (y - y0)

  so the MAJOR axis of the mass contours lies along ``x'``, at angle ``phi`` counter-clockwise
  from the ``+x`` axis, and ``q <= 1`` is the minor-to-major axis ratio. ``r_ein`` is thus the
  MAJOR-axis Einstein radius: the elliptical radius ``rho`` is measured along the major axis.
* lenstronomy (``EPL``, ``SIE``) normalises to the intermediate axis,
  ``kappa = (3 - gamma)/2 * (theta_E / sqrt(q x'^2 + y'^2 / q)) ** (gamma - 1)``. Because
  ``sqrt(q x'^2 + y'^2/q) = sqrt(q) * rho``, the two agree when ``theta_E = sqrt(q) * r_ein``;
  its ``e1, e2 = (1-q)/(1+q) * (cos 2 phi, sin 2 phi)`` with the same ``phi``.
  :func:`paper_to_lenstronomy` and :func:`lenstronomy_to_paper` convert.
* External shear (eq. 13): ``alpha_ext = [[gamma1, gamma2], [gamma2, -gamma1]] @ (x, y)`` with
  ``(x, y)`` the absolute sky position (origin of the coordinate system, not the lens centre),
  identical to lenstronomy's ``SHEAR`` with ``ra_0 = dec_0 = 0``.

Broadcasting
------------
Positions ``x`` and ``y`` broadcast against each other; call their common shape ``S``.
Parameters may be Python numbers, or arrays / tensors of a batch shape ``B`` whose rank is at
most ``rank(S)``: each parameter gets trailing singleton axes appended up to ``rank(S)``, then
everything broadcasts. A batch of lens systems therefore uses parameters of shape ``(batch,)``
and positions of shape ``(batch, ny, nx)`` (or ``(1, ny, nx)`` for one shared grid); the result
has the broadcast shape.

Accuracy and dtype
------------------
Computation runs in the dtype of ``x`` when it is a float tensor / array (float32 or float64),
float32 otherwise. The exact EPL series (:func:`epl_deflection`) sums enough terms for a
truncation error below ~1e-8 (float32) or ~1e-15 (float64) relative, so it is accurate to the
rounding of the dtype. The interpolation table (:func:`spl_deflection`) is limited by the table
(see :mod:`tfhybrid.physics.spl_table`), not by the dtype.

Which deflection to use
-----------------------
:func:`spl_deflection` (the paper's table) is the hot path for fitting and sampling: relative
error <= 1e-5 over ``q in [0.1, 1]``, ``gamma in [1.2, 2.8]`` (<= 5e-7 for ``q >= 0.2``),
8 ms per 256 x 256 field in float32 with XLA on 2 CPU cores, 17 ms with gradients.
:func:`epl_deflection` is exact (any ``0 < q <= 1``, ``1 < gamma < 3``), about as fast for the
value at moderate ``q`` but slower with gradients (46 ms float32, 240 ms float64 at q = 0.5)
and its cost grows as ``1 / q``; autodiff through its series loop stores every term.
:func:`sie_deflection` is the closed form for ``gamma = 2``.

Validation
----------
The public functions check values (finite, ``0 < q <= 1``, ``r_ein > 0``, slope in range) when
they are called eagerly; when traced inside ``tf.function`` the values are symbolic and are
not checked (validate once outside the compiled loop). The ``*_core`` functions never check.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfhybrid.validation import TfhybridInputError, check_finite

#: Anything convertible to a float tensor: Python number, NumPy array, tf.Tensor / Variable.
TensorLike = "float | np.ndarray | tf.Tensor | tf.Variable"
Deflection = tuple[tf.Tensor, tf.Tensor]

__all__ = [
    "epl_deflection",
    "sie_deflection",
    "spl_deflection",
    "external_shear_deflection",
    "paper_to_lenstronomy",
    "lenstronomy_to_paper",
    "circularised_einstein_radius",
    "epl_num_terms",
    "epl_deflection_major_axis",
    "sie_deflection_major_axis",
    "EPL_GAMMA_RANGE",
]

#: Slopes for which the Tessore & Metcalf series is valid (convergence needs 1 < gamma < 3).
EPL_GAMMA_RANGE = (1.0, 3.0)

# Bound on series terms when q is symbolic (inside tf.function): a static loop bound keeps the
# loop XLA-compilable and its gradient buffers (bound x field size) finite; 400 terms converge
# for q >= 0.05 in float64 (q >= 0.02 in float32). With concrete q (eager calls) the bound is
# the exact count needed, up to _MAX_EAGER_TERMS.
_MAX_EPL_TERMS = 400
# A static (Python int) count up to this is unrolled (traceable and differentiable under XLA).
_MAX_UNROLLED_TERMS = 400
_MAX_EAGER_TERMS = 100000


# ----------------------------------------------------------------------------------------------
# Helpers: dtype, broadcasting, validation
# ----------------------------------------------------------------------------------------------
def _infer_dtype(x) -> tf.DType:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return tf.float32
    dtype = tf.as_dtype(dtype)
    return dtype if dtype in (tf.float32, tf.float64) else tf.float32


def _is_symbolic(value) -> bool:
    return isinstance(value, tf.Tensor) and not hasattr(value, "numpy")


def _concrete(value):
    """NumPy value of ``value`` if it is known now (eager, constant), else None."""
    if isinstance(value, (np.ndarray, np.generic, float, int, list, tuple)):
        return np.asarray(value)
    if tf.executing_eagerly():
        try:  # EagerTensor, tf.Variable, keras.Variable
            return np.asarray(value)
        except (TypeError, ValueError, NotImplementedError):
            return None
    if isinstance(value, tf.Tensor):
        return tf.get_static_value(value)
    return None


def _validate(name: str, value, low=None, high=None, low_open=False, high_open=False, unit=""):
    arr = _concrete(value)
    if arr is None:
        return
    if arr.dtype.kind not in "biuf":
        raise TfhybridInputError(f"{name} must be real numbers; got dtype {arr.dtype}")
    arr = check_finite(name, arr.astype(np.float64))
    u = f" {unit}" if unit else ""
    if low is not None and np.any(arr <= low if low_open else arr < low):
        op = ">" if low_open else ">="
        raise TfhybridInputError(f"{name} must be {op} {low}{u}; got {np.min(arr):g}{u}")
    if high is not None and np.any(arr >= high if high_open else arr > high):
        op = "<" if high_open else "<="
        raise TfhybridInputError(f"{name} must be {op} {high}{u}; got {np.max(arr):g}{u}")


def _to_tensors(dtype, x, y, *params):
    """Cast to ``dtype`` and give each parameter trailing unit axes up to the positions' rank."""
    x = tf.convert_to_tensor(x, dtype=dtype)
    y = tf.convert_to_tensor(y, dtype=dtype)
    rank = max(x.shape.rank, y.shape.rank)
    out = []
    for p in params:
        p = tf.convert_to_tensor(p, dtype=dtype)
        extra = rank - p.shape.rank
        if extra < 0:
            raise TfhybridInputError(
                f"a lens parameter has shape {p.shape} (rank {p.shape.rank}) but positions have "
                f"rank {rank}; parameters broadcast over the LEADING axes of the positions, so "
                "give positions a batch axis, e.g. x[None] of shape (1, ny, nx)"
            )
        if extra > 0:
            p = tf.reshape(p, tf.concat([tf.shape(p), tf.ones([extra], tf.int32)], axis=0))
        out.append(p)
    return x, y, out


def _validate_common(x, y, r_ein, q, phi, x0, y0):
    _validate("x", x, unit="arcsec")
    _validate("y", y, unit="arcsec")
    _validate("r_ein", r_ein, low=0.0, low_open=True, unit="arcsec")
    _validate("q", q, low=0.0, high=1.0, low_open=True)
    _validate("phi", phi, unit="rad")
    _validate("x0", x0, unit="arcsec")
    _validate("y0", y0, unit="arcsec")


def _to_lens_frame(x, y, phi, x0, y0):
    """Shift by the lens centre and rotate by ``phi`` so the major axis lies along x'."""
    c, s = tf.cos(phi), tf.sin(phi)
    dx, dy = x - x0, y - y0
    return c * dx + s * dy, -s * dx + c * dy


def _from_lens_frame(ax, ay, phi):
    c, s = tf.cos(phi), tf.sin(phi)
    return c * ax - s * ay, s * ax + c * ay


# ----------------------------------------------------------------------------------------------
# Exact EPL: Tessore & Metcalf (2015) series
# ----------------------------------------------------------------------------------------------
def _series_tolerance(dtype: tf.DType) -> float:
    return 1e-15 if dtype == tf.float64 else 1e-8


def epl_num_terms(q: TensorLike, dtype=tf.float32) -> tf.Tensor:
    """Number of series terms for axis ratio ``q`` (tensor or number; the minimum q counts).

    The n-th term of the Tessore & Metcalf series is bounded by ``f**n`` with
    ``f = (1 - q) / (1 + q)`` (for gamma <= 3), so truncating after N terms leaves at most
    ``f**N / (1 - f)``; its derivative with respect to ``f`` at most ``N f**(N-1) / (1-f)**2``.
    We take N with ``f**N <= tol * (1 - f)**2`` plus two terms so that both the value and its
    gradient are converged (tol ~1e-8 in float32, ~1e-15 in float64), at least 3 terms.
    """
    dtype = tf.as_dtype(dtype)
    q = tf.convert_to_tensor(q, dtype=dtype)
    f = tf.reduce_max((1.0 - q) / (1.0 + q))
    f = tf.clip_by_value(f, 1e-30, 1.0 - 1e-12)
    tol = tf.constant(_series_tolerance(dtype), dtype)
    n = tf.math.ceil(tf.math.log(tol * (1.0 - f) ** 2) / tf.math.log(f)) + 2.0
    return tf.cast(tf.clip_by_value(n, 3.0, float(_MAX_EAGER_TERMS)), tf.int32)


def _safe_origin(xm, ym, q):
    """Positions with the exact lens centre replaced by a harmless point, and the centre mask.

    At the centre the deflection of a power law is 0 (gamma < 2), direction-dependent
    (gamma = 2) or infinite (gamma > 2); we return 0 there and keep gradients finite by never
    evaluating the singular expressions at the origin (double-``where`` trick).
    """
    tiny = tf.constant(np.finfo(xm.dtype.as_numpy_dtype).tiny ** 0.25, xm.dtype)
    r2 = (q * xm) ** 2 + ym**2
    at_centre = r2 <= tiny**2
    xs = tf.where(at_centre, tf.ones_like(xm), xm)
    ys = tf.where(at_centre, tf.zeros_like(ym), ym)
    return xs, ys, at_centre


def epl_deflection_major_axis(xm, ym, b, t, q, n_terms, max_terms=None):
    """EPL deflection in the major-axis frame (Tessore & Metcalf 2015, eqs. 13, 23, 29).

    Convergence ``kappa = (2 - t)/2 * (b / R)**t`` with ``R = sqrt(q**2 xm**2 + ym**2)``; in the
    paper's notation ``t = gamma - 1`` and ``b = q * r_ein``. No validation; all arguments are
    tensors of one float dtype, already broadcast-compatible. ``n_terms``: Python int or int32
    scalar tensor (see :func:`epl_num_terms`); ``max_terms``: static bound of the loop (default
    ``n_terms`` when it is a Python int, else 400). A Python-int ``n_terms <= 400`` is unrolled
    (XLA can then differentiate it); a tensor count runs a ``tf.while_loop``.

    Returns ``(alpha_x, alpha_y)`` along the major and minor axes.
    """
    if max_terms is None:
        max_terms = n_terms if isinstance(n_terms, int) else _MAX_EPL_TERMS
    xs, ys, at_centre = _safe_origin(xm, ym, q)
    qx = q * xs
    r = tf.sqrt(qx**2 + ys**2)
    cos1, sin1 = qx / r, ys / r  # e^{i phi_ell}, phi_ell the elliptical angle
    cos2, sin2 = cos1**2 - sin1**2, 2.0 * cos1 * sin1
    f = (1.0 - q) / (1.0 + q)
    wr, wi = -f * cos2, -f * sin2  # ratio of successive terms without the t-dependent factor
    shape = tf.broadcast_dynamic_shape(tf.shape(cos1), tf.shape(wr))
    term_r = tf.broadcast_to(cos1, shape)
    term_i = tf.broadcast_to(sin1, shape)
    two_minus_t = 2.0 - t

    def body(n, term_r, term_i, sum_r, sum_i):
        nf = tf.cast(n, xm.dtype)
        a = (2.0 * nf - two_minus_t) / (2.0 * nf + two_minus_t)
        new_r = a * (wr * term_r - wi * term_i)
        new_i = a * (wr * term_i + wi * term_r)
        return n + 1, new_r, new_i, sum_r + new_r, sum_i + new_i

    if isinstance(n_terms, int) and n_terms <= _MAX_UNROLLED_TERMS:
        # Static count: unroll. XLA cannot differentiate a while_loop whose gradient
        # accumulators (TensorLists) cross the compiled function's boundary, and the unrolled
        # chain is also what XLA fuses best.
        state = (1, term_r, term_i, term_r, term_i)
        for _ in range(1, n_terms):
            state = body(*state)
        sum_r, sum_i = state[3], state[4]
    else:
        _, _, _, sum_r, sum_i = tf.while_loop(
            lambda n, *_: n < n_terms,
            body,
            (tf.constant(1, tf.int32), term_r, term_i, term_r, term_i),
            maximum_iterations=max_terms,
        )
    amp = 2.0 * b / (1.0 + q) * (b / r) ** (t - 1.0)
    zero = tf.zeros_like(sum_r)
    return tf.where(at_centre, zero, amp * sum_r), tf.where(at_centre, zero, amp * sum_i)


def epl_deflection_core(x, y, r_ein, gamma, q, phi, x0, y0, n_terms, max_terms=None):
    """Unvalidated :func:`epl_deflection` on tensors of one dtype (trailing axes added)."""
    xm, ym = _to_lens_frame(x, y, phi, x0, y0)
    axm, aym = epl_deflection_major_axis(xm, ym, q * r_ein, gamma - 1.0, q, n_terms, max_terms)
    return _from_lens_frame(axm, aym, phi)


def epl_deflection(
    x: TensorLike,
    y: TensorLike,
    r_ein: TensorLike,
    gamma: TensorLike,
    q: TensorLike,
    phi: TensorLike,
    x0: TensorLike = 0.0,
    y0: TensorLike = 0.0,
    n_terms: int | None = None,
) -> Deflection:
    """Exact deflection of the singular power-law ellipsoid (SPLE / EPL), eqs. 11-12 of 003_*.

    Evaluated with the hypergeometric series of Tessore & Metcalf (2015), whose terms shrink as
    ``f**n``, ``f = (1 - q)/(1 + q)``; the number of terms is chosen from the largest ``f`` in
    the batch and the dtype (see :func:`epl_num_terms`). This is the reference that the
    interpolation table of :func:`spl_deflection` is checked against.

    Parameters
    ----------
    x, y : array_like or tf.Tensor
        Sky positions in arcsec, any broadcastable shapes ``S``.
    r_ein : float or (batch...)
        Major-axis Einstein radius in arcsec (eq. 11), > 0.
    gamma : float or (batch...)
        Radial slope of the 3D density (eq. 11), ``1 < gamma < 3``; 2 is isothermal.
    q : float or (batch...)
        Minor-to-major axis ratio, ``0 < q <= 1``.
    phi : float or (batch...)
        Orientation of the major axis in radians, counter-clockwise from +x.
    x0, y0 : float or (batch...)
        Lens centre ``theta_lens`` in arcsec.
    n_terms : int, optional
        Override the number of series terms. By default chosen from the smallest ``q``: the
        exact count when ``q`` is concrete (eager), else a tensor bounded by 400 terms
        (enough for ``q >= 0.05`` in float64).

    Returns
    -------
    (alpha_x, alpha_y) : tf.Tensor
        Deflection in arcsec, shape = broadcast of positions and parameters (see module doc).
        0 at the exact lens centre.
    """
    _validate_common(x, y, r_ein, q, phi, x0, y0)
    _validate("gamma", gamma, *EPL_GAMMA_RANGE, low_open=True, high_open=True)
    dtype = _infer_dtype(x)
    x, y, (r_ein, gamma, q, phi, x0, y0) = _to_tensors(dtype, x, y, r_ein, gamma, q, phi, x0, y0)
    if n_terms is None:
        n_terms = epl_num_terms(q, dtype)
        if not _is_symbolic(n_terms):
            n_terms = int(n_terms)  # concrete q: exact static loop bound
    return epl_deflection_core(x, y, r_ein, gamma, q, phi, x0, y0, n_terms)


# ----------------------------------------------------------------------------------------------
# SIE: closed form (gamma = 2)
# ----------------------------------------------------------------------------------------------
def sie_deflection_major_axis(xm, ym, b, q):
    """SIE deflection in the major-axis frame, closed form (Kormann et al. 1994; Keeton 2001).

    ``kappa = b / (2 R)``, ``R = sqrt(q**2 xm**2 + ym**2)``, ``b = q * r_ein``::

        alpha_x = b / s * arctan(s xm / R),   alpha_y = b / s * artanh(s ym / R),
        s = sqrt(1 - q**2).

    At ``q -> 1`` (``s -> 0``) the odd Taylor series ``atan(s u)/s = u (1 - (s u)^2/3 + ...)``
    replaces the ratio so values and gradients stay finite.
    """
    xs, ys, at_centre = _safe_origin(xm, ym, q)
    r = tf.sqrt((q * xs) ** 2 + ys**2)
    ux, uy = xs / r, ys / r
    s2 = tf.maximum(1.0 - q**2, 0.0)
    eps = 1e-2 if xm.dtype == tf.float32 else 1e-4
    small = s2 < eps**2
    s_safe = tf.sqrt(tf.where(small, tf.ones_like(s2), s2))
    s2_small = tf.where(small, s2, tf.zeros_like(s2))
    # Taylor to third order in s^2: error < (s u)^8 / 9 < 1e-16 (float32: 1e-8)
    atan_series = ux * (
        1.0 - s2_small * ux**2 / 3.0 + (s2_small * ux**2) ** 2 / 5.0 - (s2_small * ux**2) ** 3 / 7.0
    )
    atanh_series = uy * (
        1.0 + s2_small * uy**2 / 3.0 + (s2_small * uy**2) ** 2 / 5.0 + (s2_small * uy**2) ** 3 / 7.0
    )
    ax = tf.where(small, atan_series, tf.atan(s_safe * ux) / s_safe)
    ay = tf.where(small, atanh_series, tf.atanh(s_safe * uy) / s_safe)
    zero = tf.zeros_like(ax)
    return tf.where(at_centre, zero, b * ax), tf.where(at_centre, zero, b * ay)


def sie_deflection_core(x, y, r_ein, q, phi, x0, y0):
    """Unvalidated :func:`sie_deflection` on tensors of one dtype (trailing axes added)."""
    xm, ym = _to_lens_frame(x, y, phi, x0, y0)
    axm, aym = sie_deflection_major_axis(xm, ym, q * r_ein, q)
    return _from_lens_frame(axm, aym, phi)


def sie_deflection(
    x: TensorLike,
    y: TensorLike,
    r_ein: TensorLike,
    q: TensorLike,
    phi: TensorLike,
    x0: TensorLike = 0.0,
    y0: TensorLike = 0.0,
) -> Deflection:
    """Singular isothermal ellipsoid deflection (eq. 11 of 003_* with gamma = 2), closed form.

    Same conventions, shapes and units as :func:`epl_deflection` (``r_ein`` is the major-axis
    Einstein radius). Accurate to the rounding of the dtype; 0 at the exact lens centre.
    """
    _validate_common(x, y, r_ein, q, phi, x0, y0)
    dtype = _infer_dtype(x)
    x, y, (r_ein, q, phi, x0, y0) = _to_tensors(dtype, x, y, r_ein, q, phi, x0, y0)
    return sie_deflection_core(x, y, r_ein, q, phi, x0, y0)


# ----------------------------------------------------------------------------------------------
# External shear (eq. 13)
# ----------------------------------------------------------------------------------------------
def external_shear_deflection_core(x, y, gamma1, gamma2):
    """Unvalidated eq. 13: ``(gamma1 x + gamma2 y, gamma2 x - gamma1 y)``."""
    return gamma1 * x + gamma2 * y, gamma2 * x - gamma1 * y


def external_shear_deflection(
    x: TensorLike, y: TensorLike, gamma1: TensorLike, gamma2: TensorLike
) -> Deflection:
    """External shear deflection, eq. 13 of 003_*.

    ``alpha = [[gamma1, gamma2], [gamma2, -gamma1]] @ (x, y)`` with ``(x, y)`` in arcsec
    measured from the coordinate origin; shapes broadcast as in :func:`epl_deflection`.
    """
    for name, v in (("x", x), ("y", y), ("gamma1", gamma1), ("gamma2", gamma2)):
        _validate(name, v)
    dtype = _infer_dtype(x)
    x, y, (gamma1, gamma2) = _to_tensors(dtype, x, y, gamma1, gamma2)
    return external_shear_deflection_core(x, y, gamma1, gamma2)


# ----------------------------------------------------------------------------------------------
# SPLE by interpolation table (appendix A)
# ----------------------------------------------------------------------------------------------
def spl_deflection(
    x: TensorLike,
    y: TensorLike,
    r_ein: TensorLike,
    gamma: TensorLike,
    q: TensorLike,
    phi: TensorLike,
    x0: TensorLike = 0.0,
    y0: TensorLike = 0.0,
    table=None,
) -> Deflection:
    """SPLE deflection from the precomputed table of appendix A (eqs. A1-A7) of 003_*.

    Same conventions, shapes and units as :func:`epl_deflection`. ``table`` is a
    :class:`tfhybrid.physics.spl_table.SPLTable`; by default the shipped table
    (:func:`tfhybrid.physics.spl_table.load_default_table`), whose extent in ``q`` and
    ``gamma`` bounds the accepted parameters; see that module for its resolution and error.
    """
    from tfhybrid.physics import spl_table

    if table is None:
        table = spl_table.load_default_table()
    _validate_common(x, y, r_ein, q, phi, x0, y0)
    _validate("q", q, low=table.q_range[0], high=table.q_range[1])
    _validate("gamma", gamma, *table.gamma_range)
    dtype = _infer_dtype(x)
    x, y, (r_ein, gamma, q, phi, x0, y0) = _to_tensors(dtype, x, y, r_ein, gamma, q, phi, x0, y0)
    return spl_deflection_core(x, y, r_ein, gamma, q, phi, x0, y0, table)


def spl_deflection_core(x, y, r_ein, gamma, q, phi, x0, y0, table):
    """Unvalidated :func:`spl_deflection` on tensors of one dtype (trailing axes added)."""
    xm, ym = _to_lens_frame(x, y, phi, x0, y0)
    axm, aym = table.deflection_major_axis(xm, ym, r_ein, gamma, q)
    return _from_lens_frame(axm, aym, phi)


# ----------------------------------------------------------------------------------------------
# Parameter converters
# ----------------------------------------------------------------------------------------------
def circularised_einstein_radius(r_ein, q):
    """Circularised Einstein radius ``θ_E = sqrt(q) r_Ein`` (arcsec) of the SPLE of eq. 11.

    The paper's ``r_Ein`` is measured along the major axis; ``θ_E`` is the intermediate-axis
    (geometric-mean) radius that lenstronomy calls ``theta_E``. For γ = 2 (the SIE) the
    tangential critical curve is the ellipse of semi-axes ``θ_E / sqrt(q)`` and ``θ_E sqrt(q)``
    and encloses the area ``π θ_E²``. Multiple images pin down that area, so ``θ_E`` is
    measured far better than ``r_Ein``, which trades off against ``q`` (on lens mock study v7
    the MAP's ``θ_E`` was within 1 % in 8/10 systems, ``r_Ein`` in 2/10). NumPy in, NumPy out.
    """
    return np.sqrt(np.asarray(q, dtype=np.float64)) * np.asarray(r_ein, dtype=np.float64)


def paper_to_lenstronomy(r_ein, gamma, q, phi, x0=0.0, y0=0.0, gamma1=0.0, gamma2=0.0) -> dict:
    """Convert the paper's lens parameters to lenstronomy's ``EPL`` + ``SHEAR`` keywords.

    ``theta_E = sqrt(q) * r_ein`` (lenstronomy normalises to the intermediate axis, the paper's
    ``r_ein`` is along the major axis), ``e1 + i e2 = (1-q)/(1+q) exp(2 i phi)``. NumPy in,
    NumPy out (scalars or arrays). Returns a dict with ``theta_E, gamma, e1, e2, center_x,
    center_y, gamma1, gamma2``.
    """
    q = np.asarray(q, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    e = (1.0 - q) / (1.0 + q)
    return {
        "theta_E": circularised_einstein_radius(r_ein, q),
        "gamma": np.asarray(gamma, dtype=np.float64),
        "e1": e * np.cos(2.0 * phi),
        "e2": e * np.sin(2.0 * phi),
        "center_x": np.asarray(x0, dtype=np.float64),
        "center_y": np.asarray(y0, dtype=np.float64),
        "gamma1": np.asarray(gamma1, dtype=np.float64),
        "gamma2": np.asarray(gamma2, dtype=np.float64),
    }


def lenstronomy_to_paper(
    theta_E, gamma, e1, e2, center_x=0.0, center_y=0.0, gamma1=0.0, gamma2=0.0
) -> dict:
    """Inverse of :func:`paper_to_lenstronomy`.

    Returns a dict with ``r_ein, gamma, q, phi, x0, y0, gamma1, gamma2``; ``phi`` in
    ``(-pi/2, pi/2]`` (``phi`` and ``phi + pi`` describe the same lens).
    """
    e1 = np.asarray(e1, dtype=np.float64)
    e2 = np.asarray(e2, dtype=np.float64)
    e = np.hypot(e1, e2)
    if np.any(e >= 1.0):
        raise TfhybridInputError(f"|e1 + i e2| must be < 1; got {np.max(e):g}")
    q = (1.0 - e) / (1.0 + e)
    return {
        "r_ein": np.asarray(theta_E, dtype=np.float64) / np.sqrt(q),
        "gamma": np.asarray(gamma, dtype=np.float64),
        "q": q,
        "phi": 0.5 * np.arctan2(e2, e1),
        "x0": np.asarray(center_x, dtype=np.float64),
        "y0": np.asarray(center_y, dtype=np.float64),
        "gamma1": np.asarray(gamma1, dtype=np.float64),
        "gamma2": np.asarray(gamma2, dtype=np.float64),
    }

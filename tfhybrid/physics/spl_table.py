"""Interpolation table of the SPLE deflection on the unit circle (appendix A of 003_*).

Chianese et al. 2020 (MNRAS 496, 381), appendix A: the deflection of the singular power-law
ellipsoid is reduced to the 1D integrals of eqs. A1-A4, tabulated on the unit circle ``r = 1``
for ``r_ein = 1`` over the angle ``eta`` in the first quadrant, the axis ratio ``q`` and the
slope ``gamma``, and interpolated; eqs. A5-A7 give every other position and Einstein radius.

What is stored (``tfhybrid/assets/spl_deflection_table.npz``, made by
``scripts/build_spl_table.py``)
    ``alpha`` (n_u, n_q, n_gamma, 2): ``(alpha_1, alpha_2)`` from eqs. A1-A4 by adaptive
    quadrature (scipy, float64, ~1e-12 relative) at the unit-circle points
    ``(cos eta, sin eta)``, in the major-axis frame of a lens with ``r_ein = 1``.
    Grid, uniform in each variable:
      * ``u`` in ``[0, pi/2]``, ``n_u = 129``, where ``tan u = tan(eta) / q`` (the elliptical
        angle; ``eta = 0`` and ``pi/2`` are nodes). The deflection is smooth in ``u`` for every
        ``q``, whereas in ``eta`` it varies on a scale ``~q`` near the major axis, so this
        reparametrisation of the ``eta`` axis is what lets a 2.6 MB table reach ~1e-6.
      * ``log q`` in ``[log 0.1, 0]``, ``n_q = 41``.
      * ``gamma`` in ``[1.2, 2.8]``, ``n_gamma = 33`` (step 0.05).
    The npz also holds the grids, ``eta`` (n_u, n_q) and the measured interpolation error.

How it is interpolated
    At load time the values are divided by their analytic envelope (see
    :meth:`SPLTable.envelope`), which leaves the smooth, order-one function
    ``G = alpha / (2 q/(1+q) (q/R)**(gamma-2) e^{iu})`` (``R`` the minor-axis elliptical
    radius of the point). ``G`` is extended from the tabulated quadrant to the whole circle by
    the reflection symmetry of eq. A5 (``G(-u) = G(pi - u) = conj G(u)``), and past the ``q``
    and ``gamma`` edges by 8 nodes of degree-5 polynomial extrapolation (so the spline has no
    boundary artefact inside the table). Tensor-product cubic B-spline coefficients
    (``scipy.ndimage.spline_filter1d``) are then evaluated in TensorFlow (64 gathers per
    point, twice continuously differentiable, so gradients are smooth).

Accuracy (measured by ``scripts/build_spl_table.py`` against the exact series,
:func:`tfhybrid.physics.lens_profiles.epl_deflection` in float64, on 20000 random off-grid
points, seed 0: ``q`` uniform in [0.1, 1], ``gamma`` in [1.2, 2.8], ``r_ein`` in [0.5, 2.5],
radius in [0.05, 5] arcsec, any angle): relative error of the deflection |d alpha| / |alpha|

    ============  ===========  ===========  ===============
    evaluation    max          99th pct     max, q >= 0.2
    ============  ===========  ===========  ===============
    float64       5.3e-6       3.7e-7       4.2e-7
    float32       5.5e-6       5.6e-7       7.5e-7
    ============  ===========  ===========  ===============

The largest errors sit at ``q ~ 0.1`` with steep slopes: 9.2e-6 at the corner ``q = 0.1,
gamma = 2.8``, below 5e-7 for ``q >= 0.2`` everywhere, ~1e-15 at ``q = 1``. Eqs. A6-A7 are
exact, so the error is the same at every radius; at the exact centre 0 is returned. Table
size 129 x 41 x 33 x 2 float64 (2.6 MB compressed); quadrature build ~4 min on 2 cores.

Speed (``benchmarks/bench_lens_profiles.py``, 2 shared CPU cores, 256 x 256 field, q = 0.5):
8 ms (float32, ``jit_compile=True``), 17 ms with the gradient in all lens parameters; the
exact series takes 8 ms / 46 ms, lenstronomy's EPL 75 ms (value only, float64).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfhybrid.validation import TfhybridInputError

__all__ = [
    "SPLTable",
    "load_default_table",
    "alpha_unit_circle_quadrature",
    "table_nodes",
    "DEFAULT_TABLE_FILENAME",
]

DEFAULT_TABLE_FILENAME = "spl_deflection_table.npz"

# Ghost nodes added by polynomial extrapolation past the q and gamma edges before the spline
# prefilter: the prefilter's boundary error decays by 0.27 per node, so 8 nodes push it below
# 1e-7 of the (already small) extrapolation mismatch.
_GHOST_NODES = 8
_EXTRAPOLATION_DEGREE = 5


# ----------------------------------------------------------------------------------------------
# Eqs. A1-A4 by quadrature (NumPy / SciPy, float64): what the table is built from
# ----------------------------------------------------------------------------------------------
def alpha_unit_circle_quadrature(theta1: float, theta2: float, q: float, gamma: float):
    """SPLE deflection at one point of the major-axis frame, eqs. A1-A4 of 003_*, ``r_ein = 1``.

    ``alpha_1 = 2 theta1 q int_0^rho rho' kappa(rho') omega / (theta1^2 + omega^4 theta2^2)``,
    ``alpha_2`` the same with ``omega^3`` and ``theta2``; ``omega`` from eqs. A3-A4, ``rho``
    from eq. 12, ``kappa = (3 - gamma)/2 rho'^(1 - gamma)``. The integrable endpoint
    singularity ``rho'^(2 - gamma)`` is handled exactly by QUADPACK's algebraic weight (QAWS).

    Returns ``(alpha_1, alpha_2)`` in units of ``r_ein`` (float64).
    """
    from scipy.integrate import quad

    t1, t2 = float(theta1), float(theta2)
    r2 = t1 * t1 + t2 * t2
    rho = np.sqrt(t1 * t1 + t2 * t2 / (q * q))
    e = 1.0 - q * q
    norm = 0.5 * (3.0 - gamma)

    def omega(rp):
        delta = np.sqrt((rp * rp * e + t2 * t2 - t1 * t1) ** 2 + 4.0 * t1 * t1 * t2 * t2)
        return np.sqrt((delta + r2 + rp * rp * e) / (delta + r2 - rp * rp * e))

    def integrand1(rp):
        w = omega(rp)
        return norm * w / (t1 * t1 + w**4 * t2 * t2)

    def integrand2(rp):
        w = omega(rp)
        return norm * w**3 / (t1 * t1 + w**4 * t2 * t2)

    kw = dict(weight="alg", wvar=(2.0 - gamma, 0.0), epsabs=1e-14, epsrel=1e-12, limit=200)
    a1 = 2.0 * t1 * q * quad(integrand1, 0.0, rho, **kw)[0] if t1 != 0.0 else 0.0
    a2 = 2.0 * t2 * q * quad(integrand2, 0.0, rho, **kw)[0] if t2 != 0.0 else 0.0
    return a1, a2


def table_nodes(n_u: int, n_q: int, n_gamma: int, q_min: float, gamma_range: tuple):
    """Grids of the table: ``u`` (n_u,), ``log_q`` (n_q,), ``gamma`` (n_gamma,), ``eta`` (n_u, n_q).

    ``eta = atan2(q sin u, cos u)`` is the polar angle of the unit-circle point whose elliptical
    angle is ``u`` (``tan u = tan(eta) / q``).
    """
    u = np.linspace(0.0, 0.5 * np.pi, n_u)
    log_q = np.linspace(np.log(q_min), 0.0, n_q)
    gamma = np.linspace(gamma_range[0], gamma_range[1], n_gamma)
    eta = np.arctan2(np.exp(log_q)[None, :] * np.sin(u)[:, None], np.cos(u)[:, None])
    eta[-1, :] = 0.5 * np.pi  # cos(pi/2) is not exactly 0 in floating point
    return u, log_q, gamma, eta


# ----------------------------------------------------------------------------------------------
# The table object
# ----------------------------------------------------------------------------------------------
def _lagrange_extrapolate(values: np.ndarray, n_ghost: int, degree: int) -> np.ndarray:
    """Extend the last axis by ``n_ghost`` nodes each side, polynomial through the edge nodes."""
    nodes = np.arange(degree + 1, dtype=np.float64)

    def extend(edge):  # edge[..., j] at node j = 0..degree; returns values at -1..-n_ghost
        out = []
        for k in range(1, n_ghost + 1):
            target = -float(k)
            acc = np.zeros(edge.shape[:-1])
            for j in range(degree + 1):
                others = np.delete(nodes, j)
                acc = acc + np.prod((target - others) / (nodes[j] - others)) * edge[..., j]
            out.append(acc)
        return np.stack(out[::-1], axis=-1)

    low = extend(values[..., : degree + 1])
    high = extend(values[..., ::-1][..., : degree + 1])[..., ::-1]
    return np.concatenate([low, values, high], axis=-1)


def _bspline_weights(s):
    """Cubic B-spline weights and base index for fractional node coordinate ``s``."""
    # a NaN coordinate (diverging sampler) must give NaN weights, not an out-of-range gather
    i = tf.floor(tf.where(tf.math.is_finite(s), s, tf.ones_like(s)))  # 1: lowest valid node
    t = s - i
    t2, t3 = t * t, t * t * t
    w0 = (1.0 - t) ** 3 / 6.0
    w1 = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w2 = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w3 = t3 / 6.0
    return tf.stack([w0, w1, w2, w3], axis=-1), tf.cast(i, tf.int32) - 1


@dataclass(frozen=True, eq=False)
class SPLTable:
    """SPLE deflection table on the unit circle (appendix A of 003_*) and its interpolator.

    Build with :meth:`from_npz` or :meth:`from_values`; the default shipped table comes from
    :func:`load_default_table`. Ranges: ``q_range = (q_min, 1)``, ``gamma_range``.
    """

    u: np.ndarray
    log_q: np.ndarray
    gamma: np.ndarray
    alpha: np.ndarray
    metadata: dict = field(default_factory=dict)
    _coefficients: np.ndarray = field(init=False, repr=False)
    _tf_cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        n_u, n_q, n_g = len(self.u), len(self.log_q), len(self.gamma)
        if self.alpha.shape != (n_u, n_q, n_g, 2):
            raise TfhybridInputError(
                f"table alpha must have shape (n_u, n_q, n_gamma, 2) = {(n_u, n_q, n_g, 2)}; "
                f"got {self.alpha.shape}"
            )
        if not np.all(np.isfinite(self.alpha)):
            raise TfhybridInputError("table alpha contains non-finite values")
        object.__setattr__(self, "_coefficients", self._spline_coefficients())

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_npz(cls, path) -> SPLTable:
        """Load a table written by ``scripts/build_spl_table.py``."""
        with np.load(path, allow_pickle=False) as data:
            meta = {k: data[k] for k in data.files if k not in ("u", "log_q", "gamma", "alpha")}
            return cls(
                u=np.asarray(data["u"], np.float64),
                log_q=np.asarray(data["log_q"], np.float64),
                gamma=np.asarray(data["gamma"], np.float64),
                alpha=np.asarray(data["alpha"], np.float64),
                metadata=meta,
            )

    @classmethod
    def from_values(cls, u, log_q, gamma, alpha, metadata=None) -> SPLTable:
        return cls(
            u=np.asarray(u, np.float64),
            log_q=np.asarray(log_q, np.float64),
            gamma=np.asarray(gamma, np.float64),
            alpha=np.asarray(alpha, np.float64),
            metadata=dict(metadata or {}),
        )

    # -- properties -----------------------------------------------------------------------
    @property
    def q_range(self) -> tuple[float, float]:
        # rounded so that the nominal edge (e.g. 0.1) is accepted despite exp(log(0.1)) > 0.1
        return float(f"{np.exp(self.log_q[0]):.12g}"), 1.0

    @property
    def gamma_range(self) -> tuple[float, float]:
        return float(f"{self.gamma[0]:.12g}"), float(f"{self.gamma[-1]:.12g}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.u), len(self.log_q), len(self.gamma)

    @staticmethod
    def envelope(u, q, gamma):
        """Complex analytic envelope ``2 q/(1+q) (q/R)**(gamma-2) e^{iu}`` at unit radius.

        ``R = q / sqrt(cos^2 u + q^2 sin^2 u)`` is the minor-axis elliptical radius of the
        unit-circle point with elliptical angle ``u`` (Tessore & Metcalf 2015 prefactor).
        """
        u, q, gamma = np.broadcast_arrays(u, q, gamma)
        big_r = q / np.sqrt(np.cos(u) ** 2 + (q * np.sin(u)) ** 2)
        return 2.0 * q / (1.0 + q) * (q / big_r) ** (gamma - 2.0) * np.exp(1j * u)

    def _spline_coefficients(self) -> np.ndarray:
        from scipy import ndimage

        uu = self.u[:, None, None]
        qq = np.exp(self.log_q)[None, :, None]
        gg = self.gamma[None, None, :]
        g = (self.alpha[..., 0] + 1j * self.alpha[..., 1]) / self.envelope(uu, qq, gg)
        # Eq. A5 as G(pi - u) = conj G(u): one period [0, pi) of nodes, wrapped by the spline.
        full = np.concatenate([g, np.conj(g[-2:0:-1])], axis=0)
        coefs = []
        for part in (full.real, full.imag):
            part = _lagrange_extrapolate(part, _GHOST_NODES, _EXTRAPOLATION_DEGREE)
            part = np.moveaxis(
                _lagrange_extrapolate(np.moveaxis(part, 1, -1), _GHOST_NODES, 5), -1, 1
            )
            part = ndimage.spline_filter1d(part, 3, axis=0, mode="grid-wrap")
            part = ndimage.spline_filter1d(part, 3, axis=1, mode="mirror")
            part = ndimage.spline_filter1d(part, 3, axis=2, mode="mirror")
            coefs.append(part)
        return np.stack(coefs, axis=-1)

    def _tf_coefficients(self, dtype: tf.DType):
        key = dtype.name
        if key not in self._tf_cache:
            # init_scope: an eager constant, reusable by every graph that traces this table
            with tf.init_scope():
                flat = self._coefficients.reshape(-1, 2)
                self._tf_cache[key] = tf.constant(flat, dtype=dtype)
        return self._tf_cache[key]

    # -- evaluation -----------------------------------------------------------------------
    # no Python control flow on tensors here: skip AutoGraph's source conversion
    @tf.autograph.experimental.do_not_convert
    def interpolate_g(self, u, q, gamma):
        """Interpolated ``(Re G, Im G)`` at elliptical angle ``u`` (any real), ``q``, ``gamma``.

        Tensors of one float dtype, broadcastable; no validation (q, gamma inside the table).
        When ``q`` and ``gamma`` have (statically) far fewer elements than ``u`` -- one lens
        per image -- the ``q, gamma`` contraction is done once per lens, leaving a 1D spline in
        ``u`` per lens (4 gathers per point instead of 64, same result to rounding).
        """
        s_q, s_g = self._node_coordinates(q, gamma)
        qg_shape = tf.broadcast_static_shape(s_q.shape, s_g.shape)
        out_shape = tf.broadcast_static_shape(u.shape, qg_shape)
        n_period = 2 * (len(self.u) - 1)
        if (
            qg_shape.is_fully_defined()
            and out_shape.is_fully_defined()
            and qg_shape.num_elements() * n_period <= out_shape.num_elements()
        ):
            return self._interpolate_per_lens(u, s_q, s_g, qg_shape, out_shape)
        return self._interpolate_per_point(u, s_q, s_g)

    def _node_coordinates(self, q, gamma):
        """Fractional indices of q and gamma in the ghost-padded coefficient array."""
        n_qc = len(self.log_q) + 2 * _GHOST_NODES
        n_gc = len(self.gamma) + 2 * _GHOST_NODES
        h_q = self.log_q[1] - self.log_q[0]
        h_g = self.gamma[1] - self.gamma[0]
        s_q = (tf.math.log(q) - self.log_q[0]) / h_q + _GHOST_NODES
        s_g = (gamma - self.gamma[0]) / h_g + _GHOST_NODES
        # Keep the 4-node stencils inside the coefficient array even for q, gamma at the edge.
        return tf.clip_by_value(s_q, 1.0, n_qc - 3.0), tf.clip_by_value(s_g, 1.0, n_gc - 3.0)

    def _u_weights(self, u):
        n_period = 2 * (len(self.u) - 1)
        w_u, i_u = _bspline_weights(u / tf.constant(self.u[1] - self.u[0], u.dtype))
        idx_u = tf.math.floormod(i_u[..., None] + tf.range(4, dtype=tf.int32), n_period)
        return w_u, idx_u

    def _interpolate_per_point(self, u, s_q, s_g):
        n_qc = len(self.log_q) + 2 * _GHOST_NODES
        n_gc = len(self.gamma) + 2 * _GHOST_NODES
        w_u, idx_u = self._u_weights(u)
        w_q, i_q = _bspline_weights(s_q)
        w_g, i_g = _bspline_weights(s_g)
        offs = tf.range(4, dtype=tf.int32)
        idx_q = i_q[..., None] + offs
        idx_g = i_g[..., None] + offs
        flat = (idx_u[..., :, None, None] * n_qc + idx_q[..., None, :, None]) * n_gc + idx_g[
            ..., None, None, :
        ]
        weights = w_u[..., :, None, None] * w_q[..., None, :, None] * w_g[..., None, None, :]
        values = tf.gather(self._tf_coefficients(u.dtype), flat)  # (..., 4, 4, 4, 2)
        g = tf.reduce_sum(values * weights[..., None], axis=[-4, -3, -2])
        return g[..., 0], g[..., 1]

    def _interpolate_per_lens(self, u, s_q, s_g, qg_shape, out_shape):
        n_period = 2 * (len(self.u) - 1)
        n_qc = len(self.log_q) + 2 * _GHOST_NODES
        n_gc = len(self.gamma) + 2 * _GHOST_NODES
        n_lens = qg_shape.num_elements()
        s_q = tf.reshape(tf.broadcast_to(s_q, qg_shape), [n_lens])
        s_g = tf.reshape(tf.broadcast_to(s_g, qg_shape), [n_lens])
        w_q, i_q = _bspline_weights(s_q)
        w_g, i_g = _bspline_weights(s_g)
        offs = tf.range(4, dtype=tf.int32)
        idx_qg = (i_q[:, None] + offs)[:, :, None] * n_gc + (i_g[:, None] + offs)[:, None, :]
        coefs = tf.reshape(self._tf_coefficients(u.dtype), [n_period, n_qc * n_gc, 2])
        values = tf.gather(coefs, idx_qg, axis=1)  # (n_period, n_lens, 4, 4, 2)
        weights = w_q[:, :, None] * w_g[:, None, :]  # (n_lens, 4, 4)
        per_lens = tf.einsum("plabc,lab->lpc", values, weights)  # 1D spline in u per lens
        per_lens = tf.reshape(per_lens, [n_lens * n_period, 2])
        lens_id = tf.broadcast_to(tf.reshape(tf.range(n_lens, dtype=tf.int32), qg_shape), out_shape)
        w_u, idx_u = self._u_weights(tf.broadcast_to(u, out_shape))
        values_u = tf.gather(per_lens, lens_id[..., None] * n_period + idx_u)  # (..., 4, 2)
        g = tf.reduce_sum(values_u * w_u[..., None], axis=-2)
        return g[..., 0], g[..., 1]

    # no Python control flow on tensors here: skip AutoGraph's source conversion
    @tf.autograph.experimental.do_not_convert
    def deflection_major_axis(self, xm, ym, r_ein, gamma, q):
        """Deflection in the lens's major-axis frame from the table, eqs. A5-A7 of 003_*.

        ``alpha(x) = r_ein**(gamma-1) * r**(2-gamma) * alpha_unit(u)`` (eqs. A7, A6), with
        ``alpha_unit`` the unit-circle table evaluated at the elliptical angle
        ``u = atan2(ym, q xm)`` over the whole circle (the symmetry of eq. A5 is built into
        the wrapped table, which keeps gradients exact on the axes). No validation.
        """
        dtype = xm.dtype
        tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny ** 0.25, dtype)
        r2 = xm**2 + ym**2
        at_centre = r2 <= tiny**2
        xs = tf.where(at_centre, tf.ones_like(xm), xm)
        ys = tf.where(at_centre, tf.zeros_like(ym), ym)
        qx = q * xs
        big_r = tf.sqrt(qx**2 + ys**2)  # minor-axis elliptical radius, R(unit circle) * r
        u = tf.atan2(ys, qx)
        g_re, g_im = self.interpolate_g(u, q, gamma)
        cos_u, sin_u = qx / big_r, ys / big_r
        # envelope (q / R_unit)^(gamma-2) with R_unit = big_r / r, times r^(2-gamma) (eq. A6)
        # and r_ein^(gamma-1) (eq. A7): the powers of r cancel.
        amp = 2.0 * q / (1.0 + q) * (q / big_r) ** (gamma - 2.0) * r_ein ** (gamma - 1.0)
        ax = amp * (cos_u * g_re - sin_u * g_im)
        ay = amp * (cos_u * g_im + sin_u * g_re)
        zero = tf.zeros_like(ax)
        return tf.where(at_centre, zero, ax), tf.where(at_centre, zero, ay)


def default_table_path() -> Path:
    return Path(str(resources.files("tfhybrid") / "assets" / DEFAULT_TABLE_FILENAME))


@functools.lru_cache(maxsize=1)
def load_default_table() -> SPLTable:
    """The shipped table (``tfhybrid/assets/spl_deflection_table.npz``), loaded once."""
    path = default_table_path()
    if not path.exists():
        raise FileNotFoundError(
            f"SPLE deflection table not found at {path}; build it with "
            "`python scripts/build_spl_table.py`"
        )
    return SPLTable.from_npz(path)

"""Tests of tfhybrid.physics.lens_profiles and the SPLE table (tfhybrid.physics.spl_table).

References: lenstronomy's EPL / SIE / SHEAR (independent implementation), direct quadrature of
eqs. A1-A4 (scipy), the SIE closed form vs the series at gamma = 2, central finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfhybrid.physics import lens_profiles as lp
from tfhybrid.physics import spl_table
from tfhybrid.validation import TfhybridInputError


def _random_lenses(rng, n, q_range=(0.2, 1.0), gamma_range=(1.5, 2.5)):
    return dict(
        r_ein=rng.uniform(0.5, 2.5, n),
        gamma=rng.uniform(*gamma_range, n),
        q=rng.uniform(*q_range, n),
        phi=rng.uniform(-np.pi, np.pi, n),
        x0=rng.normal(0.0, 0.5, n),
        y0=rng.normal(0.0, 0.5, n),
    )


def _random_positions(rng, n, m):
    return rng.uniform(-4.0, 4.0, (n, m)), rng.uniform(-4.0, 4.0, (n, m))


def _rel_err(ax, ay, bx, by):
    return np.hypot(np.asarray(ax) - bx, np.asarray(ay) - by) / np.hypot(bx, by)


@pytest.fixture(scope="module")
def lenstronomy_models():
    lens_model = pytest.importorskip("lenstronomy.LensModel.lens_model")
    return {k: lens_model.LensModel([k]) for k in ("EPL", "SIE", "SHEAR")}


# ----------------------------------------------------------------------------------------------
# References: lenstronomy, quadrature, closed forms
# ----------------------------------------------------------------------------------------------
def test_epl_matches_lenstronomy_batched(lenstronomy_models):
    # tolerance 1e-10: both are the same series summed to float64 rounding; the issue asks 1e-5
    rng = np.random.default_rng(1)
    lenses = _random_lenses(rng, 24)
    x, y = _random_positions(rng, 24, 200)
    ax, ay = lp.epl_deflection(x, y, **lenses)  # params (24,) broadcast over positions (24, 200)
    assert ax.dtype == tf.float64
    for i in range(24):
        kw = lp.paper_to_lenstronomy(
            *(lenses[k][i] for k in ("r_ein", "gamma", "q", "phi")),
            lenses["x0"][i],
            lenses["y0"][i],
        )
        kw = {k: kw[k] for k in ("theta_E", "gamma", "e1", "e2", "center_x", "center_y")}
        bx, by = lenstronomy_models["EPL"].alpha(x[i], y[i], [kw])
        assert np.max(_rel_err(ax[i], ay[i], bx, by)) < 1e-10


def test_sie_matches_epl_and_lenstronomy(lenstronomy_models):
    rng = np.random.default_rng(2)
    lenses = _random_lenses(rng, 12, q_range=(0.1, 1.0))
    lenses.pop("gamma")
    lenses["q"][0] = 1.0
    x, y = _random_positions(rng, 12, 100)
    sx, sy = lp.sie_deflection(x, y, **lenses)
    ex, ey = lp.epl_deflection(x, y, gamma=2.0, **lenses)
    assert np.max(_rel_err(sx, sy, ex.numpy(), ey.numpy())) < 1e-12
    for i in range(12):
        kw = lp.paper_to_lenstronomy(
            lenses["r_ein"][i],
            2.0,
            lenses["q"][i],
            lenses["phi"][i],
            lenses["x0"][i],
            lenses["y0"][i],
        )
        kw = {k: kw[k] for k in ("theta_E", "e1", "e2", "center_x", "center_y")}
        bx, by = lenstronomy_models["SIE"].alpha(x[i], y[i], [kw])
        # lenstronomy's SIE is its NIE with a 1e-10 core: agreement to ~1e-8
        assert np.max(_rel_err(sx[i], sy[i], bx, by)) < 1e-7


def test_external_shear_matches_lenstronomy(lenstronomy_models):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2, 50))
    g1, g2 = 0.07, -0.03
    ax, ay = lp.external_shear_deflection(x, y, g1, g2)
    bx, by = lenstronomy_models["SHEAR"].alpha(x, y, [dict(gamma1=g1, gamma2=g2)])
    np.testing.assert_allclose(ax, bx, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ay, by, rtol=1e-13, atol=1e-15)


def test_converters_round_trip():
    rng = np.random.default_rng(4)
    lenses = _random_lenses(rng, 10)
    lenses["phi"] = rng.uniform(-np.pi / 2 + 1e-3, np.pi / 2, 10)
    kw = lp.paper_to_lenstronomy(**lenses, gamma1=0.1, gamma2=-0.2)
    np.testing.assert_allclose(kw["theta_E"], np.sqrt(lenses["q"]) * lenses["r_ein"])
    back = lp.lenstronomy_to_paper(**kw)
    for key, value in lenses.items():
        np.testing.assert_allclose(back[key], value, rtol=1e-12, atol=1e-12)
    assert back["gamma1"] == pytest.approx(0.1) and back["gamma2"] == pytest.approx(-0.2)


@pytest.mark.parametrize(
    "eta, q, gamma",
    [
        (0.0, 0.3, 1.7),
        (0.5 * np.pi, 0.3, 2.3),
        (0.7, 0.15, 2.75),
        (1.2, 0.9, 1.25),
        (0.01, 0.5, 2.0),
    ],
)
def test_quadrature_a1_a4_matches_series(eta, q, gamma):
    t1 = 0.0 if eta == 0.5 * np.pi else np.cos(eta)
    a1, a2 = spl_table.alpha_unit_circle_quadrature(t1, np.sin(eta), q, gamma)
    ex, ey = lp.epl_deflection(np.array([t1]), np.array([np.sin(eta)]), 1.0, gamma, q, 0.0)
    assert np.max(_rel_err([a1], [a2], ex.numpy(), ey.numpy())) < 1e-10


# ----------------------------------------------------------------------------------------------
# The interpolation table
# ----------------------------------------------------------------------------------------------
def test_shipped_table_metadata():
    table = spl_table.load_default_table()
    assert table.q_range[0] == pytest.approx(0.1)
    assert table.gamma_range == pytest.approx((1.2, 2.8))
    assert table.alpha.shape == table.shape + (2,)
    assert float(table.metadata["max_rel_error_float64"]) < 1e-5


# tolerances: the build script measured max 5.3e-6 (q >= 0.1) and 4.2e-7 (q >= 0.2) in float64
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-5), (np.float32, 1e-5)])
def test_spl_table_matches_exact_epl(dtype, tol):
    rng = np.random.default_rng(5)
    lenses = _random_lenses(rng, 16, q_range=(0.1, 1.0), gamma_range=(1.2, 2.8))
    x, y = _random_positions(rng, 16, 400)
    lenses = {k: v.astype(dtype) for k, v in lenses.items()}
    tx, ty = lp.spl_deflection(x.astype(dtype), y.astype(dtype), **lenses)
    assert tx.dtype == tf.as_dtype(dtype)
    ex, ey = lp.epl_deflection(x, y, **{k: v.astype(np.float64) for k, v in lenses.items()})
    err = _rel_err(tx.numpy(), ty.numpy(), ex.numpy(), ey.numpy())
    assert np.max(err) < tol
    strict = lenses["q"] >= 0.2
    assert np.max(err[strict]) < (1e-6 if dtype == np.float64 else 3e-6)


# ----------------------------------------------------------------------------------------------
# Singular points, gradients, compilation, broadcasting, validation
# ----------------------------------------------------------------------------------------------
def _profiles():
    return {
        "epl": lambda x, y, r, g, q, p, a, b: lp.epl_deflection(x, y, r, g, q, p, a, b),
        "sie": lambda x, y, r, g, q, p, a, b: lp.sie_deflection(x, y, r, q, p, a, b),
        "spl": lambda x, y, r, g, q, p, a, b: lp.spl_deflection(x, y, r, g, q, p, a, b),
    }


@pytest.mark.parametrize("name", ["epl", "sie", "spl"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_no_nan_at_centre_axes_and_round_lens(name, dtype):
    fn = _profiles()[name]
    for gamma in (1.6, 2.0, 2.4):
        vals = [
            tf.constant([0.2, 0.0, 0.3, 0.0, -0.5], dtype),
            tf.constant([0.1, 0.0, 0.0, 0.2, 0.0], dtype),
            tf.constant(1.3, dtype),
            tf.constant(gamma, dtype),
            tf.constant(1.0, dtype),
            tf.constant(0.4, dtype),
            tf.constant(0.2, dtype),
            tf.constant(0.1, dtype),
        ]
        with tf.GradientTape() as tape:
            tape.watch(vals)
            ax, ay = fn(*vals)
            total = tf.reduce_sum(1.3 * ax + 0.7 * ay)
        grads = tape.gradient(total, vals)
        assert np.all(np.isfinite(ax.numpy())) and np.all(np.isfinite(ay.numpy()))
        assert ax.numpy()[0] == 0.0 and ay.numpy()[0] == 0.0  # exact centre
        for g in grads:
            assert g is None or np.all(np.isfinite(g.numpy()))


@pytest.mark.parametrize("name", ["epl", "sie", "spl", "shear"])
def test_gradients_match_finite_differences(name):
    rng = np.random.default_rng(6)
    x = tf.constant(rng.uniform(-2, 2, 6))
    y = tf.constant(rng.uniform(-2, 2, 6))
    if name == "shear":
        params = [x, y, tf.constant(0.05, tf.float64), tf.constant(-0.03, tf.float64)]
        fn = lp.external_shear_deflection
    else:
        params = [x, y] + [tf.constant(v, tf.float64) for v in (1.2, 2.13, 0.63, 0.4, 0.1, -0.2)]
        fn = _profiles()[name]
    weights = rng.normal(size=(2, 6))

    def scalar(*vals):
        ax, ay = fn(*vals)
        return tf.reduce_sum(weights[0] * ax + weights[1] * ay)

    with tf.GradientTape() as tape:
        tape.watch(params)
        total = scalar(*params)
    grads = tape.gradient(total, params)
    h = 1e-6
    for k, p in enumerate(params):
        if name == "sie" and k == 3:
            assert grads[k] is None  # the slope is not a parameter of the SIE
            continue
        flat = p.numpy().reshape(-1)
        fd = np.empty_like(flat)
        for j in range(flat.size):
            plus, minus = flat.copy(), flat.copy()
            plus[j] += h
            minus[j] -= h
            vp = [tf.constant(plus.reshape(p.shape)) if i == k else v for i, v in enumerate(params)]
            vm = [
                tf.constant(minus.reshape(p.shape)) if i == k else v for i, v in enumerate(params)
            ]
            fd[j] = (scalar(*vp).numpy() - scalar(*vm).numpy()) / (2 * h)
        np.testing.assert_allclose(grads[k].numpy().reshape(-1), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["epl", "spl"])
def test_compiled_with_xla_matches_eager(name):
    fn = _profiles()[name]
    rng = np.random.default_rng(7)
    x = tf.constant(rng.uniform(-3, 3, (2, 16, 16)), tf.float32)
    y = tf.constant(rng.uniform(-3, 3, (2, 16, 16)), tf.float32)
    params = [
        tf.constant(v, tf.float32)
        for v in ([1.2, 0.8], [2.1, 1.7], [0.5, 0.9], [0.3, -1.0], [0.0, 0.1], [0.1, 0.0])
    ]
    compiled = tf.function(fn, jit_compile=True)
    eager = fn(x, y, *params)
    jit = compiled(x, y, *params)
    for a, b in zip(eager, jit, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-6)


def test_batch_broadcasting_matches_per_system_calls():
    rng = np.random.default_rng(8)
    lenses = _random_lenses(rng, 3)
    grid_x, grid_y = np.meshgrid(np.linspace(-2, 2, 5), np.linspace(-2, 2, 4))
    ax, ay = lp.spl_deflection(grid_x[None], grid_y[None], **lenses)  # (1, 4, 5) grid shared
    assert ax.shape == (3, 4, 5)
    for i in range(3):
        bx, by = lp.spl_deflection(grid_x, grid_y, **{k: v[i] for k, v in lenses.items()})
        np.testing.assert_allclose(ax[i], bx, rtol=1e-12)
        np.testing.assert_allclose(ay[i], by, rtol=1e-12)
    with pytest.raises(TfhybridInputError, match="LEADING"):
        lp.epl_deflection(np.zeros(4), np.zeros(4), np.ones((2, 2)), 2.0, 0.5, 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=0.0), "q must be >"),
        (dict(q=1.2), "q must be <="),
        (dict(q=-0.5), "q must be >"),
        (dict(r_ein=0.0), "r_ein must be >"),
        (dict(gamma=3.2), "gamma must be"),
        (dict(gamma=np.nan), "gamma contains"),
        (dict(x=np.array([0.0, np.inf])), "x contains"),
        (dict(phi=np.nan), "phi contains"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(
        x=np.array([0.5, 1.0]), y=np.array([0.2, 0.0]), r_ein=1.0, gamma=2.0, q=0.6, phi=0.1
    )
    args.update(kwargs)
    with pytest.raises(TfhybridInputError, match=match):
        lp.epl_deflection(**args)
    with pytest.raises(TfhybridInputError, match=match):
        lp.spl_deflection(**args)


def test_spl_rejects_parameters_outside_the_table():
    table = spl_table.load_default_table()
    with pytest.raises(TfhybridInputError, match="gamma must be <= 2.8"):
        lp.spl_deflection(1.0, 0.5, 1.0, 2.9, 0.5, 0.0)
    with pytest.raises(TfhybridInputError, match="q must be >= 0.1"):
        lp.spl_deflection(1.0, 0.5, 1.0, 2.0, 0.05, 0.0)
    assert table.gamma_range[0] == pytest.approx(1.2)
    with pytest.raises(TfhybridInputError, match="q must be"):
        lp.sie_deflection(1.0, 0.5, 1.0, 1.5, 0.0)


def test_public_functions_trace_inside_tf_function_with_variables():
    # symbolic values cannot be checked: the public functions must still trace and match eager
    q = tf.Variable(0.55)
    gamma = tf.Variable(2.2)
    x = tf.constant([[0.3, -1.2, 2.0]])
    y = tf.constant([[0.8, 0.1, -0.4]])

    @tf.function
    def total():
        ax, ay = lp.spl_deflection(x, y, 1.1, gamma, q, 0.2, 0.05, 0.0)
        bx, by = lp.epl_deflection(x, y, 1.1, gamma, q, 0.2, 0.05, 0.0)
        sx, sy = lp.external_shear_deflection(x, y, 0.02, 0.01)
        return ax + sx, ay + sy, bx + sx, by + sy

    ax, ay, bx, by = total()
    np.testing.assert_allclose(ax.numpy(), bx.numpy(), rtol=3e-5)
    np.testing.assert_allclose(ay.numpy(), by.numpy(), rtol=3e-5)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_table_per_lens_and_per_point_paths_agree(dtype):
    # per-lens contraction (few lenses, many pixels) and per-point gathers must be the same spline
    table = spl_table.load_default_table()
    rng = np.random.default_rng(9)
    u = tf.constant(rng.uniform(-4.0, 4.0, (3, 40, 30)), dtype)
    q = tf.constant(rng.uniform(0.1, 1.0, (3, 1, 1)), dtype)
    gamma = tf.constant(rng.uniform(1.2, 2.8, (3, 1, 1)), dtype)
    per_lens = table.interpolate_g(u, q, gamma)
    s_q, s_g = table._node_coordinates(q, gamma)
    per_point = table._interpolate_per_point(u, s_q, s_g)
    for a, b in zip(per_lens, per_point, strict=True):
        np.testing.assert_allclose(
            a.numpy(), b.numpy(), rtol=1e-5 if dtype == tf.float32 else 1e-12
        )


@pytest.mark.parametrize("q", [1.0, 0.7, 0.4])
def test_circularised_einstein_radius_sets_the_sie_critical_curve_area(q):
    """For the SIE (γ = 2) the region where det(∂β/∂θ) < 0, inside the tangential critical
    curve, has area π θ_E² with θ_E = sqrt(q) r_Ein, whatever q; the Jacobian is taken by
    central differences of :func:`sie_deflection` on a 0.01" grid (the area's pixelisation
    error over a curve of length ~2π θ_E is ~1e-2 θ_E / θ_E² ≈ 0.5 %, tolerance 1 %)."""
    r_ein, phi, h = 1.3, 0.3, 0.01
    theta_e = lp.circularised_einstein_radius(r_ein, q)
    assert theta_e == pytest.approx(np.sqrt(q) * r_ein)
    c = np.arange(-2.5, 2.5, h) + h / 2
    x, y = np.meshgrid(c, c)

    def beta(dx, dy):
        ax, ay = (a.numpy() for a in lp.sie_deflection(
            tf.constant(x + dx), tf.constant(y + dy), r_ein, q, phi, 0.05, -0.02))
        return x + dx - ax, y + dy - ay

    e = 1e-5
    (b1px, b2px), (b1mx, b2mx) = beta(e, 0.0), beta(-e, 0.0)
    (b1py, b2py), (b1my, b2my) = beta(0.0, e), beta(0.0, -e)
    det = ((b1px - b1mx) * (b2py - b2my) - (b1py - b1my) * (b2px - b2mx)) / (2 * e) ** 2
    area = np.sum(det < 0) * h**2
    assert area == pytest.approx(np.pi * theta_e**2, rel=0.01)

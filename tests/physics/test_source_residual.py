"""Tests of tfhybrid.physics.source_residual (the marginalised source-plane residual).

References: a dense design matrix built pixel by pixel (``bilinear_design_matrix``, itself
checked against scipy's bilinear ``RegularGridInterpolator``), scipy's dense multivariate
normal for the marginal likelihood, and central finite differences for the gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.interpolate import RegularGridInterpolator
from scipy.stats import multivariate_normal

from tfhybrid.physics import source_residual as sr
from tfhybrid.validation import TfhybridInputError


def _positions(rng, batch, num_pix, m):
    # beyond the grid on every side (the fade-out cells and far outside) as well as inside
    size = (batch, num_pix)
    return rng.uniform(-2.5, m + 1.5, size), rng.uniform(-2.5, m + 1.5, size)


def test_design_matrix_is_bilinear_interpolation_with_a_zero_border():
    rng = np.random.default_rng(0)
    m = 5
    col, row = _positions(rng, 1, 400, m)
    values = rng.normal(size=(m, m))
    # scipy: the grid padded by a ring of zero nodes = the one-node fade-out beyond the edge
    padded = np.pad(values, 1)
    axis = np.arange(-1, m + 1, dtype=np.float64)
    ref = RegularGridInterpolator((axis, axis), padded, bounds_error=False, fill_value=0.0)
    expected = ref(np.stack([row[0], col[0]], -1))
    got = sr.bilinear_design_matrix(col, row, m)[0] @ values.reshape(-1)
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("m", [1 + 1, 4, 7])
def test_bilinear_gram_equals_the_dense_products(m):
    rng = np.random.default_rng(m)
    col, row = _positions(rng, 3, 500, m)
    resid = rng.normal(size=(3, 500))
    dense = sr.bilinear_design_matrix(col, row, m)
    diagonal, lower, proj = sr.bilinear_gram(tf.constant(col), tf.constant(row),
                                             tf.constant(resid), m)
    assert diagonal.shape == (3, m, m, m) and lower.shape == (3, m - 1, m, m)
    expected = np.einsum("bpi,bpj->bij", dense, dense)
    # BᵀB is block tridiagonal in grid rows: the blocks hold all of it (float64 in, float64
    # sums: agreement to rounding)
    np.testing.assert_allclose(sr.dense_gram(diagonal, lower), expected, atol=1e-12)
    by_rows = expected.reshape(3, m, m, m, m).transpose(0, 1, 3, 2, 4)  # (b, row a, row b, ..)
    far = np.abs(np.subtract.outer(np.arange(m), np.arange(m))) > 1
    assert np.all(by_rows[:, far] == 0) and np.abs(by_rows[:, ~far]).sum() > 0
    np.testing.assert_allclose(proj.numpy(), np.einsum("bpi,bp->bi", dense, resid), atol=1e-12)


def test_marginal_correction_equals_the_dense_gaussian():
    rng = np.random.default_rng(3)
    m, num_pix = 4, 300
    col, row = _positions(rng, 2, num_pix, m)
    resid = rng.normal(size=(2, num_pix)) * 0.1
    sigma, sigma_res = np.array([0.05, 0.1]), np.array([0.2, 0.03])
    gram = sr.bilinear_gram(tf.constant(col), tf.constant(row), tf.constant(resid), m)
    got = sr.marginal_log_likelihood_correction(*gram, tf.constant(sigma),
                                                tf.constant(sigma_res)).numpy()
    dense = sr.bilinear_design_matrix(col, row, m)
    for i in range(2):
        cov = sigma[i] ** 2 * np.eye(num_pix) + sigma_res[i] ** 2 * dense[i] @ dense[i].T
        full = multivariate_normal(np.zeros(num_pix), cov).logpdf(resid[i])
        white = multivariate_normal(np.zeros(num_pix), sigma[i] ** 2 * np.eye(num_pix)).logpdf(
            resid[i])
        # float64 throughout: the two routes agree to rounding of a ~1e3 log density
        np.testing.assert_allclose(got[i], full - white, rtol=1e-9, atol=1e-9)
    # no residual amplitude, no correction; a residual with no pixels on the grid costs nothing
    zero = sr.marginal_log_likelihood_correction(*gram, tf.constant(sigma),
                                                 tf.constant([1e-12, 1e-12], tf.float64)).numpy()
    np.testing.assert_allclose(zero, 0.0, atol=1e-12)


def test_weighted_gram_gives_the_marginal_of_a_per_pixel_noise():
    # Pixel weights w = (σ / σ_p)² (0: masked): BᵀWB, BᵀW r, and the same correction formula
    # is the dense Gaussian with covariance diag(σ_p²) + σ_δ² B Bᵀ over the unmasked pixels,
    # against the white one over them (float64: to rounding).
    rng = np.random.default_rng(5)
    m, num_pix = 4, 300
    col, row = _positions(rng, 1, num_pix, m)
    resid = rng.normal(size=(1, num_pix)) * 0.1
    sigma, sigma_res = 0.05, 0.2
    sigma_pix = sigma * rng.uniform(0.5, 3.0, num_pix)
    sigma_pix[rng.choice(num_pix, 40, replace=False)] = np.inf
    weights = (sigma / sigma_pix) ** 2
    gram = sr.bilinear_gram(tf.constant(col), tf.constant(row), tf.constant(resid), m,
                            weights=tf.constant(weights[None]))
    dense = sr.bilinear_design_matrix(col, row, m)[0]
    np.testing.assert_allclose(sr.dense_gram(*gram[:2])[0],
                               dense.T @ (weights[:, None] * dense), atol=1e-12)
    got = sr.marginal_log_likelihood_correction(*gram, tf.constant([sigma], tf.float64),
                                                tf.constant([sigma_res], tf.float64))[0]
    keep = np.isfinite(sigma_pix)
    b, r = dense[keep], resid[0, keep]
    full = multivariate_normal(np.zeros(keep.sum()),
                               np.diag(sigma_pix[keep] ** 2) + sigma_res**2 * b @ b.T).logpdf(r)
    white = multivariate_normal(np.zeros(keep.sum()), np.diag(sigma_pix[keep] ** 2)).logpdf(r)
    np.testing.assert_allclose(got, full - white, rtol=1e-9, atol=1e-9)


def test_marginal_correction_in_float32_and_its_gradient():
    rng = np.random.default_rng(5)
    m, num_pix = 6, 2000
    col, row = _positions(rng, 1, num_pix, m)
    resid = rng.normal(size=(1, num_pix)) * 0.05

    def delta(shift, dtype):
        c = tf.constant(col + shift, dtype)
        gram = sr.bilinear_gram(c, tf.constant(row, dtype), tf.constant(resid, dtype), m)
        return sr.marginal_log_likelihood_correction(
            *gram, tf.constant([0.03], dtype), tf.constant([0.01], dtype))[0]

    d64 = float(delta(0.0, tf.float64))
    # float32 (the default): A's eigenvalues are >= 1, so the Cholesky is well conditioned
    assert abs(float(delta(0.0, tf.float32)) - d64) < 1e-4 * max(1.0, abs(d64))
    # d delta / d (a uniform shift of the positions): autodiff against central differences
    shift = tf.Variable(0.0, dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = delta(shift, tf.float64)
    grad = float(tape.gradient(value, shift))
    eps = 1e-6
    fd = (float(delta(eps, tf.float64)) - float(delta(-eps, tf.float64))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-5)



def test_marginal_correction_gradient_in_every_input_matches_finite_differences():
    # the hand-written gradient (custom_gradient) along random directions of each input,
    # float64, against central differences: the truncation error is O(eps²) ~ 1e-10 relative
    rng = np.random.default_rng(11)
    m, num_pix = 5, 800
    col, row = _positions(rng, 2, num_pix, m)
    gram = sr.bilinear_gram(tf.constant(col), tf.constant(row),
                            tf.constant(rng.normal(size=(2, num_pix)) * 0.05), m)
    inputs = [*gram, tf.constant([0.03, 0.02], tf.float64), tf.constant([0.01, 0.05], tf.float64)]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        total = tf.reduce_sum(sr.marginal_log_likelihood_correction(*inputs) * [1.0, -0.7])
    grads = tape.gradient(total, inputs)
    for i, x in enumerate(inputs):
        direction = rng.normal(size=x.shape)
        if i == 0:  # symmetric perturbations keep the diagonal blocks symmetric, as they are
            direction = direction + np.swapaxes(direction, -1, -2)
        eps = 1e-6 * float(tf.reduce_max(tf.abs(x)))

        def value(step, i=i, direction=direction, eps=eps):
            moved = list(inputs)
            moved[i] = inputs[i] + step * eps * direction
            return float(tf.reduce_sum(sr.marginal_log_likelihood_correction(*moved)
                                       * [1.0, -0.7]))

        fd = (value(1.0) - value(-1.0)) / (2 * eps)
        np.testing.assert_allclose(float(tf.reduce_sum(grads[i] * direction)), fd, rtol=1e-6,
                                   err_msg=f"input {i}")

def test_grid_coordinates_and_config_validation():
    cfg = sr.SourceResidualConfig(grid_size=4, pixel_factor=2.0)
    # the stamp's centre (31.5, 31.5) is the grid's centre (1.5, 1.5); 2 stamp px per node
    col, row = sr.grid_coordinates(np.array([31.5, 33.5]), np.array([31.5, 27.5]), (64, 64), cfg)
    np.testing.assert_allclose(col, [1.5, 2.5])
    np.testing.assert_allclose(row, [1.5, -0.5])
    assert cfg.num_nodes == 16
    for bad in (dict(grid_size=1), dict(grid_size=2.5), dict(grid_size=True),
                dict(pixel_factor=0.0), dict(pixel_factor=float("nan"))):
        with pytest.raises(TfhybridInputError):
            sr.SourceResidualConfig(**bad)

"""Tests of tfhybrid.inference.proximal against scipy's NNLS and scikit-learn's LASSO."""

import functools

import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import nnls

from tfhybrid.inference.proxes import chain_proxes, prox_l1, prox_monotonic, prox_positive
from tfhybrid.inference.proximal import (
    block_lipschitz,
    lipschitz_power_iteration,
    proximal_gradient,
)
from tfhybrid.validation import TfhybridInputError


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 20))
    b = rng.normal(size=40)
    return a, b


def _lsq(a, b, scale=1.0):
    at, bt = tf.constant(a), tf.constant(b)
    return lambda x: 0.5 * scale * tf.reduce_sum(tf.square(tf.linalg.matvec(at, x) - bt))


def test_power_iteration_matches_spectral_norm(problem):
    a, _ = problem
    at = tf.constant(a)
    lip = lipschitz_power_iteration(lambda v: tf.linalg.matvec(at, v), [20], dtype=tf.float64)
    np.testing.assert_allclose(float(lip), np.linalg.norm(a, 2) ** 2, rtol=1e-4)
    # batched: one constant per independent operator (per source)
    scales = tf.constant([[1.0], [3.0]], tf.float64)
    lips = lipschitz_power_iteration(
        lambda v: scales * tf.linalg.matvec(at, v), [2, 20], dtype=tf.float64, batch_ndims=1
    )
    np.testing.assert_allclose(
        lips.numpy(), np.array([1.0, 9.0]) * np.linalg.norm(a, 2) ** 2, rtol=1e-4
    )
    hess = block_lipschitz(
        lambda x, y: _lsq(a, problem[1])(x) + tf.reduce_sum(y),
        [tf.zeros(20, tf.float64), tf.zeros(3, tf.float64)],
        0,
        num_iter=60,
    )
    np.testing.assert_allclose(float(hess), np.linalg.norm(a, 2) ** 2, rtol=1e-4)


@pytest.mark.parametrize("fixed_step,accelerate", [(False, True), (True, True), (True, False)])
def test_nnls_matches_scipy(problem, fixed_step, accelerate):
    a, b = problem
    x_ref, _ = nnls(a, b)
    step = 1.0 / np.linalg.norm(a, 2) ** 2 if fixed_step else None
    res = proximal_gradient(
        _lsq(a, b),
        tf.zeros(20, tf.float64),
        prox_positive,
        step_sizes=step,
        max_iter=20000,
        rtol=1e-12,
        accelerate=accelerate,
    )
    assert res.converged, res.message
    # float64 and rtol 1e-12: the solution agrees with scipy's active-set answer to ~1e-9
    np.testing.assert_allclose(res.blocks[0].numpy(), x_ref, atol=1e-8)
    assert np.all(res.blocks[0].numpy() >= 0)
    assert res.loss_trace.shape == (res.num_iter,)


def test_blockwise_nnls_and_callable_steps(problem):
    a, b = problem
    x_ref, _ = nnls(a, b)
    lsq = _lsq(a, b)
    lip1 = np.linalg.norm(a[:, :10], 2) ** 2
    res = proximal_gradient(
        lambda u, v: lsq(tf.concat([u, v], 0)),
        [tf.zeros(10, tf.float64), tf.zeros(10, tf.float64)],
        [prox_positive, prox_positive],
        step_sizes=[lambda u, v: tf.constant(1.0 / lip1, tf.float64), None],
        max_iter=20000,
        rtol=1e-12,
    )
    assert res.converged, res.message
    np.testing.assert_allclose(np.concatenate([b_.numpy() for b_ in res.blocks]), x_ref, atol=1e-8)


def test_lasso_matches_sklearn(problem):
    from sklearn.linear_model import Lasso

    a, b = problem
    alpha = 0.1
    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=200000).fit(a, b).coef_
    # sklearn minimises 1/(2n) ||b - a x||^2 + alpha ||x||_1
    res = proximal_gradient(
        _lsq(a, b, 1.0 / len(b)),
        tf.zeros(20, tf.float64),
        functools.partial(prox_l1, threshold=alpha),
        max_iter=20000,
        rtol=1e-13,
    )
    assert res.converged, res.message
    np.testing.assert_allclose(res.blocks[0].numpy(), ref, atol=1e-7)
    assert np.sum(res.blocks[0].numpy() == 0) == np.sum(ref == 0) > 0


def test_batched_sources_monotone_deconvolution_float32():
    """A K=3 batch of stamps fitted under positivity + monotonicity, XLA on: constraints hold."""
    rng = np.random.default_rng(2)
    yy, xx = np.meshgrid(np.arange(15), np.arange(15), indexing="ij")
    truth = np.exp(-((yy - 7) ** 2 + (xx - 7) ** 2) / np.array([4.0, 8.0, 12.0])[:, None, None])
    data = (truth + 0.05 * rng.normal(size=truth.shape)).astype(np.float32)
    f = lambda s: 0.5 * tf.reduce_sum(tf.square(s - data))  # noqa: E731
    res = proximal_gradient(
        f,
        tf.zeros((3, 15, 15)),
        chain_proxes(prox_positive, prox_monotonic),
        step_sizes=1.0,
        max_iter=50,
        rtol=1e-6,
        jit_compile=True,
    )
    s = res.blocks[0].numpy()
    assert res.converged and s.dtype == np.float32
    np.testing.assert_array_equal(prox_monotonic(s).numpy(), s)
    assert np.sqrt(np.mean((s - truth) ** 2)) < 0.05  # projection removed noise


def test_not_converged_is_reported(problem):
    a, b = problem
    res = proximal_gradient(_lsq(a, b), tf.zeros(20, tf.float64), prox_positive, max_iter=3)
    assert not res.converged and "NOT converged" in res.message and res.num_iter == 3


def test_bad_inputs(problem):
    a, b = problem
    with pytest.raises(TfhybridInputError, match="one per block"):
        proximal_gradient(_lsq(a, b), [tf.zeros(20), tf.zeros(3)], [prox_positive])
    with pytest.raises(TfhybridInputError, match="NaN"):
        proximal_gradient(_lsq(a, b), tf.constant([np.nan] * 20, tf.float64))
    with pytest.raises(TfhybridInputError, match="> 0"):
        proximal_gradient(_lsq(a, b), tf.zeros(20, tf.float64), step_sizes=-1.0)

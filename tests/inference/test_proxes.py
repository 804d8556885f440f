"""Tests of tfhybrid.inference.proxes: projections land in their sets and are idempotent."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from tfhybrid.inference.proxes import (
    _monotonic_doubling_maps,
    chain_proxes,
    prox_l0,
    prox_l1,
    prox_monotonic,
    prox_normalize_max,
    prox_normalize_sum,
    prox_positive,
    prox_symmetric,
)
from tfhybrid.validation import TfhybridInputError


def _stamps(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _sequential_monotonic(x, center):
    """Reference: scarlet's sequential sweep in order of distance from the peak (pure NumPy)."""
    h, w = x.shape[-2:]
    ref = _monotonic_doubling_maps(h, w, *center)[0]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = np.argsort(np.hypot(yy - center[0], xx - center[1]).ravel(), kind="stable")
    flat = x.reshape(x.shape[:-2] + (h * w,)).copy()
    for p in order:
        flat[..., p] = np.minimum(flat[..., p], flat[..., ref[p]])
    return flat.reshape(x.shape), ref


def test_positive_and_thresholds_elementwise():
    x = np.array([-2.0, -0.5, 0.0, 0.3, 1.5], np.float32)
    np.testing.assert_array_equal(prox_positive(x).numpy(), np.maximum(x, 0))
    np.testing.assert_allclose(prox_l1(x, 0.25, step=2.0).numpy(), [-1.5, 0, 0, 0, 1.0])
    # exact L0 prox: keep where x^2 > 2 * step * t = 0.5  ->  |x| > 0.707
    np.testing.assert_array_equal(prox_l0(x, 0.25, step=1.0).numpy(), [-2.0, 0, 0, 0, 1.5])


@pytest.mark.parametrize("shape,center", [((9, 9), None), ((8, 11), None), ((12, 10), (3, 6))])
def test_symmetric_is_symmetric_and_idempotent(shape, center):
    x = _stamps((3, 2) + shape)
    s = prox_symmetric(x, center=center).numpy()
    h, w = shape
    cy, cx = center if center is not None else (h // 2, w // 2)
    for y in range(h):
        for xx in range(w):
            py, px = 2 * cy - y, 2 * cx - xx
            if 0 <= py < h and 0 <= px < w:
                np.testing.assert_allclose(s[..., y, xx], s[..., py, px], rtol=0, atol=1e-7)
                np.testing.assert_allclose(
                    s[..., y, xx], 0.5 * (x[..., y, xx] + x[..., py, px]), atol=1e-6
                )
            else:
                assert np.all(s[..., y, xx] == 0.0)
    np.testing.assert_array_equal(prox_symmetric(s, center=center).numpy(), s)
    m = prox_symmetric(x, center=center, mode="min").numpy()
    np.testing.assert_array_equal(prox_symmetric(m, center=center, mode="min").numpy(), m)


@pytest.mark.parametrize("shape,center", [((15, 15), None), ((16, 13), None), ((14, 14), (4, 9))])
def test_monotonic_matches_sequential_sweep_and_is_monotone(shape, center):
    x = np.abs(_stamps((2, 3) + shape, seed=1))
    c = center if center is not None else (shape[0] // 2, shape[1] // 2)
    expected, ref = _sequential_monotonic(x, c)
    m = prox_monotonic(x, center=center).numpy()
    np.testing.assert_array_equal(m, expected)
    flat = m.reshape(m.shape[:-2] + (-1,))
    assert np.all(flat <= flat[..., ref])  # every pixel <= its reference towards the peak
    np.testing.assert_array_equal(prox_monotonic(m, center=center).numpy(), m)
    # the peak is untouched and a monotone input is returned unchanged
    assert np.all(m[..., c[0], c[1]] == x[..., c[0], c[1]])
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    gauss = np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / 8.0).astype(np.float32)
    np.testing.assert_array_equal(prox_monotonic(gauss, center=center).numpy(), gauss)


def test_monotonic_reference_points_towards_centre():
    h, w, cy, cx = 21, 17, 10, 8
    ref = _monotonic_doubling_maps(h, w, cy, cx)[0]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    d = np.hypot(yy - cy, xx - cx).ravel()
    ry, rx = np.divmod(ref, w)
    step = np.maximum(np.abs(ry - yy.ravel()), np.abs(rx - xx.ravel()))
    centre = cy * w + cx
    assert ref[centre] == centre
    others = np.arange(h * w) != centre
    assert np.all(d[ref][others] < d[others]) and np.all(step[others] == 1)


def test_monotonic_under_tf_function_and_xla():
    x = tf.constant(np.abs(_stamps((4, 32, 32), seed=3)))
    eager = prox_monotonic(x).numpy()
    for jit in (False, True):
        np.testing.assert_array_equal(tf.function(prox_monotonic, jit_compile=jit)(x), eager)


def test_chain_keeps_all_constraints_and_normalisations():
    x = _stamps((3, 15, 15), seed=4)
    chain = chain_proxes(prox_positive, prox_monotonic, prox_symmetric)
    y = chain(x, step=0.1).numpy()
    assert np.all(y >= 0)
    np.testing.assert_allclose(y, y[..., ::-1, ::-1], atol=1e-7)
    np.testing.assert_allclose(prox_monotonic(y).numpy(), y, atol=1e-7)
    np.testing.assert_allclose(chain(y).numpy(), y, atol=1e-7)
    nm = prox_normalize_max(np.abs(x)).numpy()
    np.testing.assert_allclose(nm.max(axis=(-2, -1)), 1.0, rtol=1e-6)
    ns = prox_normalize_sum(np.abs(x)).numpy()
    np.testing.assert_allclose(ns.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(prox_normalize_max(np.zeros((2, 4, 4))).numpy(), 0.0)
    soft = chain_proxes(functools.partial(prox_l1, threshold=1.0), lambda v: v * 2.0)
    np.testing.assert_allclose(soft(np.array([3.0]), step=0.5).numpy(), [5.0])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TfhybridInputError, match="inside the 8x8 stamp"):
        prox_monotonic(np.zeros((8, 8), np.float32), center=(9, 1))
    with pytest.raises(TfhybridInputError, match=r"\(\.\.\., h, w\)"):
        prox_symmetric(np.zeros(5, np.float32))
    with pytest.raises(TfhybridInputError, match="callable"):
        chain_proxes(prox_positive, 3)

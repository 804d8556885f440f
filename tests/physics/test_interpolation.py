"""Tests of tfhybrid.physics.interpolation (bilinear sampling, eq. 17 of 003_*).

Reference: ``scipy.ndimage.map_coordinates(order=1, cval=0)``. "Zero outside" comes in two
conventions, both tested (pixel centres at integer coordinates, edges at -0.5 and n - 0.5):

* ``mode="grid-constant"`` (default): the image is padded with zeros and interpolated, so the
  value tapers linearly from the edge pixel's centre to 0 one pixel further out (-1 and n).
  scipy ``mode='grid-constant'``, PyTorch ``grid_sample(padding_mode='zeros')``, lenstronomy
  ``INTERPOL``.
* ``mode="constant"``: 0 for every point outside ``[0, n - 1]`` (beyond the edge pixels'
  CENTRES), no interpolation with the padding. scipy ``mode='constant'``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import map_coordinates

from tfhybrid.physics import interpolation as interp
from tfhybrid.validation import TfhybridInputError


def _scipy_reference(image, x, y, mode):
    """map_coordinates per batch element; ``image`` (B, ny, nx), ``x``, ``y`` (B, ...)."""
    out = np.empty(x.shape, np.float64)
    for b in range(image.shape[0]):
        out[b] = map_coordinates(
            image[b].astype(np.float64), [y[b], x[b]], order=1, mode=mode, cval=0.0
        )
    return out


def _points_covering_the_edges(rng, shape, ny, nx):
    """Random points from 2 pixels outside to 2 pixels outside, plus exact edge cases."""
    x = rng.uniform(-2.0, nx + 1.0, shape)
    y = rng.uniform(-2.0, ny + 1.0, shape)
    # exact integers (pixel centres), the edge-pixel centres and the padded ring
    special = np.array([-1.0, -0.5, 0.0, 0.5, nx - 1.0, nx - 0.5, float(nx), 3.0])
    x.flat[: len(special)] = special
    y.flat[: len(special)] = special[::-1] * (ny / nx)
    return x, y


@pytest.mark.parametrize("mode", ["grid-constant", "constant"])
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_scipy_map_coordinates(mode, jit_compile, dtype):
    # tolerance 1e-6 absolute on values of order 1 (the figure): float32 rounding of a
    # convex combination of 4 values is ~2e-7; float64 agrees to ~1e-15. The reference gets
    # the coordinates rounded to the tested dtype: rounding x ~ 20 to float32 moves it by
    # ~1e-6 px, an input change, not an interpolation error.
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 17, 23)).astype(dtype)  # non-square: catches an x/y swap
    x, y = _points_covering_the_edges(rng, (3, 40, 30), 17, 23)
    x, y = x.astype(dtype), y.astype(dtype)
    got = interp.bilinear_interpolate(image, x, y, mode=mode, jit_compile=jit_compile)
    assert got.shape == (3, 40, 30)
    assert got.dtype == tf.as_dtype(dtype)
    want = _scipy_reference(image, x, y, mode)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=tol)


def test_zero_outside_conventions_differ_only_in_the_outer_half_pixel_ring():
    # Documents exactly what "zero outside" means for each mode on a constant image of ones.
    image = np.ones((1, 4, 5))
    x = np.array([[-1.5, -1.0, -0.5, -0.25, 0.0, 2.0, 4.0, 4.25, 4.5, 5.0, 5.5]])
    y = np.full_like(x, 1.5)
    gc = interp.bilinear_interpolate(image, x, y, mode="grid-constant").numpy()[0]
    c = interp.bilinear_interpolate(image, x, y, mode="constant").numpy()[0]
    np.testing.assert_allclose(gc, [0, 0, 0.5, 0.75, 1, 1, 1, 0.75, 0.5, 0, 0], atol=1e-15)
    np.testing.assert_allclose(c, [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0], atol=1e-15)


def test_unbatched_and_batched_broadcast_shapes():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(8, 9))
    x = rng.uniform(0, 8, (5, 6))
    y = rng.uniform(0, 7, (5, 6))
    single = interp.bilinear_interpolate(image, x, y).numpy()
    np.testing.assert_allclose(
        single, map_coordinates(image, [y, x], order=1, mode="grid-constant"), atol=1e-12
    )
    # two batch axes
    images = np.stack([image, 2 * image])[None]  # (1, 2, 8, 9)
    xs = np.stack([x, x])[None]
    ys = np.stack([y, y])[None]
    both = interp.bilinear_interpolate(images, xs, ys).numpy()
    np.testing.assert_allclose(both[0, 1], 2 * single, atol=1e-12)


def _fd_check(fn, args, index, eps=1e-6):
    """Central finite difference of sum(w * fn(*args)) along a random direction of args[index]."""
    rng = np.random.default_rng(2 + index)
    weights = rng.normal(size=fn(*args).shape)
    direction = rng.normal(size=np.shape(args[index]))
    tensors = [tf.constant(a) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = tf.reduce_sum(weights * fn(*tensors))
    grad = tape.gradient(loss, tensors[index]).numpy()
    plus = list(args)
    minus = list(args)
    plus[index] = args[index] + eps * direction
    minus[index] = args[index] - eps * direction
    fd = (np.sum(weights * fn(*plus).numpy()) - np.sum(weights * fn(*minus).numpy())) / (2 * eps)
    return float(np.sum(grad * direction)), fd


@pytest.mark.parametrize("mode", ["grid-constant", "constant"])
@pytest.mark.parametrize("jit_compile", [True, False])
def test_gradients_match_finite_differences(mode, jit_compile):
    # float64. The interpolant is piecewise linear, so points are kept 1e-3 px away from the
    # kinks (integer coordinates; in 'constant' mode also from the jumps at 0 and n - 1); then
    # a 1e-6 step never crosses one and central differences are exact up to rounding (~1e-9).
    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, 6, 7))
    x = rng.uniform(-1.8, 7.8, (2, 50))
    y = rng.uniform(-1.8, 6.8, (2, 50))
    x = np.where(np.abs(x - np.round(x)) < 1e-3, x + 0.01, x)
    y = np.where(np.abs(y - np.round(y)) < 1e-3, y + 0.01, y)

    def fn(image, x, y):
        return interp.bilinear_interpolate(image, x, y, mode=mode, jit_compile=jit_compile)

    for index in range(3):  # image, x, y
        analytic, fd = _fd_check(fn, (image, x, y), index)
        assert analytic == pytest.approx(fd, rel=1e-7, abs=1e-9), index


def test_gradient_is_zero_far_outside_and_finite_on_the_grid_nodes():
    image = tf.constant(np.arange(12.0).reshape(3, 4))
    x = tf.constant([[-5.0, 10.0, 0.0, 1.0, 3.0]])[0]
    y = tf.constant([[1.0, 1.0, 0.0, 2.0, 2.0]])[0]
    with tf.GradientTape() as tape:
        tape.watch([image, x, y])
        out = tf.reduce_sum(interp.bilinear_interpolate(image, x, y))
    gi, gx, gy = tape.gradient(out, [image, x, y])
    assert np.all(np.isfinite(gx.numpy())) and np.all(np.isfinite(gy.numpy()))
    assert gx.numpy()[0] == 0.0 and gx.numpy()[1] == 0.0  # clamped region: exact zero
    # the image gradient is the sum of the bilinear weights: 3 points on nodes -> 3
    assert gi.numpy().sum() == pytest.approx(3.0)


def test_keras_layer_matches_function_and_serialises():
    import keras

    rng = np.random.default_rng(4)
    image = rng.normal(size=(2, 5, 5)).astype(np.float32)
    x = rng.uniform(-1, 5, (2, 7)).astype(np.float32)
    y = rng.uniform(-1, 5, (2, 7)).astype(np.float32)
    layer = interp.BilinearInterpolation(mode="constant")
    np.testing.assert_allclose(
        layer([image, x, y]).numpy(),
        interp.bilinear_interpolate(image, x, y, mode="constant").numpy(),
        atol=1e-7,
    )
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert clone.mode == "constant"


@pytest.mark.parametrize(
    "image, x, y, kwargs, match",
    [
        (np.ones(5), np.ones(2), np.ones(2), {}, "rank >= 2"),
        (np.ones((4, 4)), np.ones(2), np.ones(3), {}, "same shape"),
        (np.ones((2, 4, 4)), np.ones((3, 5)), np.ones((3, 5)), {}, "batch shape"),
        (np.ones((4, 4)), np.array([np.nan, 1.0]), np.ones(2), {}, "non-finite"),
        (np.full((4, 4), np.inf), np.ones(2), np.ones(2), {}, "non-finite"),
        (np.ones((4, 4)), np.ones(2), np.ones(2), {"mode": "nearest"}, "mode must be"),
        (np.array([["a"]]), np.ones(2), np.ones(2), {}, "real numbers|numeric"),
    ],
)
def test_bad_input_raises(image, x, y, kwargs, match):
    with pytest.raises(TfhybridInputError, match=match):
        interp.bilinear_interpolate(image, x, y, **kwargs)

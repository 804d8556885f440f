"""Tests of the multi-band scene forward model (000_* eq. 6), tfhybrid/physics/scene.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.signal import fftconvolve

from tfhybrid.physics.psf import gaussian_psf
from tfhybrid.physics.scene import (
    SceneRenderer,
    box_corners,
    render_components,
    render_model_frame,
    scene_chi2,
    scene_model,
)

SHAPE = (20, 24)


def _reference_frame(seds, morphs, corners, shape):
    """Plain NumPy loop over sources: Σ_k A_k S_k placed at its corner, clipped to the frame."""
    k, b = seds.shape
    out = np.zeros((b,) + shape)
    h, w = morphs.shape[-2:]
    for j in range(k):
        for dy in range(h):
            for dx in range(w):
                y, x = corners[j, 0] + dy, corners[j, 1] + dx
                if 0 <= y < shape[0] and 0 <= x < shape[1]:
                    out[:, y, x] += seds[j] * morphs[j, dy, dx]
    return out


def _random_scene(rng, n_scenes=2, k=3, b=3, box=7):
    seds = rng.uniform(0.5, 2.0, (n_scenes, k, b))
    morphs = rng.uniform(0.0, 1.0, (n_scenes, k, box, box))
    # Boxes partly outside every edge, overlapping boxes.
    centres = np.array([[[1.0, 2.0], [10.0, 12.0], [18.6, 23.2]],
                        [[5.0, 5.0], [6.0, 7.0], [-0.4, 22.0]]])[:n_scenes, :k]
    return seds, morphs, box_corners(centres, (box, box))


def test_box_corners_put_the_box_centre_on_the_nearest_pixel():
    c = box_corners(np.array([[10.4, 3.6]]), (7, 8))
    # Centre pixel of a (7, 8) box is (3, 4); round(10.4) = 10, round(3.6) = 4.
    np.testing.assert_array_equal(c, [[10 - 3, 4 - 4]])


def test_render_model_frame_matches_a_loop_reference_with_boxes_outside():
    rng = np.random.default_rng(0)
    seds, morphs, corners = _random_scene(rng)
    got = render_model_frame(seds, morphs, corners, SHAPE).numpy()
    for i in range(2):
        ref = _reference_frame(seds[i], morphs[i], corners[i], SHAPE)
        # float64 in, float64 out: only summation-order rounding.
        np.testing.assert_allclose(got[i], ref, rtol=1e-12, atol=1e-12)


def test_scene_model_is_band_wise_convolution_of_the_frame():
    rng = np.random.default_rng(1)
    seds, morphs, corners = _random_scene(rng)
    kernels = np.stack([gaussian_psf(f, 0.168, 9) for f in (0.3, 0.4, 0.5)]).astype(np.float64)
    got = scene_model(seds, morphs, corners, SHAPE, kernels).numpy()
    for i in range(2):
        frame = _reference_frame(seds[i], morphs[i], corners[i], SHAPE)
        for b in range(3):
            ref = fftconvolve(frame[b], kernels[b], mode="same")
            # FFT convolution in float64: agreement to ~1e-12 of the image maximum.
            np.testing.assert_allclose(got[i, b], ref, atol=1e-10 * np.abs(ref).max())


def test_components_sum_to_the_scene_and_batching_equals_per_scene_calls():
    rng = np.random.default_rng(2)
    seds, morphs, corners = _random_scene(rng)
    kernels = np.stack([gaussian_psf(f, 0.168, 9) for f in (0.3, 0.4, 0.5)]).astype(np.float64)
    total = scene_model(seds, morphs, corners, SHAPE, kernels).numpy()
    comps = render_components(seds, morphs, corners, SHAPE, kernels).numpy()
    assert comps.shape == (2, 3, 3) + SHAPE
    np.testing.assert_allclose(comps.sum(axis=1), total, atol=1e-12)
    one = scene_model(seds[1], morphs[1], corners[1], SHAPE, kernels).numpy()
    np.testing.assert_allclose(one, total[1], atol=1e-12)
    renderer = SceneRenderer(SHAPE, corners, kernels, dtype=tf.float64)
    np.testing.assert_allclose(renderer(seds, morphs).numpy(), total, atol=1e-12)


def test_gradient_of_the_likelihood_matches_finite_differences():
    """Gradient check of ½‖y − P Σ A_kᵀ S_k‖²_W with respect to A and S (float64)."""
    rng = np.random.default_rng(3)
    seds, morphs, corners = _random_scene(rng, n_scenes=1)
    kernels = np.stack([gaussian_psf(f, 0.168, 9) for f in (0.3, 0.4, 0.5)]).astype(np.float64)
    data = rng.normal(size=(1, 3) + SHAPE)
    weights = rng.uniform(0.5, 2.0, (1, 3) + SHAPE)

    def loss(a, s):
        return 0.5 * scene_chi2(data, weights, scene_model(a, s, corners, SHAPE, kernels))[0]

    a = tf.constant(seds)
    s = tf.constant(morphs)
    with tf.GradientTape() as tape:
        tape.watch([a, s])
        val = loss(a, s)
    ga, gs = (g.numpy() for g in tape.gradient(val, [a, s]))
    eps = 1e-6
    for _ in range(3):
        da, ds = rng.normal(size=seds.shape), rng.normal(size=morphs.shape)
        fd = (loss(a + eps * da, s + eps * ds) - loss(a - eps * da, s - eps * ds)).numpy() / (
            2 * eps
        )
        analytic = np.sum(ga * da) + np.sum(gs * ds)
        # Central differences on a cubic-in-(A,S) loss: truncation O(eps²) ~ 1e-12 relative,
        # rounding ~ 1e-16 / eps ~ 1e-10 relative.
        assert fd == pytest.approx(analytic, rel=1e-6)


def test_per_band_weights_broadcast_like_per_pixel_weights():
    rng = np.random.default_rng(4)
    data = rng.normal(size=(2, 3) + SHAPE)
    model = rng.normal(size=(2, 3) + SHAPE)
    wb = np.array([1.0, 2.0, 3.0])
    a = scene_chi2(data, wb[:, None, None], model).numpy()
    b = scene_chi2(data, np.broadcast_to(wb[:, None, None], data.shape), model).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-12)

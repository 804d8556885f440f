"""Multi-band scene forward model of the deblending paper (Lanusse, Melchior & Moolekamp 2019).

Eq. 6 of 000_*::

    y = P Σ_k A_kᵀ S_k + n

A scene of K sources seen in B bands: source k has an SED ``A_k`` (B,) and a non-parametric
morphology ``S_k`` (h, w) defined on a box whose top-left pixel in the frame is ``corner_k``
(y0, x0). The morphologies live in a *model frame* that has the observation's pixel grid and a
narrow model PSF; ``P`` convolves band b with the difference kernel that takes the model PSF to
band b's observed PSF (block-diagonal over bands, :func:`tfhybrid.physics.psf.convolve_fft`).

Conventions
-----------
* Images are ``(..., B, ny, nx)``, axis order (y, x); pixel (i, j) is row i, column j.
* ``seds`` ``(..., K, B)``, ``morphs`` ``(..., K, h, w)``, ``corners`` ``(..., K, 2)`` int32
  (y0, x0), one leading batch of scenes ``...`` shared by all three (may be empty).
* Box pixels outside the frame are dropped (their flux is not observed); boxes may overlap.
* Everything is linear in the SEDs for fixed morphologies and in the morphologies for fixed
  SEDs; all K boxes of all scenes are placed by ONE ``unsorted_segment_sum`` (a scatter-add;
  its gradient is a gather), with no Python loop over sources or scenes.
* float32 by default; every function keeps the dtype of ``morphs`` (float64 for gradient checks).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfhybrid.physics.psf import convolve_fft

__all__ = [
    "box_corners",
    "render_model_frame",
    "render_components",
    "scene_model",
    "scene_chi2",
    "SceneRenderer",
]


def box_corners(centres_yx, box_shape) -> np.ndarray:
    """Integer top-left corners (y0, x0) of boxes centred on the pixels nearest to the centres.

    The centre pixel of a box is its pixel ``(h // 2, w // 2)`` (the convention of
    :mod:`tfhybrid.inference.proxes`), placed on ``round(centre)``.

    Parameters
    ----------
    centres_yx : ``(..., K, 2)`` float pixel coordinates (row y, column x); pixel centres at
        integers.
    box_shape : (h, w).

    Returns
    -------
    ``(..., K, 2)`` int32 corners.
    """
    c = np.rint(np.asarray(centres_yx, dtype=np.float64)).astype(np.int64)
    h, w = (int(s) for s in box_shape)
    return (c - np.array([h // 2, w // 2])).astype(np.int32)


def _flat_leading(x: tf.Tensor, inner_rank: int) -> tuple[tf.Tensor, tf.Tensor]:
    shape = tf.shape(x)
    lead = shape[: tf.rank(x) - inner_rank]
    flat = tf.reshape(x, tf.concat([[-1], shape[tf.rank(x) - inner_rank :]], axis=0))
    return flat, lead


def render_model_frame(seds, morphs, corners, frame_shape) -> tf.Tensor:
    """Σ_k A_kᵀ S_k placed in the model frame: eq. 6 of 000_* before the convolution P.

    Parameters
    ----------
    seds : ``(..., K, B)`` SEDs A_k (flux units per unit morphology).
    morphs : ``(..., K, h, w)`` morphologies S_k on their boxes.
    corners : ``(..., K, 2)`` int32 (y0, x0) of each box in the frame (may be partly outside).
    frame_shape : (ny, nx) of the model frame.

    Returns
    -------
    ``(..., B, ny, nx)`` model-frame image, dtype of ``morphs``.
    """
    morphs = tf.convert_to_tensor(morphs)
    seds = tf.cast(seds, morphs.dtype)
    corners = tf.cast(corners, tf.int32)
    ny, nx = (int(s) for s in frame_shape)
    h, w = int(morphs.shape[-2]), int(morphs.shape[-1])
    n_bands = int(seds.shape[-1])

    m, lead = _flat_leading(morphs, 3)  # (N, K, h, w)
    a = tf.reshape(seds, tf.concat([tf.shape(m)[:2], [n_bands]], axis=0))  # (N, K, B)
    c = tf.reshape(corners, tf.concat([tf.shape(m)[:2], [2]], axis=0))  # (N, K, 2)
    n_scenes = tf.shape(m)[0]

    iy = c[..., 0:1] + tf.range(h)[None, None, :]  # (N, K, h)
    ix = c[..., 1:2] + tf.range(w)[None, None, :]  # (N, K, w)
    valid = ((iy >= 0) & (iy < ny))[..., :, None] & ((ix >= 0) & (ix < nx))[..., None, :]
    npix = ny * nx
    # One extra "dump" segment per scene receives the pixels that fall outside the frame.
    flat = iy[..., :, None] * nx + ix[..., None, :]
    seg = tf.where(valid, flat, npix) + (npix + 1) * tf.range(n_scenes)[:, None, None, None]
    data = m[..., None] * a[:, :, None, None, :]  # (N, K, h, w, B)
    out = tf.math.unsorted_segment_sum(
        tf.reshape(data, [-1, n_bands]), tf.reshape(seg, [-1]), n_scenes * (npix + 1)
    )
    out = tf.reshape(out, [n_scenes, npix + 1, n_bands])[:, :npix]
    out = tf.transpose(tf.reshape(out, [n_scenes, ny, nx, n_bands]), [0, 3, 1, 2])
    return tf.reshape(out, tf.concat([lead, [n_bands, ny, nx]], axis=0))


def scene_model(seds, morphs, corners, frame_shape, kernels) -> tf.Tensor:
    """The noiseless observed scene P Σ_k A_kᵀ S_k (000_* eq. 6).

    Parameters
    ----------
    seds, morphs, corners, frame_shape : as in :func:`render_model_frame`.
    kernels : the operator P, one of
        * ``(B, ky, kx)`` per-band kernels (odd sizes) taking the model frame to the observed
          frame (the difference kernels of the model PSF to each band's PSF), shared by all
          scenes; ``(N, B, ky, kx)`` for one set per scene when the scenes are ``(N,)``;
        * a callable mapping ``(n, B, ny, nx)`` model frames to observed frames (e.g. a
          :class:`tfhybrid.physics.psf.FFTConvolution`, whose kernel transforms are
          precomputed: what the fitter uses);
        * ``None`` when the model frame already has the observed PSFs.
        Kernels are applied as given (``normalize_psf=False``): difference kernels sum to 1.

    Returns
    -------
    ``(..., B, ny, nx)``.
    """
    frame = render_model_frame(seds, morphs, corners, frame_shape)
    if kernels is None:
        return frame
    flat, lead = _flat_leading(frame, 3)
    if callable(kernels):
        out = kernels(flat)
    else:
        kernels = tf.cast(kernels, frame.dtype)
        if kernels.shape.rank == 4:
            kernels = tf.reshape(kernels, tf.concat([[-1], tf.shape(kernels)[-3:]], axis=0))
        out = convolve_fft(flat, kernels, normalize_psf=False)
    return tf.reshape(out, tf.concat([lead, tf.shape(out)[1:]], axis=0))


def render_components(seds, morphs, corners, frame_shape, kernels) -> tf.Tensor:
    """Each source's own contribution P A_kᵀ S_k, ``(..., K, B, ny, nx)`` (sums to the model).

    The sources are moved into the batch dimension, so this is still one batched render.
    ``kernels`` as in :func:`scene_model`, except that a callable must accept the
    ``(n·K, B, ny, nx)`` batch and per-scene kernels must be ``(..., B, ky, kx)``.
    """
    morphs = tf.convert_to_tensor(morphs)
    if kernels is not None and not callable(kernels):
        kernels = tf.convert_to_tensor(kernels)
        if kernels.shape.rank == 4:  # (N, B, ky, kx) -> one copy per source
            k = tf.shape(morphs)[-3]
            kernels = tf.repeat(kernels, k, axis=0)
    return scene_model(
        tf.cast(seds, morphs.dtype)[..., None, :],
        morphs[..., None, :, :],
        tf.cast(corners, tf.int32)[..., None, :],
        frame_shape,
        kernels,
    )


def scene_chi2(data, weights, model) -> tf.Tensor:
    """Weighted residual sum of squares ‖y − model‖²_Σ⁻¹ per scene (twice eq. 7's first term).

    Parameters
    ----------
    data, model : ``(..., B, ny, nx)``.
    weights : inverse variances broadcastable to ``data`` (``(B, 1, 1)`` per band or
        ``(..., B, ny, nx)`` per pixel; 0 masks a pixel).

    Returns
    -------
    ``(...)``.
    """
    model = tf.convert_to_tensor(model)
    r = tf.cast(data, model.dtype) - model
    return tf.reduce_sum(tf.cast(weights, model.dtype) * r * r, axis=[-3, -2, -1])


class SceneRenderer:
    """The fixed part of eq. 6 for one frame: frame shape, box corners and kernels.

    ``renderer(seds, morphs)`` returns the observed-frame model ``(..., B, ny, nx)``;
    ``renderer.components(seds, morphs)`` the per-source images ``(..., K, B, ny, nx)``.

    Parameters
    ----------
    frame_shape : (ny, nx).
    corners : ``(..., K, 2)`` int32 box corners (y0, x0) (see :func:`box_corners`).
    kernels : ``(B, ky, kx)`` difference kernels or ``None``.
    dtype : float dtype of the kernels.
    """

    def __init__(self, frame_shape, corners, kernels=None, dtype=tf.float32):
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.corners = tf.constant(np.asarray(corners), tf.int32)
        self.kernels = None if kernels is None else tf.constant(np.asarray(kernels), dtype)

    def __call__(self, seds, morphs) -> tf.Tensor:
        return scene_model(seds, morphs, self.corners, self.frame_shape, self.kernels)

    def frame(self, seds, morphs) -> tf.Tensor:
        """The model-frame image Σ_k A_kᵀ S_k (before P)."""
        return render_model_frame(seds, morphs, self.corners, self.frame_shape)

    def components(self, seds, morphs) -> tf.Tensor:
        return render_components(seds, morphs, self.corners, self.frame_shape, self.kernels)

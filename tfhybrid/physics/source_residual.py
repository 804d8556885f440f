"""A pixelated source-plane residual, marginalised analytically (beyond Chianese et al. 2020).

Why: the VAE source ``d(z)`` of eq. 17 cannot reproduce every detail of a galaxy it has not
seen. Under the white likelihood of eq. 26 the lens parameters then bend to fit the source's
misfit: in the mock studies the MAP's r_Ein was off by 3–9 % in a few systems even when the
fit started at the truth, and the 68 % intervals covered the truth in only 3 of 10 systems.
A residual that lives in the SOURCE plane is the physically right model of that misfit: it is
lensed like the source, so its multiple images are correlated, which the lens parameters
cannot mimic.

Model (one lens system; the same for every system of a batch)::

    I_obs = I_pred(Θ, z) + B(Θ) δ + n,      δ ~ N(0, σ_δ² I_M),   n ~ N(0, σ² I)

* ``δ``: values at the ``M = m × m`` nodes of a regular grid centred on the source stamp
  (node spacing ``pixel_factor`` source-stamp pixels, so it moves and scales with
  ``θ_src`` and ``s`` as the stamp does), zero beyond its outer nodes;
* ``B(Θ)`` ``(n_pix², M)``: bilinear interpolation of ``δ`` at each image pixel's ray-traced
  source position (:func:`grid_coordinates`), the same rule as the source's (eq. 17);
* ``σ_δ``: the residual's amplitude, per system, in the source's surface-brightness units
  (chosen by the evidence, :func:`tfhybrid.lens.fit.residual_sigma_by_evidence`).

The PSF is not applied to ``B δ`` (``I_pred`` keeps its PSF): with it, ``BᵀB`` would need
``M`` PSF convolutions of full images per evaluation. The residual is a model of the model's
error, not a physical component, and where the lens magnifies, the grid nodes (0.16″ apart
for the default grid at ``s = 5``) are wider than the PSF (σ = 0.05″). Where it
demagnifies (counter-images near the lens centre) several nodes fall in one image pixel,
``B δ`` changes from pixel to pixel, and the PSF would smooth it noticeably: measured on
the 10 study mocks for white ``δ``, ``‖P B δ − B δ‖ / ‖B δ‖`` = 0.06–0.44 (16 nodes, 1.5
pixels apart) and 0.10–0.62 (24 nodes, 1 pixel apart). So the residual's image-plane
covariance is rougher than a PSF-convolved one would be: an approximation of a nuisance
model, stated here, not hidden.

Integrating ``δ`` out gives a Gaussian with covariance ``σ² I + σ_δ² B Bᵀ``. With the Woodbury
identity and the matrix determinant lemma its log density is the white one plus

    Δ = ½ σ_δ² b̃ᵀ A⁻¹ b̃ − ½ log det A,   A = I_M + (σ_δ / σ)² BᵀB,   b̃ = Bᵀ (I_obs − I_pred) / σ²

(:func:`marginal_log_likelihood_correction`), an ``M × M`` Cholesky factorisation instead of
an ``n_pix² × n_pix²`` one. ``Δ ≥ −½ log det A`` pays for the extra freedom (an Occam
factor), so the evidence has a maximum in ``σ_δ``. ``A``'s eigenvalues are all ≥ 1, and at
most ``1 + (σ_δ/σ)² max(BᵀB)`` (≈ 10–100 for the evidence's σ_δ), so its factorisation is
accurate in float32.

``BᵀB`` and ``Bᵀ r`` come from nine second moments of the bilinear weights per grid CELL
(:func:`bilinear_gram`): every pixel touches the four nodes of one cell, and the 16 products
of its weights are products of ``(1−f)², f(1−f), f²`` in x and y, so the image's pixels are
summed into ``(m + 1)²`` cells first and only the cells' moments are scattered onto the nodes.
The pixel-level work is one segment sum of 13 numbers per pixel; the memory stays
``O(n_pix²)`` per system, not ``O(16 n_pix²)`` index pairs.

Precision: float32 (the log densities are summed over 65 536 pixels in float32 either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfhybrid.validation import TfhybridInputError

__all__ = [
    "SourceResidualConfig",
    "grid_coordinates",
    "bilinear_gram",
    "marginal_log_likelihood_correction",
    "bilinear_design_matrix",
]


@dataclass(frozen=True)
class SourceResidualConfig:
    """Grid of the source-plane residual.

    Attributes
    ----------
    grid_size : int
        ``m``: the grid has ``m × m`` nodes (``M = m²`` marginalised values). Each evaluation
        factorises an ``M × M`` matrix per system.
    pixel_factor : float
        Node spacing in source-stamp pixels (``2 s / 64`` arcsec each for the VAE's 64 × 64
        stamp: 0.156″ at ``s = 5``). The default grid (24 nodes, 1 pixel apart: the stamp's
        own resolution) spans the central 24 of the stamp's 64 pixels: 37 %, enough for the
        held-out galaxies, which fill about the central third (section 5.1). On the 10 study
        mocks it gained 2 091 nats of evidence in all over the white likelihood, against 1 280
        for 16 nodes 1.5 pixels apart (whose MAPs were also further from the truth).
    """

    grid_size: int = 24
    pixel_factor: float = 1.0

    def __post_init__(self):
        m = self.grid_size
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or not 2 <= m <= 64:
            raise TfhybridInputError(f"grid_size must be an integer in [2, 64]; got {m!r}")
        if not (np.isfinite(self.pixel_factor) and self.pixel_factor > 0):
            raise TfhybridInputError(
                f"pixel_factor must be > 0 (source-stamp pixels); got {self.pixel_factor!r}"
            )

    @property
    def num_nodes(self) -> int:
        """``M = grid_size²``."""
        return int(self.grid_size) ** 2


def grid_coordinates(source_col, source_row, source_shape, config: SourceResidualConfig):
    """Source-stamp pixel coordinates → residual-grid coordinates (nodes at 0 … m − 1).

    ``source_col, source_row``: any shape, the positions in the stamp's pixel units (pixel
    centres at integers, as :func:`tfhybrid.physics.lensing.source_pixel_coordinates_core`
    returns them); ``source_shape`` = ``(ny_s, nx_s)``. The grid is centred on the stamp's
    centre and its nodes are ``config.pixel_factor`` stamp pixels apart.
    """
    ny_s, nx_s = source_shape
    half = 0.5 * (config.grid_size - 1)
    inv = 1.0 / float(config.pixel_factor)
    grid_col = (source_col - 0.5 * (nx_s - 1)) * inv + half
    grid_row = (source_row - 0.5 * (ny_s - 1)) * inv + half
    return grid_col, grid_row


def _node_scatter_indices(m: int):
    """Static indices that put the cells' moments onto the ``M × M`` Gram matrix and ``M`` nodes.

    Cell ``(i, j)``, ``i, j`` in ``0 … m``, spans nodes ``(i − 1 … i, j − 1 … j)``; a node
    index outside ``0 … m − 1`` (the grid's border cells) goes to a discarded slot.
    Returns the 16 Gram moment numbers and Gram indices, and the 4 node indices, per cell.
    """
    nc = m + 1
    ii, jj = np.meshgrid(np.arange(nc), np.arange(nc), indexing="ij")
    num = m * m
    # the second moment of corners a and b: (1-f)^2 for both at offset 0, f(1-f) for mixed, f^2
    kind = {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 2}
    gram_moment, gram_index = [], []
    node_index = []
    for dya in (0, 1):
        for dxa in (0, 1):
            ra, ca = ii + dya - 1, jj + dxa - 1
            ok_a = (ra >= 0) & (ra < m) & (ca >= 0) & (ca < m)
            node_index.append(np.where(ok_a, ra * m + ca, num))
            for dyb in (0, 1):
                for dxb in (0, 1):
                    rb, cb = ii + dyb - 1, jj + dxb - 1
                    ok = ok_a & (rb >= 0) & (rb < m) & (cb >= 0) & (cb < m)
                    gram_moment.append(3 * kind[(dya, dyb)] + kind[(dxa, dxb)])
                    gram_index.append(np.where(ok, (ra * m + ca) * num + rb * m + cb, num * num))
    return (np.asarray(gram_moment), np.stack(gram_index).reshape(16, -1).astype(np.int32),
            np.stack(node_index).reshape(4, -1).astype(np.int32))


def bilinear_gram(grid_col, grid_row, residual, grid_size: int):
    """``BᵀB`` and ``Bᵀ r`` of the bilinear interpolation operator, from per-cell moments.

    Parameters
    ----------
    grid_col, grid_row : ``(batch, P)``
        Each image pixel's position in grid coordinates (:func:`grid_coordinates`).
    residual : ``(batch, P)``
        ``r`` (e.g. ``I_obs − I_pred``), same dtype.
    grid_size : int
        ``m`` (static).

    Returns
    -------
    gram : ``(batch, M, M)``, ``BᵀB``, where row ``p`` of ``B`` holds pixel ``p``'s bilinear
        weights on the ``M = m²`` nodes (node ``(i, j)`` at index ``i m + j``, row-major,
        rows along the source's y); positions beyond the outer nodes fade to zero over one
        node spacing (the zero rule of eq. 17's interpolation).
    projected : ``(batch, M)``, ``Bᵀ r``.

    Compiled with XLA (whatever the caller's graph): TensorFlow's CPU kernel of
    ``unsorted_segment_sum`` is slow for these sizes (8 ms for 65 536 × 13 values onto 626
    cells, 0.4 ms with XLA), and BᵀB with its gradient for a 256² image and a 24² grid takes
    6.7 ms instead of 24 ms (2-core CPU). The Cholesky of :func:`marginal_log_likelihood_correction`
    stays outside: XLA makes it slower on CPU.
    """
    return _bilinear_gram_xla(grid_col, grid_row, residual, int(grid_size))


def _bilinear_gram(grid_col, grid_row, residual, grid_size: int):
    m = int(grid_size)
    nc = m + 1
    dtype = grid_col.dtype
    c0f, r0f = tf.floor(grid_col), tf.floor(grid_row)
    fx, fy = grid_col - c0f, grid_row - r0f
    c0, r0 = tf.cast(c0f, tf.int32), tf.cast(r0f, tf.int32)
    inside = (c0 >= -1) & (c0 < m) & (r0 >= -1) & (r0 < m)
    cell = tf.where(inside, (r0 + 1) * nc + (c0 + 1), nc * nc)  # nc² = the discarded slot
    wx = tf.stack([(1 - fx) ** 2, fx * (1 - fx), fx**2], -1)
    wy = tf.stack([(1 - fy) ** 2, fy * (1 - fy), fy**2], -1)
    lx = tf.stack([1 - fx, fx], -1)
    ly = tf.stack([1 - fy, fy], -1)
    batch, num_pix = tf.shape(grid_col)[0], tf.shape(grid_col)[1]
    moments = tf.reshape(wy[..., :, None] * wx[..., None, :], [batch, num_pix, 9])
    linear = tf.reshape(residual[..., None, None] * ly[..., :, None] * lx[..., None, :],
                        [batch, num_pix, 4])
    data = tf.concat([moments, linear], -1)  # (batch, P, 13)
    seg = cell + tf.range(batch)[:, None] * (nc * nc + 1)
    cells = tf.math.unsorted_segment_sum(tf.reshape(data, [-1, 13]), tf.reshape(seg, [-1]),
                                         batch * (nc * nc + 1))
    cells = tf.reshape(cells, [batch, nc * nc + 1, 13])[:, : nc * nc]  # (batch, cells, 13)

    gram_moment, gram_index, node_index = _node_scatter_indices(m)
    num = m * m
    values = tf.gather(cells, gram_moment, axis=2)  # (batch, cells, 16)
    values = tf.transpose(values, [0, 2, 1])  # (batch, 16, cells)
    seg = tf.constant(gram_index.reshape(-1))[None] + tf.range(batch)[:, None] * (num * num + 1)
    gram = tf.math.unsorted_segment_sum(tf.reshape(values, [-1]), tf.reshape(seg, [-1]),
                                        batch * (num * num + 1))
    gram = tf.reshape(tf.reshape(gram, [batch, num * num + 1])[:, : num * num], [batch, num, num])
    values = tf.transpose(cells[..., 9:], [0, 2, 1])  # (batch, 4 corners, cells)
    seg = tf.constant(node_index.reshape(-1))[None] + tf.range(batch)[:, None] * (num + 1)
    projected = tf.math.unsorted_segment_sum(tf.reshape(values, [-1]), tf.reshape(seg, [-1]),
                                             batch * (num + 1))
    projected = tf.reshape(projected, [batch, num + 1])[:, :num]
    return tf.cast(gram, dtype), tf.cast(projected, dtype)


_bilinear_gram_xla = tf.function(_bilinear_gram, jit_compile=True, reduce_retracing=True)


def marginal_log_likelihood_correction(gram, projected, sigma, sigma_residual):
    """Δ = log N(r | 0, σ² I + σ_δ² B Bᵀ) − log N(r | 0, σ² I), per system.

    ``Δ = ½ σ_δ² b̃ᵀ A⁻¹ b̃ − ½ log det A`` with ``A = I + (σ_δ/σ)² BᵀB`` and
    ``b̃ = Bᵀ r / σ²`` (Woodbury identity and matrix determinant lemma; see the module).
    ``gram`` ``(batch, M, M)`` and ``projected`` ``(batch, M)`` from :func:`bilinear_gram`;
    ``sigma`` (pixel noise) and ``sigma_residual`` (σ_δ) ``(batch,)``, > 0.

    The gradient is written out (first order only): with ``w = A⁻¹ b̃`` and
    ``K = ∂Δ/∂A = −½ σ_δ² w wᵀ − ½ A⁻¹``, ``∂Δ/∂(BᵀB) = (σ_δ/σ)² K`` and
    ``∂Δ/∂(Bᵀr) = σ_δ² w / σ²``; ``A⁻¹`` comes from the forward pass's Cholesky factor.
    TensorFlow's generic Cholesky gradient took 18 ms for ``M = 576`` (float32, 2-core CPU),
    this one 9 ms; they agree to 2e-6 (relative), and the tests check it against finite
    differences.
    """
    return _marginal_correction(gram, projected, sigma, sigma_residual)


@tf.custom_gradient
def _marginal_correction(gram, projected, sigma, sigma_residual):
    s2 = tf.square(sigma_residual)
    ratio2 = s2 / tf.square(sigma)
    eye = tf.eye(tf.shape(gram)[-1], dtype=gram.dtype)
    a = eye + ratio2[:, None, None] * gram
    chol = tf.linalg.cholesky(a)
    b = projected / tf.square(sigma)[:, None]
    y = tf.linalg.triangular_solve(chol, b[..., None], lower=True)
    half_log_det = tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)), -1)
    value = 0.5 * s2 * tf.reduce_sum(tf.square(y[..., 0]), -1) - half_log_det

    def grad(upstream):
        w = tf.linalg.triangular_solve(chol, y, lower=True, adjoint=True)[..., 0]  # A⁻¹ b̃
        a_inv = tf.linalg.cholesky_solve(chol, tf.broadcast_to(eye, tf.shape(a)))
        k = -0.5 * s2[:, None, None] * w[:, :, None] * w[:, None, :] - 0.5 * a_inv
        k_gram = tf.reduce_sum(k * gram, [-2, -1])  # ∂Δ/∂(σ_δ/σ)²
        b_w = tf.reduce_sum(b * w, -1)
        inv_s3 = 1.0 / (sigma * tf.square(sigma))
        d_gram = (upstream * ratio2)[:, None, None] * k
        d_projected = (upstream * s2 / tf.square(sigma))[:, None] * w
        d_sigma = upstream * (-2.0 * s2 * inv_s3) * (tf.reduce_sum(w * projected, -1) + k_gram)
        d_sigma_residual = upstream * sigma_residual * (b_w + 2.0 * k_gram / tf.square(sigma))
        return d_gram, d_projected, d_sigma, d_sigma_residual

    return value, grad


def bilinear_design_matrix(grid_col, grid_row, grid_size: int) -> np.ndarray:
    """Dense ``B`` ``(batch, P, M)`` (NumPy, float64): the reference the tests check against.

    Slow (a Python loop over corners, fine for a few hundred pixels); :func:`bilinear_gram`
    is the fast path. Same conventions: node ``(i, j)`` at index ``i m + j``, zero weight on
    nodes outside the grid.
    """
    col = np.asarray(grid_col, np.float64)
    row = np.asarray(grid_row, np.float64)
    m = int(grid_size)
    batch, num_pix = col.shape
    out = np.zeros((batch, num_pix, m * m))
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    fx, fy = col - c0, row - r0
    b_idx, p_idx = np.meshgrid(np.arange(batch), np.arange(num_pix), indexing="ij")
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            r, c = r0 + dy, c0 + dx
            ok = (r >= 0) & (r < m) & (c >= 0) & (c < m)
            np.add.at(out, (b_idx[ok], p_idx[ok], (r * m + c)[ok]), (wx * wy)[ok])
    return out

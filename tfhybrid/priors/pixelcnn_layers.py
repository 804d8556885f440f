"""Keras 3 building blocks of PixelCNN++ (Salimans et al. 2017, arXiv:1701.05517).

The network keeps two causal streams, as in the paper's Fig. 2 and its public code:

* the *down* stream ``u`` sees only rows strictly above the current pixel
  (down-shifted convolutions, kernel (2, 3));
* the *down-right* stream ``ul`` sees rows above plus the pixels to the left in the current row
  (down-right-shifted convolutions, kernel (2, 2)).

Causality is obtained by padding only on the top (and left) so that a ``valid`` convolution
output at row ``i`` depends on input rows ``<= i``, followed by a one-pixel shift of the very
first layer (:func:`down_shift`, :func:`right_shift`) that makes it strict. Images are
channels-last ``(batch, ny, nx, channels)``, axis order (y, x), row 0 generated first.

These layers are written for the project's single Keras line (Keras 3, TensorFlow backend);
they carry no weight normalisation (the paper's data-dependent weight norm is what breaks
SavedModel export of ``tfp.distributions.PixelCNN``). Instead the last convolution of every
gated residual block starts with small weights (``init_scale=0.1`` as in the paper's code),
which keeps the untrained residual stack close to the identity.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def concat_elu(x: tf.Tensor) -> tf.Tensor:
    """ELU of ``[x, -x]`` concatenated on the channel axis (PixelCNN++ §2.5); doubles channels."""
    return tf.nn.elu(tf.concat([x, -x], axis=-1))


def down_shift(x: tf.Tensor) -> tf.Tensor:
    """Shift an image one row down, filling row 0 with zeros: ``(b, h, w, c)`` -> same shape."""
    return tf.pad(x, [[0, 0], [1, 0], [0, 0], [0, 0]])[:, :-1, :, :]


def right_shift(x: tf.Tensor) -> tf.Tensor:
    """Shift an image one column right, filling column 0 with zeros."""
    return tf.pad(x, [[0, 0], [0, 0], [1, 0], [0, 0]])[:, :, :-1, :]


def _scaled_init(init_scale: float) -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(
        scale=init_scale**2, mode="fan_avg", distribution="uniform"
    )


class DownShiftedConv2D(keras.layers.Layer):
    """Convolution whose output at row ``i`` sees input rows ``<= i``, centred in x.

    Pads ``kh - 1`` rows on top and ``(kw - 1) // 2`` columns left and right, then a ``valid``
    convolution (stride 1 or 2). Kernel (kh, kw) defaults to (2, 3) as in PixelCNN++.
    """

    def __init__(self, filters: int, kernel_size=(2, 3), strides=1, init_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = tuple(kernel_size)
        self.strides = strides
        self.conv = keras.layers.Conv2D(
            filters,
            self.kernel_size,
            strides=strides,
            padding="valid",
            kernel_initializer=_scaled_init(init_scale),
            name="conv",
        )

    def call(self, x):
        kh, kw = self.kernel_size
        x = tf.pad(x, [[0, 0], [kh - 1, 0], [(kw - 1) // 2, (kw - 1) // 2], [0, 0]])
        return self.conv(x)


class DownRightShiftedConv2D(keras.layers.Layer):
    """Convolution whose output at (i, j) sees input rows ``<= i`` and columns ``<= j``.

    Pads ``kh - 1`` rows on top and ``kw - 1`` columns on the left; kernel defaults to (2, 2).
    """

    def __init__(self, filters: int, kernel_size=(2, 2), strides=1, init_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = tuple(kernel_size)
        self.conv = keras.layers.Conv2D(
            filters,
            self.kernel_size,
            strides=strides,
            padding="valid",
            kernel_initializer=_scaled_init(init_scale),
            name="conv",
        )

    def call(self, x):
        kh, kw = self.kernel_size
        x = tf.pad(x, [[0, 0], [kh - 1, 0], [kw - 1, 0], [0, 0]])
        return self.conv(x)


class DownShiftedConv2DTranspose(keras.layers.Layer):
    """Stride-2 transposed convolution (kernel (2, 3)) that doubles ny, nx and stays causal.

    A ``valid`` transposed convolution yields ``(2 ny, 2 nx + 1)``; dropping the first and the
    last column re-centres it (the paper code's crop of its ``2 nx + 2`` output).
    """

    def __init__(self, filters: int, kernel_size=(2, 3), **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = tuple(kernel_size)
        self.conv = keras.layers.Conv2DTranspose(
            filters, self.kernel_size, strides=2, padding="valid", name="deconv"
        )

    def call(self, x):
        kw = self.kernel_size[1]
        y = self.conv(x)
        h2 = 2 * tf.shape(x)[1]
        w2 = 2 * tf.shape(x)[2]
        off = (kw - 1) // 2
        return y[:, :h2, off : off + w2, :]


class DownRightShiftedConv2DTranspose(keras.layers.Layer):
    """Stride-2 transposed convolution (kernel (2, 2)): output (2 ny, 2 nx), causal in y and x."""

    def __init__(self, filters: int, kernel_size=(2, 2), **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2DTranspose(
            filters, tuple(kernel_size), strides=2, padding="valid", name="deconv"
        )

    def call(self, x):
        y = self.conv(x)
        return y[:, : 2 * tf.shape(x)[1], : 2 * tf.shape(x)[2], :]


class NetworkInNetwork(keras.layers.Layer):
    """1x1 convolution ("nin" in the PixelCNN++ code): a dense layer applied per pixel."""

    def __init__(self, filters: int, init_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(
            filters, kernel_initializer=_scaled_init(init_scale), name="dense"
        )

    def call(self, x):
        return self.dense(x)


class GatedResnet(keras.layers.Layer):
    """Gated residual block of PixelCNN++ (Salimans et al. 2017, §2.5 and their code).

    ``c1 = conv(concat_elu(x)) [+ nin(concat_elu(a))]``; ``c2 = conv(dropout(concat_elu(c1)))``
    with ``2 F`` channels split into ``(g, s)``; returns ``x + g * sigmoid(s)``. ``a`` is the
    auxiliary input (the other stream and/or the skip connection from the up pass).

    Parameters
    ----------
    filters : number of channels ``F`` of ``x`` (and of the output).
    shift : ``"down"`` (kernel (2, 3)) or ``"down_right"`` (kernel (2, 2)).
    dropout : dropout rate applied between the two convolutions during training.
    has_aux : whether ``call`` receives the auxiliary input ``a``.
    """

    def __init__(
        self, filters: int, shift: str, dropout: float = 0.0, has_aux: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        conv = {"down": DownShiftedConv2D, "down_right": DownRightShiftedConv2D}[shift]
        self.conv1 = conv(filters, name="conv1")
        self.conv2 = conv(2 * filters, init_scale=0.1, name="conv2")
        self.aux = NetworkInNetwork(filters, name="aux") if has_aux else None
        self.dropout = keras.layers.Dropout(dropout) if dropout > 0 else None

    def call(self, x, a=None, training=None):
        c1 = self.conv1(concat_elu(x))
        if self.aux is not None:
            c1 = c1 + self.aux(concat_elu(a))
        c1 = concat_elu(c1)
        if self.dropout is not None:
            c1 = self.dropout(c1, training=training)
        c2 = self.conv2(c1)
        g, s = tf.split(c2, 2, axis=-1)
        return x + g * tf.sigmoid(s)

"""SASRec building blocks: the causal self-attention block. Backend-agnostic (``keras.ops`` only)."""

from __future__ import annotations

import math

import keras
from keras import ops

# Score of a masked key before the softmax: its weight underflows to exactly 0.
MASKED_SCORE = -1e9


@keras.saving.register_keras_serializable(package="sasrec")
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` whose mask comes from the ThreeFry generator when TensorFlow compiles it
    with XLA.

    TensorFlow's stateless dropout picks Philox by default, which XLA on CPU runs about 5x slower
    than ThreeFry: with SASRec's (B, L, L) attention weights that made dropout ~40% of a training
    step. TensorFlow's own kernels (no XLA) have no ThreeFry, and other backends use Keras's dropout.
    """

    def call(self, inputs, training=False):
        if not training or self.rate == 0 or not _tensorflow_xla():
            return super().call(inputs, training=training)
        import tensorflow as tf

        seed = tf.cast(self.seed_generator.next(), "int64")
        return tf.nn.experimental.stateless_dropout(
            inputs, rate=self.rate, seed=seed, noise_shape=self.noise_shape, rng_alg="threefry"
        )


def _tensorflow_xla() -> bool:
    """Whether this call is being traced by TensorFlow for XLA compilation."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def weight_initializer(std: float):
    """Glorot normal (the paper's reference code) when ``std`` is 0, else normal(0, std)."""
    return keras.initializers.RandomNormal(stddev=std) if std > 0 else keras.initializers.GlorotNormal()


@keras.saving.register_keras_serializable(package="sasrec")
class CausalSelfAttentionBlock(keras.layers.Layer):
    """One SASRec block: causal multi-head self-attention and a point-wise feed-forward net.

    ``norm="pre"`` follows the reference SASRec implementation: the query is layer-normalised and
    also carries the residual, keys and values are the raw input; then layer norm, a two-layer ReLU
    feed-forward net and a residual. ``norm="post"`` is the Transformer's original order.

    Inputs: ``x`` (B, L, d) and ``valid`` (B, L) bool marking real (non-padding) positions. Padding
    positions are neither attended to nor carried: their outputs are zero.
    """

    def __init__(
        self, hidden_units: int, num_heads: int = 1, dropout: float = 0.2, norm: str = "pre", init_std: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_units = hidden_units
        self.num_heads = num_heads
        self.dropout_rate = dropout
        self.norm = norm
        self.init_std = init_std
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-8, name="attention_norm")
        # Holds the query/key/value/output projections; the attention itself is computed in
        # :meth:`_attend`, which the cached-state step shares.
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=num_heads,
            key_dim=hidden_units // num_heads,
            kernel_initializer=weight_initializer(init_std),
            name="attention",
        )
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-8, name="ffn_norm")
        self.ffn_inner = keras.layers.Dense(
            hidden_units, activation="relu", kernel_initializer=weight_initializer(init_std), name="ffn_inner"
        )
        self.ffn_outer = keras.layers.Dense(hidden_units, kernel_initializer=weight_initializer(init_std), name="ffn_outer")
        self.attention_dropout = Dropout(dropout)
        self.ffn_dropout_inner = Dropout(dropout)
        self.ffn_dropout_outer = Dropout(dropout)

    def build(self, input_shape):
        x_shape = input_shape
        self.attention_norm.build(x_shape)
        self.attention.build(x_shape, x_shape, x_shape)
        self.ffn_norm.build(x_shape)
        self.ffn_inner.build(x_shape)
        self.ffn_outer.build(x_shape[:-1] + (self.hidden_units,))
        self.built = True

    def _feed_forward(self, x, training):
        h = self.ffn_dropout_inner(self.ffn_inner(x), training=training)
        return self.ffn_dropout_outer(self.ffn_outer(h), training=training)

    def call(self, x, valid, training=False, last_only=False):
        """``last_only``: compute the output of the last position only, ``(B, 1, d)``: what scoring the
        next item needs from the last block (keys and values still cover the whole window)."""
        length = ops.shape(x)[1]
        causal = ops.tril(ops.ones((length, length), dtype="bool"))
        # Query i may attend key j when j <= i and j is a real item.
        attention_mask = ops.logical_and(causal[None, :, :], valid[:, None, :])
        keep = ops.cast(valid, x.dtype)[:, :, None]
        if last_only:
            attention_mask, keep = attention_mask[:, -1:, :], keep[:, -1:, :]
        query = self._query_input(x[:, -1:, :] if last_only else x)
        keys, values = self.key_values(x)
        attended = self._attend(query, keys, values, attention_mask, training)
        return self._after_attention(query, attended, training) * keep

    def _attend(self, query, keys, values, mask, training=False):
        """Scaled dot-product attention of block queries ``query`` (B, N, d) over projected ``keys`` and
        ``values`` (B, M, H, d/H) where ``mask`` (B, N, M): the attention's output projection (B, N, d)."""
        projected = self.attention.query_dense(query)
        scale = 1.0 / math.sqrt(self.hidden_units // self.num_heads)
        scores = ops.einsum("bnhd,bmhd->bhnm", projected * ops.cast(scale, projected.dtype), keys)
        scores = ops.where(mask[:, None, :, :], scores, ops.cast(MASKED_SCORE, scores.dtype))
        weights = self.attention_dropout(ops.softmax(scores, axis=-1), training=training)
        return self.attention.output_dense(ops.einsum("bhnm,bmhd->bnhd", weights, values))

    def _query_input(self, x):
        return self.attention_norm(x) if self.norm == "pre" else x

    def _after_attention(self, query, attended, training=False):
        """The residual around attention and the feed-forward net, in the order ``norm`` names."""
        if self.norm == "pre":
            h = self.ffn_norm(query + attended)
            return h + self._feed_forward(h, training)
        h = self.attention_norm(query + attended)
        return self.ffn_norm(h + self._feed_forward(h, training))

    def key_values(self, x):
        """The attention's projected keys and values of block inputs ``x`` (B, L, d): two (B, L, H, d/H)."""
        return self.attention.key_dense(x), self.attention.value_dense(x)

    def step(self, x, valid, cached_keys, cached_values, cached_valid):
        """The block's output for new positions ``x`` (B, N, d) that follow cached ones, without
        re-encoding them: the new positions attend to the cached keys/values (B, M, H, d/H) where
        ``cached_valid`` (B, M), and causally to each other where ``valid`` (B, N).

        Returns the outputs (B, N, d) and the new positions' keys and values, to append to the cache.
        Inference only (no dropout); equals :meth:`call` on the whole sequence at those positions.
        """
        new_keys, new_values = self.key_values(x)
        keys = ops.concatenate([cached_keys, new_keys], axis=1)
        values = ops.concatenate([cached_values, new_values], axis=1)
        count = ops.shape(x)[1]
        causal = ops.tril(ops.ones((count, count), dtype="bool"))
        mask = ops.concatenate(
            [
                ops.broadcast_to(cached_valid[:, None, :], (ops.shape(x)[0], count, ops.shape(cached_valid)[1])),
                ops.logical_and(causal[None, :, :], valid[:, None, :]),
            ],
            axis=2,
        )
        query = self._query_input(x)
        attended = self._attend(query, keys, values, mask)
        out = self._after_attention(query, attended) * ops.cast(valid, x.dtype)[:, :, None]
        return out, new_keys, new_values

    def compute_output_shape(self, input_shape, valid_shape=None):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=self.hidden_units, num_heads=self.num_heads, dropout=self.dropout_rate, norm=self.norm,
            init_std=self.init_std,
        )
        return config

"""SASRec building blocks: the causal self-attention block. Backend-agnostic (``keras.ops`` only)."""

from __future__ import annotations

import keras
from keras import ops


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
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=num_heads,
            key_dim=hidden_units // num_heads,
            dropout=dropout,
            kernel_initializer=weight_initializer(init_std),
            name="attention",
        )
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-8, name="ffn_norm")
        self.ffn_inner = keras.layers.Dense(
            hidden_units, activation="relu", kernel_initializer=weight_initializer(init_std), name="ffn_inner"
        )
        self.ffn_outer = keras.layers.Dense(hidden_units, kernel_initializer=weight_initializer(init_std), name="ffn_outer")
        self.ffn_dropout_inner = keras.layers.Dropout(dropout)
        self.ffn_dropout_outer = keras.layers.Dropout(dropout)

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
        if self.norm == "pre":
            query = self.attention_norm(x[:, -1:, :] if last_only else x)
            h = query + self.attention(query, x, x, attention_mask=attention_mask, training=training)
            h = self.ffn_norm(h)
            h = h + self._feed_forward(h, training)
        else:
            query = x[:, -1:, :] if last_only else x
            h = self.attention_norm(query + self.attention(query, x, x, attention_mask=attention_mask, training=training))
            h = self.ffn_norm(h + self._feed_forward(h, training))
        return h * keep

    def compute_output_shape(self, input_shape, valid_shape=None):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=self.hidden_units, num_heads=self.num_heads, dropout=self.dropout_rate, norm=self.norm,
            init_std=self.init_std,
        )
        return config

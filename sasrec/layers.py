"""SASRec building blocks: the causal self-attention block. Backend-agnostic (``keras.ops`` only)."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

# Score of a masked key before the softmax: its weight underflows to exactly 0.
MASKED_SCORE = -1e9
# similarity "cosine": the learned temperature starts here (cosines in [-1, 1] need a scale to make
# a peaked softmax; about sqrt(head size) for the usual 64-128).
COSINE_INITIAL_SCALE = 10.0
# position_bias "relative": distances 0..RELATIVE_BUCKETS/2-1 get their own bucket, longer ones share
# log-spaced buckets up to RELATIVE_MAX_DISTANCE (T5's bucketing, one direction: attention is causal).
RELATIVE_BUCKETS = 32
RELATIVE_MAX_DISTANCE = 256
ROTARY_BASE = 10000.0
# normalisation "linear": positions per chunk of the causal prefix-sum form (a C x C product inside a
# chunk, D x D prefix sums across chunks): its cost per position is C*D + D^2 instead of L*D.
LINEAR_CHUNK = 64
# In training, causal self-attention over a window runs a chunk of queries at a time, each over the keys up
# to the chunk's end (later keys are masked for all its queries): with 4 chunks 5/8 of the (L, L) products.
# Chunks of fewer than 32 queries were slower than fewer, larger ones (BENCHMARKS.md, training speed).
CAUSAL_CHUNKS = 4
MIN_CAUSAL_CHUNK = 32
# time_bias: the gap between a query's and a key's timestamps (seconds) falls in bucket floor(log2(1 + gap));
# the last bucket holds 2^31 - 1 s (68 years) and more, so 32 buckets cover every gap.
TIME_BUCKETS = 32
UNKNOWN_TIME = -1  # model-level timestamps below 0 are unknown: no time bias for their pairs


@keras.saving.register_keras_serializable(package="sasrec")
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` whose masks come from XLA's ThreeFry bit generator on TensorFlow (when
    compiled with XLA) and JAX, with as few random bits per element as the rate allows.

    The backends' default generators (TensorFlow's Philox, JAX's ``jax.random`` ThreeFry written in
    array ops) ran 5-7x slower on CPU than XLA's own ThreeFry: with SASRec's (B, L, L) attention
    weights that made dropout 40-50% of a training step, and even XLA's ThreeFry was still ~13% of a
    step's CPU time at 32 bits per element. So each 32-bit word serves four elements (8 bits each) when
    the rate rounded to 1/256 is within 1% of itself (0.2 -> 51/256, 0.5 exactly), else two (16 bits;
    0.1 -> 6554/65536), else one; an element is dropped when its bits are below the rounded rate, and
    kept elements are scaled by the rounded keep probability's inverse. TensorFlow without XLA and
    torch use Keras's dropout.
    """

    def call(self, inputs, training=False):
        if training and 0 < self.rate < 1 and self.noise_shape is None:
            if keras.backend.backend() == "jax":
                return self._jax_dropout(inputs)
            if _tensorflow_xla():
                return self._tensorflow_dropout(inputs)
        return super().call(inputs, training=training)

    @property
    def bits_per_element(self) -> int:
        """8 or 16 when the rate rounded to that many bits is within 1% of it, else 32."""
        for bits in (8, 16):
            dropped = round(self.rate * 2**bits)
            if 0 < dropped < 2**bits and abs(dropped / 2**bits - self.rate) <= 0.01 * self.rate:
                return bits
        return 32

    def _words(self, size):
        """How many 32-bit random words ``size`` elements take (``size``: an int or a scalar tensor)."""
        per_word = 32 // self.bits_per_element
        return (size + per_word - 1) // per_word

    def _keep(self, inputs, words, size, bitcast):
        """``inputs`` with elements whose random bits (``words`` split by ``bitcast(words, dtype)`` into
        :attr:`bits_per_element`-wide values, the first ``size`` one per element) are below the rounded
        rate zeroed, the rest scaled by 1 / the rounded keep probability."""
        bits = self.bits_per_element
        values = words if bits == 32 else ops.reshape(bitcast(words, f"uint{bits}"), (-1,))[:size]
        dropped = min(max(round(self.rate * 2**bits), 1), 2**bits - 1)
        keep = ops.reshape(values, ops.shape(inputs)) >= ops.convert_to_tensor(np.array(dropped, f"uint{bits}"))
        return ops.where(keep, inputs * ops.cast(2**bits / (2**bits - dropped), inputs.dtype), ops.zeros_like(inputs))

    def _tensorflow_dropout(self, inputs):
        import tensorflow as tf

        seed = tf.cast(self.seed_generator.next(), "int64")
        size = tf.size(inputs)
        words = tf.random.stateless_uniform([self._words(size)], seed=seed, minval=None, maxval=None, dtype=tf.uint32,
                                            alg="threefry")
        return self._keep(inputs, words, size, tf.bitcast)

    def _jax_dropout(self, inputs):
        import jax

        size = math.prod(inputs.shape)
        seed = ops.cast(self.seed_generator.next(), "uint32")
        _, words = jax.lax.rng_bit_generator(
            ops.concatenate([seed, seed[::-1]]), (self._words(size),), dtype="uint32",
            algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY,
        )
        return self._keep(inputs, words, size, jax.lax.bitcast_convert_type)


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
        similarity: str = "dot", normalisation: str = "softmax", window: int = 0, position_bias: str = "none",
        time_bias: bool = False, **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_units = hidden_units
        self.num_heads = num_heads
        self.dropout_rate = dropout
        self.norm = norm
        self.init_std = init_std
        # Attention variants (sasrec.config.SASRecConfig: attention_*, position_bias); the defaults are
        # the paper's attention and add no weights.
        self.similarity = similarity
        self.normalisation = normalisation
        self.window = int(window)
        self.position_bias = position_bias
        self.time_bias = bool(time_bias)
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
        if self.similarity == "cosine":
            # log of the temperature that multiplies the cosine; exp(log 10) = 10 at the start.
            self.cosine_log_scale = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(math.log(COSINE_INITIAL_SCALE)), name="cosine_log_scale"
            )
        if self.position_bias == "relative":
            self.relative_bias = self.add_weight(
                shape=(RELATIVE_BUCKETS, self.num_heads), initializer="zeros", name="relative_bias"
            )
        if self.time_bias:
            self.time_gap_bias = self.add_weight(
                shape=(TIME_BUCKETS, self.num_heads), initializer="zeros", name="time_gap_bias"
            )
        self.built = True

    def _feed_forward(self, x, training):
        h = self.ffn_dropout_inner(self.ffn_inner(x), training=training)
        return self.ffn_dropout_outer(self.ffn_outer(h), training=training)

    def call(self, x, valid, training=False, last_only=False, timestamps=None):
        """``last_only``: compute the output of the last position only, ``(B, 1, d)``: what scoring the
        next item needs from the last block (keys and values still cover the whole window).
        ``timestamps`` (B, L) int seconds (< 0 unknown) or None: what :attr:`time_bias` reads."""
        keep = ops.cast(valid, x.dtype)[:, :, None]
        if last_only:
            keep = keep[:, -1:, :]
        if self.normalisation == "linear" and not last_only:
            # No (L, L) mask or weights: the chunked form needs only the validity.
            query = self._query_input(x)
            attended = self._linear_attend(query, *self.key_values(x), valid)
            return self._after_attention(query, attended, training) * keep
        query, keys, values, attention_mask, query_index, index, query_time, key_time = self._self_attention_inputs(
            x, valid, last_only, timestamps)
        if last_only:
            attended = self._attend(query, keys, values, attention_mask, training, query_index, index, query_time,
                                    key_time)
        else:
            attended = self._causal_attend(query, keys, values, attention_mask, training, index, key_time)
        return self._after_attention(query, attended, training) * keep

    def _self_attention_inputs(self, x, valid, last_only=False, timestamps=None):
        """What :meth:`attention_weights` needs for the block's own window ``x`` (B, L, d): the query
        input (B, N, d) (N = L, or 1 with ``last_only``), projected keys and values, the mask (B, N, L),
        the query and key item indices and the query and key timestamps."""
        length = ops.shape(x)[1]
        causal = ops.tril(ops.ones((length, length), dtype="bool"))
        # Query i may attend key j when j <= i and j is a real item.
        attention_mask = ops.logical_and(causal[None, :, :], valid[:, None, :])
        index = self._item_index(valid)
        query_index = index
        key_time = self._key_times(timestamps)
        query_time = key_time
        if last_only:
            attention_mask = attention_mask[:, -1:, :]
            query_index = index[:, -1:] if index is not None else None
            query_time = key_time[:, -1:] if key_time is not None else None
        query = self._query_input(x[:, -1:, :] if last_only else x)
        keys, values = self.key_values(x)
        return query, keys, values, attention_mask, query_index, index, query_time, key_time

    def attention_map(self, x, valid, last_only=False, timestamps=None):
        """The block's attention weights on its input ``x`` (B, L, d) with validity ``valid`` (B, L):
        ``(B, H, N, L)`` float32 (N = L, or 1 with ``last_only``), rows of padding zero, whatever the
        attention variant; and the projected values (B, L, H, d/H). For explanations and plots."""
        query, keys, values, mask, query_index, index, query_time, key_time = self._self_attention_inputs(
            x, valid, last_only, timestamps)
        weights = ops.cast(self.attention_weights(query, keys, mask, query_index, index, query_time, key_time),
                           "float32")
        rows = valid[:, -1:] if last_only else valid
        return weights * ops.cast(ops.logical_and(mask, rows[:, :, None]), "float32")[:, None, :, :], values

    @property
    def uses_positions(self) -> bool:
        """Whether the attention depends on the distance between query and key (window, position bias)."""
        return self.window > 0 or self.position_bias != "none"

    def _item_index(self, valid):
        """Each column's index among the real items of ``valid`` (B, M), counted from the first, or None
        when the attention does not use positions. Padding anywhere (left in windows, right in cached
        states) is skipped, so distances count items, never columns."""
        if not self.uses_positions:
            return None
        return ops.cumsum(ops.cast(valid, "int32"), axis=1) - 1

    def _key_times(self, timestamps):
        """``timestamps`` as int32 when :attr:`time_bias` reads them, else None (no bias to compute)."""
        if not self.time_bias or timestamps is None:
            return None
        return ops.cast(timestamps, "int32")

    def attention_weights(self, query, keys, mask, query_index=None, key_index=None, query_time=None, key_time=None):
        """The attention weights (B, H, N, M) of block queries ``query`` (B, N, d) over projected ``keys``
        (B, M, H, d/H) where ``mask`` (B, N, M), before dropout; ``query_index``/``key_index`` (B, N)/(B, M):
        the items' indices (:meth:`_item_index`), needed when :attr:`uses_positions`;
        ``query_time``/``key_time`` (B, N)/(B, M): int32 timestamps (< 0 unknown) for :attr:`time_bias`,
        None: no time bias."""
        projected = self.attention.query_dense(query)
        distance = None
        if self.uses_positions:
            distance = query_index[:, :, None] - key_index[:, None, :]
        if self.window > 0:
            mask = ops.logical_and(mask, distance < self.window)
        projected, keys = self._compared(projected, keys, query_index, key_index)
        scores = ops.einsum("bnhd,bmhd->bhnm", projected, keys)
        if self.position_bias == "relative":
            scores = scores + ops.cast(_head_bias(self.relative_bias, relative_bucket(distance)), scores.dtype)
        if query_time is not None:
            # A pair with an unknown timestamp (a request without times, padding) gets no time bias.
            known = ops.logical_and(query_time[:, :, None] >= 0, key_time[:, None, :] >= 0)[:, None, :, :]
            bias = _head_bias(self.time_gap_bias, time_bucket(query_time[:, :, None] - key_time[:, None, :]))
            scores = scores + ops.cast(ops.where(known, bias, ops.zeros_like(bias)), scores.dtype)
        if self.normalisation == "silu":
            # HSTU: pointwise weights, masked keys 0, divided by how many keys the query attends.
            attended = ops.cast(mask, scores.dtype)[:, None, :, :]
            count = ops.maximum(ops.sum(attended, axis=-1, keepdims=True), ops.cast(1.0, scores.dtype))
            return ops.silu(scores) * attended / count
        if self.normalisation == "linear":
            # phi(q).phi(k_j) > 0 over its sum on the attended keys; a query that attends none gets 0.
            scores = scores * ops.cast(mask, scores.dtype)[:, None, :, :]
            total = ops.sum(scores, axis=-1, keepdims=True)
            return ops.cast(scores / ops.where(total > 0, total, ops.ones_like(total)), query.dtype)
        scores = ops.where(mask[:, None, :, :], scores, ops.cast(MASKED_SCORE, scores.dtype))
        return ops.softmax(scores, axis=-1)

    def _compared(self, projected, keys, query_index=None, key_index=None):
        """Projected queries (B, N, H, D) and keys (B, M, H, D) as the similarity compares them: rotated
        (rotary), unit and scaled (cosine) or scaled by 1/sqrt(D) (dot); for ``linear`` then through the
        feature map elu(x) + 1 (the dot product unscaled, as Katharopoulos et al.), in float32."""
        if self.position_bias == "rotary":
            projected, keys = _rotary(projected, query_index), _rotary(keys, key_index)
        if self.similarity == "cosine":
            scale = ops.exp(ops.cast(self.cosine_log_scale, projected.dtype))
            projected = _unit(projected) * scale
            keys = _unit(keys)
        elif self.normalisation != "linear":
            scale = 1.0 / math.sqrt(self.hidden_units // self.num_heads)
            projected = projected * ops.cast(scale, projected.dtype)
        if self.normalisation == "linear":
            # float32: the prefix sums add up to thousands of terms, too many for bfloat16.
            return ops.elu(ops.cast(projected, "float32")) + 1.0, ops.elu(ops.cast(keys, "float32")) + 1.0
        return projected, keys

    def _linear_attend(self, query, keys, values, valid):
        """``linear`` attention of the window's own queries ``query`` (B, L, d) over its projected
        ``keys`` and ``values`` (B, L, H, D) where ``valid`` (B, L), in the chunked causal form that never
        forms the (L, L) weights: inside each chunk of :data:`LINEAR_CHUNK` positions a masked C x C
        product, from earlier chunks their prefix sums of phi(k) v^T and phi(k). Equals :meth:`_attend`
        with :meth:`attention_weights` (tested); the output projection (B, L, d)."""
        phi_q, phi_k = self._compared(self.attention.query_dense(query), keys)
        # Padding keys add nothing to any sum.
        phi_k = phi_k * ops.cast(valid, "float32")[:, :, None, None]
        values = ops.cast(values, "float32")
        batch, length, heads = ops.shape(values)[0], ops.shape(values)[1], ops.shape(values)[2]
        chunks = (length + LINEAR_CHUNK - 1) // LINEAR_CHUNK
        # (B, L, H, D) -> (B, chunks, C, H, D), zero-padded at the end (zero keys; the extra queries are cut).
        def chunked(t):
            pad = ops.zeros((batch, chunks * LINEAR_CHUNK - length, heads, ops.shape(t)[3]), t.dtype)
            return ops.reshape(ops.concatenate([t, pad], axis=1), (batch, chunks, LINEAR_CHUNK, heads, ops.shape(t)[3]))

        phi_q, phi_k, values = chunked(phi_q), chunked(phi_k), chunked(values)
        # Exclusive prefix sums over chunks: what every query of a chunk gets from all earlier chunks.
        state = ops.einsum("bnchd,bnche->bnhde", phi_k, values)
        key_sum = ops.sum(phi_k, axis=2)
        state = ops.concatenate([ops.zeros_like(state[:, :1]), ops.cumsum(state[:, :-1], axis=1)], axis=1)
        key_sum = ops.concatenate([ops.zeros_like(key_sum[:, :1]), ops.cumsum(key_sum[:, :-1], axis=1)], axis=1)
        scores = ops.einsum("bnchd,bnmhd->bnhcm", phi_q, phi_k)
        scores = scores * ops.cast(ops.tril(ops.ones((LINEAR_CHUNK, LINEAR_CHUNK))), "float32")
        numerator = ops.einsum("bnchd,bnhde->bnche", phi_q, state) + ops.einsum("bnhcm,bnmhe->bnche", scores, values)
        total = ops.einsum("bnchd,bnhd->bnch", phi_q, key_sum) + ops.transpose(ops.sum(scores, axis=-1), (0, 1, 3, 2))
        attended = numerator / ops.where(total > 0, total, ops.ones_like(total))[..., None]
        attended = ops.reshape(attended, (batch, chunks * LINEAR_CHUNK, heads, ops.shape(values)[4]))[:, :length]
        return self.attention.output_dense(ops.cast(attended, query.dtype))

    def _attend(self, query, keys, values, mask, training=False, query_index=None, key_index=None, query_time=None,
                key_time=None):
        """Attention of block queries ``query`` (B, N, d) over projected ``keys`` and ``values``
        (B, M, H, d/H) where ``mask`` (B, N, M), by :meth:`attention_weights`: the attention's output
        projection (B, N, d)."""
        return self.attention.output_dense(self._weighted_values(query, keys, values, mask, training, query_index,
                                                                 key_index, query_time, key_time))

    def _weighted_values(self, query, keys, values, mask, training, query_index, key_index, query_time, key_time):
        """:meth:`_attend` before the output projection: the values weighted by the attention (B, N, H, d/H)."""
        weights = self.attention_weights(query, keys, mask, query_index, key_index, query_time, key_time)
        if self.normalisation != "linear":  # linear: no weights to drop in its parallel form, so none here
            weights = self.attention_dropout(weights, training=training)
        return ops.einsum("bhnm,bmhd->bnhd", weights, values)

    def _causal_attend(self, query, keys, values, mask, training=False, index=None, times=None):
        """:meth:`_attend` of a window's own queries (B, L, d) over its own keys and values (causal ``mask``
        (B, L, L)). In training, a chunk of queries at a time over the keys up to the chunk's end
        (:func:`causal_chunks`): the keys left out are masked for every query of the chunk, so no output at a
        real position changes, only the work (inference keeps one product: a serving graph pays per op).
        ``index``/``times`` (B, L) or None: the positions' item indices and timestamps."""
        if not training:
            return self._attend(query, keys, values, mask, training, index, index, times, times)
        length = query.shape[1]
        cut = lambda t, start, end: None if t is None else t[:, start:end]  # noqa: E731
        parts = [self._weighted_values(query[:, start:end], keys[:, :end], values[:, :end], mask[:, start:end, :end],
                                       training, cut(index, start, end), cut(index, None, end), cut(times, start, end),
                                       cut(times, None, end))
                 for start, end in causal_chunks(ops.shape(query)[1] if length is None else length)]
        return self.attention.output_dense(parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1))

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

    def step(self, x, valid, cached_keys, cached_values, cached_valid, timestamps=None, cached_timestamps=None):
        """The block's output for new positions ``x`` (B, N, d) that follow cached ones, without
        re-encoding them: the new positions attend to the cached keys/values (B, M, H, d/H) where
        ``cached_valid`` (B, M), and causally to each other where ``valid`` (B, N). With
        :attr:`time_bias`, ``timestamps`` (B, N) and ``cached_timestamps`` (B, M) are the new and cached
        positions' times (None: unknown).

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
        # Item indices over the cached and the new positions together: what the whole history gives.
        index = self._item_index(ops.concatenate([cached_valid, valid], axis=1))
        query_index = index[:, -count:] if index is not None else None
        key_time = None
        if self.time_bias and (timestamps is not None or cached_timestamps is not None):
            key_time = ops.concatenate([_times_or_unknown(cached_timestamps, cached_valid),
                                        _times_or_unknown(timestamps, valid)], axis=1)
        query_time = key_time[:, -count:] if key_time is not None else None
        attended = self._attend(query, keys, values, mask, False, query_index, index, query_time, key_time)
        out = self._after_attention(query, attended) * ops.cast(valid, x.dtype)[:, :, None]
        return out, new_keys, new_values

    def compute_output_shape(self, input_shape, valid_shape=None):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=self.hidden_units, num_heads=self.num_heads, dropout=self.dropout_rate, norm=self.norm,
            init_std=self.init_std, similarity=self.similarity, normalisation=self.normalisation, window=self.window,
            position_bias=self.position_bias, time_bias=self.time_bias,
        )
        return config


def causal_chunks(length) -> list[tuple]:
    """Query ranges ``(start, end)`` of :meth:`CausalSelfAttentionBlock._causal_attend` for a window of
    ``length`` positions: ``length // MIN_CAUSAL_CHUNK`` of them (at least 1, at most :data:`CAUSAL_CHUNKS`),
    equal to within one. ``length`` is an int, or a scalar tensor when the step is traced for windows of any
    width (TensorFlow's training step): then always :data:`CAUSAL_CHUNKS` ranges, those past the count empty,
    and XLA, which compiles each width on its own, sees constants."""
    if isinstance(length, int):
        count = max(1, min(CAUSAL_CHUNKS, length // MIN_CAUSAL_CHUNK))
        edges = [length * i // count for i in range(count + 1)]
    else:
        count = ops.clip(length // MIN_CAUSAL_CHUNK, 1, CAUSAL_CHUNKS)
        edges = [ops.minimum(length, length * i // count) for i in range(CAUSAL_CHUNKS + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _head_bias(table, buckets):
    """The (B, H, N, M) per-head bias of a learned ``table`` (buckets, H) at ``buckets`` (B, N, M)."""
    return ops.transpose(ops.take(table, buckets, axis=0), (0, 3, 1, 2))


def time_bucket(gap):
    """Bucket of time gaps ``gap`` (int32 seconds, >= 0 where attended): floor(log2(1 + gap)), exactly,
    up to ``TIME_BUCKETS - 1``."""
    gap = ops.maximum(ops.cast(gap, "int32"), 0)
    starts = ops.convert_to_tensor([2**b - 1 for b in range(TIME_BUCKETS)], "int32")  # smallest gap of each bucket
    guess = ops.cast(ops.floor(ops.log2(1.0 + ops.cast(gap, "float32"))), "int32")
    # float32 log2 can miss by one next to a power of two (differently per backend): correct it both ways.
    guess = ops.clip(guess, 0, TIME_BUCKETS - 1)
    guess = guess - ops.cast(gap < ops.take(starts, guess), "int32")
    up = ops.logical_and(guess < TIME_BUCKETS - 1, gap >= ops.take(starts, ops.minimum(guess + 1, TIME_BUCKETS - 1)))
    return guess + ops.cast(up, "int32")


def _times_or_unknown(timestamps, valid):
    """``timestamps`` (B, M) as int32, or all :data:`UNKNOWN_TIME` shaped like ``valid`` when None."""
    if timestamps is None:
        return ops.full(ops.shape(valid), UNKNOWN_TIME, dtype="int32")
    return ops.cast(timestamps, "int32")


def relative_bucket(distance):
    """T5's bucket of causal distances ``distance`` (int, >= 0 where attended): exact below
    ``RELATIVE_BUCKETS / 2``, log-spaced up to ``RELATIVE_MAX_DISTANCE``, the last bucket beyond."""
    exact = RELATIVE_BUCKETS // 2
    distance = ops.maximum(distance, 0)
    far = ops.log(ops.cast(ops.maximum(distance, 1), "float32") / exact) / math.log(RELATIVE_MAX_DISTANCE / exact)
    far = exact + ops.cast(far * (RELATIVE_BUCKETS - exact), "int32")
    return ops.where(distance < exact, distance, ops.minimum(far, RELATIVE_BUCKETS - 1))


def _unit(x):
    """``x`` scaled to unit L2 norm over its last axis; the epsilon keeps a zero vector (a padding key)
    at zero with a finite gradient, where ``x / norm(x)`` has none."""
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + ops.cast(1e-12, x.dtype))


def _rotary(x, index):
    """Rotary position embedding (RoPE, rotate-half form) of ``x`` (B, N, H, D) at item indices ``index``
    (B, N): the dot product of a rotated query and key depends only on their distance."""
    half = ops.shape(x)[-1] // 2
    frequencies = ops.power(ROTARY_BASE, -ops.arange(half, dtype="float32") / ops.cast(half, "float32"))
    angles = ops.cast(index, "float32")[:, :, None, None] * frequencies  # (B, N, 1, D/2)
    cos, sin = ops.cast(ops.cos(angles), x.dtype), ops.cast(ops.sin(angles), x.dtype)
    first, second = x[..., :half], x[..., half:]
    return ops.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

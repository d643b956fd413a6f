"""The SASRec model (Kang & McAuley, ICDM 2018) as a backend-agnostic Keras 3 model."""

from __future__ import annotations

import math

import keras
from keras import ops

from pipelines.dataset import FIRST_ITEM_ID
from sasrec.config import SASRecConfig
from sasrec.layers import CausalSelfAttentionBlock, Dropout, weight_initializer


@keras.saving.register_keras_serializable(package="sasrec")
class SASRec(keras.Model):
    """Self-attentive sequential recommender.

    ``model(ids)`` takes internal item ids ``(B, W)`` with ``W <= maxlen``, left-padded with 0 so the
    most recent item sits in the last column, and returns hidden states ``(B, W, d)``. Positions are
    counted from the end of the window (``positions="from_end"``) or from its first real item
    (``"from_start"``); either way cutting left padding off changes nothing.
    Scores are dot products with the item embedding table (shared between input and output).

    With ``time_bias`` the input may also be a dict ``{"ids": (B, W), "timestamps": (B, W)}``: each
    event's time in seconds (int32; only gaps matter, so callers rebase them, see
    :func:`sasrec.feed.rebase_times`; < 0 unknown), which the blocks' time-gap bias reads. Plain ids
    (or unknown times) leave that bias off.
    """

    def __init__(
        self,
        vocab_size: int,
        maxlen: int = 200,
        hidden_units: int = 50,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        norm: str = "pre",
        positions: str = "from_end",
        init_std: float = 0.0,
        attention_similarity: str = "dot",
        attention_normalisation: str = "softmax",
        attention_window: int | list[int] = 0,
        position_bias: str = "none",
        absolute_positions: bool = True,
        time_bias: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.maxlen = maxlen
        self.hidden_units = hidden_units
        self.num_blocks = num_blocks
        self.num_heads = num_heads
        self.dropout_rate = dropout
        self.norm = norm
        self.positions = positions
        self.init_std = init_std
        self.attention_similarity = attention_similarity
        self.attention_normalisation = attention_normalisation
        # One window per block (0: global); one value stands for every block.
        windows = [int(w) for w in (attention_window if isinstance(attention_window, (list, tuple)) else [attention_window])]
        self.attention_window = windows * (num_blocks // len(windows)) if num_blocks % len(windows) == 0 else windows
        if len(self.attention_window) != num_blocks:
            raise ValueError(f"attention_window needs one value or one per block, got {attention_window!r}")
        self.position_bias = position_bias
        self.absolute_positions = bool(absolute_positions)
        self.time_bias = bool(time_bias)
        self.item_embedding = keras.layers.Embedding(
            vocab_size, hidden_units, embeddings_initializer=weight_initializer(init_std), name="item_embedding"
        )
        # None without absolute positions (position_bias and attention_window then carry the order).
        self.position_embedding = keras.layers.Embedding(
            maxlen, hidden_units, embeddings_initializer=weight_initializer(init_std), name="position_embedding"
        ) if self.absolute_positions else None
        self.embedding_dropout = Dropout(dropout)
        self.blocks = [
            CausalSelfAttentionBlock(
                hidden_units, num_heads, dropout, norm, init_std=init_std, similarity=attention_similarity,
                normalisation=attention_normalisation, window=self.attention_window[i], position_bias=position_bias,
                time_bias=self.time_bias, name=f"block_{i}",
            )
            for i in range(num_blocks)
        ]
        # float32 even under mixed precision: the hidden state that every item score is a dot product
        # with keeps full precision, so near-equal scores do not collapse into bfloat16 ties.
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-8, dtype="float32", name="final_norm")
        # Set by training code (see sasrec.losses); not part of the saved model.
        self.training_loss = None

    def build(self, input_shape=None):
        self.item_embedding.build((None, None))
        if self.position_embedding is not None:
            self.position_embedding.build((None,))
        shape = (None, None, self.hidden_units)
        for block in self.blocks:
            block.build(shape)
        self.final_norm.build(shape)
        self.built = True

    def _embed(self, ids, positions, training=False):
        """Item plus position embeddings of ``ids`` (B, W), zero at padding, and the validity mask."""
        valid = ops.not_equal(ids, 0)
        x = self.item_embedding(ids) * math.sqrt(self.hidden_units)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        x = self.embedding_dropout(x, training=training)
        return x * ops.cast(ops.expand_dims(valid, -1), x.dtype), valid

    def _positions(self, ids, offset=0):
        """Position of each column of left-padded ``ids`` (B, W); ``offset`` (B,): real items before them."""
        width = ops.shape(ids)[1]
        if self.positions == "from_start":
            # Histories are left-padded: the running count of real items is the position from the start.
            count = ops.cumsum(ops.cast(ops.not_equal(ids, 0), "int32"), axis=1) - 1
            # Clipped: a continuation past maxlen is refused by the caller, but must not fail the batch.
            return ops.clip(count + ops.reshape(ops.cast(offset, "int32"), (-1, 1)), 0, self.maxlen - 1)
        return ops.expand_dims(ops.arange(self.maxlen - width, self.maxlen, dtype="int32"), 0)

    @staticmethod
    def split_inputs(inputs):
        """``(ids, timestamps or None)`` of model input ``inputs``: ids, or a dict with ``ids`` and ``timestamps``."""
        if isinstance(inputs, dict):
            return inputs["ids"], inputs.get("timestamps")
        return inputs, None

    def call(self, inputs, training=False, last_only=False):
        """Hidden states ``(B, W, d)``; with ``last_only`` just the last position's, ``(B, 1, d)``."""
        ids, timestamps = self.split_inputs(inputs)
        ids = ops.cast(ids, "int32")
        x, valid = self._embed(ids, self._positions(ids), training)
        for i, block in enumerate(self.blocks):
            x = block(x, valid, training=training, last_only=last_only and i == len(self.blocks) - 1,
                      timestamps=timestamps)
        return self.final_norm(x)

    def encode_state(self, ids, timestamps=None):
        """What :meth:`advance_state` continues from, for left-padded ``ids`` (B, W) (and their
        ``timestamps``, which the caller keeps with the state for a time-bias model): the last position's
        hidden state (B, d), every block's attention keys and values (B, blocks, W, H, d/H) and the
        window's validity mask (B, W). Inference only."""
        ids = ops.cast(ids, "int32")
        x, valid = self._embed(ids, self._positions(ids))
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            block_keys, block_values = block.key_values(x)
            keys.append(block_keys)
            values.append(block_values)
            x = block(x, valid, last_only=i == len(self.blocks) - 1, timestamps=timestamps)
        return self.final_norm(x)[:, -1, :], ops.stack(keys, axis=1), ops.stack(values, axis=1), valid

    def advance_state(self, ids, offset, keys, values, cached_valid, timestamps=None, cached_timestamps=None):
        """Continue a history by new items without re-encoding it (causal attention: new items do not
        change what earlier positions computed).

        ``ids`` (B, N): the new items, left-padded; ``offset`` (B,): real items already encoded;
        ``keys``/``values`` (B, blocks, M, H, d/H) and ``cached_valid`` (B, M): the encoded state;
        ``timestamps`` (B, N) / ``cached_timestamps`` (B, M): the new and the cached items' times, one origin
        for both (None: unknown). Returns
        the hidden state after the last new item (B, d) and the new items' keys and values
        (B, blocks, N, H, d/H). Equals :meth:`encode_state` on the whole history only while positions
        count from the start and the history fits the window (``offset + new items <= maxlen``);
        callers check that (positions counted from the end shift with every new item).
        """
        ids = ops.cast(ids, "int32")
        x, valid = self._embed(ids, self._positions(ids, offset))
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            x, block_keys, block_values = block.step(x, valid, keys[:, i], values[:, i], cached_valid, timestamps,
                                                     cached_timestamps)
            new_keys.append(block_keys)
            new_values.append(block_values)
        return self.final_norm(x)[:, -1, :], ops.stack(new_keys, axis=1), ops.stack(new_values, axis=1)

    def item_logits(self, hidden):
        """Scores of every item for hidden states ``(..., d)``: ``(..., vocab_size)``, computed in float32
        whatever the compute precision (evaluation, export and serving all score through here)."""
        table = ops.cast(self.item_embedding.embeddings, "float32")
        return ops.matmul(ops.cast(hidden, "float32"), ops.transpose(table))

    def score_last(self, inputs):
        """Next-item scores after the last position of ``inputs`` (ids, or ids and timestamps, see
        :meth:`call`) only: ``(B, vocab_size)`` float32.

        Padding and the out-of-vocabulary id score ``-inf`` so they are never recommended.
        """
        hidden = self(inputs, training=False, last_only=True)[:, -1, :]
        logits = self.item_logits(hidden)
        reserved = ops.arange(self.vocab_size) < FIRST_ITEM_ID
        return ops.where(ops.expand_dims(reserved, 0), float("-inf"), logits)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.training_loss is None:
            raise RuntimeError("SASRec.training_loss is not set; train with sasrec.train.train()")
        return self.training_loss(self, y_pred, y)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            maxlen=self.maxlen,
            hidden_units=self.hidden_units,
            num_blocks=self.num_blocks,
            num_heads=self.num_heads,
            dropout=self.dropout_rate,
            norm=self.norm,
            positions=self.positions,
            init_std=self.init_std,
            attention_similarity=self.attention_similarity,
            attention_normalisation=self.attention_normalisation,
            attention_window=list(self.attention_window),
            position_bias=self.position_bias,
            absolute_positions=self.absolute_positions,
            time_bias=self.time_bias,
        )
        return config


class LastPositionScorer(keras.Model):
    """Wraps a SASRec so that ``predict_on_batch(inputs)`` returns ``score_last(inputs)``, compiled by the
    backend's own predict machinery (tf.function, jax.jit or torch). Never saved."""

    def __init__(self, sasrec: SASRec, **kwargs):
        super().__init__(**kwargs)
        self.sasrec = sasrec

    def call(self, inputs):
        return self.sasrec.score_last(inputs)


def build_model(config: SASRecConfig, vocab_size: int) -> SASRec:
    model = SASRec(
        vocab_size=vocab_size,
        maxlen=config.maxlen,
        hidden_units=config.hidden_units,
        num_blocks=config.num_blocks,
        num_heads=config.num_heads,
        dropout=config.dropout,
        norm=config.norm,
        positions=config.positions,
        init_std=config.init_std,
        attention_similarity=config.attention_similarity,
        attention_normalisation=config.attention_normalisation,
        attention_window=config.block_windows(),
        position_bias=config.position_bias,
        absolute_positions=config.absolute_positions,
        time_bias=config.time_bias,
        name="sasrec",
    )
    model.build((None, config.maxlen))
    return model

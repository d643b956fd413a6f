"""An exported model version's forward pass in numpy, for live histories: encode one user's window into
attention keys and values, continue them by new events, and rank items as the signatures do, all
outside TensorFlow.

Why: a call of the ``advance_state`` signature costs ~2 ms of TensorFlow executor overhead whatever it
computes, while the same one-event step in numpy costs about a tenth (BENCHMARKS.md, "Live histories").
The arithmetic is :class:`sasrec.layers.CausalSelfAttentionBlock`'s at inference, for one user at a time
and without padding, so results equal the signatures' within float32 rounding (tested against them).

The export hands the weights over in ``host_weights``, a dict of the SavedModel's own variables (no copy
on disk) under the names :func:`host_weights` gives, and describes the layers in the card's
``architecture`` (:func:`architecture`). :func:`load` returns ``None`` and the reason for a model this
module does not compute (time_bias, a compute dtype other than float32, an export made before
``host_weights``); callers then use the signatures.

Nothing here imports TensorFlow or Keras: :func:`host_weights` and :func:`architecture` only read attributes
of the model they are given.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.dataset import FIRST_ITEM_ID, OOV_ID

# The same constants as sasrec.layers (not imported: that module imports Keras); tests pin them equal.
NORM_EPSILON = 1e-8
MASKED_SCORE = -1e9
RELATIVE_BUCKETS = 32
RELATIVE_MAX_DISTANCE = 256
ROTARY_BASE = 10000.0
UNIT_EPSILON = 1e-12
ARCHITECTURE_KEYS = ("maxlen", "hidden_units", "num_blocks", "num_heads", "norm", "positions",
                     "attention_similarity", "attention_normalisation", "attention_window", "position_bias",
                     "absolute_positions", "time_bias")
_DENSE = ("query", "key", "value", "attention_output")
# States continued in one padded pass: larger passes allocate MBs of padded buffers afresh per call and cost
# more than they save (BENCHMARKS.md, "Live histories: the numpy path").
STATES_PER_PASS = 8


def host_weights(model) -> dict:
    """The variables a :class:`HostModel` reads, by name: what the export tracks as ``host_weights``."""
    weights = {"item_embedding": model.item_embedding.embeddings,
               "final_norm/gamma": model.final_norm.gamma, "final_norm/beta": model.final_norm.beta}
    if model.position_embedding is not None:
        weights["position_embedding"] = model.position_embedding.embeddings
    for i, block in enumerate(model.blocks):
        prefix = f"block_{i}/"
        for norm in ("attention_norm", "ffn_norm"):
            layer = getattr(block, norm)
            weights[prefix + norm + "/gamma"], weights[prefix + norm + "/beta"] = layer.gamma, layer.beta
        dense = dict(zip(_DENSE, (block.attention.query_dense, block.attention.key_dense,
                                  block.attention.value_dense, block.attention.output_dense)))
        for name in ("ffn_inner", "ffn_outer"):
            dense[name] = getattr(block, name)
        for name, layer in dense.items():
            weights[prefix + name + "/kernel"], weights[prefix + name + "/bias"] = layer.kernel, layer.bias
        for extra in ("cosine_log_scale", "relative_bias"):
            if hasattr(block, extra):
                weights[prefix + extra] = getattr(block, extra)
    return {name: getattr(variable, "value", variable) for name, variable in weights.items()}


def architecture(model) -> dict:
    """The card's ``architecture``: what :class:`HostModel` needs to know besides the weights."""
    config = model.get_config()
    return {**{key: config[key] for key in ARCHITECTURE_KEYS}, "compute_dtype": str(model.compute_dtype)}


def load(loaded, card: dict) -> tuple[HostModel | None, str]:
    """A :class:`HostModel` of a loaded SavedModel, or ``(None, why not)``."""
    arch = card.get("architecture")
    if arch is None or not hasattr(loaded, "host_weights"):
        return None, "exported before the weights were handed to serving (export it again with `sasrec export`)"
    if arch.get("time_bias"):
        return None, "a time_bias model (its states carry timestamps; computed by the signatures)"
    if arch.get("compute_dtype") != "float32":
        return None, f"compute dtype {arch.get('compute_dtype')} (numpy computes float32 only)"
    weights = {name: variable.numpy() for name, variable in loaded.host_weights.items()}
    vocab = [x.decode("utf-8") for x in loaded.vocab.numpy()]
    return HostModel(arch, weights, vocab, loaded.popularity.numpy()), ""


def _layer_norm(x, norm):
    gamma, beta = norm
    # np.add.reduce, not .mean(): the same float32 sums without mean()'s Python wrapper, which cost as much
    # as the arithmetic on one user's row.
    scale = np.float32(1 / x.shape[-1])
    centred = x - np.add.reduce(x, axis=-1, keepdims=True) * scale
    variance = np.add.reduce(centred * centred, axis=-1, keepdims=True) * scale
    return centred / np.sqrt(variance + np.float32(NORM_EPSILON)) * gamma + beta


def _unit(x):
    return x / np.sqrt(np.square(x).sum(axis=-1, keepdims=True) + np.float32(UNIT_EPSILON))


def _elu_plus_one(x):
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


def _rotary(x, index):
    """Rotate-half RoPE of ``x`` (..., N, H, D) at item indices ``index`` (..., N), as sasrec.layers._rotary."""
    half = x.shape[-1] // 2
    frequencies = np.power(np.float32(ROTARY_BASE), -np.arange(half, dtype=np.float32) / np.float32(half))
    angles = index.astype(np.float32)[..., None, None] * frequencies
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def relative_bucket(distance: np.ndarray) -> np.ndarray:
    """sasrec.layers.relative_bucket in numpy (float32 as there)."""
    exact = RELATIVE_BUCKETS // 2
    distance = np.maximum(distance, 0)
    far = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
           / np.float32(math.log(RELATIVE_MAX_DISTANCE / exact)))
    far = exact + (far * np.float32(RELATIVE_BUCKETS - exact)).astype(np.int32)
    return np.where(distance < exact, distance, np.minimum(far, RELATIVE_BUCKETS - 1))


class _Block:
    """One block's weights, with the key and value projections fused into one matrix."""

    def __init__(self, weights: dict, prefix: str, arch: dict, window: int):
        def dense(name):
            """A projection as a (inputs, outputs) matrix and its bias: the query/key/value kernels are
            (d, H, D), the attention output's (H, D, d)."""
            kernel, bias = weights[prefix + name + "/kernel"], weights[prefix + name + "/bias"]
            matrix = kernel.reshape(kernel.shape[0], -1) if name in _DENSE[:3] else kernel.reshape(-1, kernel.shape[-1])
            return matrix, bias.reshape(-1)

        self.attention_norm = (weights[prefix + "attention_norm/gamma"], weights[prefix + "attention_norm/beta"])
        self.ffn_norm = (weights[prefix + "ffn_norm/gamma"], weights[prefix + "ffn_norm/beta"])
        self.query = dense("query")
        (key_kernel, key_bias), (value_kernel, value_bias) = dense("key"), dense("value")
        self.key_value = (np.ascontiguousarray(np.concatenate([key_kernel, value_kernel], axis=1)),
                          np.concatenate([key_bias, value_bias]))
        self.output = dense("attention_output")
        self.ffn_inner, self.ffn_outer = dense("ffn_inner"), dense("ffn_outer")
        scale = weights.get(prefix + "cosine_log_scale")
        self.cosine_scale = None if scale is None else np.exp(np.float32(scale))
        self.relative_bias = weights.get(prefix + "relative_bias")  # (buckets, heads)
        self.window = int(window)
        self.pre_norm = arch["norm"] == "pre"


class HostModel:
    """One model version in numpy: :meth:`lookup`, :meth:`encode`, :meth:`advance`, :meth:`rank`.

    States are the signatures' (:class:`sasrec.recommender.AttentionState`): every block's projected keys
    and values ``(blocks, M, heads, d/heads)`` of the window's items, so a state made by either path
    continues on the other.
    """

    def __init__(self, arch: dict, weights: dict, vocab: list[str], popularity: np.ndarray):
        self.maxlen = int(arch["maxlen"])
        self.hidden_units = int(arch["hidden_units"])
        self.num_heads = int(arch["num_heads"])
        self.head_size = self.hidden_units // self.num_heads
        self.from_start = arch["positions"] == "from_start"
        self.cosine = arch["attention_similarity"] == "cosine"
        self.normalisation = arch["attention_normalisation"]
        self.position_bias = arch["position_bias"]
        self.embedding = np.ascontiguousarray(weights["item_embedding"], dtype=np.float32)
        self.embedding_scale = np.float32(math.sqrt(self.hidden_units))
        self.position_embedding = weights.get("position_embedding")
        windows = arch["attention_window"]
        self.blocks = [_Block(weights, f"block_{i}/", arch, windows[i]) for i in range(int(arch["num_blocks"]))]
        self.final_norm = (weights["final_norm/gamma"], weights["final_norm/beta"])
        self.vocab = np.array(vocab, dtype=object)
        self.vocab[:FIRST_ITEM_ID] = ""  # placeholders are never returned
        self.index = {name: i for i, name in enumerate(vocab[FIRST_ITEM_ID:], start=FIRST_ITEM_ID)}
        self.popularity = popularity.astype(np.float32)

    def lookup(self, ids) -> tuple[np.ndarray, int]:
        """Internal ids of the known items of external ``ids`` (``""`` ignored), and how many were unknown."""
        index = self.index
        internal = [index.get(x, OOV_ID) for x in ids if x != ""]
        known = np.array([i for i in internal if i != OOV_ID], dtype=np.int32)
        return known, len(internal) - len(known)

    def empty_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(hidden, keys, values)`` of a window without known items."""
        shape = (len(self.blocks), 0, self.num_heads, self.head_size)
        return np.zeros(self.hidden_units, np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def encode(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The hidden state after ``window`` (known internal ids, oldest first, 1..maxlen of them) and every
        block's keys and values of its items."""
        count = len(window)
        positions = np.arange(count) if self.from_start else np.arange(self.maxlen - count, self.maxlen)
        empty = np.zeros((len(self.blocks), 1, 0, self.num_heads, self.head_size), np.float32)
        hidden, keys, values = self._forward(window[None], positions[None], empty, empty, np.zeros(1, np.int64))
        return hidden[0], keys[:, 0], values[:, 0]

    def advance(self, keys: list[np.ndarray], values: list[np.ndarray], new: np.ndarray):
        """States' ``keys``/``values`` (each (blocks, M, H, D)) continued by the same number of known internal
        ids each (``new``: (B, N)), in one pass whose numpy calls cover every state, the shorter states padded
        (padding sits after each state's items, where the causal mask hides it). Returns the hidden states
        after the last (B, d) and the lists of continued keys and values (blocks, M + N, H, D). Exact only
        with positions from the start and ``M + N <= maxlen`` (the caller checks)."""
        if len(keys) > STATES_PER_PASS:
            parts = [self.advance(keys[i:i + STATES_PER_PASS], values[i:i + STATES_PER_PASS],
                                  new[i:i + STATES_PER_PASS]) for i in range(0, len(keys), STATES_PER_PASS)]
            return (np.concatenate([p[0] for p in parts]), [k for p in parts for k in p[1]],
                    [v for p in parts for v in p[2]])
        counts = np.array([k.shape[1] for k in keys], np.int64)
        width = int(counts.max())
        if len(keys) == 1:
            cached_keys, cached_values = keys[0][:, None], values[0][:, None]
        else:
            shape = (len(self.blocks), len(keys), width, self.num_heads, self.head_size)
            cached_keys, cached_values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            for b, (k, v) in enumerate(zip(keys, values)):
                cached_keys[:, b, : k.shape[1]], cached_values[:, b, : v.shape[1]] = k, v
        positions = counts[:, None] + np.arange(new.shape[1])
        hidden, all_keys, all_values = self._forward(new, positions, cached_keys, cached_values, counts)
        if len(keys) == 1:
            return hidden, [all_keys[:, 0]], [all_values[:, 0]]
        ends = counts + new.shape[1]
        return (hidden, [np.ascontiguousarray(all_keys[:, b, :end]) for b, end in enumerate(ends)],
                [np.ascontiguousarray(all_values[:, b, :end]) for b, end in enumerate(ends)])

    def _forward(self, ids, positions, cached_keys, cached_values, counts):
        """``ids``/``positions`` (B, N) after ``counts`` (B,) cached items whose keys/values are
        ``cached_*`` (blocks, B, M, H, D), padded past each row's count."""
        x = self.embedding[ids] * self.embedding_scale
        if self.position_embedding is not None:
            x = x + self.position_embedding[positions]
        all_keys, all_values = [], []
        for i, block in enumerate(self.blocks):
            x, block_keys, block_values = self._block(block, x, cached_keys[i], cached_values[i], counts,
                                                      last_only=i == len(self.blocks) - 1)
            all_keys.append(block_keys)
            all_values.append(block_values)
        return _layer_norm(x[:, -1], self.final_norm), np.stack(all_keys), np.stack(all_values)

    def _block(self, block: _Block, x, cached_keys, cached_values, counts, last_only: bool):
        batch, count = x.shape[:2]
        heads, size = self.num_heads, self.head_size
        kernel, bias = block.key_value
        projected = x @ kernel + bias
        new_keys = projected[..., : heads * size].reshape(batch, count, heads, size)
        new_values = projected[..., heads * size:].reshape(batch, count, heads, size)
        keys = np.concatenate([cached_keys, new_keys], axis=1)
        values = np.concatenate([cached_values, new_values], axis=1)
        if (counts != cached_keys.shape[1]).any():  # a shorter state's new items go right after its own
            rows, columns = np.arange(batch)[:, None], counts[:, None] + np.arange(count)
            keys[rows, columns], values[rows, columns] = new_keys, new_values
        rows = x[:, -1:] if last_only else x
        query = _layer_norm(rows, block.attention_norm) if block.pre_norm else rows
        query_index = counts[:, None] + np.arange(count - rows.shape[1], count)
        attended = self._attend(block, query, keys, values, query_index)
        if block.pre_norm:
            h = _layer_norm(query + attended, block.ffn_norm)
            return h + self._feed_forward(block, h), keys, values
        h = _layer_norm(query + attended, block.attention_norm)
        return _layer_norm(h + self._feed_forward(block, h), block.ffn_norm), keys, values

    @staticmethod
    def _feed_forward(block: _Block, h):
        (inner, inner_bias), (outer, outer_bias) = block.ffn_inner, block.ffn_outer
        return np.maximum(h @ inner + inner_bias, 0) @ outer + outer_bias

    def _attend(self, block: _Block, query, keys, values, query_index):
        """The attention output projection (B, N, d) of block queries ``query`` (B, N, d) at item indices
        ``query_index`` (B, N) over ``keys``/``values`` (B, M, H, D) of items 0..M-1 (causal: item j <=
        query's, which also hides each row's padding)."""
        batch, count = query.shape[:2]
        kernel, bias = block.query
        projected = (query @ kernel + bias).reshape(batch, count, self.num_heads, self.head_size)
        key_index = np.arange(keys.shape[1])
        distance = query_index[:, :, None] - key_index  # (B, N, M)
        mask = distance >= 0
        if block.window > 0:
            mask &= distance < block.window
        if self.position_bias == "rotary":
            projected, keys = _rotary(projected, query_index), _rotary(keys, key_index)
        if self.cosine:
            projected, keys = _unit(projected) * block.cosine_scale, _unit(keys)
        elif self.normalisation != "linear":
            projected = projected * np.float32(1.0 / math.sqrt(self.head_size))
        if self.normalisation == "linear":
            projected, keys = _elu_plus_one(projected), _elu_plus_one(keys)
        scores = np.matmul(projected.transpose(0, 2, 1, 3), keys.transpose(0, 2, 3, 1))  # (B, H, N, M)
        if self.position_bias == "relative":
            scores = scores + block.relative_bias[relative_bucket(distance)].transpose(0, 3, 1, 2)
        mask = mask[:, None]  # (B, 1, N, M): every head
        if self.normalisation == "silu":
            visible = np.maximum(mask.sum(axis=-1, keepdims=True), 1).astype(np.float32)
            sigmoid = 0.5 * (1 + np.tanh(0.5 * scores))  # no overflow warning where exp(-x) would
            weights = scores * sigmoid * mask / visible
        elif self.normalisation == "linear":
            scores = scores * mask
            total = scores.sum(axis=-1, keepdims=True)
            weights = scores / np.where(total > 0, total, 1)
        else:
            scores = np.where(mask, scores, np.float32(MASKED_SCORE))
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
        attended = np.matmul(weights, values.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # (B, N, H, D)
        kernel, bias = block.output
        return attended.reshape(batch, count, -1) @ kernel + bias

    def rank(self, hidden: np.ndarray | None, seen: np.ndarray, k: int, exclude_seen: bool,
             exclude_item_ids) -> tuple[np.ndarray, np.ndarray]:
        """The signatures' ranking: the top ``k`` item ids (str, ``""`` past the last candidate) and scores
        (``-inf`` there) of ``hidden``'s item scores, or of the popularity ranking for a cold start
        (``hidden`` None); never padding, OOV, ``exclude_item_ids`` or, with ``exclude_seen``, ``seen``
        (internal ids). Equal scores rank the lower internal id first, as ``tf.math.top_k``."""
        scores = self.popularity.copy() if hidden is None else self.embedding @ hidden
        scores[:FIRST_ITEM_ID] = -np.inf
        if exclude_seen:
            scores[seen] = -np.inf
        excluded = [self.index[x] for x in exclude_item_ids if x in self.index]
        scores[excluded] = -np.inf
        k = min(k, len(scores))
        if k < len(scores):
            threshold = scores[np.argpartition(-scores, k - 1)[:k]].min()
            candidates = np.flatnonzero(scores >= threshold)
        else:
            candidates = np.arange(len(scores))
        top = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
        top_scores = scores[top]
        return np.where(top_scores > -np.inf, self.vocab[top], ""), top_scores

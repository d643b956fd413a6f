"""Export a trained run as a TensorFlow SavedModel with the whole history rule inside the graph.

``sasrec export --run RUN --model-base models/NAME`` writes ``models/NAME/<N>/`` (the next integer
version, as TensorFlow Serving expects) atomically: the SavedModel is built in a hidden temporary
folder beside it and renamed into place, so a partial export is never visible to a server polling
the model base.

The ``serving_default`` signature is the one rule for histories, shared by the gRPC servicer and the
pandas batch scorer (both call it through :class:`sasrec.recommender.Recommender`):

inputs
    ``history`` string ``[B, L]``: external item ids, oldest first, right-padded with ``""``.
    ``k`` int32 scalar, ``exclude_seen`` bool scalar,
    ``exclude_item_ids`` string ``[B, E]`` (padded with ``""``).
outputs
    ``item_ids`` string ``[B, k]``, ``scores`` float32 ``[B, k]``: best first; when fewer than k
    candidates remain, trailing entries are ``""`` with score ``-inf``.
    ``unknown_count`` int32 ``[B]``: history ids not in the vocabulary (they are ignored).
    ``cold_start`` bool ``[B]``: the history had no known item, so the popularity ranking (share of
    training events) was returned instead of model scores.

Inside the graph: vocabulary lookup (a ``StaticHashTable``; unknown -> OOV, counted, then dropped),
padding ``""`` dropped, the most recent ``maxlen`` known items left-padded with 0 to the batch's
sequence width (the smallest of :func:`sequence_widths` that holds the longest known history: the
model cost grows faster than linearly with the width, and cutting left padding off changes no
score), only the last position scored (``model.score_last``), padding/OOV never returned, seen
items masked when ``exclude_seen``, ``exclude_item_ids`` masked, top-k with a run-time ``k``.

Two more signatures serve live histories (the server keeps each user's state, see
:class:`sasrec.recommender.AttentionState`), with the same ``k``/``exclude_seen``/``exclude_item_ids``
inputs and the same four outputs, computed by the same ranking code:

``encode_state`` (``history`` as above)
    also returns ``state_keys``/``state_values`` float32 ``[B, blocks, W, heads, d/heads]`` (each
    block's attention keys and values of the window), ``state_valid`` bool ``[B, W]``,
    ``state_hidden`` float32 ``[B, d]`` and ``history_ids`` int32 ``[B, L]`` (internal ids).
``advance_state``
    continues states by new events without re-encoding the window (SASRec is causal): ``items``
    string ``[B, N]`` (new events, right-padded with ``""``), ``offset`` int32 ``[B]`` (known items in
    the state), the state's ``state_keys``/``state_values``/``state_hidden`` (states right-padded to
    one length: a row's first ``offset`` slots are its items) and ``seen_ids`` int32 ``[B, S]`` (the
    history's internal ids). Returns the new items' keys, values and validity, the new hidden state,
    their ``history_ids``, and ``overflow`` bool ``[B]``: the continuation would not be exact (the window
    would slide past ``maxlen``, or positions count from the end and a known item arrived); such rows
    must be re-encoded. The card's ``incremental_state`` says whether positions allow continuing.

``explain`` (inputs of ``serving_default`` plus ``explain_items`` int32 scalar)
    ``serving_default``'s four outputs, computed by the same lookup, window and ranking code, plus
    ``explanation_item_ids`` string / ``explanation_weights`` float32 ``[B, k, n]`` (n =
    min(explain_items, window width)): for each returned item the history items that contributed most
    to its score, largest weight first (``""``/``-inf`` where there is none: a short history, a cold
    start, an empty slot of the top-k), by the card's ``explain_method`` (:mod:`sasrec.explain`);
    ``attention`` float32 ``[B, blocks, heads, W]`` (the last position's attention over the window in
    every block and head) and ``window_item_ids`` string ``[B, W]`` (the window, ``""`` for padding).
    ``serving_default`` is untouched: plain requests cost what they cost without it.

``recommend_timed`` (only a ``time_bias`` model, card ``"time_bias": true``; inputs of ``serving_default``
plus ``timestamps`` int64 ``[B, L]``)
    ``serving_default``'s four outputs with the time-gap bias on: ``timestamps`` holds each history
    event's time in seconds, aligned with ``history`` (any value for padding); a negative value means
    unknown, and a pair of events with an unknown time gets no bias. TensorFlow signatures have no
    optional inputs, so ``serving_default`` stays the call without times (every time unknown: the bias
    off, the model still answers). Only gaps matter: the graph rebases the window's times to its
    earliest known one (as :func:`sasrec.feed.rebase_times` does in training). ``explain`` takes no
    timestamps (it answers with the bias off), so the server refuses explanations of requests with
    timestamps.

``encode_state_timed`` / ``advance_state_timed`` (only a ``time_bias`` model)
    ``encode_state`` with ``timestamps`` int64 ``[B, L]`` aligned with ``history``, and ``advance_state``
    with ``timestamps`` int64 ``[B, N]`` aligned with ``items`` and ``state_times`` int64 ``[B, S]`` (the
    cached items' times, aligned with the state's slots; negative: unknown). Only gaps matter, so
    the graph rebases the cached and the new times to their earliest known one, as the stateless
    window does: a state advanced event by event answers as ``recommend_timed`` on the whole history.

The SavedModel needs neither this project's code nor Keras to load: ``tf.saved_model.load`` is enough.
Besides the signatures it tracks ``host_weights`` (the model's own variables by name) and the card has
``architecture``: what serving's numpy path for live histories reads (:mod:`sasrec.host_model`).
The model card ``assets/model_card.json`` holds the config, the data manifest, the metrics with their
protocol, the popularity ranking, ``max_k``, ``maxlen``, the export time and the source run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipelines.atomic import atomic_directory
from pipelines.dataset import FIRST_ITEM_ID, OOV_ID, PADDING_ID
from pipelines.errors import InputError
from sasrec.explain import (
    DEFAULT_METHOD,
    METHODS,
    OCCLUSION_CANDIDATES,
    attributions,
    block_inputs,
    last_hidden,
    last_position_attention,
    top_positions,
)
from sasrec.host_model import architecture, host_weights
from sasrec.model_base import (
    ADVANCE_SIGNATURE,
    ADVANCE_TIMED_SIGNATURE,
    CARD_FORMAT,
    ENCODE_SIGNATURE,
    ENCODE_TIMED_SIGNATURE,
    EXPLAIN_SIGNATURE,
    MODEL_CARD,
    SIGNATURE,
    TIMED_SIGNATURE,
    card_path,
    new_version_folder,
    sequence_widths,
)

POPULARITY_IN_CARD = 1000  # the card lists at most this many items of the popularity ranking


def popularity_scores(train_counts: np.ndarray) -> np.ndarray:
    """Cold-start scores: each item's share of training events; padding and OOV get ``-inf``."""
    counts = np.asarray(train_counts, dtype=np.float64)
    total = counts[FIRST_ITEM_ID:].sum()
    scores = counts / total if total > 0 else np.zeros_like(counts)
    scores = scores.astype(np.float32)
    scores[:FIRST_ITEM_ID] = -np.inf
    return scores


def popularity_ranking(item_ids: np.ndarray, train_counts: np.ndarray) -> list[int]:
    """Internal ids of real items by decreasing training count (ties: lower id first)."""
    counts = np.asarray(train_counts)[FIRST_ITEM_ID:]
    order = np.lexsort((np.arange(len(counts)), -counts))
    return (order + FIRST_ITEM_ID).tolist()


def build_serving_module(model, item_ids: np.ndarray, train_counts: np.ndarray, *, jit_compile: bool = False,
                         explain_method: str = DEFAULT_METHOD):
    """A ``tf.Module`` whose ``recommend`` tf.function implements the signature described above.

    ``model`` needs ``maxlen``, ``vocab_size`` and ``score_last(ids) -> (B, vocab_size)`` built from
    ``keras.ops`` (traceable with the TensorFlow backend). ``jit_compile`` compiles the scoring part
    (the model call) with XLA. ``explain_method``: the attribution method of the ``explain`` signature
    (one of :data:`sasrec.explain.METHODS`).
    """
    import tensorflow as tf

    if explain_method not in METHODS:
        raise InputError(f"explain method must be one of {', '.join(METHODS)}, got {explain_method!r}")

    vocab_size = int(model.vocab_size)
    maxlen = int(model.maxlen)
    item_ids = np.asarray(item_ids, dtype=object)
    if len(item_ids) != vocab_size:
        raise InputError(f"the model's vocab_size is {vocab_size} but the run's items.parquet has {len(item_ids)} ids")
    names = item_ids.astype(str)
    real = names[FIRST_ITEM_ID:]
    if len(set(real.tolist())) != len(real) or "" in set(real.tolist()):
        raise InputError("items.parquet: item ids must be unique and non-empty")

    module = tf.Module()
    module.table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(real, tf.string), tf.range(FIRST_ITEM_ID, vocab_size, dtype=tf.int32)
        ),
        default_value=OOV_ID,
    )
    vocab = names.copy()
    vocab[:FIRST_ITEM_ID] = ""  # placeholders are never returned; "" marks "no item"
    module.vocab = tf.Variable(vocab, trainable=False, name="vocab")
    module.popularity = tf.Variable(popularity_scores(train_counts), trainable=False, name="popularity")
    # Track the model's weights (not the Keras objects): the SavedModel then loads without Keras.
    module.model_variables = [getattr(v, "value", v) for v in model.variables]
    # The same variables by name, for serving's numpy path (sasrec.host_model); nothing is stored twice.
    module.host_weights = host_weights(model)

    def score(seq):
        return tf.cast(model.score_last(seq), tf.float32)

    score_fn = tf.function(score, jit_compile=True) if jit_compile else score
    widths = tf.constant(sequence_widths(maxlen), tf.int32)
    neg_inf = tf.constant(-np.inf, tf.float32)
    string_matrix = lambda name: tf.TensorSpec([None, None], tf.string, name=name)  # noqa: E731
    ranking_inputs = [
        tf.TensorSpec([], tf.int32, name="k"),
        tf.TensorSpec([], tf.bool, name="exclude_seen"),
        string_matrix("exclude_item_ids"),
    ]

    def lookup(history):
        """Internal ids of external ids ``[B, L]`` (``""`` -> padding, unknown -> OOV), which are known,
        and how many per row were unknown."""
        present = tf.not_equal(history, "")
        ids = tf.where(present, module.table.lookup(history), PADDING_ID)
        known = ids >= FIRST_ITEM_ID
        return ids, known, tf.reduce_sum(tf.cast(present & ~known, tf.int32), axis=1)

    def recent_known(ids, width, timestamps=None, origin=None):
        """The most recent ``width`` known items of ``ids`` ``[B, L]``, left-padded: rank positions with a
        known item by recency (top_k over position indices, -1 elsewhere), then put them back in time order.
        With ``timestamps`` (int64, aligned with ``ids``): also the model's timestamps of those items (gaps
        from ``origin`` ``[B, 1]``, default their earliest known time)."""
        short = tf.maximum(width - tf.shape(ids)[1], 0)
        padded = tf.pad(ids, [[0, 0], [short, 0]])
        positions = tf.range(tf.shape(padded)[1], dtype=tf.int32)[None, :]
        rank_key = tf.where(padded >= FIRST_ITEM_ID, positions, -1)
        top_pos, top_idx = tf.math.top_k(rank_key, k=width, sorted=True)
        top_pos = tf.reverse(top_pos, axis=[1])
        top_idx = tf.reverse(top_idx, axis=[1])
        seq = tf.ensure_shape(tf.where(top_pos >= 0, tf.gather(padded, top_idx, batch_dims=1), PADDING_ID), [None, None])
        if timestamps is None:
            return seq
        times = tf.gather(tf.pad(timestamps, [[0, 0], [short, 0]], constant_values=-1), top_idx, batch_dims=1)
        known = (seq != PADDING_ID) & (times >= 0)
        return seq, model_times(known, times, earliest(known, times) if origin is None else origin)

    def earliest(known, times):
        """Each row's earliest known time ``[B, 1]`` (int64 max where none is known)."""
        return tf.reduce_min(tf.where(known, times, tf.int64.max), axis=1, keepdims=True)

    def model_times(known, times, origin):
        """:func:`sasrec.feed.rebase_times` in the graph: int64 seconds as int32 gaps from ``origin``
        ``[B, 1]``; unknown (negative) times and padding (``known`` false) become -1."""
        gaps = tf.cast(tf.clip_by_value(times - origin, 0, tf.int32.max), tf.int32)
        return tf.where(known, gaps, -1)

    def window(ids, known, timestamps=None):
        """The model input for a batch of histories: the most recent known items, as wide as the
        smallest of ``widths`` that holds the batch's longest known history (at most ``maxlen``); with
        ``timestamps``, also their model timestamps."""
        longest = tf.minimum(tf.reduce_max(tf.reduce_sum(tf.cast(known, tf.int32), axis=1)), maxlen)
        return recent_known(ids, widths[tf.reduce_sum(tf.cast(widths < longest, tf.int32))], timestamps)

    def rank(logits, cold_start, seen_ids, k, exclude_seen, exclude_item_ids):
        """Top-k of the model's scores (popularity for cold starts), never returning padding, OOV, the
        excluded ids or, with ``exclude_seen``, ``seen_ids`` (the whole history, not only the window)."""
        batch = tf.shape(logits)[0]
        scores = tf.where(cold_start[:, None], module.popularity[None, :], logits)
        seen = seen_ids * tf.cast(exclude_seen, tf.int32)
        excluded = tf.where(
            tf.not_equal(exclude_item_ids, ""), module.table.lookup(exclude_item_ids), PADDING_ID
        )
        reserved = tf.broadcast_to(tf.range(FIRST_ITEM_ID)[None, :], tf.stack([batch, FIRST_ITEM_ID]))
        masked_ids = tf.concat([reserved, seen, excluded], axis=1)
        rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(masked_ids))
        scores = tf.tensor_scatter_nd_update(
            scores, tf.stack([rows, masked_ids], axis=-1), tf.fill(tf.shape(masked_ids), neg_inf)
        )
        top_k = tf.clip_by_value(k, 0, vocab_size)
        top_scores, top_ids = tf.math.top_k(scores, k=top_k, sorted=True)
        valid = top_scores > neg_inf
        return {
            "item_ids": tf.where(valid, tf.gather(module.vocab, top_ids), ""),
            "scores": top_scores,
            "cold_start": cold_start,
        }

    @tf.function(input_signature=[string_matrix("history")] + ranking_inputs)
    def recommend(history, k, exclude_seen, exclude_item_ids):
        ids, known, unknown_count = lookup(history)
        cold_start = tf.logical_not(tf.reduce_any(known, axis=1))
        out = rank(score_fn(window(ids, known)), cold_start, ids, k, exclude_seen, exclude_item_ids)
        return {**out, "unknown_count": unknown_count}

    @tf.function(input_signature=[string_matrix("history"), tf.TensorSpec([None, None], tf.int64, name="timestamps")]
                 + ranking_inputs)
    def recommend_timed(history, timestamps, k, exclude_seen, exclude_item_ids):
        ids, known, unknown_count = lookup(history)
        cold_start = tf.logical_not(tf.reduce_any(known, axis=1))
        seq, times = window(ids, known, timestamps)
        out = rank(score_fn({"ids": seq, "timestamps": times}), cold_start, ids, k, exclude_seen, exclude_item_ids)
        return {**out, "unknown_count": unknown_count}

    def logits_of(hidden):
        return tf.cast(model.item_logits(hidden), tf.float32)

    def encode(history, k, exclude_seen, exclude_item_ids, timestamps=None):
        ids, known, unknown_count = lookup(history)
        cold_start = tf.logical_not(tf.reduce_any(known, axis=1))
        if timestamps is None:
            hidden, keys, values, valid = model.encode_state(window(ids, known))
        else:
            hidden, keys, values, valid = model.encode_state(*window(ids, known, timestamps))
        out = rank(logits_of(hidden), cold_start, ids, k, exclude_seen, exclude_item_ids)
        return {
            **out, "unknown_count": unknown_count, "history_ids": ids, "state_hidden": tf.cast(hidden, tf.float32),
            "state_keys": tf.cast(keys, tf.float32), "state_values": tf.cast(values, tf.float32), "state_valid": valid,
        }

    @tf.function(input_signature=[string_matrix("history")] + ranking_inputs)
    def encode_state(history, k, exclude_seen, exclude_item_ids):
        return encode(history, k, exclude_seen, exclude_item_ids)

    @tf.function(input_signature=[string_matrix("history"), tf.TensorSpec([None, None], tf.int64, name="timestamps")]
                 + ranking_inputs)
    def encode_state_timed(history, timestamps, k, exclude_seen, exclude_item_ids):
        return encode(history, k, exclude_seen, exclude_item_ids, timestamps)

    state_inputs = [
        string_matrix("items"),
        tf.TensorSpec([None], tf.int32, name="offset"),
        tf.TensorSpec([None, None, None, None, None], tf.float32, name="state_keys"),
        tf.TensorSpec([None, None, None, None, None], tf.float32, name="state_values"),
        tf.TensorSpec([None, None], tf.float32, name="state_hidden"),
        tf.TensorSpec([None, None], tf.int32, name="seen_ids"),
    ]

    @tf.function(input_signature=state_inputs + ranking_inputs)
    def advance_state(items, offset, state_keys, state_values, state_hidden, seen_ids, k, exclude_seen,
                      exclude_item_ids):
        return advance(items, offset, state_keys, state_values, state_hidden, seen_ids, k, exclude_seen,
                       exclude_item_ids)

    @tf.function(input_signature=state_inputs + ranking_inputs + [
        tf.TensorSpec([None, None], tf.int64, name="timestamps"),
        tf.TensorSpec([None, None], tf.int64, name="state_times"),
    ])
    def advance_state_timed(items, offset, state_keys, state_values, state_hidden, seen_ids, k, exclude_seen,
                            exclude_item_ids, timestamps, state_times):
        return advance(items, offset, state_keys, state_values, state_hidden, seen_ids, k, exclude_seen,
                       exclude_item_ids, (timestamps, state_times))

    def advance(items, offset, state_keys, state_values, state_hidden, seen_ids, k, exclude_seen, exclude_item_ids,
                times=None):
        """``times``: None, or the new items' and the cached items' int64 times (a time_bias model)."""
        ids, known, unknown_count = lookup(items)
        # States are right-padded to one length: the first `offset` slots of each row are its cached items.
        state_valid = tf.range(tf.shape(state_keys)[2])[None, :] < offset[:, None]
        count = tf.reduce_sum(tf.cast(known, tf.int32), axis=1)
        width = tf.maximum(tf.reduce_max(count), 1)  # one column even when nothing is new
        new_times = cached_times = None
        if times is None:
            new = recent_known(ids, width)
        else:
            timestamps, state_times = times
            # One origin for the cached and the new items, the earliest known of both: the stateless window's.
            cached_known = state_valid & (state_times >= 0)
            origin = tf.minimum(earliest(cached_known, state_times), earliest(known & (timestamps >= 0), timestamps))
            new, new_times = recent_known(ids, width, timestamps, origin)
            cached_times = model_times(cached_known, state_times, origin)
        hidden, new_keys, new_values = model.advance_state(new, offset, state_keys, state_values, state_valid,
                                                           new_times, cached_times)
        hidden = tf.where((count > 0)[:, None], tf.cast(hidden, tf.float32), state_hidden)
        # The state cannot be continued exactly when the window would slide or positions count from the end.
        overflow = offset + count > maxlen
        if model.positions != "from_start":
            overflow = overflow | (count > 0)
        cold_start = (offset + count) == 0
        seen = tf.concat([seen_ids, ids], axis=1)
        out = rank(logits_of(hidden), cold_start, seen, k, exclude_seen, exclude_item_ids)
        return {
            **out, "unknown_count": unknown_count, "history_ids": ids, "state_hidden": hidden, "overflow": overflow,
            "state_keys": tf.cast(new_keys, tf.float32), "state_values": tf.cast(new_values, tf.float32),
            "state_valid": tf.not_equal(new, PADDING_ID),
        }

    @tf.function(input_signature=[string_matrix("history")] + ranking_inputs
                 + [tf.TensorSpec([], tf.int32, name="explain_items")])
    def explain(history, k, exclude_seen, exclude_item_ids, explain_items):
        ids, known, unknown_count = lookup(history)
        cold_start = tf.logical_not(tf.reduce_any(known, axis=1))
        seq = window(ids, known)
        # One pass through the blocks before the last, shared by the scores, attributions and attention.
        inputs, valid = block_inputs(model, seq)
        out = rank(logits_of(last_hidden(model, inputs[-1], valid, len(model.blocks) - 1)), cold_start, ids, k,
                   exclude_seen, exclude_item_ids)
        # The returned items' internal ids ("" -> padding: no item, its explanation is dropped below).
        targets = tf.where(tf.not_equal(out["item_ids"], ""), module.table.lookup(out["item_ids"]), PADDING_ID)
        weights = attributions(model, seq, inputs, valid, targets, explain_method,
                               candidates=tf.maximum(explain_items, OCCLUSION_CANDIDATES))
        positions, weights = top_positions(weights, explain_items)
        weights = tf.where((targets >= FIRST_ITEM_ID)[:, :, None], weights, neg_inf)
        window_ids = tf.gather(module.vocab, seq)
        return {
            **out, "unknown_count": unknown_count,
            "explanation_item_ids": tf.where(weights > neg_inf, tf.gather(window_ids, positions, batch_dims=1), ""),
            "explanation_weights": weights,
            "attention": tf.cast(last_position_attention(model, inputs, valid), tf.float32),
            "window_item_ids": window_ids,
        }

    module.recommend = recommend
    module.explain = explain
    module.encode_state = encode_state
    module.advance_state = advance_state
    if getattr(model, "time_bias", False):
        module.recommend_timed = recommend_timed
        module.encode_state_timed = encode_state_timed
        module.advance_state_timed = advance_state_timed
    return module


def model_card(
    *,
    model,
    item_ids: np.ndarray,
    train_counts: np.ndarray,
    config: dict,
    manifest: dict,
    metrics: dict | None,
    source_run: str,
    xla: bool = False,
    explain_method: str = DEFAULT_METHOD,
) -> dict:
    ranking = popularity_ranking(item_ids, train_counts)[:POPULARITY_IN_CARD]
    return {
        "format": CARD_FORMAT,
        "signature": SIGNATURE,
        "maxlen": int(model.maxlen),
        "vocab_size": int(model.vocab_size),
        "num_items": int(model.vocab_size) - FIRST_ITEM_ID,
        "max_k": int(model.vocab_size) - FIRST_ITEM_ID,
        "xla": bool(xla),
        # The attribution method of the explain signature (sasrec.explain; README, "Explanations").
        "explain_method": explain_method,
        # advance_state continues a state exactly only when positions count from the start.
        "incremental_state": model.positions == "from_start",
        # The recommend_timed signature: the model reads the events' timestamps (README, "Attention variants").
        "time_bias": bool(getattr(model, "time_bias", False)),
        # What serving's numpy path (sasrec.host_model) needs besides the weights in host_weights.
        "architecture": architecture(model),
        "sequence_widths": sequence_widths(model.maxlen),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_run": source_run,
        "config": config,
        "data_manifest": manifest,
        "metrics": metrics,
        "popularity": {
            "basis": "train_count (events in training histories); cold-start score = share of training events",
            "items": [{"item_id": str(item_ids[i]), "train_count": int(train_counts[i])} for i in ranking],
        },
    }


def export_model(
    model,
    model_base: str | os.PathLike,
    *,
    item_ids: np.ndarray,
    train_counts: np.ndarray,
    config: dict | None = None,
    manifest: dict | None = None,
    metrics: dict | None = None,
    source_run: str = "",
    version: int | None = None,
    jit_compile: bool = False,
    explain_method: str = DEFAULT_METHOD,
) -> Path:
    """Write ``model`` as the next (or given) version under ``model_base``; returns the version folder."""
    import tensorflow as tf

    target = new_version_folder(model_base, version)
    module = build_serving_module(model, item_ids, train_counts, jit_compile=jit_compile, explain_method=explain_method)
    card = model_card(
        model=model,
        item_ids=item_ids,
        train_counts=train_counts,
        config=config or {},
        manifest=manifest or {},
        metrics=metrics,
        source_run=source_run,
        xla=jit_compile,
        explain_method=explain_method,
    )
    with atomic_directory(target, overwrite=False) as tmp:
        card_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.card-", dir=Path(tmp).parent))
        card_file = card_dir / MODEL_CARD
        try:
            card_file.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
            module.model_card = tf.saved_model.Asset(str(card_file))
            signatures = {
                SIGNATURE: module.recommend.get_concrete_function(),
                ENCODE_SIGNATURE: module.encode_state.get_concrete_function(),
                EXPLAIN_SIGNATURE: module.explain.get_concrete_function(),
                ADVANCE_SIGNATURE: module.advance_state.get_concrete_function(),
            }
            if hasattr(module, "recommend_timed"):
                signatures[TIMED_SIGNATURE] = module.recommend_timed.get_concrete_function()
                signatures[ENCODE_TIMED_SIGNATURE] = module.encode_state_timed.get_concrete_function()
                signatures[ADVANCE_TIMED_SIGNATURE] = module.advance_state_timed.get_concrete_function()
            tf.saved_model.save(
                module,
                str(tmp),
                signatures=signatures,
                options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
            )
        finally:
            shutil.rmtree(card_dir, ignore_errors=True)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a server may run as another user
        # The asset keeps its file name; make sure the card sits where the model base's readers look.
        if not card_path(tmp).is_file():
            raise RuntimeError("model card missing from the SavedModel assets")
    return target


def export_run(
    run: str | os.PathLike,
    model_base: str | os.PathLike,
    *,
    version: int | None = None,
    jit_compile: bool = False,
    explain_method: str = DEFAULT_METHOD,
) -> Path:
    """``sasrec export``: the run's best model, vocabulary and card as the next version."""
    from sasrec.run import BEST_MODEL, RunFolder

    run = RunFolder(run)
    run.require(BEST_MODEL)
    item_ids, _counts, train_counts = run.items()
    return export_model(
        run.load_best(),
        model_base,
        item_ids=item_ids,
        train_counts=train_counts,
        config=run.config_tables(),
        manifest=run.manifest(),
        metrics=run.read_metrics(),
        source_run=str(run.path.resolve()),
        version=version,
        jit_compile=jit_compile,
        explain_method=explain_method,
    )

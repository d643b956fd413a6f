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

The SavedModel needs neither this project's code nor Keras to load: ``tf.saved_model.load`` is enough.
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
from sasrec.model_base import CARD_FORMAT, MODEL_CARD, SIGNATURE, card_path, new_version_folder, sequence_widths

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


def build_serving_module(model, item_ids: np.ndarray, train_counts: np.ndarray, *, jit_compile: bool = False):
    """A ``tf.Module`` whose ``recommend`` tf.function implements the signature described above.

    ``model`` needs ``maxlen``, ``vocab_size`` and ``score_last(ids) -> (B, vocab_size)`` built from
    ``keras.ops`` (traceable with the TensorFlow backend). ``jit_compile`` compiles the scoring part
    (the model call) with XLA.
    """
    import tensorflow as tf

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

    def score(seq):
        return tf.cast(model.score_last(seq), tf.float32)

    score_fn = tf.function(score, jit_compile=True) if jit_compile else score
    widths = tf.constant(sequence_widths(maxlen), tf.int32)
    neg_inf = tf.constant(-np.inf, tf.float32)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.string, name="history"),
            tf.TensorSpec([], tf.int32, name="k"),
            tf.TensorSpec([], tf.bool, name="exclude_seen"),
            tf.TensorSpec([None, None], tf.string, name="exclude_item_ids"),
        ]
    )
    def recommend(history, k, exclude_seen, exclude_item_ids):
        batch = tf.shape(history)[0]
        present = tf.not_equal(history, "")
        ids = tf.where(present, module.table.lookup(history), PADDING_ID)
        known = ids >= FIRST_ITEM_ID
        unknown_count = tf.reduce_sum(tf.cast(present & ~known, tf.int32), axis=1)
        cold_start = tf.logical_not(tf.reduce_any(known, axis=1))

        # The width: the smallest of `widths` that holds the batch's longest known history.
        longest = tf.minimum(tf.reduce_max(tf.reduce_sum(tf.cast(known, tf.int32), axis=1)), maxlen)
        width = widths[tf.reduce_sum(tf.cast(widths < longest, tf.int32))]
        # The most recent `width` known items, left-padded: rank positions with a known item by
        # recency (top_k over position indices, -1 elsewhere), then put them back in time order.
        short = tf.maximum(maxlen - tf.shape(ids)[1], 0)
        padded = tf.pad(ids, [[0, 0], [short, 0]])
        positions = tf.range(tf.shape(padded)[1], dtype=tf.int32)[None, :]
        rank_key = tf.where(padded >= FIRST_ITEM_ID, positions, -1)
        top_pos, top_idx = tf.math.top_k(rank_key, k=width, sorted=True)
        top_pos = tf.reverse(top_pos, axis=[1])
        top_idx = tf.reverse(top_idx, axis=[1])
        seq = tf.where(top_pos >= 0, tf.gather(padded, top_idx, batch_dims=1), PADDING_ID)
        seq = tf.ensure_shape(seq, [None, None])

        logits = score_fn(seq)
        scores = tf.where(cold_start[:, None], module.popularity[None, :], logits)

        # Mask seen items (the whole history given, not only the scored window), exclusions, and the
        # padding and OOV ids, which are never returned whatever the model gave them.
        seen = ids * tf.cast(exclude_seen, tf.int32)
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
        out_ids = tf.where(valid, tf.gather(module.vocab, top_ids), "")
        return {
            "item_ids": out_ids,
            "scores": top_scores,
            "unknown_count": unknown_count,
            "cold_start": cold_start,
        }

    module.recommend = recommend
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
) -> Path:
    """Write ``model`` as the next (or given) version under ``model_base``; returns the version folder."""
    import tensorflow as tf

    target = new_version_folder(model_base, version)
    module = build_serving_module(model, item_ids, train_counts, jit_compile=jit_compile)
    card = model_card(
        model=model,
        item_ids=item_ids,
        train_counts=train_counts,
        config=config or {},
        manifest=manifest or {},
        metrics=metrics,
        source_run=source_run,
        xla=jit_compile,
    )
    with atomic_directory(target, overwrite=False) as tmp:
        card_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.card-", dir=Path(tmp).parent))
        card_file = card_dir / MODEL_CARD
        try:
            card_file.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
            module.model_card = tf.saved_model.Asset(str(card_file))
            tf.saved_model.save(
                module,
                str(tmp),
                signatures={SIGNATURE: module.recommend.get_concrete_function()},
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
    )

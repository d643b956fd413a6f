"""Test helpers: a tiny self-contained run folder with a real (randomly initialised) SASRec."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipelines.dataset import FIRST_ITEM_ID, SequenceDataset, write_dataset
from sasrec.feed import pad_histories

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def item_names(num_items: int) -> list[str]:
    return [f"item-{i:04d}" for i in range(num_items)]


def publish_copy(version_dir: Path, model_base: Path, version: int) -> Path:
    """A copy of an exported version published as ``model_base/version`` the way `sasrec export` publishes
    (a hidden folder, then a rename): a new version for the server without the cost of another export."""
    staging = Path(model_base) / f".{version}.tmp-copy"
    shutil.copytree(version_dir, staging)
    return staging.rename(Path(model_base) / str(version))


def make_run(run: Path, *, num_items: int = 40, maxlen: int = 12, hidden_units: int = 16, seed: int = 0,
             positions: str = "from_end") -> Path:
    """Write RUN/{config.toml, best.keras, dataset/, metrics.json} like `sasrec train` does."""
    import keras

    from sasrec.model import SASRec

    rng = np.random.default_rng(seed)
    vocab = np.array(["", "<oov>", *item_names(num_items)], dtype=object)
    users = 30
    lengths = rng.integers(3, 20, users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(FIRST_ITEM_ID, len(vocab), offsets[-1]).astype(np.int32)
    # A skewed popularity so the cold-start ranking is well defined (no ties at the top).
    train_counts = np.zeros(len(vocab), np.int64)
    train_counts[FIRST_ITEM_ID:] = np.arange(num_items, 0, -1) * 3 + rng.integers(0, 2, num_items)
    ds = SequenceDataset(
        user_ids=np.array([f"u{i}" for i in range(users)], dtype=object),
        items=items,
        timestamps=np.arange(offsets[-1], dtype=np.int64),
        offsets=offsets,
        train_end=(lengths - 2).astype(np.int32),
        valid_end=(lengths - 1).astype(np.int32),
        item_ids=vocab,
        item_counts=train_counts + 2,
        train_counts=train_counts,
        manifest={"source": "tests/serving/helpers.py", "seed": seed},
    )
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    write_dataset(run / "dataset", ds)
    for name in ("sequences.parquet",):  # a run folder keeps only the manifest and the vocabulary
        (run / "dataset" / name).unlink()
    keras.utils.set_random_seed(seed)
    model = SASRec(vocab_size=len(vocab), maxlen=maxlen, hidden_units=hidden_units, num_blocks=2, num_heads=1,
                   dropout=0.2, positions=positions, name="sasrec")
    model.build((None, maxlen))
    model.save(run / "best.keras")
    (run / "config.toml").write_text(
        f"maxlen = {maxlen}\nhidden_units = {hidden_units}\nnum_blocks = 2\nnum_heads = 1\ndropout = 0.2\n"
        f"positions = \"{positions}\"\n"
    )
    (run / "metrics.json").write_text(json.dumps({
        "test": {"full": {"NDCG@10": 0.1, "HR@10": 0.2}},
        "protocol": {"split": "leave-one-out", "candidates": "all items, seen items excluded"},
    }))
    return run


def reference_topk(model, vocab: np.ndarray, history: list[str], k: int, exclude_seen: bool = True,
                   exclude: list[str] = ()) -> tuple[list[str], np.ndarray]:
    """The history rule written out in plain Python/numpy on the Keras model, padded by the training and
    evaluation code's own rule: the oracle that ties the SavedModel graph to it."""
    index = {name: i for i, name in enumerate(vocab) if i >= FIRST_ITEM_ID}
    known = [index[h] for h in history if h in index]
    ids = pad_histories([known], model.maxlen)  # the padding rule of training and evaluation
    scores = np.asarray(model.score_last(ids))[0].astype(np.float64)
    if not known:
        raise ValueError("cold start: no model scores")
    mask = np.zeros(len(vocab), bool)
    mask[:FIRST_ITEM_ID] = True
    if exclude_seen:
        mask[known] = True
    mask[[index[e] for e in exclude if e in index]] = True
    scores[mask] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    order = [i for i in order if np.isfinite(scores[i])]
    return [str(vocab[i]) for i in order], scores[order]


def same_answer(answer, direct) -> None:
    """Two RecommendResponses agree item for item, score for score within 1e-4 (a cached attention state's
    rounding), flags and version."""
    assert [i.item_id for i in answer.items] == [i.item_id for i in direct.items]
    np.testing.assert_allclose([i.score for i in answer.items], [i.score for i in direct.items], atol=1e-4)
    assert (answer.unknown_history_ids, answer.cold_start, answer.model_version) == (
        direct.unknown_history_ids, direct.cold_start, direct.model_version)

"""Load an exported SavedModel and recommend: the one Python path to the ``serving_default`` signature.

The gRPC servicer and batch scoring both go through :class:`Recommender`, and all history rules
(vocabulary, unknown ids, truncation, padding, seen items, cold start) live in the SavedModel graph
(see :mod:`sasrec.export`), so every caller gets the same answer for the same history.

    rec = Recommender.load("models/ml-1m")          # newest version, or a version folder
    rec.recommend(["1193", "661"], k=10)            # -> Recommendation(items=[(id, score), ...], ...)
    rec.recommend_batch([[...], [...]], k=10)       # -> BatchResult of numpy arrays

TensorFlow is imported when a model is loaded, not when this module is imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipelines.errors import InputError

SIGNATURE = "serving_default"
MODEL_CARD = "model_card.json"


@dataclass
class Recommendation:
    """Top items for one history, best first (never padding, unknown or excluded ids)."""

    items: list[tuple[str, float]]
    unknown_count: int = 0
    cold_start: bool = False

    @property
    def item_ids(self) -> list[str]:
        return [item for item, _ in self.items]


@dataclass
class BatchResult:
    """Raw signature outputs for B histories: trailing ``""`` ids (score ``-inf``) mean "no item"."""

    item_ids: np.ndarray  # (B, k) object: str
    scores: np.ndarray  # (B, k) float32
    unknown_count: np.ndarray  # (B,) int32
    cold_start: np.ndarray  # (B,) bool

    def row(self, i: int) -> Recommendation:
        ids, scores = self.item_ids[i], self.scores[i]
        n = int(np.count_nonzero(ids != ""))
        return Recommendation(
            items=[(str(ids[j]), float(scores[j])) for j in range(n)],
            unknown_count=int(self.unknown_count[i]),
            cold_start=bool(self.cold_start[i]),
        )

    def __len__(self) -> int:
        return len(self.unknown_count)


def resolve_version(path: str | os.PathLike) -> tuple[Path, int | None]:
    """``path`` is a version folder (holds ``saved_model.pb``) or a model base (newest integer version)."""
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path, int(path.name) if path.name.isdigit() else None
    from sasrec.export import list_versions

    versions = list_versions(path)
    if not versions:
        raise InputError(f"{path}: neither a SavedModel nor a model base with integer version folders")
    return path / str(versions[-1]), versions[-1]


def _pad(rows: Sequence[Sequence[str]], min_width: int = 0) -> np.ndarray:
    width = max([len(r) for r in rows] + [min_width])
    out = np.full((len(rows), width), "", dtype=object)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = list(row)
    return out


class Recommender:
    """A loaded SavedModel version and its model card."""

    def __init__(self, loaded, path: Path, version: int | None, card: dict):
        self._loaded = loaded
        self._fn = loaded.signatures[SIGNATURE]
        self.path = path
        self.version = version
        self.card = card
        self.maxlen = int(card.get("maxlen", 0))
        self.num_items = int(card.get("num_items", 0))
        self.max_k = int(card.get("max_k", self.num_items))
        # An XLA-compiled signature compiles once per batch size: pad batches to a few bucket sizes.
        self.xla = bool(card.get("xla", False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recommender":
        version_dir, version = resolve_version(path)
        card_path = version_dir / "assets" / MODEL_CARD
        if not card_path.is_file():
            raise InputError(f"{version_dir}: no assets/{MODEL_CARD}; export it with `sasrec export`")
        card = json.loads(card_path.read_text())
        import tensorflow as tf

        loaded = tf.saved_model.load(str(version_dir))
        if SIGNATURE not in loaded.signatures:
            raise InputError(f"{version_dir}: no {SIGNATURE!r} signature")
        return cls(loaded, version_dir, version, card)

    def call(self, history: np.ndarray, k: int, exclude_seen: bool, exclude_item_ids: np.ndarray) -> dict:
        """Call the signature on padded string arrays; returns its output tensors as numpy arrays."""
        import tensorflow as tf

        out = self._fn(
            history=tf.constant(history, tf.string),
            k=tf.constant(k, tf.int32),
            exclude_seen=tf.constant(bool(exclude_seen)),
            exclude_item_ids=tf.constant(exclude_item_ids, tf.string),
        )
        return {name: value.numpy() for name, value in out.items()}

    def recommend_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        exclude_seen: bool = True,
        exclude_item_ids: Sequence[str] | Sequence[Sequence[str]] = (),
    ) -> BatchResult:
        """Top-k for each history (oldest item first). ``exclude_item_ids`` is one list for all rows
        or one list per row."""
        if not histories:
            return BatchResult(
                np.empty((0, k), object), np.empty((0, k), np.float32), np.empty(0, np.int32), np.empty(0, bool)
            )
        if not 1 <= k <= self.max_k:
            raise InputError(f"k must be in 1..{self.max_k}, got {k}")
        if exclude_item_ids and not isinstance(exclude_item_ids[0], str):
            excl = _pad(exclude_item_ids)
            if len(excl) != len(histories):
                raise InputError("exclude_item_ids: give one list for all histories or one per history")
        else:
            excl = np.tile(_pad([list(exclude_item_ids)]), (len(histories), 1))
        n = len(histories)
        hist = _pad(histories)
        if self.xla and bucket_size(n) != n:
            extra = bucket_size(n) - n
            hist = np.concatenate([hist, np.full((extra, hist.shape[1]), "", dtype=object)])
            excl = np.concatenate([excl, np.full((extra, excl.shape[1]), "", dtype=object)])
        out = self.call(hist, k, exclude_seen, excl)
        ids = out["item_ids"][:n]
        return BatchResult(
            item_ids=np.array([[x.decode("utf-8") for x in row] for row in ids], dtype=object).reshape(ids.shape),
            scores=out["scores"][:n],
            unknown_count=out["unknown_count"][:n],
            cold_start=out["cold_start"][:n],
        )

    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        exclude_seen: bool = True,
        exclude_item_ids: Sequence[str] = (),
    ) -> Recommendation:
        return self.recommend_batch([list(history)], k, exclude_seen, [list(exclude_item_ids)]).row(0)

    def warm_up(self, max_batch_size: int = 64, k: int = 10) -> None:
        """Run the signature once per batch bucket up to ``max_batch_size`` so first requests are fast."""
        popular = [p["item_id"] for p in self.card.get("popularity", {}).get("items", [])[:5]]
        k = max(1, min(k, self.max_k))
        sizes = sorted({bucket_size(b) for b in range(1, max_batch_size + 1)})
        for b in sizes:
            self.recommend_batch([popular + ["<warm-up-unknown>"]] * b, k=k, exclude_seen=True)


def bucket_size(n: int) -> int:
    """Batch sizes an XLA signature is compiled for: 1, 2, 4, 8, then multiples of 8."""
    if n <= 8:
        return 1 << max(0, (n - 1).bit_length())
    return (n + 7) // 8 * 8

"""Load an exported SavedModel and recommend: the one Python path to the ``serving_default`` signature.

The gRPC servicer and batch scoring both go through :class:`Recommender`, and all history rules
(vocabulary, unknown ids, truncation, padding, seen items, cold start) live in the SavedModel graph
(see :mod:`sasrec.export`), so every caller gets the same answer for the same history.

    rec = Recommender.load("models/ml-1m")          # newest version, or a version folder
    rec.recommend(["1193", "661"], k=10)            # -> [(item id, score), ...] (a Recommendation list)
    rec.recommend_batch([[...], [...]], k=10)       # -> BatchResult of numpy arrays
    rec.score_frame(events, k=10)                   # -> long frame user_id, rank, item_id, score, ...
    rec.recommend(["1193", "661"], timestamps=[978300760, 978302109])  # a time_bias model reads them

``score_frame`` turns a pandas frame (events or list-valued histories) into padded string batches
with numpy and calls the same signature in bounded chunks; it never re-implements a history rule.

TensorFlow is imported when a model is loaded, not when this module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.dataset import FIRST_ITEM_ID
from pipelines.errors import InputError
from sasrec import host_model
from sasrec.catalog import bounded_rows
from sasrec.model_base import (
    ADVANCE_SIGNATURE,
    ADVANCE_TIMED_SIGNATURE,
    ENCODE_SIGNATURE,
    ENCODE_TIMED_SIGNATURE,
    EXPLAIN_SIGNATURE,
    SIGNATURE,
    TIMED_SIGNATURE,
    read_card,
    resolve_version,
)

DEFAULT_CHUNK_SIZE = 1024  # users per signature call in score_frame
DEFAULT_EXPLAIN_ITEMS = 3  # history items per recommended item in an explanation
MAX_EXPLAIN_ITEMS = 50
UNKNOWN_TIMESTAMP = -1  # recommend_timed: a negative timestamp is unknown (no time bias for its pairs)


class Recommendation(list):
    """Top items for one history, best first (never padding, unknown or excluded ids): a list of
    ``(item id, score)`` tuples that also carries ``unknown_count`` and ``cold_start``."""

    def __init__(self, items=(), unknown_count: int = 0, cold_start: bool = False, explanations=None):
        super().__init__(items)
        self.unknown_count = unknown_count
        self.cold_start = cold_start
        # With explain: per returned item, [(history item id, weight), ...] largest weight first.
        self.explanations = explanations

    @property
    def items(self) -> list[tuple[str, float]]:
        return list(self)

    @property
    def item_ids(self) -> list[str]:
        return [item for item, _ in self]

    def __repr__(self) -> str:
        return (f"Recommendation({list.__repr__(self)}, unknown_count={self.unknown_count}, "
                f"cold_start={self.cold_start})")


@dataclass
class BatchResult:
    """Raw signature outputs for B histories: trailing ``""`` ids (score ``-inf``) mean "no item"."""

    item_ids: np.ndarray  # (B, k) object: str
    scores: np.ndarray  # (B, k) float32
    unknown_count: np.ndarray  # (B,) int32
    cold_start: np.ndarray  # (B,) bool
    # The explain signature only: (B, k, n) history item ids ("" = none) and weights, largest first;
    # the last position's attention (B, blocks, heads, W) over the window's items (B, W) ("" = padding).
    explanation_item_ids: np.ndarray | None = None
    explanation_weights: np.ndarray | None = None
    attention: np.ndarray | None = None
    window_item_ids: np.ndarray | None = None

    def explanations(self, i: int) -> list[list[tuple[str, float]]] | None:
        """Row ``i``'s explanation of each returned item: ``[(history item id, weight), ...]``."""
        if self.explanation_item_ids is None:
            return None
        n = int(np.count_nonzero(self.item_ids[i] != ""))
        return [[(str(item), float(weight)) for item, weight in zip(ids, weights) if item != ""]
                for ids, weights in zip(self.explanation_item_ids[i][:n], self.explanation_weights[i][:n])]

    def row(self, i: int) -> Recommendation:
        ids, scores = self.item_ids[i], self.scores[i]
        n = int(np.count_nonzero(ids != ""))
        return Recommendation(
            items=[(str(ids[j]), float(scores[j])) for j in range(n)],
            unknown_count=int(self.unknown_count[i]),
            cold_start=bool(self.cold_start[i]),
            explanations=self.explanations(i),
        )

    def __len__(self) -> int:
        return len(self.unknown_count)

    @classmethod
    def of(cls, out: dict, rows=slice(None)) -> BatchResult:
        """The result in a signature's raw numpy outputs (``rows`` of them)."""
        ids = out["item_ids"][rows]
        explained = "explanation_item_ids" in out
        return cls(
            item_ids=_strings(ids),
            scores=out["scores"][rows],
            unknown_count=out["unknown_count"][rows],
            cold_start=out["cold_start"][rows],
            explanation_item_ids=_strings(out["explanation_item_ids"][rows]) if explained else None,
            explanation_weights=out["explanation_weights"][rows] if explained else None,
            attention=out["attention"][rows] if explained else None,
            window_item_ids=_strings(out["window_item_ids"][rows]) if explained else None,
        )


def _strings(values: np.ndarray) -> np.ndarray:
    """A signature's bytes array as str, same shape."""
    return np.array([x.decode("utf-8") for x in values.reshape(-1)], dtype=object).reshape(values.shape)


@dataclass
class AttentionState:
    """What a model version computed for one user's history, so that new events continue it instead of
    re-encoding the window (the ``encode_state``/``advance_state`` signatures of :mod:`sasrec.export`).

    ``keys``/``values``: every block's attention keys and values of the window's known items
    (blocks, M, heads, d/heads), kept only while a new event can continue them (positions from the start
    and a window under maxlen), else M = 0: any new known item re-encodes the window anyway, so a full
    window, or every window of a model whose positions count from the end, is kept without them;
    ``length``: the known items in the window (-1 when constructed: M); ``hidden``: the state after the
    last one (d,); ``seen_ids``: internal ids of every known item of the history (``exclude_seen`` covers
    the whole history, not the window); ``unknown_count``: history ids not in the vocabulary;
    ``version``: the model version that made it (a state never answers for another version); ``times``: a
    time_bias model's state items' times in seconds (int64, aligned with ``keys``, negative: unknown),
    else None.
    """

    version: int | None
    keys: np.ndarray
    values: np.ndarray
    hidden: np.ndarray
    seen_ids: np.ndarray
    unknown_count: int
    times: np.ndarray | None = None
    length: int = -1

    def __post_init__(self):
        if self.length < 0:
            self.length = int(self.keys.shape[1])

    @property
    def nbytes(self) -> int:
        return (self.keys.nbytes + self.values.nbytes + self.hidden.nbytes + self.seen_ids.nbytes
                + (0 if self.times is None else self.times.nbytes))


def _known(ids: np.ndarray) -> np.ndarray:
    return ids[ids >= FIRST_ITEM_ID].astype(np.int32)


def _known_times(times: np.ndarray | None, row: int, ids: np.ndarray, count: int) -> np.ndarray | None:
    """The times of the last ``count`` known items of row ``row`` (``ids``: its internal ids, aligned with
    ``times``), or None without times."""
    if times is None:
        return None
    known = times[row][ids >= FIRST_ITEM_ID]
    return known[len(known) - count:]


def _stack_padded(arrays: list[np.ndarray], axis: int, dtype=None) -> np.ndarray:
    """``arrays`` stacked on a new first axis, zero-padded at the end of ``axis`` to the longest."""
    longest = max(a.shape[axis] for a in arrays)
    shape = (len(arrays),) + arrays[0].shape[:axis] + (longest,) + arrays[0].shape[axis + 1:]
    out = np.zeros(shape, dtype=dtype or arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i,) + (slice(None),) * axis + (slice(0, a.shape[axis]),)] = a
    return out


def _timestamp_rows(timestamps, histories, shape) -> np.ndarray:
    """``timestamps`` (per history: ints or None) as an int64 matrix of ``shape`` aligned with the padded
    histories, :data:`UNKNOWN_TIMESTAMP` where unknown or padding; InputError naming a row that does not
    match its history."""
    if len(timestamps) != len(histories):
        raise InputError(f"timestamps: {len(timestamps)} rows for {len(histories)} histories")
    out = np.full(shape, UNKNOWN_TIMESTAMP, dtype=np.int64)
    for i, (times, history) in enumerate(zip(timestamps, histories)):
        if times is None:
            continue
        if len(times) != len(history):
            raise InputError(f"timestamps[{i}]: {len(times)} timestamps for a history of {len(history)} items")
        out[i, : len(times)] = [UNKNOWN_TIMESTAMP if t is None else t for t in times]
    return out


def _pad(rows: Sequence[Sequence[str]], min_width: int = 0, num_rows: int = 0) -> np.ndarray:
    """Rows padded with "" to one width; ``num_rows`` adds empty rows (XLA batch buckets), which is
    far cheaper here than padding the string tensor in TensorFlow."""
    width = max([len(r) for r in rows] + [min_width])
    out = np.full((max(len(rows), num_rows), width), "", dtype=object)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = list(row)
    return out


class Recommender:
    """A loaded SavedModel version and its model card."""

    def __init__(self, loaded, path: Path, version: int | None, card: dict, host=None, host_reason: str = ""):
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
        # States computed in numpy (sasrec.host_model) instead of the state signatures, or None and why not.
        self.host = host
        self.host_reason = host_reason

    @classmethod
    def load(cls, path: str | os.PathLike, host: bool = True) -> Recommender:
        """``host``: compute attention states (:meth:`encode_states`, :meth:`advance_states`) in numpy when the
        export allows it (:mod:`sasrec.host_model`); False: always through the state signatures."""
        version_dir, version = resolve_version(path)
        card = read_card(version_dir)
        import tensorflow as tf

        loaded = tf.saved_model.load(str(version_dir))
        if SIGNATURE not in loaded.signatures:
            raise InputError(f"{version_dir}: no {SIGNATURE!r} signature")
        model, reason = host_model.load(loaded, card) if host else (None, "turned off")
        return cls(loaded, version_dir, version, card, model, reason)

    def call(self, history: np.ndarray, k: int, exclude_seen: bool, exclude_item_ids: np.ndarray,
             explain_items: int = 0, timestamps: np.ndarray | None = None) -> dict:
        """Call the signature (``explain`` when ``explain_items`` > 0, ``recommend_timed`` with
        ``timestamps``: int64 aligned with ``history``) on padded arrays; returns its output tensors as
        numpy arrays."""
        import tensorflow as tf

        if timestamps is not None and explain_items > 0:
            raise InputError("timestamps: explanations read no timestamps; explain without them")

        inputs = dict(
            history=tf.convert_to_tensor(history, tf.string),
            k=tf.constant(k, tf.int32),
            exclude_seen=tf.constant(bool(exclude_seen)),
            exclude_item_ids=tf.convert_to_tensor(exclude_item_ids, tf.string),
        )
        if explain_items > 0:
            out = self._explain_fn()(**inputs, explain_items=tf.constant(explain_items, tf.int32))
        elif timestamps is not None:
            out = self._loaded.signatures[TIMED_SIGNATURE](**inputs, timestamps=tf.convert_to_tensor(timestamps, tf.int64))
        else:
            out = self._fn(**inputs)
        return {name: value.numpy() for name, value in out.items()}

    @cached_property  # a loaded version's signatures and card do not change
    def reads_timestamps(self) -> bool:
        """A ``time_bias`` model: the export has ``recommend_timed`` and timestamps change its answers."""
        return TIMED_SIGNATURE in self._loaded.signatures

    @cached_property
    def explains(self) -> bool:
        """The export has the ``explain`` signature (:meth:`explain_batch`)."""
        return EXPLAIN_SIGNATURE in self._loaded.signatures

    def _explain_fn(self):
        if not self.explains:
            raise InputError(f"{self.path}: this model version has no {EXPLAIN_SIGNATURE!r} signature "
                             f"(exported before explanations): export it again with `sasrec export`")
        return self._loaded.signatures[EXPLAIN_SIGNATURE]

    @staticmethod
    def check_explain_items(explain_items: int) -> int:
        if isinstance(explain_items, bool) or not 1 <= int(explain_items) <= MAX_EXPLAIN_ITEMS:
            raise InputError(f"explain_items must be in 1..{MAX_EXPLAIN_ITEMS}, got {explain_items!r}")
        return int(explain_items)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise InputError(f"k must be in 1..{self.max_k}, got {k}")

    def _call_rows(self, hist, excl, k: int, exclude_seen: bool, n: int | None = None, explain_items: int = 0,
                   times=None) -> dict:
        """The signature on padded rows (numpy arrays or string tensors; ``times``: int64 aligned with
        ``hist``, or None), with the XLA bucket padding added where missing; returns the first ``n``
        (default all) rows of the raw numpy outputs."""
        given = int(hist.shape[0])
        n = given if n is None else n
        if self.xla and bucket_size(given) != given:
            import tensorflow as tf

            extra = bucket_size(given) - given
            hist = tf.pad(tf.convert_to_tensor(hist, tf.string), [[0, extra], [0, 0]])
            excl = tf.pad(tf.convert_to_tensor(excl, tf.string), [[0, extra], [0, 0]])
            if times is not None:
                times = tf.pad(tf.convert_to_tensor(times, tf.int64), [[0, extra], [0, 0]],
                               constant_values=UNKNOWN_TIMESTAMP)
        out = self.call(hist, k, exclude_seen, excl, explain_items, times)
        return {name: value[:n] for name, value in out.items()}

    def recommend_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        exclude_seen: bool = True,
        exclude_item_ids: Sequence[str] | Sequence[Sequence[str]] = (),
        explain_items: int = 0,
        timestamps: Sequence[Sequence[int] | None] | None = None,
    ) -> BatchResult:
        """Top-k for each history (oldest item first). ``exclude_item_ids`` is one list for all rows
        or one list per row. ``explain_items`` > 0: through the ``explain`` signature, with that many
        history items explaining each returned item (:meth:`explain_batch`). ``timestamps``: per history,
        its events' times in seconds (one per item; negative: unknown) or None (unknown), read by a
        ``time_bias`` model (:attr:`reads_timestamps`) through ``recommend_timed``; other models answer
        the same without them."""
        if explain_items:
            self.check_explain_items(explain_items)
            self._explain_fn()
        if not histories:
            return BatchResult(
                np.empty((0, k), object), np.empty((0, k), np.float32), np.empty(0, np.int32), np.empty(0, bool)
            )
        self._check_k(k)
        n = len(histories)
        rows = bucket_size(n) if self.xla else n
        if len(exclude_item_ids) and not isinstance(exclude_item_ids[0], str):
            if len(exclude_item_ids) != n:
                raise InputError("exclude_item_ids: give one list for all histories or one per history")
            excl = _pad(exclude_item_ids, num_rows=rows)
        else:
            excl = np.tile(_pad([list(exclude_item_ids)]), (rows, 1))
        hist = _pad(histories, num_rows=rows)
        times = self._times_read(histories, timestamps, hist.shape)
        return BatchResult.of(self._call_rows(hist, excl, k, exclude_seen, n=n, explain_items=explain_items,
                                              times=times))

    def explain_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        exclude_seen: bool = True,
        exclude_item_ids: Sequence[str] | Sequence[Sequence[str]] = (),
        explain_items: int = DEFAULT_EXPLAIN_ITEMS,
    ) -> BatchResult:
        """:meth:`recommend_batch` (the same items and scores) plus, for each returned item, the
        ``explain_items`` history items that contributed most to its score, with their weights (the
        card's ``explain_method``), and the last position's attention over the window per block and head.
        A cold start (no known history item) has no explanation."""
        return self.recommend_batch(histories, k, exclude_seen, exclude_item_ids,
                                    explain_items=self.check_explain_items(explain_items))

    def explain(self, history: Sequence[str], k: int = 10, exclude_seen: bool = True,
                exclude_item_ids: Sequence[str] = (), explain_items: int = DEFAULT_EXPLAIN_ITEMS) -> Recommendation:
        """One history's :class:`Recommendation` with ``explanations``."""
        return self.explain_batch([list(history)], k, exclude_seen, [list(exclude_item_ids)], explain_items).row(0)

    @cached_property
    def keeps_state(self) -> bool:
        """The export has the live-history signatures (:meth:`encode_states`, :meth:`advance_states`); a
        time_bias model needs their timed forms (exports before them keep no state)."""
        needed = [ENCODE_SIGNATURE, ADVANCE_SIGNATURE]
        if self.reads_timestamps:
            needed += [ENCODE_TIMED_SIGNATURE, ADVANCE_TIMED_SIGNATURE]
        return all(name in self._loaded.signatures for name in needed)

    @cached_property
    def advances_state(self) -> bool:
        """New events continue a state exactly (positions from the start); else any new event re-encodes."""
        return self.keeps_state and bool(self.card.get("incremental_state", False))

    def _ranking_inputs(self, n: int, k: int, exclude_seen: bool, exclude_item_ids) -> dict:
        import tensorflow as tf

        self._check_k(k)
        return dict(k=tf.constant(k, tf.int32), exclude_seen=tf.constant(bool(exclude_seen)),
                    exclude_item_ids=tf.convert_to_tensor(_pad(exclude_item_ids, num_rows=n), tf.string))

    def _times_read(self, rows: Sequence[Sequence[str]], timestamps, shape: tuple, always: bool = False):
        """``timestamps`` (checked against ``rows``) as the int64 matrix of ``shape`` a time_bias model reads,
        or None: none given (``always``: every time unknown instead, for the timed state signatures), or a
        model without time_bias, which has no use for them."""
        if timestamps is None and not (always and self.reads_timestamps):
            return None
        times = _timestamp_rows([None] * len(rows) if timestamps is None else timestamps, rows, shape)
        return times if self.reads_timestamps else None

    def encode_states(self, histories: Sequence[Sequence[str]], k: int, exclude_seen: bool,
                      exclude_item_ids: Sequence[Sequence[str]],
                      timestamps: Sequence[Sequence[int] | None] | None = None) -> tuple[BatchResult, list[AttentionState]]:
        """:meth:`recommend_batch` (one exclusion list per row) and each history's attention state;
        ``timestamps`` as in :meth:`recommend_batch` (a time_bias model keeps them with the state)."""
        import tensorflow as tf

        padded = _pad(histories)
        times = self._times_read(histories, timestamps, padded.shape, always=True)
        if self.host is not None:
            return self._host_encode([self.host.lookup(history) for history in histories], k, exclude_seen,
                                     exclude_item_ids)
        timed = {} if times is None else {"timestamps": tf.constant(times)}
        fn = self._loaded.signatures[ENCODE_TIMED_SIGNATURE if timed else ENCODE_SIGNATURE]
        out = fn(history=tf.convert_to_tensor(padded, tf.string), **timed,
                 **self._ranking_inputs(len(histories), k, exclude_seen, exclude_item_ids))
        out = {name: value.numpy() for name, value in out.items()}
        states = []
        for i in range(len(histories)):
            valid = out["state_valid"][i]
            states.append(self._kept(AttentionState(
                version=self.version,
                keys=out["state_keys"][i][:, valid],
                values=out["state_values"][i][:, valid],
                hidden=out["state_hidden"][i],
                seen_ids=_known(out["history_ids"][i]),
                unknown_count=int(out["unknown_count"][i]),
                # The window holds the most recent known items: the last `valid.sum()` known times.
                times=_known_times(times, i, out["history_ids"][i], int(valid.sum())),
            )))
        return BatchResult.of(out), states

    def advance_states(self, states: Sequence[AttentionState], new_items: Sequence[Sequence[str]], k: int,
                       exclude_seen: bool, exclude_item_ids: Sequence[Sequence[str]],
                       timestamps: Sequence[Sequence[int] | None] | None = None):
        """Continue each state by its new items (oldest first) and recommend for the longer history;
        ``timestamps``: the new items' times (a time_bias model).

        Returns ``(BatchResult, new states)``; a row whose state cannot be continued exactly (the
        window would slide past ``maxlen``, or positions count from the end) has ``None`` as its state
        and its result row is meaningless: re-encode that history with :meth:`encode_states`.
        """
        import tensorflow as tf

        if any(state.version != self.version for state in states):
            raise ValueError("an attention state of another model version")
        padded = _pad(new_items)
        times = self._times_read(new_items, timestamps, padded.shape, always=True)
        if self.host is not None:
            return self._host_advance(states, new_items, k, exclude_seen, exclude_item_ids)
        # A time_bias model's states always carry their times (encode_states reads them the same way).
        timed = {} if times is None else {"timestamps": tf.constant(times), "state_times": tf.constant(
            _stack_padded([s.times for s in states], axis=0, dtype=np.int64))}
        fn = self._loaded.signatures[ADVANCE_TIMED_SIGNATURE if timed else ADVANCE_SIGNATURE]
        out = fn(
            items=tf.convert_to_tensor(padded, tf.string),
            offset=tf.constant([state.length for state in states], tf.int32),
            state_keys=tf.constant(_stack_padded([s.keys for s in states], axis=1)),
            state_values=tf.constant(_stack_padded([s.values for s in states], axis=1)),
            state_hidden=tf.constant(np.stack([s.hidden for s in states])),
            seen_ids=tf.constant(_stack_padded([s.seen_ids for s in states], axis=0, dtype=np.int32)),
            **timed,
            **self._ranking_inputs(len(states), k, exclude_seen, exclude_item_ids),
        )
        out = {name: value.numpy() for name, value in out.items()}
        out["unknown_count"] = out["unknown_count"] + np.array([s.unknown_count for s in states], np.int32)
        advanced = []
        for i, state in enumerate(states):
            if out["overflow"][i]:  # also every state kept without keys that a known item reaches
                advanced.append(None)
                continue
            new = out["state_valid"][i]
            new_times = _known_times(times, i, out["history_ids"][i], int(new.sum()))
            advanced.append(self._kept(AttentionState(
                version=self.version,
                keys=np.concatenate([state.keys, out["state_keys"][i][:, new]], axis=1),
                values=np.concatenate([state.values, out["state_values"][i][:, new]], axis=1),
                hidden=out["state_hidden"][i],
                seen_ids=np.concatenate([state.seen_ids, _known(out["history_ids"][i])]),
                unknown_count=int(out["unknown_count"][i]),
                times=None if new_times is None else np.concatenate([state.times, new_times]),
                length=state.length + int(new.sum()),
            )))
        return BatchResult.of(out), advanced

    def _kept(self, state: AttentionState) -> AttentionState:
        """``state`` without its keys and values (and their times) when no new event can continue it."""
        if self.advances_state and state.length < self.maxlen:
            return state
        return replace(state, keys=state.keys[:, :0], values=state.values[:, :0],
                       times=None if state.times is None else state.times[:0])

    def state_route(self, state: AttentionState | None, new_events: Sequence[str]) -> str:
        """How a stored history with a cached ``state`` (None: none) and ``new_events`` it has not seen is
        answered: ``"continue"`` the state; or without it, and why: ``"miss"``, ``"new_version"`` (a state never
        answers for another version), ``"positions_from_end"`` (every event shifts them), ``"window_full"``
        (the state fills maxlen: any known event slides the window)."""
        if state is None:
            return "miss"
        if state.version != self.version:
            return "new_version"
        if new_events and not self.advances_state:
            return "positions_from_end"
        if new_events and state.length >= self.maxlen:
            return "window_full"
        return "continue"

    def recommend_stored(self, requests: Sequence[tuple]) -> list[tuple[BatchResult, int, AttentionState, str]]:
        """Stored histories in numpy (:attr:`host`), each request ``(history, state, new_events, k,
        exclude_seen, exclude_item_ids)``: its cached ``state`` continued by ``new_events`` (the end of
        ``history`` it has not seen) where that is exact, else the history encoded. ``history`` may be None
        when ``state`` is of this version: the stored history is then the state's followed by ``new_events``
        (a caller that read only those from its store), which re-encodes from the state's item ids. The states that continue
        advance together (one numpy pass per number of new events, :meth:`sasrec.host_model.HostModel.advance`).
        Per request: a result, its row there (at least its ``k`` columns), the state after ``history`` and
        how it was obtained (``"continued"`` or a :meth:`state_route` reason for encoding)."""
        answers: list = [None] * len(requests)
        routes = [self.state_route(state, new) for _, state, new, _, _, _ in requests]
        for flag in (False, True):  # exclude_seen is one flag per call of the helpers below
            group = [i for i, request in enumerate(requests) if bool(request[4]) == flag]
            if not group:
                continue
            k = max(requests[i][3] for i in group)
            going_on = [i for i in group if routes[i] == "continue"]
            if going_on:
                out, advanced = self._host_advance([requests[i][1] for i in going_on],
                                                   [list(requests[i][2]) for i in going_on], k, flag,
                                                   [requests[i][5] for i in going_on])
                for row, (i, state) in enumerate(zip(going_on, advanced)):
                    if state is None:
                        routes[i] = "window_full"  # the new events' known items overflow maxlen
                    else:
                        answers[i] = (out, row, state, "continued")
            encoding = [i for i in group if answers[i] is None]
            if encoding:
                out, encoded = self._host_encode([self._stored_ids(*requests[i][:3]) for i in encoding], k, flag,
                                                 [requests[i][5] for i in encoding])
                for row, (i, state) in enumerate(zip(encoding, encoded)):
                    answers[i] = (out, row, state, routes[i])
        return answers

    def _stored_ids(self, history, state: AttentionState | None, new_events) -> tuple[np.ndarray, int]:
        """A stored history's known internal ids and its count of unknown ids: ``history`` looked up, or
        without it the ids of ``state`` (of this version) followed by those of ``new_events``."""
        if history is not None:
            return self.host.lookup(history)
        if state is None or state.version != self.version:
            raise ValueError("a stored history without its events needs a state of this model version")
        known, unknown = self.host.lookup(new_events)
        return np.concatenate([state.seen_ids, known]), state.unknown_count + unknown

    def _host_encode(self, lookups, k: int, exclude_seen: bool, exclude_item_ids) -> tuple[BatchResult, list]:
        """:meth:`encode_states` in numpy, one history at a time, each given as ``(known ids, unknown count)``."""
        self._check_k(k)
        host = self.host
        rows, states = [], []
        for (known, unknown), exclude in zip(lookups, exclude_item_ids):
            window = known[max(0, len(known) - self.maxlen):]
            hidden, keys, values = host.encode(window) if len(window) else host.empty_state()
            states.append(self._kept(AttentionState(self.version, keys, values, hidden, known, unknown)))
            rows.append(host.rank(hidden if len(window) else None, known, k, exclude_seen, exclude)
                        + (unknown, not len(window)))
        return _host_result(rows, k), states

    def _host_advance(self, states, new_items, k: int, exclude_seen: bool, exclude_item_ids) -> tuple[BatchResult, list]:
        """:meth:`advance_states` in numpy: the states that gain known items advance together, per number
        of new known items."""
        self._check_k(k)
        host = self.host
        lookups = [host.lookup(new) for new in new_items]
        moving: dict[int, list[int]] = {}  # number of new known items -> states
        for i, (state, (known, _)) in enumerate(zip(states, lookups)):
            # The states _kept left their keys to (the same test), while the window has room for the new items.
            if len(known) and self.advances_state and state.length + len(known) <= self.maxlen:
                moving.setdefault(len(known), []).append(i)
        continued = {}
        for indices in moving.values():
            hidden, keys, values = host.advance([states[i].keys for i in indices],
                                                [states[i].values for i in indices],
                                                np.stack([lookups[i][0] for i in indices]))
            continued.update((i, (hidden[j], keys[j], values[j])) for j, i in enumerate(indices))
        rows, advanced = [], []
        for i, (state, (known, unknown), exclude) in enumerate(zip(states, lookups, exclude_item_ids)):
            unknown += state.unknown_count
            if len(known) and i not in continued:
                advanced.append(None)  # the window would slide, or positions count from the end: re-encode
                rows.append((np.full(k, "", object), np.full(k, -np.inf, np.float32), unknown, False))
                continue
            hidden, keys, values = continued.get(i, (state.hidden, state.keys, state.values))
            seen = np.concatenate([state.seen_ids, known])
            cold = state.length + len(known) == 0
            advanced.append(self._kept(AttentionState(self.version, keys, values, hidden, seen, unknown,
                                                      length=state.length + len(known))))
            rows.append(host.rank(None if cold else hidden, seen, k, exclude_seen, exclude) + (unknown, cold))
        return _host_result(rows, k), advanced

    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        exclude_seen: bool = True,
        exclude_item_ids: Sequence[str] = (),
        timestamps: Sequence[int] | None = None,
    ) -> Recommendation:
        return self.recommend_batch([list(history)], k, exclude_seen, [list(exclude_item_ids)],
                                    timestamps=None if timestamps is None else [list(timestamps)]).row(0)

    def score_frame(
        self,
        df: pd.DataFrame,
        k: int = 10,
        *,
        user_col: str = "user_id",
        item_col: str = "item_id",
        time_col: str | None = "timestamp",
        history_col: str | None = None,
        exclude_col: str | None = None,
        exclude_item_ids: Sequence[str] = (),
        exclude_seen: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        sort_by_length: bool = True,
        progress: bool | None = None,
        explain: bool = False,
        explain_items: int = DEFAULT_EXPLAIN_ITEMS,
    ) -> pd.DataFrame:
        """Top-k for every user of ``df``, as a long frame, through the same signature as the service.

        ``df`` is either

        - an **events frame**: one row per event with ``user_col``, ``item_col`` and, when present,
          ``time_col`` (a history is the user's events sorted by time, ties in row order; without a time
          column, row order). ``time_col=None`` ignores any time column; a ``time_col`` other than the
          default that is not in ``df`` is an error; or
        - a **history frame**: one row per user with ``user_col`` and a list-valued ``history_col``
          (oldest first; ``None``/NaN is an empty history). Chosen when ``history_col`` is given, or
          when ``df`` has no ``item_col`` but a ``"history"`` column.

        A ``time_bias`` model (:attr:`reads_timestamps`) also reads each event's time from ``time_col``
        of an events frame (numbers: seconds, as in the training data; dates); with ``explain`` it refuses
        them (explanations read no times: pass ``time_col=None``). History frames carry no times, so the
        bias is off for them.

        Item ids are compared as strings (``1193`` and ``"1193"`` are the same item; integral floats
        such as ``1193.0`` are read as integers). Unknown ids are ignored and counted, the last
        ``maxlen`` known items are scored and users with no known item get the popularity ranking
        (``cold_start``): those rules live in the SavedModel signature, as for the gRPC service.

        Exclusions: ``exclude_item_ids`` (one list for everyone) and/or ``exclude_col``, a list-valued
        column (events frame: the value on the user's first row is used). ``exclude_seen`` masks every
        item of the history.

        Users are scored ``chunk_size`` at a time (one signature call per chunk; fewer on large
        catalogs, so that a chunk's scores over every item stay bounded: ``sasrec.catalog.bounded_rows``). With
        ``sort_by_length`` chunks hold users of similar history length, so little padding is sent;
        the output order does not change. ``progress``: a tqdm bar on stderr (``None``: only for
        more than 8 chunks and a terminal).

        Returns one row per recommended item: ``user_id`` (the values and dtype of ``user_col``, users in
        order of first appearance), ``rank`` (int32, 1 = best), ``item_id`` (str), ``score``
        (float32), ``cold_start`` (bool, per user) and ``unknown_count`` (int32, per user: history ids
        not in the vocabulary). A user gets fewer than ``k`` rows only when fewer items are left after
        exclusions (none at all: the user is absent).

        ``explain``: through the ``explain`` signature (the same items and scores), with two more
        list-valued columns per row: ``explanation_item_ids`` (the ``explain_items`` history items that
        contributed most to that item's score, largest first; empty for a cold start) and
        ``explanation_weights`` (float32, their weights: see README, "Explanations").
        """
        self._check_k(int(k))
        if chunk_size < 1:
            raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
        if not isinstance(df, pd.DataFrame):
            raise InputError(f"score_frame needs a pandas DataFrame, got {type(df).__name__}")
        batch = frame_histories(df, user_col=user_col, item_col=item_col, time_col=time_col,
                                history_col=history_col, exclude_col=exclude_col)
        explain_items = self.check_explain_items(explain_items) if explain else 0
        if explain:
            self._explain_fn()
            if batch.times is not None and self.reads_timestamps:
                # The explain signature reads no times: its scores would not be this model's answer.
                raise InputError("explain: explanations of a time_bias model read no timestamps; score without "
                                 "explain, or explain without times (time_col=None)")
        return self._score_histories(batch, int(k), exclude_seen=exclude_seen, exclude_item_ids=exclude_item_ids,
                                     chunk_size=chunk_size, sort_by_length=sort_by_length, progress=progress,
                                     explain_items=explain_items)

    def _score_histories(self, batch: FrameHistories, k: int, *, exclude_seen: bool, exclude_item_ids,
                         chunk_size: int, sort_by_length: bool, progress: bool | None,
                         explain_items: int = 0) -> pd.DataFrame:
        import tensorflow as tf

        n = batch.num_users
        chunk_size = bounded_rows(chunk_size, self.num_items + FIRST_ITEM_ID)
        item_table = tf.constant(batch.item_table)  # unique history ids (+ "" for padding), as bytes
        global_excl = [x for x in _id_strings(list(exclude_item_ids)) if x != ""]
        if batch.exclude_offsets is not None:
            excl_table = tf.constant(batch.exclude_table)
        lengths = np.diff(batch.offsets)
        order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(n)
        # Per chunk, only the valid entries are kept, ids as one compact Arrow array (not n * k Python
        # objects); they are put back in the input's user order at the end.
        parts: list[tuple] = []
        unknown_out = np.zeros(n, dtype=np.int32)
        cold_out = np.zeros(n, dtype=bool)
        starts = range(0, n, chunk_size)
        bar = _progress_bar(len(starts), n, progress)
        try:
            for start in starts:
                rows = order[start : start + chunk_size]
                hist = tf.gather(item_table, _padded_codes(batch.offsets, batch.item_codes, rows,
                                                           len(batch.item_table) - 1))
                if batch.exclude_offsets is not None:
                    excl = tf.gather(excl_table, _padded_codes(batch.exclude_offsets, batch.exclude_codes, rows,
                                                               len(batch.exclude_table) - 1))
                    if global_excl:
                        tail = tf.broadcast_to(tf.constant(global_excl)[None, :], [len(rows), len(global_excl)])
                        excl = tf.concat([excl, tail], axis=1)
                else:
                    excl = np.broadcast_to(np.array(global_excl, dtype=object)[None, :], (len(rows), len(global_excl)))
                times = None
                if batch.times is not None and self.reads_timestamps:
                    times = _padded_codes(batch.offsets, batch.times, rows, UNKNOWN_TIMESTAMP)
                out = self._call_rows(hist, excl, k, exclude_seen, explain_items=explain_items, times=times)
                parts.append(_chunk_part(out["item_ids"], out["scores"])
                             + (_explanation_part(out, explain_items) if explain_items else ()))
                unknown_out[rows] = out["unknown_count"]
                cold_out[rows] = out["cold_start"]
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        return _long_frame(batch.users, order, parts, k, unknown_out, cold_out)

    def warm_up(self, max_batch_size: int = 64, k: int = 10) -> None:
        """Run the signature once per batch bucket up to ``max_batch_size`` and sequence width (an XLA
        signature compiles once per shape) so first requests are fast."""
        popular = [p["item_id"] for p in self.card.get("popularity", {}).get("items", [])[:1]]
        k = max(1, min(k, self.max_k))
        sizes = sorted({bucket_size(b) for b in range(1, max_batch_size + 1)})
        # Models exported before widths were recorded always score at maxlen.
        widths = self.card.get("sequence_widths") or [self.maxlen]
        for b in sizes:
            for width in widths:
                self.recommend_batch([popular * width + ["<warm-up-unknown>"]] * b, k=k, exclude_seen=True)
                if self.reads_timestamps:  # recommend_timed is a signature of its own
                    self.recommend_batch([popular * width + ["<warm-up-unknown>"]] * b, k=k, exclude_seen=True,
                                         timestamps=[list(range(len(popular) * width + 1))] * b)
        if self.keeps_state:
            _, states = self.encode_states([popular], k, True, [[]])
            self.advance_states(states, [popular + ["<warm-up-unknown>"]], k, True, [[]])


def _host_result(rows: list[tuple], k: int) -> BatchResult:
    """Rows of (item ids, scores, unknown count, cold start) of :class:`~sasrec.host_model.HostModel` as a
    :class:`BatchResult`, padded to ``k`` columns (``""``, ``-inf``) as the signatures' are."""
    ids = np.full((len(rows), k), "", dtype=object)
    scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for i, (row_ids, row_scores, _, _) in enumerate(rows):
        ids[i, : len(row_ids)], scores[i, : len(row_scores)] = row_ids, row_scores
    return BatchResult(ids, scores, np.array([r[2] for r in rows], np.int32), np.array([r[3] for r in rows], bool))


def bucket_size(n: int) -> int:
    """Batch sizes an XLA signature is compiled for: 1, 2, 4, 8, then multiples of 8."""
    if n <= 8:
        return 1 << max(0, (n - 1).bit_length())
    return (n + 7) // 8 * 8


# ---------------------------------------------------------------------------------------------------
# pandas frames -> CSR histories (numpy, no per-event Python loop) -> padded string batches


@dataclass
class FrameHistories:
    """Histories of ``num_users`` users as CSR codes into ``item_table`` (bytes; last entry ``b""``)."""

    users: pd.Index  # unique users, in order of first appearance (the input's dtype)
    offsets: np.ndarray  # (U + 1,) int64
    item_codes: np.ndarray  # (events,) int64: rows of item_table, oldest first per user
    item_table: np.ndarray  # (I + 1,) object bytes; item_table[-1] == b""
    exclude_offsets: np.ndarray | None = None
    exclude_codes: np.ndarray | None = None
    exclude_table: np.ndarray | None = None
    # Events frames with a time column: each event's time in seconds, aligned with item_codes.
    times: np.ndarray | None = None

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1


def _require(df: pd.DataFrame, column: str, what: str) -> None:
    if column not in df.columns:
        cols = ", ".join(repr(str(c)) for c in list(df.columns)[:20])
        raise InputError(f"missing column {column!r} ({what}); the frame has columns: {cols or 'none'}")


def _id_strings(ids) -> pd.Index:
    """External ids (any dtype) as strings, the one rule for ids given in a frame or a list: a float
    column of integral values is read as integers (``1193.0`` is item ``"1193"``)."""
    values = pd.Index(ids)
    if values.dtype.kind == "f":
        finite = values.to_numpy(dtype=np.float64)
        if np.all(finite == np.round(finite)):
            values = pd.Index(finite.astype(np.int64))
    return values.astype(str)


def _id_table(uniques) -> np.ndarray:
    """External ids (any dtype) as UTF-8 bytes, plus ``b""`` at the end for padding."""
    return np.array([x.encode("utf-8") for x in _id_strings(uniques)] + [b""], dtype=object)


def _time_key(series: pd.Series, column: str) -> np.ndarray:
    if series.isna().any():
        raise InputError(f"column {column!r}: {int(series.isna().sum())} missing timestamps")
    kind = series.dtype.kind
    if kind in "iub":
        return series.to_numpy(dtype=np.int64)
    if kind == "f":
        return series.to_numpy(dtype=np.float64)
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        kind = "M"
    if kind == "M":
        return series.to_numpy(dtype="datetime64[ns]").view(np.int64)
    try:
        parsed = pd.to_datetime(series, utc=True)
    except (ValueError, TypeError) as exc:
        raise InputError(f"column {column!r}: timestamps must be numbers or dates ({exc})") from None
    return parsed.dt.tz_localize(None).to_numpy().astype("datetime64[ns]").view(np.int64)


def _list_column(series: pd.Series, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list-valued column as (offsets, codes, id table); ``None``/NaN rows are empty lists."""
    import pyarrow as pa

    arr = None
    try:
        arr = pa.array(series, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        arr = None
    if arr is not None and isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr is not None and not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
                                or pa.types.is_fixed_size_list(arr.type) or pa.types.is_null(arr.type)):
        arr = None
    if arr is None:
        # Find the first offending row for the message, or fall back to Python for mixed element types.
        values = series.to_numpy(dtype=object)
        flat: list[str] = []
        lengths = np.zeros(len(values), np.int64)
        for i, value in enumerate(values):
            if value is None or (isinstance(value, float) and np.isnan(value)):
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
                raise InputError(
                    f"column {column!r} must hold a list of item ids per row; row {i} "
                    f"(user at position {i}) holds {type(value).__name__} {str(value)[:40]!r}"
                )
            items = [str(x) for x in value]
            flat.extend(items)
            lengths[i] = len(items)
        codes, uniques = pd.factorize(pd.Series(flat, dtype=object), sort=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return offsets, codes.astype(np.int64), _id_table(uniques)
    if pa.types.is_null(arr.type):
        offsets = np.zeros(len(arr) + 1, np.int64)
        return offsets, np.zeros(0, np.int64), _id_table([])
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_values = arr.flatten()
    if flat_values.null_count:
        raise InputError(f"column {column!r}: {flat_values.null_count} missing item ids inside the lists")
    codes, uniques = pd.factorize(flat_values.to_pandas(), sort=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, codes.astype(np.int64), _id_table(uniques)


def frame_histories(
    df: pd.DataFrame,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    history_col: str | None = None,
    exclude_col: str | None = None,
) -> FrameHistories:
    """Events or list-valued histories -> :class:`FrameHistories` (see :meth:`Recommender.score_frame`)."""
    if history_col is None and item_col not in df.columns and "history" in df.columns:
        history_col = "history"
    if user_col not in df.columns and df.index.name == user_col:
        df = df.reset_index()
    _require(df, user_col, "user ids")
    if len(df) == 0:
        raise InputError("the input frame is empty: no users to score")
    users = df[user_col]
    if users.isna().any():
        raise InputError(f"column {user_col!r}: {int(users.isna().sum())} missing user ids")
    if exclude_col is not None:
        _require(df, exclude_col, "per-user exclusion lists")

    if history_col is not None:
        _require(df, history_col, "list-valued histories, oldest first")
        duplicated = users.duplicated()
        if duplicated.any():
            raise InputError(f"column {user_col!r}: user {users[duplicated].iloc[0]!r} has more than one "
                             f"history row (a history frame has one row per user)")
        offsets, codes, table = _list_column(df[history_col], history_col)
        out = FrameHistories(pd.Index(users.array), offsets, codes, table)
        first_rows = None
    else:
        _require(df, item_col, "events frame: one row per event with user, item[, timestamp]; for one row "
                               "per user with a list of item ids, name that column with history_col / --history-col")
        items = df[item_col]
        user_codes, uniques = pd.factorize(users, sort=False)
        item_codes, item_uniques = pd.factorize(items, sort=False)
        if (item_codes < 0).any():
            raise InputError(f"column {item_col!r}: {int((item_codes < 0).sum())} missing item ids")
        if time_col is not None and time_col not in df.columns and time_col != "timestamp":
            _require(df, time_col, "event times")
        n = len(uniques)
        counts = np.bincount(user_codes, minlength=n)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        grouped = bool(np.all(user_codes[1:] >= user_codes[:-1]))
        if time_col is not None and time_col in df.columns:
            ts = _time_key(df[time_col], time_col)
            in_order = grouped and bool(np.all((ts[1:] >= ts[:-1]) | (user_codes[1:] != user_codes[:-1])))
            perm = None if in_order else np.lexsort((ts, user_codes))  # stable: ties keep row order
        else:
            perm = None if grouped else np.argsort(user_codes, kind="stable")
        codes = item_codes.astype(np.int64) if perm is None else item_codes[perm].astype(np.int64)
        out = FrameHistories(pd.Index(uniques), offsets, codes, _id_table(item_uniques))
        if time_col is not None and time_col in df.columns:
            # Numbers are seconds (as in the training data); dates come as nanoseconds.
            seconds = (np.floor(ts).astype(np.int64) if df[time_col].dtype.kind in "iuf"
                       else np.floor_divide(ts, 10**9))
            out.times = seconds if perm is None else seconds[perm]
        first_rows = None
        if exclude_col is not None:
            first_rows = np.empty(n, np.int64)
            first_rows[user_codes[::-1]] = np.arange(len(user_codes) - 1, -1, -1)
    if exclude_col is not None:
        column = df[exclude_col] if first_rows is None else df[exclude_col].iloc[first_rows].reset_index(drop=True)
        out.exclude_offsets, out.exclude_codes, out.exclude_table = _list_column(column, exclude_col)
    return out


def _padded_codes(offsets: np.ndarray, codes: np.ndarray, rows: np.ndarray, pad: int) -> np.ndarray:
    """Right-padded (len(rows), max length) matrix of codes for ``rows``; ``pad`` fills the rest."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    width = int(lengths.max()) if len(rows) else 0
    if width == 0 or len(codes) == 0:
        return np.full((len(rows), max(width, 0)), pad, dtype=np.int64)
    cols = np.arange(width)
    index = np.minimum(starts[:, None] + cols[None, :], len(codes) - 1)
    return np.where(cols[None, :] < lengths[:, None], codes[index], pad)


def _progress_bar(chunks: int, users: int, progress: bool | None):
    import sys

    if progress is None:
        progress = chunks > 8 and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=users, unit="user", desc="scoring", file=sys.stderr, smoothing=0.1)


def _chunk_part(ids: np.ndarray, scores: np.ndarray) -> tuple:
    """One chunk's signature outputs -> (items per row, valid ids as an Arrow binary array, valid scores)."""
    import pyarrow as pa

    valid = ids != b""  # trailing "" means fewer than k items were left
    return valid.sum(axis=1), pa.array(ids[valid], type=pa.binary()), scores[valid].astype(np.float32)


def _explanation_part(out: dict, explain_items: int) -> tuple:
    """One chunk's explanations of its valid items: ids (m, explain_items) bytes and weights, padded with
    ``b""``/-inf to ``explain_items`` (the signature returns at most the window's width)."""
    valid = out["item_ids"] != b""
    ids, weights = out["explanation_item_ids"][valid], out["explanation_weights"][valid]
    short = explain_items - ids.shape[1]
    if short > 0:
        ids = np.pad(ids, [(0, 0), (0, short)], constant_values=b"")
        weights = np.pad(weights, [(0, 0), (0, short)], constant_values=-np.inf)
    return ids, weights.astype(np.float32)


def _list_columns(ids: np.ndarray, weights: np.ndarray) -> tuple:
    """(m, n) explanation matrices (``b""`` = none, always after the real entries) -> two Arrow-backed
    list columns."""
    import pyarrow as pa

    present = ids != b""
    offsets = pa.array(np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32))
    names = pa.ListArray.from_arrays(offsets, pa.array(ids[present], type=pa.binary()).cast(pa.string()))
    values = pa.ListArray.from_arrays(offsets, pa.array(weights[present], type=pa.float32()))
    return pd.arrays.ArrowExtensionArray(names), pd.arrays.ArrowExtensionArray(values)


def _long_frame(users: pd.Index, order: np.ndarray, parts: list[tuple], k: int, unknown: np.ndarray,
                cold: np.ndarray) -> pd.DataFrame:
    """Chunks scored in ``order`` (user positions) -> the long frame in the input's user order."""
    import pyarrow as pa

    n = len(users)
    per_user_processed = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    per_user = np.zeros(n, np.int64)
    per_user[order] = per_user_processed
    # Where each user's rows start in the processed (chunk) order, then the gather index in user order.
    start_processed = np.concatenate([[0], np.cumsum(per_user_processed)[:-1]]).astype(np.int64)
    start = np.zeros(n, np.int64)
    start[order] = start_processed
    owner = np.repeat(np.arange(n), per_user)
    first_row = np.concatenate([[0], np.cumsum(per_user)[:-1]]).astype(np.int64)
    within = np.arange(len(owner), dtype=np.int64) - np.repeat(first_row, per_user)
    take = start[owner] + within
    ids = pa.concat_arrays([p[1] for p in parts]) if parts else pa.array([], pa.binary())
    scores = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
    item_ids = ids.take(pa.array(take)).cast(pa.string())
    frame = pd.DataFrame({
        "user_id": users.take(owner).array,
        "rank": (within + 1).astype(np.int32),
        "item_id": pd.Series(item_ids, dtype=pd.StringDtype("pyarrow", na_value=np.nan)).array,
        "score": scores[take],
        "cold_start": cold[owner],
        "unknown_count": unknown[owner].astype(np.int32),
    })
    if parts and len(parts[0]) > 3:  # explain: the explanation matrices of each chunk's valid items
        explained = np.concatenate([p[3] for p in parts])[take], np.concatenate([p[4] for p in parts])[take]
        frame["explanation_item_ids"], frame["explanation_weights"] = _list_columns(*explained)
    return frame

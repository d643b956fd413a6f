"""Splits: per-user ``train_end`` / ``valid_end`` boundaries over sequences in CSR form.

``items[:train_end]`` is training history, ``items[train_end:valid_end]`` validation targets,
``items[valid_end:]`` test targets (positions relative to the user's start).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pipelines.errors import InputError

SPLIT_PROTOCOLS = ("leave-one-out", "temporal")
DEFAULT_VALIDATION = "as many events as the test window, just before it"


def leave_one_out_split(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Last event = test, second-to-last = validation; users with fewer than 3 events train only."""
    lengths = np.asarray(lengths, dtype=np.int64)
    short = lengths < 3
    train_end = np.where(short, lengths, lengths - 2).astype(np.int32)
    valid_end = np.where(short, lengths, lengths - 1).astype(np.int32)
    return train_end, valid_end


class EventTimes(Protocol):
    """The order statistics a temporal cut needs: the number of events, the k-th smallest time
    (0-based) and the number of events before a time. :class:`SortedTimes` answers them from an array in
    memory; the Dask engine answers them from its workers, so both engines cut at the same times."""

    n: int

    def kth(self, k: int) -> int: ...

    def count_before(self, time: int) -> int: ...


class SortedTimes:
    def __init__(self, timestamps: np.ndarray):
        self.ordered = np.sort(np.asarray(timestamps))
        self.n = len(self.ordered)

    def kth(self, k: int) -> int:
        return int(self.ordered[k])

    def count_before(self, time: int) -> int:
        return int(np.searchsorted(self.ordered, time, side="left"))


def lower_quantile_index(n: int, quantile: float) -> int:
    """The 0-based rank numpy's ``quantile(..., method="lower")`` picks among ``n`` sorted values."""
    return int(np.floor((n - 1) * np.float64(quantile)))


def temporal_cutoffs(
    times: EventTimes,
    *,
    cutoff_time: int | None = None,
    cutoff_quantile: float | None = None,
    valid_time: int | None = None,
    valid_quantile: float | None = None,
) -> tuple[int, int]:
    """Resolve ``(valid_cut, test_cut)`` from times or quantiles of all event timestamps.

    Exactly one of ``cutoff_time``/``cutoff_quantile`` sets the test cut. The validation cut comes
    from ``valid_time``/``valid_quantile``; without either, the validation window holds as many events
    as the test window, just before it (:data:`DEFAULT_VALIDATION`). Quantiles use the "lower" method,
    so the cut is an actual event time.
    """
    if (cutoff_time is None) == (cutoff_quantile is None):
        raise InputError("temporal split needs exactly one of --cutoff-time or --cutoff-quantile")
    if valid_time is not None and valid_quantile is not None:
        raise InputError("give at most one of --valid-time or --valid-quantile")
    for name, q in (("--cutoff-quantile", cutoff_quantile), ("--valid-quantile", valid_quantile)):
        if q is not None and not 0.0 < q < 1.0:
            raise InputError(f"{name} must be between 0 and 1 (exclusive), got {q}")

    def cut(time, quantile):
        return int(time) if time is not None else times.kth(lower_quantile_index(times.n, quantile))

    test_cut = cut(cutoff_time, cutoff_quantile)
    if valid_time is None and valid_quantile is None:
        before_test = times.count_before(test_cut)
        first_valid = before_test - (times.n - before_test)
        if first_valid <= 0:
            raise InputError(f"the test window (events at or after {test_cut}) holds half of the events or more, "
                             "leaving no room for a validation window of the same size before it; give "
                             "--valid-time or --valid-quantile")
        return times.kth(first_valid), test_cut
    valid_cut = cut(valid_time, valid_quantile)
    if valid_cut > test_cut:
        raise InputError(f"validation cut {valid_cut} is after the test cut {test_cut}")
    return valid_cut, test_cut


def temporal_split(
    timestamps: np.ndarray, offsets: np.ndarray, valid_cut: int, test_cut: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global temporal split: ``t < valid_cut`` train, ``valid_cut <= t < test_cut`` validation, rest test.

    Each user's timestamps must be sorted. A user whose events are all after a cut keeps them
    (``train_end`` may be 0: no history, all events are targets)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    users = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    n = len(offsets) - 1
    train_end = np.bincount(users, weights=timestamps < valid_cut, minlength=n).astype(np.int32)
    valid_end = np.bincount(users, weights=timestamps < test_cut, minlength=n).astype(np.int32)
    return train_end, valid_end

"""Cleaning: minimum rating, repeated consecutive events, k-core filtering.

The frame functions take and return interactions frames (see :mod:`pipelines.readers`) and keep
row order; the ``*_mask`` functions work on integer codes and return which rows to keep.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.errors import InputError

KCORE_MODES = ("iterative", "single-pass", "none")


def min_rating_mask(ratings: np.ndarray | None, min_rating: float | None) -> np.ndarray | None:
    """Rows with ``rating >= min_rating``; None when there is nothing to filter."""
    if min_rating is None:
        return None
    if ratings is None:
        raise InputError("--min-rating given but the input has no rating column")
    return np.asarray(ratings) >= min_rating


def consecutive_duplicate_mask(user_codes: np.ndarray, item_codes: np.ndarray) -> np.ndarray:
    """Rows to keep when dropping an event that repeats the same user's previous item.

    Rows must already be grouped by user in time order."""
    keep = np.ones(len(user_codes), dtype=bool)
    keep[1:] = (user_codes[1:] != user_codes[:-1]) | (item_codes[1:] != item_codes[:-1])
    return keep


def kcore_mask(
    user_codes: np.ndarray, item_codes: np.ndarray, user_core: int, item_core: int, *, iterative: bool = True
) -> np.ndarray:
    """Rows kept by k-core filtering: users with >= ``user_core`` and items with >= ``item_core`` events.

    ``iterative=True`` repeats until nothing changes (every kept user and item meets its threshold);
    ``iterative=False`` is the single pass of the SASRec paper's preprocessing: counts are taken once
    on the input and rows of users or items below the thresholds are dropped, without recounting.
    """
    user_codes = np.asarray(user_codes)
    item_codes = np.asarray(item_codes)
    keep = np.ones(len(user_codes), dtype=bool)
    if len(keep) == 0:
        return keep
    n_users, n_items = int(user_codes.max()) + 1, int(item_codes.max()) + 1
    rows = np.arange(len(keep))  # indices of the rows still kept; shrinks every round
    while True:
        users, items = user_codes[rows], item_codes[rows]
        ok = (np.bincount(users, minlength=n_users)[users] >= user_core) & (
            np.bincount(items, minlength=n_items)[items] >= item_core
        )
        if ok.all():
            break
        keep[rows[~ok]] = False
        rows = rows[ok]
        if not iterative or len(rows) == 0:
            break
    return keep


def filter_min_rating(frame: pd.DataFrame, min_rating: float | None) -> pd.DataFrame:
    mask = min_rating_mask(frame["rating"].to_numpy() if "rating" in frame else None, min_rating)
    return frame if mask is None else frame.loc[mask].reset_index(drop=True)


def dedupe_consecutive(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop events that repeat the user's previous item (time order, ties in row order)."""
    order = np.lexsort((frame["timestamp"].to_numpy(), frame["user_id"].cat.codes.to_numpy()))
    ordered = frame.iloc[order]
    keep = consecutive_duplicate_mask(ordered["user_id"].cat.codes.to_numpy(), ordered["item_id"].cat.codes.to_numpy())
    return frame.iloc[np.sort(order[keep])].reset_index(drop=True) if not keep.all() else frame


def kcore(frame: pd.DataFrame, user_core: int = 5, item_core: int = 5, iterative: bool = True) -> pd.DataFrame:
    """Keep the rows of :func:`kcore_mask`, in their original order."""
    mask = kcore_mask(
        frame["user_id"].cat.codes.to_numpy(), frame["item_id"].cat.codes.to_numpy(), user_core, item_core, iterative=iterative
    )
    return frame if mask.all() else frame.loc[mask].reset_index(drop=True)

"""Ranking metrics for next-item prediction with one held-out item per user.

``rank`` is the 0-based position of the held-out item among the candidates (0 = first).
HR@k = [rank < k]; NDCG@k = 1 / log2(rank + 2) if rank < k; MRR@k = 1 / (rank + 1) if rank < k.
HR@k equals Recall@k with one held-out item.
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)


def metrics_from_ranks(ranks: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no users to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
    return out


def rank_of_target(scores: np.ndarray, target_scores: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target: the number of candidates scoring strictly higher, plus half
    of the other candidates scoring exactly the same (ties are neither won nor lost).

    ``scores`` (B, C) holds the target's own column. A NaN candidate counts as higher than the target,
    and a target whose own score is NaN or infinite ranks last (C - 1): a model that produces
    non-finite scores never gets a hit from them."""
    scores = np.asarray(scores)
    target_scores = np.asarray(target_scores)[:, None]
    higher = ((scores > target_scores) | np.isnan(scores)).sum(axis=1)
    ties = (scores == target_scores).sum(axis=1) - 1
    ranks = higher + np.maximum(ties, 0) / 2.0
    return np.where(np.isfinite(target_scores[:, 0]), ranks, float(scores.shape[1] - 1))


def evaluate_recommendations(
    recs,
    heldout,
    k=DEFAULT_KS,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rank_col: str | None = "rank",
    heldout_user_col: str | None = None,
    heldout_item_col: str | None = None,
) -> dict[str, float]:
    """HR/NDCG/MRR@k of a recommendations frame against held-out items, for any recommender's output.

    ``recs``: long frame, one row per (user, recommended item), e.g. :meth:`Recommender.score_frame`'s
    output; the item's position is ``rank_col`` (1 = best) or, without that column, its order within
    the user's rows. ``heldout``: one row per user with the held-out item (columns ``user_col`` and
    ``item_col`` unless ``heldout_user_col`` / ``heldout_item_col`` say otherwise). Ids are compared
    as strings. Every held-out user counts: users absent from ``recs``, or whose item is not among
    their recommendations, are misses. Returns ``{"hr@K": ..., "ndcg@K": ..., "mrr@K": ..., "users": N}``
    with the formulas of :func:`metrics_from_ranks`. A ``k`` above the most recommendations any user
    has is computed from the items given (a lower bound), with a warning.
    """
    import warnings

    import pandas as pd

    from pipelines.errors import InputError

    ks = (k,) if isinstance(k, (int, np.integer)) else tuple(k)
    if not ks or any(int(x) < 1 for x in ks):
        raise InputError(f"k must be positive integers, got {k!r}")
    h_user = heldout_user_col or user_col
    h_item = heldout_item_col or item_col
    for frame, name, cols in ((recs, "recommendations", (user_col, item_col)), (heldout, "held-out", (h_user, h_item))):
        if not isinstance(frame, pd.DataFrame):
            raise InputError(f"{name}: expected a pandas DataFrame, got {type(frame).__name__}")
        for col in cols:
            if col not in frame.columns:
                raise InputError(f"{name} frame: missing column {col!r} (has {', '.join(map(str, frame.columns))})")
    if len(heldout) == 0:
        raise InputError("held-out frame is empty: no users to evaluate")
    held_users = heldout[h_user].astype(str)
    if held_users.duplicated().any():
        raise InputError(f"held-out frame: user {held_users[held_users.duplicated()].iloc[0]!r} has more than one "
                         "row (one held-out item per user)")
    rec_users = recs[user_col].astype(str)
    if rank_col is not None and rank_col in recs.columns:
        ranks = pd.to_numeric(recs[rank_col]).to_numpy(dtype=np.float64) - 1.0
    else:
        ranks = rec_users.groupby(rec_users, sort=False).cumcount().to_numpy(dtype=np.float64)
    left = pd.DataFrame({"u": held_users.to_numpy(dtype=object), "i": heldout[h_item].astype(str).to_numpy(dtype=object)})
    right = pd.DataFrame({"u": rec_users.to_numpy(dtype=object), "i": recs[item_col].astype(str).to_numpy(dtype=object),
                          "r": ranks})
    right = right.groupby(["u", "i"], sort=False, as_index=False)["r"].min()  # a duplicated item: its best rank
    merged = left.merge(right, on=["u", "i"], how="left")
    found = merged["r"].to_numpy(dtype=np.float64)
    found = np.where(np.isnan(found), np.inf, found)
    if len(recs):
        depth = round(float(np.nanmax(ranks))) + 1
        too_deep = [x for x in ks if int(x) > depth]
        if too_deep:
            warnings.warn(f"k={too_deep} exceeds the {depth} recommendations per user in the frame: "
                          "those metrics only count the items given", stacklevel=2)
    out = metrics_from_ranks(found, [int(x) for x in ks])
    out["users"] = len(found)
    return out

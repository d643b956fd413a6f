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
    of the other candidates scoring exactly the same (ties are neither won nor lost)."""
    target_scores = np.asarray(target_scores)[:, None]
    higher = (scores > target_scores).sum(axis=1)
    ties = (scores == target_scores).sum(axis=1) - 1
    return higher + np.maximum(ties, 0) / 2.0

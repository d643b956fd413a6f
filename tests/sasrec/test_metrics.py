"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from sasrec.metrics import metrics_from_ranks, rank_of_target


def test_metrics_by_hand():
    m = metrics_from_ranks(np.array([0, 1, 4, 20]), ks=(1, 5, 10))
    assert m["hr@1"] == 0.25
    assert m["hr@5"] == 0.75 and m["hr@10"] == 0.75
    assert m["ndcg@1"] == 0.25
    assert m["ndcg@5"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6)) / 4)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 4)
    assert m["mrr@1"] == 0.25


def test_rank_counts_higher_scores_and_half_the_ties():
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    # row 0: target 0.5 -> one higher, one tie; row 1: target ties with 3 others
    assert rank_of_target(scores, np.array([0.5, 1.0])).tolist() == [1.5, 1.5]


def test_empty_input_is_an_error():
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([]))


def test_a_non_finite_target_ranks_last_and_nan_candidates_rank_above():
    scores = np.array([[np.nan, 0.5, 0.1], [0.9, np.nan, 0.1], [0.9, 0.5, np.inf], [0.2, 0.5, np.nan]])
    targets = np.array([np.nan, 0.1, np.inf, 0.5])
    # NaN or infinite targets rank last (2 of 0..2); a NaN candidate counts as higher than the target.
    assert rank_of_target(scores, targets).tolist() == [2.0, 2.0, 2.0, 1.0]
    assert metrics_from_ranks(rank_of_target(np.full((3, 50), np.nan), np.full(3, np.nan)), ks=(10,))["ndcg@10"] == 0.0

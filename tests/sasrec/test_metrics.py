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

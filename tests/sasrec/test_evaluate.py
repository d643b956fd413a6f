"""Evaluation protocols on data where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.dataset import read_dataset
from sasrec.evaluate import Protocol, evaluate_scores, evaluation_set, rank_targets


def oracle(ds):
    """Scores the true target highest: knows the held-out item of each history's user."""
    lookup = {}
    for split_cut in (ds.train_end, ds.valid_end):
        for u in range(ds.num_users):
            lookup[tuple(ds.user_items(u)[: split_cut[u]].tolist())] = ds.user_items(u)[split_cut[u]] if split_cut[u] < ds.lengths[u] else 0

    def score(ids):
        out = np.random.default_rng(0).random((len(ids), ds.vocab_size)).astype(np.float32)
        for row, history in enumerate(ids):
            target = lookup.get(tuple(history[history != 0].tolist()), 0)
            out[row, target] = 10.0
        return out

    return score


@pytest.mark.parametrize("protocol", ["full", "sampled-100"])
def test_oracle_is_perfect_and_protocol_is_saved(tiny_dataset, protocol):
    ds = read_dataset(tiny_dataset)
    result = evaluate_scores(oracle(ds), ds, Protocol(split="test", protocol=protocol), maxlen=100, batch_size=64)
    assert result["metrics"]["hr@1"] == 1.0 and result["metrics"]["ndcg@10"] == 1.0
    assert result["protocol"]["users_evaluated"] == ds.num_users
    assert result["protocol"]["protocol"] == protocol
    assert 0 < result["popularity"]["hr@10"] < 0.5


def test_valid_split_history_stops_before_the_validation_item(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    ev = evaluation_set(ds, "valid")
    u = ev.users[0]
    assert ev.history_ends[0] - ev.history_starts[0] == ds.train_end[u]
    assert ev.targets[0] == ds.user_items(u)[ds.train_end[u]]


def test_seen_items_are_removed_in_full_ranking(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    ev = evaluation_set(ds, "test")

    def seen_first(ids):  # ranks every history item above everything else
        out = np.zeros((len(ids), ds.vocab_size), np.float32)
        for row, h in enumerate(ids):
            out[row, h[h != 0]] = 5.0
        return out

    with_filter, _ = rank_targets(seen_first, ds, ev, Protocol(), maxlen=100)
    without, _ = rank_targets(seen_first, ds, ev, Protocol(exclude_seen=False), maxlen=100)
    assert (with_filter < without).mean() > 0.9


def test_sampled_candidates_are_never_interacted_items(tiny_dataset):
    from sasrec.evaluate import _sampled_candidates

    ds = read_dataset(tiny_dataset)
    ev = evaluation_set(ds, "test")
    cands = _sampled_candidates(ds, ev, 0, 10, 20, np.random.default_rng(0))
    for row in range(10):
        interacted = set(ds.user_items(ev.users[row]).tolist())
        assert cands[row, 0] == ev.targets[row]
        assert not interacted & set(cands[row, 1:].tolist()) and len(set(cands[row, 1:])) == 20


def test_sampled_protocol_on_a_catalog_smaller_than_the_sample(tiny_dataset):
    """60 items, histories of up to 30: fewer than 100 unseen items exist; all are used, none twice."""
    from sasrec.evaluate import _sampled_candidates

    ds = read_dataset(tiny_dataset)
    ev = evaluation_set(ds, "test")
    cands = _sampled_candidates(ds, ev, 0, 5, 100, np.random.default_rng(0))
    for row in range(5):
        unseen = set(range(2, ds.vocab_size)) - set(ds.user_items(ev.users[row]).tolist())
        assert set(cands[row, 1:].tolist()) - {0} == unseen


def test_a_model_that_scores_nan_gets_zero_not_a_perfect_hit(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    nan_model = lambda ids: np.full((len(ids), ds.vocab_size), np.nan, np.float32)  # noqa: E731
    for protocol in ("full", "sampled-100"):
        result = evaluate_scores(nan_model, ds, Protocol(protocol=protocol), maxlen=50, with_popularity=False)
        assert result["metrics"]["hr@20"] == 0.0 and result["metrics"]["ndcg@10"] == 0.0
        assert result["non_finite_targets"] == ds.num_users


def test_repeat_targets_are_counted_and_missed_in_the_deliverable_metrics(tiny_dataset):
    """The oracle hits every target; with repeats counted as misses its HR@1 drops by their share."""
    ds = read_dataset(tiny_dataset)
    expected = sum(int(ds.user_items(u)[ds.valid_end[u]] in set(ds.user_items(u)[: ds.valid_end[u]].tolist()))
                   for u in range(ds.num_users))
    assert 0 < expected < ds.num_users  # synthetic chains with noise revisit items
    result = evaluate_scores(oracle(ds), ds, Protocol(), maxlen=100)
    assert result["repeat_targets"] == expected
    assert result["metrics"]["hr@1"] == 1.0
    assert result["deliverable_metrics"]["hr@1"] == pytest.approx(1 - expected / ds.num_users)
    assert result["popularity_deliverable_metrics"]["hr@10"] <= result["popularity"]["hr@10"]
    assert "deliverable_metrics" in result["protocol"]

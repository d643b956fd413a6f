"""Recommend with explain over gRPC: explanations for every returned item, the same items and scores as
without, a response without explain unchanged, bad explain_items INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import grpc
import pytest

from tests.serving.helpers import item_names

NAMES = item_names(40)


def test_recommend_with_explain_explains_every_item(client, recommender):
    history = [NAMES[i] for i in (4, 9, 1, 22, 17)] + ["unknown-id"]
    plain = client.recommend(history, k=6)
    explained = client.recommend(history, k=6, explain=True, explain_items=2)
    assert [i.item_id for i in explained.items] == [i.item_id for i in plain.items]
    assert [i.score for i in explained.items] == pytest.approx([i.score for i in plain.items], rel=1e-5)
    assert explained.unknown_history_ids == 1 and explained.explain_method == recommender.card["explain_method"]
    expected = recommender.explain(history, k=6, explain_items=2).explanations
    for item, want in zip(explained.items, expected):
        assert [c.item_id for c in item.explanation] == [name for name, _ in want]
        assert [c.weight for c in item.explanation] == pytest.approx([w for _, w in want], rel=1e-4, abs=1e-5)
        assert len(item.explanation) == 2 and {c.item_id for c in item.explanation} <= set(history)
    # explain alone: the default number of explanation items.
    assert all(len(item.explanation) == 3 for item in client.recommend(history, k=2, explain=True).items)


def test_recommend_without_explain_is_unchanged(client):
    from sasrec.v1 import recommender_pb2

    history = [NAMES[i] for i in (2, 5, 8)]
    plain = client.recommend(history, k=4)
    assert not plain.explain_method and not any(item.explanation for item in plain.items)
    # The bytes of a request that never heard of the new fields get the same answer.
    raw = client.stub.Recommend(recommender_pb2.RecommendRequest(history=history, k=4), timeout=10)
    assert raw == plain


def test_explain_cold_start_and_bad_explain_items(client):
    cold = client.recommend([], k=3, explain=True)
    assert cold.cold_start and len(cold.items) == 3 and not any(item.explanation for item in cold.items)
    for bad in (0, 51, -3):
        with pytest.raises(grpc.RpcError) as err:
            client.recommend([NAMES[1]], k=3, explain_items=bad)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == f"explain_items must be in 1..50, got {bad}"

"""A time_bias model over gRPC: Recommend reads the request's timestamps, RecommendForUser the stored
ones, continuing the user's cached state (which keeps its events' times) as Recommend would answer."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.serving.conftest import start_server
from tests.sasrec.test_time_bias import TIMES, VOCAB, time_model

HISTORY = [f"i{i}" for i in (5, 9, 13, 2, 30, 7, 21, 11, 3)]
STAMPS = [int(t) for t in TIMES]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(Recommender, client)`` over an exported time_bias model with a SQLite history store."""
    from sasrec.export import export_model
    from sasrec.recommender import Recommender
    from serving.client import RecommenderClient

    items = np.array(["<pad>", "<oov>"] + [f"i{i}" for i in range(2, VOCAB)], dtype=object)
    base = tmp_path_factory.mktemp("timed") / "models"
    rec = Recommender.load(export_model(time_model(seed=3), base, item_ids=items, train_counts=np.arange(VOCAB)))
    # Batches of 4 at most: a short warm-up (one signature call per batch size and width).
    srv = start_server(base, history_store=f"sqlite:///{tmp_path_factory.mktemp('histories') / 'h.db'}",
                       max_batch_size=4, state_cache_mb=8)
    assert srv.wait_ready(60)
    with RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
        yield rec, client, srv
    srv.stop(1)


def answer(response):
    return [item.item_id for item in response.items], [item.score for item in response.items]


def test_recommend_reads_the_request_timestamps(served):
    rec, client, _ = served
    expected = rec.recommend(HISTORY, k=5, timestamps=STAMPS)
    ids, scores = answer(client.recommend(HISTORY, 5, timestamps=STAMPS))
    assert ids == expected.item_ids
    np.testing.assert_allclose(scores, [s for _, s in expected], atol=1e-5)
    # Without timestamps the bias is off and the model still answers (another answer).
    plain = rec.recommend(HISTORY, k=5)
    ids, scores = answer(client.recommend(HISTORY, 5))
    assert ids == plain.item_ids and not np.allclose(scores, [s for _, s in expected], atol=1e-3)


def test_bad_timestamps_are_refused_naming_the_field(served):
    _, client, _ = served
    with pytest.raises(grpc.RpcError) as err:
        client.recommend(HISTORY, 5, timestamps=STAMPS[:-1])
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "timestamps" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.recommend(HISTORY, 5, timestamps=STAMPS, explain=True)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "timestamps" in err.value.details()


def test_recommend_for_user_reads_the_stored_timestamps(served):
    rec, client, srv = served
    continued = lambda: srv.metrics.registry.get_sample_value(  # noqa: E731
        "sasrec_state_requests_total", {"outcome": "continued"}) or 0
    client.append_events("u1", HISTORY[:5], timestamps=STAMPS[:5])
    # Then events with times, events without (unknown: no bias for their pairs), and one earlier than
    # every stored event: each call continues the state built by the first and answers as Recommend.
    calls = [([], []), (HISTORY[5:9], STAMPS[5:9]), (["i14", "i15"], None), (["i16"], [STAMPS[0] - 3_600])]
    items, times = list(HISTORY[:5]), list(STAMPS[:5])
    for new_items, new_times in calls:
        before = continued()
        reply = client.recommend_for_user("u1", 5, item_ids=new_items, timestamps=new_times or ())
        items += new_items
        times += new_times or [None] * len(new_items)
        expected = rec.recommend(items, k=5, timestamps=times)
        ids, scores = answer(reply.recommendation)
        assert ids == expected.item_ids
        np.testing.assert_allclose(scores, [s for _, s in expected], atol=1e-4)
        assert continued() == before + (1 if new_items else 0)

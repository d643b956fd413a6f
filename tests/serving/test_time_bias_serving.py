"""A time_bias model over gRPC: Recommend reads the request's timestamps, RecommendForUser the stored
ones (recomputed from the stored history, never from a cached state that read no times)."""

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
                       max_batch_size=4)
    assert srv.wait_ready(60)
    with RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
        yield rec, client
    srv.stop(1)


def answer(response):
    return [item.item_id for item in response.items], [item.score for item in response.items]


def test_recommend_reads_the_request_timestamps(served):
    rec, client = served
    expected = rec.recommend(HISTORY, k=5, timestamps=STAMPS)
    ids, scores = answer(client.recommend(HISTORY, 5, timestamps=STAMPS))
    assert ids == expected.item_ids
    np.testing.assert_allclose(scores, [s for _, s in expected], atol=1e-5)
    # Without timestamps the bias is off and the model still answers (another answer).
    plain = rec.recommend(HISTORY, k=5)
    ids, scores = answer(client.recommend(HISTORY, 5))
    assert ids == plain.item_ids and not np.allclose(scores, [s for _, s in expected], atol=1e-3)


def test_bad_timestamps_are_refused_naming_the_field(served):
    _, client = served
    with pytest.raises(grpc.RpcError) as err:
        client.recommend(HISTORY, 5, timestamps=STAMPS[:-1])
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "timestamps" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.recommend(HISTORY, 5, timestamps=STAMPS, explain=True)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "timestamps" in err.value.details()


def test_recommend_for_user_reads_the_stored_timestamps(served):
    rec, client = served
    client.append_events("u1", HISTORY[:5], timestamps=STAMPS[:5])
    for end in (5, 9):  # the second call adds events: nothing stale from the first
        reply = client.recommend_for_user("u1", 5, item_ids=HISTORY[5:end], timestamps=STAMPS[5:end])
        expected = rec.recommend(HISTORY[:end], k=5, timestamps=STAMPS[:end])
        ids, scores = answer(reply.recommendation)
        assert ids == expected.item_ids
        np.testing.assert_allclose(scores, [s for _, s in expected], atol=1e-5)

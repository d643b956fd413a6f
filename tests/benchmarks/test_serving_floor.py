"""The floor servers of benchmarks/serving.py answer like the real service, without a SavedModel."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from benchmarks.serving import free_port
from benchmarks.serving_floor import InstantModel, serve_echo, serve_instant
from serving.client import RecommenderClient


@pytest.mark.parametrize("serve", [serve_echo, serve_instant])
def test_floor_server_answers_recommend(serve):
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=serve, args=(port, stop), daemon=True)
    thread.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=30) as client:
            grpc.channel_ready_future(client.channel).result(timeout=60)
            end = time.monotonic() + 60
            while serve is serve_instant and client.health() != "SERVING":  # the model store loads it
                assert time.monotonic() < end, "the instant-model server never became SERVING"
                time.sleep(0.05)
            response = client.recommend(["a", "b", "c"], k=10)
            assert len(response.items) == 10
            assert response.model_version == 1
            if serve is serve_instant:  # through the whole `sasrec serve` stack
                assert [i.item_id for i in response.items] == [str(i) for i in range(1, 11)]
                assert len(client.recommend(["a"], k=3).items) == 3  # k is honoured
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


def test_instant_model_answers_each_row_with_k_items():
    out = InstantModel().recommend_batch([["x"], [], ["y", "z"]], k=4)
    assert out.item_ids.shape == (3, 4) and out.scores.shape == (3, 4)
    assert list(out.item_ids[2]) == ["1", "2", "3", "4"]
    assert not out.cold_start.any() and not out.unknown_count.any()

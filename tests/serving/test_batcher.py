from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batcher import DeadlineExceeded, KOutOfRange, MicroBatcher
from sasrec.recommender import BatchResult


class FakeModel:
    version = 7
    max_k = 100

    def __init__(self, delay=0.0):
        self.calls = []
        self.delay = delay

    def recommend_batch(self, histories, k, exclude_seen, exclude_item_ids):
        self.calls.append((len(histories), k, exclude_seen))
        time.sleep(self.delay)
        n = len(histories)
        ids = np.array([[f"{h[0] if h else 'pop'}-{j}" for j in range(k)] for h in histories], dtype=object)
        ids[:, k - 1] = ""  # the last column is always "no item"
        return BatchResult(ids, np.tile(-np.arange(k, dtype=np.float32), (n, 1)), np.zeros(n, np.int32),
                           np.array([not h for h in histories]))


def test_concurrent_requests_share_model_calls_and_get_their_own_k():
    model = FakeModel(delay=0.02)
    batcher = MicroBatcher(lambda: model, max_batch_size=16, max_wait_s=0.005)
    futures = [batcher.submit([f"h{i}"], k=2 + i % 3, exclude_seen=i % 2 == 0, exclude_item_ids=[]) for i in range(40)]
    results = [f.result(5) for f in futures]
    batcher.close(5)
    for i, r in enumerate(results):
        assert r.item_ids == [f"h{i}-{j}" for j in range(2 + i % 3 - 1)] or len(r.item_ids) == 2 + i % 3
        assert r.version == 7
    assert sum(c[0] for c in model.calls) == 40
    assert len(model.calls) < 40
    assert all(size <= 16 for size, _, _ in model.calls)


def test_trailing_empty_ids_are_dropped():
    model = FakeModel()
    batcher = MicroBatcher(lambda: model, max_batch_size=4, max_wait_s=0)
    result = batcher.submit(["a"], k=3, exclude_seen=True, exclude_item_ids=[]).result(5)
    assert result.item_ids == ["a-0", "a-1"] and len(result.scores) == 2
    batcher.close(5)


def test_expired_requests_are_dropped_before_the_model_call():
    model = FakeModel(delay=0.1)
    batcher = MicroBatcher(lambda: model, max_batch_size=1, max_wait_s=0)
    first = batcher.submit(["a"], 2, True, [])
    late = batcher.submit(["b"], 2, True, [], deadline=time.monotonic() + 0.01)
    first.result(5)
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert len(model.calls) == 1
    batcher.close(5)


def test_model_errors_reach_the_caller_and_the_worker_survives():
    class Broken(FakeModel):
        def recommend_batch(self, *args, **kwargs):
            raise RuntimeError("boom")

    model = [Broken()]
    batcher = MicroBatcher(lambda: model[0], max_batch_size=4, max_wait_s=0)
    with pytest.raises(RuntimeError):
        batcher.submit(["a"], 2, True, []).result(5)
    model[0] = FakeModel()
    assert batcher.submit(["a"], 2, True, []).result(5).item_ids == ["a-0"]
    batcher.close(5)


@pytest.mark.parametrize("model_workers", [1, 3])
def test_close_answers_everything_queued_and_stops_every_worker(model_workers):
    model = FakeModel(delay=0.05)
    batcher = MicroBatcher(lambda: model, max_batch_size=2, max_wait_s=0, model_workers=model_workers)
    futures = [batcher.submit([str(i)], 2, True, []) for i in range(10)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    assert all(f.result(5).item_ids for f in futures)
    closer.join(5)
    assert not any(t.is_alive() for t in batcher._threads)


def test_model_workers_run_batches_side_by_side():
    class Overlap(FakeModel):
        running = peak = 0
        lock = threading.Lock()

        def recommend_batch(self, *args, **kwargs):
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                return super().recommend_batch(*args, **kwargs)
            finally:
                with self.lock:
                    self.running -= 1

    model = Overlap(delay=0.05)
    batcher = MicroBatcher(lambda: model, max_batch_size=2, max_wait_s=0, model_workers=2)
    futures = [batcher.submit([str(i)], 2, True, []) for i in range(8)]
    assert all(f.result(5).item_ids for f in futures)
    batcher.close(5)
    assert model.peak == 2


class SmallerCatalog(FakeModel):
    version = 8
    max_k = 5


def test_a_k_the_batch_model_cannot_return_fails_alone():
    """A hot swap to a model with fewer items between validation and the batch: only that request fails."""
    batcher = MicroBatcher(SmallerCatalog, max_batch_size=8, max_wait_s=0.05)
    fits, too_large = batcher.submit(["a"], 3, True, []), batcher.submit(["b"], 9, True, [])
    assert fits.result(5).item_ids == ["a-0", "a-1"] and fits.result().version == 8
    with pytest.raises(KOutOfRange, match=r"k must be in 1\.\.5, got 9"):
        too_large.result(5)
    batcher.close(5)


def test_servicer_answers_invalid_argument_naming_k_after_a_swap_to_a_smaller_catalog():
    import grpc

    from sasrec.v1 import recommender_pb2
    from serving.observability import Metrics
    from serving.servicer import RecommenderServicer

    class Store:  # validation sees the big model; the batch runs on the smaller one swapped in meanwhile
        def get(self):
            return FakeModel()

    class Context:
        code = grpc.StatusCode.OK
        details = ""

        def time_remaining(self):
            return 5.0

        def add_callback(self, callback):
            pass

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    batcher = MicroBatcher(SmallerCatalog, max_batch_size=8, max_wait_s=0)
    servicer = RecommenderServicer(Store(), batcher, model_name="m", metrics=Metrics())
    ok, bad = Context(), Context()
    assert [i.item_id for i in servicer.Recommend(recommender_pb2.RecommendRequest(history=["a"], k=3), ok).items] \
        == ["a-0", "a-1"]
    servicer.Recommend(recommender_pb2.RecommendRequest(history=["b"], k=9), bad)
    assert ok.code == grpc.StatusCode.OK
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "k must be in 1..5, got 9" in bad.details
    batcher.close(5)


class ExplainingModel(FakeModel):
    """Explains item j of a history by its first item, with as many entries as asked."""

    card = {"explain_method": "fake"}

    def recommend_batch(self, histories, k, exclude_seen, exclude_item_ids, explain_items=0):
        out = super().recommend_batch(histories, k, exclude_seen, exclude_item_ids)
        self.calls[-1] += (explain_items,)
        if explain_items:
            n = len(histories)
            out.explanation_item_ids = np.array([[[h[0]] * explain_items] * k for h in histories], dtype=object)
            out.explanation_weights = np.ones((n, k, explain_items), np.float32)
        return out


def test_explained_and_plain_requests_in_one_batch_each_get_their_answer():
    model = ExplainingModel()
    batcher = MicroBatcher(lambda: model, max_batch_size=8, max_wait_s=0.05)
    futures = [batcher.submit([f"h{i}"], k=3, exclude_seen=True, exclude_item_ids=[], explain_items=i % 3)
               for i in range(6)]
    results = [f.result(5) for f in futures]
    batcher.close(5)
    for i, r in enumerate(results):
        assert r.item_ids == [f"h{i}-0", f"h{i}-1"]
        if i % 3:
            assert r.explanations == [[(f"h{i}", 1.0)] * (i % 3)] * 2 and r.explain_method == "fake"
        else:
            assert r.explanations is None and r.explain_method == ""
    # Explained rows go to one call with the largest explain_items; plain rows to another.
    assert sorted(c[-1] for c in model.calls) == [0, 2]

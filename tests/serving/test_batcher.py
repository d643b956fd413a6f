from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from sasrec.recommender import BatchResult
from serving.batcher import DeadlineExceeded, MicroBatcher, ShuttingDown


class FakeModel:
    version = 7

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


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_concurrent_requests_share_model_calls_and_get_their_own_k():
    model = FakeModel(delay=0.02)

    async def main():
        batcher = MicroBatcher(lambda: model, max_batch_size=16, max_wait_s=0.005)
        futures = [batcher.submit([f"h{i}"], k=2 + i % 3, exclude_seen=i % 2 == 0, exclude_item_ids=[])
                   for i in range(40)]
        results = await asyncio.gather(*futures)
        await batcher.close(5)
        return results

    for i, r in enumerate(run(main())):
        k = 2 + i % 3
        # Its own first k columns of the group's call; the fake's last column (of the group's k) is empty.
        assert len(r.item_ids) in (k - 1, k)
        assert r.item_ids == [f"h{i}-{j}" for j in range(len(r.item_ids))]
        assert r.scores == [-float(j) for j in range(len(r.item_ids))]
        assert r.version == 7
    assert sum(c[0] for c in model.calls) == 40
    assert len(model.calls) < 40
    assert all(size <= 16 for size, _, _ in model.calls)


def test_requests_arriving_during_a_model_call_form_the_next_batch():
    """Greedy batching (no wait): the first request goes alone, the 30 queued behind it go together."""
    model = FakeModel(delay=0.05)

    async def main():
        batcher = MicroBatcher(lambda: model, max_batch_size=64, max_wait_s=0)
        first = batcher.submit(["a"], 2, True, [])
        rest = [batcher.submit([str(i)], 2, True, []) for i in range(30)]
        await asyncio.gather(first, *rest)
        await batcher.close(5)

    run(main())
    assert [c[0] for c in model.calls] == [1, 30]


def test_a_lone_request_waits_at_most_max_wait():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(lambda: model, max_batch_size=64, max_wait_s=0.05)
        start = time.monotonic()
        await batcher.submit(["a"], 2, True, [])
        waited = time.monotonic() - start
        await batcher.close(5)
        return waited

    waited = run(main())
    assert 0.045 <= waited < 0.5, waited


def test_expired_and_cancelled_requests_are_dropped_before_the_model_call():
    model = FakeModel(delay=0.1)

    async def main():
        batcher = MicroBatcher(lambda: model, max_batch_size=1, max_wait_s=0)
        first = batcher.submit(["a"], 2, True, [])
        late = batcher.submit(["b"], 2, True, [], deadline=time.monotonic() + 0.01)
        gone = batcher.submit(["c"], 2, True, [])
        gone.cancel()
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        await batcher.close(5)

    run(main())
    assert len(model.calls) == 1


def test_model_errors_reach_the_caller_and_the_worker_survives():
    class Broken(FakeModel):
        def recommend_batch(self, *args, **kwargs):
            raise RuntimeError("boom")

    model = [Broken()]

    async def main():
        batcher = MicroBatcher(lambda: model[0], max_batch_size=4, max_wait_s=0)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(["a"], 2, True, [])
        model[0] = FakeModel()
        result = await batcher.submit(["a"], 2, True, [])
        await batcher.close(5)
        return result

    assert run(main()).item_ids == ["a-0"]


@pytest.mark.parametrize("model_workers", [1, 3])
def test_close_answers_everything_queued_and_refuses_new_requests(model_workers):
    model = FakeModel(delay=0.05)

    async def main():
        batcher = MicroBatcher(lambda: model, max_batch_size=2, max_wait_s=1.0, model_workers=model_workers)
        futures = [batcher.submit([str(i)], 2, True, []) for i in range(10)]
        await batcher.close(5)
        assert all(f.done() for f in futures)  # close waited for every batch
        with pytest.raises(ShuttingDown):
            await batcher.submit(["x"], 2, True, [])
        return [f.result() for f in futures], batcher

    results, batcher = run(main())
    assert [r.item_ids for r in results] == [[f"{i}-0"] for i in range(10)]
    assert batcher.queued == 0 and batcher.running == 0


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

    async def main():
        batcher = MicroBatcher(lambda: model, max_batch_size=2, max_wait_s=0, model_workers=2)
        results = await asyncio.gather(*[batcher.submit([str(i)], 2, True, []) for i in range(8)])
        await batcher.close(5)
        return results

    assert all(r.item_ids for r in run(main()))
    assert model.peak == 2

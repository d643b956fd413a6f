"""Dynamic micro-batching on the server's event loop: concurrent requests share one model call.

Handlers ``await batcher.submit(...)``. Requests queue on the event loop; whenever a model worker is
free it takes up to ``max_batch_size`` of them (after waiting up to ``max_wait_s`` from the oldest one
for the batch to fill) and computes them in its thread, so the loop keeps receiving requests while
TensorFlow computes (it releases the GIL). Requests that arrive while the model is busy form the next
batch: under load batches grow with the load without any waiting, and an idle server answers a lone
request at once. One model worker (the default) keeps batches as large as possible; more workers
overlap batches, which only pays where cores would otherwise be idle.

Requests in one batch are grouped by ``exclude_seen`` (a scalar of the signature) and called with
the largest ``k`` of the group; each request gets its own first ``k`` columns. Requests whose
deadline passed or whose caller went away are dropped before the model call. The model used for a
batch is read once per batch, so a hot swap never mixes versions inside a batch.

Everything except the model call runs on the event loop, so no state here needs a lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("serving.batcher")


class DeadlineExceeded(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Pending:
    history: list
    k: int
    exclude_seen: bool
    exclude_item_ids: list
    deadline: float | None  # time.monotonic() seconds, None: no deadline
    future: asyncio.Future
    queued_at: float


@dataclass
class Result:
    item_ids: list
    scores: list
    unknown_count: int
    cold_start: bool
    version: int | None


class MicroBatcher:
    def __init__(
        self,
        get_model: Callable,
        *,
        max_batch_size: int = 64,
        max_wait_s: float = 0.0,
        model_workers: int = 1,
        metrics=None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if model_workers < 1:
            raise ValueError("model_workers must be >= 1")
        self._get_model = get_model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self.model_workers = model_workers
        self._metrics = metrics
        self._pending: deque[Pending] = deque()
        self._free = model_workers
        self._executor = ThreadPoolExecutor(model_workers, thread_name_prefix="model")
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._idle: asyncio.Event | None = None  # created by close(), set once nothing is queued or running

    @property
    def queued(self) -> int:
        """Requests waiting for a model worker."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Batches being computed."""
        return self.model_workers - self._free

    def submit(self, history, k, exclude_seen, exclude_item_ids, deadline=None) -> asyncio.Future:
        """Queue one request (on the event loop); the future resolves to a :class:`Result`."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._closed:
            future.set_exception(ShuttingDown("server is shutting down"))
            return future
        self._pending.append(
            Pending(history, int(k), bool(exclude_seen), exclude_item_ids, deadline, future, time.monotonic())
        )
        self._dispatch()
        return future

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, compute everything queued at once, wait for running batches."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._idle = asyncio.Event()
        self._dispatch()
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("batcher closed with %d queued and %d running batches", self.queued, self.running)
        self._executor.shutdown(wait=False)

    # -- event loop side ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._free and self._pending:
            if self.max_wait_s and not self._closed and len(self._pending) < self.max_batch_size:
                wait = self._pending[0].queued_at + self.max_wait_s - time.monotonic()
                if wait > 0:
                    if self._timer is None:
                        self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)
                    return
            take = min(self.max_batch_size, len(self._pending))
            batch = self._live([self._pending.popleft() for _ in range(take)])
            if not batch:
                continue
            self._free -= 1
            model = self._get_model()
            done = asyncio.get_running_loop().run_in_executor(self._executor, self._compute, model, batch)
            done.add_done_callback(functools.partial(self._deliver, batch))

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    @staticmethod
    def _live(batch: list[Pending]) -> list[Pending]:
        """Drop requests whose caller went away; answer expired ones with DeadlineExceeded."""
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # cancelled by the caller, or timed out by the handler
                continue
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(DeadlineExceeded())
                continue
            live.append(item)
        return live

    def _deliver(self, batch: list[Pending], done: asyncio.Future) -> None:
        self._free += 1
        error = done.exception()
        results = [error] * len(batch) if error is not None else done.result()
        for item, result in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        self._dispatch()
        self._check_idle()

    def _check_idle(self) -> None:
        if self._idle is not None and not self._pending and self._free == self.model_workers:
            self._idle.set()

    # -- model worker thread --------------------------------------------------------------------

    def _compute(self, model, batch: list[Pending]) -> list:
        """Results (or the exception of a failed group) for ``batch``, in order."""
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
        results: list = [None] * len(batch)
        for exclude_seen in (True, False):
            group = [i for i, item in enumerate(batch) if item.exclude_seen == exclude_seen]
            if group:
                self._call(model, batch, group, exclude_seen, results)
        return results

    def _call(self, model, batch: list[Pending], group: list[int], exclude_seen: bool, results: list) -> None:
        k = max(batch[i].k for i in group)
        start = time.perf_counter()
        try:
            out = model.recommend_batch(
                [batch[i].history for i in group],
                k=k,
                exclude_seen=exclude_seen,
                exclude_item_ids=[batch[i].exclude_item_ids for i in group],
            )
        except Exception as exc:  # answered to each caller; the worker stays alive
            log.exception("model call failed for a batch of %d", len(group))
            for i in group:
                results[i] = exc
            return
        if self._metrics is not None:
            self._metrics.batch_latency.observe(time.perf_counter() - start)
        for row, i in enumerate(group):
            item_k = batch[i].k
            ids = out.item_ids[row, :item_k]
            n = int((ids != "").sum())
            results[i] = Result(
                item_ids=list(ids[:n]),
                scores=out.scores[row, :n].tolist(),
                unknown_count=int(out.unknown_count[row]),
                cold_start=bool(out.cold_start[row]),
                version=model.version,
            )

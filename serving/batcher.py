"""Dynamic micro-batching: concurrent requests share one model call.

Handler threads ``submit`` a request and wait on its future. A model worker thread takes the oldest
request, then gathers more until ``max_batch_size`` requests or ``max_wait_s`` after it took the
first; requests that arrived while the model was busy are already queued, so under load batches
fill without waiting and an idle server answers a lone request after at most ``max_wait_s``.
``model_workers`` threads do this side by side (TensorFlow releases the GIL inside a model call);
how many batches in flight pay off depends on the cores and TensorFlow's thread pools (see
:class:`serving.server.ServerConfig`).

Requests in one batch are grouped by ``exclude_seen`` (a scalar of the signature) and called with
the largest ``k`` of the group; each request gets its own first ``k`` columns. Requests whose
deadline passed or whose caller went away are dropped before the model call. The model used for a
batch is read once per batch, so a hot swap never mixes versions inside a batch; a request whose
``k`` that model cannot return fails alone with :class:`KOutOfRange`, the rest of the batch is answered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("serving.batcher")


class DeadlineExceeded(Exception):
    pass


class ShuttingDown(Exception):
    pass


class KOutOfRange(Exception):
    """The request's ``k`` exceeds what the model running its batch can return (a hot swap to a model
    with fewer items since the servicer checked it)."""


@dataclass
class Pending:
    history: list
    k: int
    exclude_seen: bool
    exclude_item_ids: list
    deadline: float | None  # time.monotonic() seconds, None: no deadline
    future: Future = field(default_factory=Future)
    # A stored user's history (RecommendForUser): its cached state and the events that state has not seen.
    live: bool = False
    state: object = None
    new_events: list = field(default_factory=list)
    explain_items: int = 0  # > 0: answered by the explain signature, that many history items per item
    timestamps: list | None = None  # the history's event times for a time_bias model (None: unknown)


@dataclass
class Result:
    item_ids: list
    scores: list
    unknown_count: int
    cold_start: bool
    version: int | None
    state: object = None  # live requests: the user's attention state after this history (None: not kept)
    explanations: list | None = None  # explain: per returned item, [(history item id, weight), ...]
    explain_method: str = ""

    @classmethod
    def of(cls, out, i: int, k: int, model, state=None, explain_items: int = 0) -> Result:
        """Row ``i`` of a :class:`~sasrec.recommender.BatchResult` that ``model`` computed, cut to ``k`` items."""
        ids = out.item_ids[i, :k]
        n = sum(1 for x in ids if x)
        explanations = out.explanations(i) if explain_items else None
        return cls(
            item_ids=list(ids[:n]),
            scores=out.scores[i, :n].tolist(),
            unknown_count=int(out.unknown_count[i]),
            cold_start=bool(out.cold_start[i]),
            version=model.version,
            state=state,
            explanations=None if explanations is None else [e[:explain_items] for e in explanations[:n]],
            explain_method=str(model.card.get("explain_method", "")) if explain_items else "",
        )


def _times(items: list[Pending], times_of) -> dict:
    """The ``timestamps`` keyword of a model call for ``items`` (``times_of(item)`` per row, None where a row
    has none), or none at all when no row has times: a model (or stand-in) without time_bias is called
    as before."""
    if all(item.timestamps is None for item in items):
        return {}
    return {"timestamps": [None if item.timestamps is None else times_of(item) for item in items]}


class MicroBatcher:
    def __init__(
        self,
        get_model: Callable,
        *,
        max_batch_size: int = 64,
        max_wait_s: float = 0.001,
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
        self._metrics = metrics
        # queue.Queue, not SimpleQueue: with several model workers, CPython 3.11's SimpleQueue.get(timeout)
        # could block forever once its deadline passed during a wake-up another worker won (seen here).
        self._queue: queue.Queue[Pending | None] = queue.Queue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"micro-batcher-{i}", daemon=True) for i in range(model_workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, history, k, exclude_seen, exclude_item_ids, deadline=None, *, live=False, state=None,
               new_events=(), explain_items: int = 0, timestamps=None) -> Future:
        """Queue a request; its future's result is a :class:`Result`. ``live``: ``history`` is a stored
        user's whole history and the result carries its attention state when the model keeps states;
        ``state`` (an :class:`~sasrec.recommender.AttentionState`) is continued by ``new_events`` (the end of
        ``history`` it has not seen) instead of re-encoding, when the serving model allows it.
        ``explain_items`` > 0: the result carries explanations (the explain signature, stateless).
        ``timestamps``: one time (or None) per ``history`` event, for a model that reads them (stateless)."""
        item = Pending(list(history), int(k), bool(exclude_seen), list(exclude_item_ids), deadline,
                       live=live, state=state, new_events=list(new_events), explain_items=int(explain_items),
                       timestamps=None if timestamps is None else list(timestamps))
        if self._closed:
            item.future.set_exception(ShuttingDown("server is shutting down"))
        else:
            self._queue.put(item)
        return item.future

    def close(self, timeout: float | None = None) -> None:
        """Finish everything queued, then stop the workers."""
        self._closed = True
        self._queue.put(None)  # one sentinel, passed on by each worker that sees it
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))

    # -- worker ---------------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            end = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._process(batch)
            except BaseException as exc:  # never let the worker die
                log.exception("batch failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
        # Drain whatever is left (close() was called): answer it rather than leave callers waiting,
        # then hand the sentinel on to the next worker.
        leftover = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftover.append(item)
        self._queue.put(None)
        for start in range(0, len(leftover), self.max_batch_size):
            self._process(leftover[start : start + self.max_batch_size])

    def _process(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue  # caller cancelled
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(DeadlineExceeded())
                continue
            live.append(item)
        if not live:
            return
        model = self._get_model()
        fits = []
        for item in live:
            if item.k > model.max_k:
                item.future.set_exception(KOutOfRange(f"k must be in 1..{model.max_k}, got {item.k}"))
            else:
                fits.append(item)
        live = fits
        if not live:
            return
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(live))
        for exclude_seen in (True, False):
            group = [item for item in live if item.exclude_seen == exclude_seen]
            if group:
                self._call(model, group, exclude_seen)

    def _call(self, model, group: list[Pending], exclude_seen: bool) -> None:
        k = max(item.k for item in group)
        explained = [item for item in group if item.explain_items]
        if explained:  # the explain signature, with as many explanation items as the group's largest ask
            items = max(item.explain_items for item in explained)
            self._run_model(model, explained, lambda: (model.recommend_batch(
                [item.history for item in explained], k=k, exclude_seen=exclude_seen,
                exclude_item_ids=[item.exclude_item_ids for item in explained], explain_items=items),
                [None] * len(explained)))
        keeps_state = getattr(model, "keeps_state", False)
        stateless, continued, encoded = [], [], []
        for item in group:
            if item.explain_items:
                continue
            route = model.state_route(item.state, item.new_events) if item.live and keeps_state else None
            if route is None:
                stateless.append((item, None))
            elif route == "window_full":
                # Any known event slides the window: no state would help, so answer without one (cheaper than
                # encoding); the cached state stays, tied to the history it saw, and sends the next call here too.
                stateless.append((item, route))
            elif route == "continue":
                continued.append(item)
            else:
                encoded.append((item, route))
        if stateless:
            items = [item for item, _ in stateless]
            self._run_model(model, items, lambda: (model.recommend_batch(
                [item.history for item in items], k=k, exclude_seen=exclude_seen,
                exclude_item_ids=[item.exclude_item_ids for item in items],
                **_times(items, lambda item: item.timestamps)), [None] * len(items)),
                outcome=[reason for _, reason in stateless])
        if continued:
            answered = self._run_model(model, continued, lambda: model.advance_states(
                [item.state for item in continued], [item.new_events for item in continued], k, exclude_seen,
                [item.exclude_item_ids for item in continued],
                **_times(continued, lambda item: item.timestamps[len(item.timestamps) - len(item.new_events):])),
                outcome="continued")
            # Rows the model could not continue exactly (the window would slide): re-encoded below.
            encoded += [(item, "window_full") for item, done in zip(continued, answered) if not done]
        if encoded:
            items = [item for item, _ in encoded]
            self._run_model(model, items, lambda: model.encode_states(
                [item.history for item in items], k, exclude_seen, [item.exclude_item_ids for item in items],
                **_times(items, lambda item: item.timestamps)), outcome=[reason for _, reason in encoded])

    def _run_model(self, model, group: list[Pending], call, outcome: str | list | None = None) -> list[bool]:
        """Answer ``group`` with ``call()`` -> (BatchResult, states). ``outcome``: the label for
        ``sasrec_state_requests``, one for all rows or one per row (None: not counted). With one label, the
        call keeps states and a row whose state is None is left unanswered. Returns which rows were answered."""
        start = time.perf_counter()
        try:
            out, states = call()
        except BaseException as exc:
            log.exception("model call failed for a batch of %d", len(group))
            for item in group:
                item.future.set_exception(exc)
            return [True] * len(group)
        if self._metrics is not None:
            self._metrics.batch_latency.observe(time.perf_counter() - start)
        answered = []
        for i, item in enumerate(group):
            if isinstance(outcome, str) and states[i] is None:
                answered.append(False)
                continue
            answered.append(True)
            label = outcome if isinstance(outcome, str) or outcome is None else outcome[i]
            if label is not None and self._metrics is not None:
                self._metrics.state_requests.labels(label).inc()
            item.future.set_result(Result.of(out, i, item.k, model, states[i], item.explain_items))
        return answered

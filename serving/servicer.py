"""The ``sasrec.v1.Recommender`` servicer: request validation and response building only.

Live histories (AppendEvents, RecommendForUser, GetHistory, DeleteUser) go to the
:class:`~serving.history_store.HistoryStore` the server opened (FAILED_PRECONDITION without one);
RecommendForUser gives Recommend's answer for the stored history, continuing the user's cached attention
state (:mod:`serving.state_cache`) where that is exact: in the handler's thread in numpy when the model
allows it (``--live-compute numpy``, :mod:`sasrec.host_model`), else through the micro-batcher and the
SavedModel's state signatures (a time_bias model's state keeps the stored events' times). Recommend's
history rules (vocabulary, unknown ids, truncation, seen items, cold start) live in the SavedModel
signature and are reached through the micro-batcher and :class:`sasrec.recommender.Recommender`.
Every outcome is a deliberate status code: INVALID_ARGUMENT names the field, UNAVAILABLE means no
model yet, shutting down or the history store failing, DEADLINE_EXCEEDED when the caller's deadline
passed before the answer.
An unexpected failure is logged and answered UNAVAILABLE (retryable), never INTERNAL.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from pipelines.errors import InputError
from sasrec.recommender import DEFAULT_EXPLAIN_ITEMS, MAX_EXPLAIN_ITEMS
from sasrec.v1 import recommender_pb2, recommender_pb2_grpc
from serving.batcher import DeadlineExceeded, KOutOfRange, Result, ShuttingDown
from serving.combining import Combiner, Entry
from serving.history_store import HistoryStoreUnavailable

log = logging.getLogger("serving.servicer")
DEFAULT_K = 10
MAX_ID_BYTES = 1024  # a longer "item id" is a client bug, not an item
NO_HISTORY_STORE = ("this server keeps no histories: start it with --history-store sqlite:///PATH "
                    "or --history-store redis://HOST:PORT/DB")


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def check_ids(name: str, values) -> list:
    """``values`` as a list, or RequestError naming the first id longer than :data:`MAX_ID_BYTES`."""
    values = list(values)
    for i, value in enumerate(values):
        if len(value) > MAX_ID_BYTES:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}[{i}] is longer than {MAX_ID_BYTES} characters")
    return values


def validate(request, model, max_k_flag: int | None) -> tuple[int, bool, list]:
    """``(k, exclude_seen, exclude_item_ids)`` of a Recommend or RecommendForUser request, or RequestError."""
    if model is None:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "no model loaded yet")
    max_k = model.max_k if not max_k_flag else min(model.max_k, max_k_flag)
    k = request.k if request.HasField("k") else DEFAULT_K
    if not 1 <= k <= max_k:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"k must be in 1..{max_k}, got {k}")
    exclude = check_ids("exclude_item_ids", request.exclude_item_ids)
    exclude_seen = request.exclude_seen if request.HasField("exclude_seen") else True
    return k, exclude_seen, exclude


def explain_items(request, model) -> int:
    """How many history items explain each returned item (0: no explanations), or RequestError."""
    if not (request.explain or request.HasField("explain_items")):
        return 0
    items = request.explain_items if request.HasField("explain_items") else DEFAULT_EXPLAIN_ITEMS
    if not 1 <= items <= MAX_EXPLAIN_ITEMS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"explain_items must be in 1..{MAX_EXPLAIN_ITEMS}, got {items}")
    if not getattr(model, "explains", False):
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           "explain: the served model version has no explain signature (exported before "
                           "explanations); export it again with `sasrec export`")
    return items


def reads_timestamps(model, explained: int) -> bool:
    """Whether ``model`` reads events' timestamps (a time_bias model), or RequestError when the request
    also asks for explanations, which read none (they would explain another answer)."""
    reads = bool(getattr(model, "reads_timestamps", False))
    if reads and explained:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           "explain: the served model reads timestamps (time_bias) and its explanations do not; "
                           "ask without explain")
    return reads


METHODS = ("Recommend", "GetModelInfo", "AppendEvents", "RecommendForUser", "GetHistory", "DeleteUser")


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, store, batcher, *, model_name: str, metrics, max_k: int | None = None,
                 histories=None, max_events_per_append: int = 1000, states=None):
        """``histories``: the :class:`~serving.history_store.HistoryStore` of the live-history calls (None:
        they answer FAILED_PRECONDITION); ``max_events_per_append``: more item ids in one call are
        RESOURCE_EXHAUSTED; ``states``: the :class:`~serving.state_cache.StateCache` of users' attention
        states (None: RecommendForUser re-encodes every stored history)."""
        self._store = store
        self._batcher = batcher
        self._name = model_name
        self._metrics = metrics
        self._max_k = max_k
        self._histories = histories
        self._max_events_per_append = max_events_per_append
        self._states = states
        self._host_steps = Combiner(self._run_host_steps)
        self._requests = metrics.requests
        self._latency = {m: metrics.latency.labels(m) for m in METHODS}

    def _finish(self, method, context, start, code=grpc.StatusCode.OK, message=""):
        if code is not grpc.StatusCode.OK:
            context.set_code(code)
            context.set_details(message)
        self._requests.labels(method, code.name).inc()
        self._latency[method].observe(time.perf_counter() - start)

    def _answer(self, method, request, context, work, empty):
        """``work()``'s response, or ``empty()`` with the status of the RequestError it raised; anything
        unexpected is logged and answered UNAVAILABLE (retryable), never INTERNAL."""
        start = time.perf_counter()
        try:
            response = work()
        except RequestError as exc:
            self._finish(method, context, start, exc.code, exc.message)
        except Exception:
            log.exception("%s failed unexpectedly (user_id=%r)", method, request.user_id)
            self._finish(method, context, start, grpc.StatusCode.UNAVAILABLE, "temporary failure, retry")
        else:
            self._finish(method, context, start)
            return response
        return empty()

    def _score(self, history, k, exclude_seen, exclude, context, **live) -> tuple:
        """Recommend's answer for ``history`` (the batcher and the SavedModel signature) and the batcher's
        :class:`~serving.batcher.Result`; ``live``: the batcher's keywords for a stored user's history
        (or ``timestamps``, the events' times for a time_bias model)."""
        remaining = context.time_remaining()
        deadline = None if remaining is None or remaining > 1e6 else time.monotonic() + remaining
        future = self._batcher.submit(history, k, exclude_seen, exclude, deadline, **live)
        # The caller went away (cancelled, disconnected, deadline passed): drop the queued work.
        context.add_callback(future.cancel)
        try:
            result = future.result(timeout=None if deadline is None else max(0.0, remaining))
        except (FutureTimeout, DeadlineExceeded):
            future.cancel()
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the model answered")
        except CancelledError:
            raise RequestError(grpc.StatusCode.CANCELLED, "cancelled by the caller")
        except ShuttingDown:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        except KOutOfRange as exc:  # a model with fewer items was swapped in since validate()
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self._response(result), result

    def _score_in_numpy(self, model, history, state, new_events, k, exclude_seen, exclude, context) -> tuple:
        """RecommendForUser's answer for a stored ``history`` computed by the model's numpy path
        in the handlers' own threads, one group at a time (:class:`~serving.combining.Combiner`): a lone
        request pays no hand-off to a model worker; under load the requests queued meanwhile share one
        :meth:`~sasrec.recommender.Recommender.recommend_stored` pass, and handler threads do not contend
        for the GIL between numpy's many small calls."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the model answered")
        out, row, new_state, outcome = self._host_steps.run((model, history, state, new_events, k, exclude_seen,
                                                             exclude))
        self._metrics.state_requests.labels(outcome).inc()
        result = Result.of(out, row, k, model, new_state)
        return self._response(result), result

    @staticmethod
    def _run_host_steps(group: list[Entry]) -> None:
        """Each model's entries in one pass (a hot swap can put two versions in a group); should the pass
        fail, each entry alone, so one bad request fails alone."""
        by_model: dict[int, list[Entry]] = {}
        for entry in group:
            by_model.setdefault(id(entry.payload[0]), []).append(entry)
        for entries in by_model.values():
            model = entries[0].payload[0]
            try:
                answers = model.recommend_stored([entry.payload[1:] for entry in entries])
            except Exception as exc:
                if len(entries) == 1:
                    entries[0].error = exc
                    continue
                for entry in entries:
                    try:
                        (entry.result,) = model.recommend_stored([entry.payload[1:]])
                    except Exception as exc:
                        entry.error = exc
            else:
                for entry, answer in zip(entries, answers):
                    entry.result = answer

    def _response(self, result: Result) -> recommender_pb2.RecommendResponse:
        """The RecommendResponse of a model's :class:`~serving.batcher.Result` (and its metrics)."""
        if result.unknown_count:
            self._metrics.unknown_ids.inc(result.unknown_count)
        if result.cold_start:
            self._metrics.cold_starts.inc()
        response = recommender_pb2.RecommendResponse(
            items=[recommender_pb2.ScoredItem(item_id=i, score=s) for i, s in zip(result.item_ids, result.scores)],
            model_name=self._name,
            model_version=result.version or 0,
            unknown_history_ids=result.unknown_count,
            cold_start=result.cold_start,
        )
        if result.explanations is not None:
            response.explain_method = result.explain_method
            for scored, explanation in zip(response.items, result.explanations):
                scored.explanation.extend(
                    recommender_pb2.Contribution(item_id=item, weight=weight) for item, weight in explanation)
        return response

    def Recommend(self, request, context):
        def work():
            model = self._store.get()
            k, exclude_seen, exclude = validate(request, model, self._max_k)
            explained = explain_items(request, model)
            history = check_ids("history", request.history)
            timestamps = list(request.timestamps) or None
            if timestamps is not None and len(timestamps) != len(history):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"timestamps: {len(timestamps)} given for a history of {len(history)} items "
                                   "(give one per item or none)")
            if timestamps is not None and not reads_timestamps(model, explained):
                timestamps = None  # a model without time_bias answers the same without them
            response, _ = self._score(history, k, exclude_seen, exclude, context, explain_items=explained,
                                      timestamps=timestamps)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "Recommend user_id=%r history=%d k=%d unknown=%d cold_start=%s",
                    request.user_id, len(history), k, response.unknown_history_ids, response.cold_start,
                )
            return response

        return self._answer("Recommend", request, context, work, recommender_pb2.RecommendResponse)

    def GetModelInfo(self, request, context):
        start = time.perf_counter()
        model = self._store.get()
        if model is None:
            self._finish("GetModelInfo", context, start, grpc.StatusCode.UNAVAILABLE, "no model loaded yet")
            return recommender_pb2.ModelInfo()
        card = model.card
        max_k = model.max_k if not self._max_k else min(model.max_k, self._max_k)
        info = recommender_pb2.ModelInfo(
            model_name=self._name,
            model_version=model.version or 0,
            maxlen=model.maxlen,
            max_k=max_k,
            num_items=model.num_items,
            exported_at=str(card.get("exported_at", "")),
            source_run=str(card.get("source_run", "")),
            model_card_json=json.dumps(card, sort_keys=True),
        )
        self._finish("GetModelInfo", context, start)
        return info

    # -- live histories -------------------------------------------------------------------------

    def _stored(self, method: str, operation: str, *args):
        """``HistoryStore.<operation>(*args)``, its errors as RequestError: bad input INVALID_ARGUMENT
        (the store's message names the field), an unreachable or timed-out store UNAVAILABLE."""
        if self._histories is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, NO_HISTORY_STORE)
        try:
            return getattr(self._histories, operation)(*args)
        except InputError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except HistoryStoreUnavailable as exc:
            self._metrics.history_store_errors.labels(method).inc()
            log.warning("%s: %s", method, exc)
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))

    def _append(self, method: str, request, read_back: bool = False, since=None) -> tuple:
        """The request's ``item_ids``/``timestamps``/``idempotency_key`` appended to ``user_id``'s history:
        the AppendEventsResponse, and with ``read_back`` the stored history as this append left it (its
        :class:`~serving.history_store.Tail` after the cursor ``since``)."""
        if len(request.item_ids) > self._max_events_per_append:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"item_ids: {len(request.item_ids)} events in one call, "
                               f"the limit is {self._max_events_per_append}")
        result = self._stored(method, "append", request.user_id, list(request.item_ids),
                              list(request.timestamps) or None, request.idempotency_key or None, read_back, since)
        self._metrics.history_appended.inc(result.appended)
        self._metrics.history_dropped.inc(result.dropped)
        response = recommender_pb2.AppendEventsResponse(
            appended=result.appended, duplicate=result.duplicate, dropped=result.dropped)
        return response, result.tail

    def AppendEvents(self, request, context):
        return self._answer("AppendEvents", request, context, lambda: self._append("AppendEvents", request)[0],
                            recommender_pb2.AppendEventsResponse)

    def RecommendForUser(self, request, context):
        def work():
            # Everything that can be refused is checked before the append, so a refused call stored nothing.
            model = self._store.get()
            k, exclude_seen, exclude = validate(request, model, self._max_k)
            explained = explain_items(request, model)
            timed = reads_timestamps(model, explained)
            response = recommender_pb2.RecommendForUserResponse()
            states = None if explained else self._states
            token = states.begin() if states is not None else None  # before the store is read: see StateCache.put
            cached = states.get(request.user_id) if states is not None else None
            host = getattr(model, "host", None) is not None
            # In numpy, a state of this version re-encodes from its own item ids, so only the events it has not
            # seen are read; the signatures re-encode from the whole history's ids (and a time_bias model's times).
            since = cached.cursor if cached is not None and host and cached.state.version == model.version else None
            if request.item_ids or request.timestamps or request.idempotency_key:
                appended, tail = self._append("RecommendForUser", request, read_back=True, since=since)
                response.append.CopyFrom(appended)
            else:
                tail = self._stored("RecommendForUser", "tail", request.user_id, since)
            events, times = tail.events
            # A time_bias model reads the stored events' times (none stored: the bias is off).
            times = times if timed and any(t is not None for t in times) else None
            state, history, new_events = None, events, events
            offset = None if cached is None else tail.offset(cached.cursor)
            if offset is not None:
                # The stored history is the state's followed by what it has not seen: continue it.
                state, new_events = cached.state, events[offset:]
                history = events if tail.whole else None
            elif cached is not None and cached.state.version != model.version:
                state = cached.state  # re-encoded, and counted as a new version's miss
            if states is None:
                answer, _ = self._score(history, k, exclude_seen, exclude, context, explain_items=explained,
                                        timestamps=times)
            else:
                if host:
                    answer, result = self._score_in_numpy(model, history, state, new_events, k, exclude_seen, exclude,
                                                          context)
                else:
                    answer, result = self._score(history, k, exclude_seen, exclude, context, live=True, state=state,
                                                 new_events=new_events, timestamps=times)
                if result.state is not None:
                    states.put(request.user_id, result.state, tail.cursor, token)
            response.recommendation.CopyFrom(answer)
            response.history_length = tail.cursor.end - tail.cursor.first
            return response

        return self._answer("RecommendForUser", request, context, work, recommender_pb2.RecommendForUserResponse)

    def GetHistory(self, request, context):
        def work():
            items, times = self._stored("GetHistory", "history", request.user_id)
            return recommender_pb2.GetHistoryResponse(
                events=[recommender_pb2.Event(item_id=i, timestamp=t) for i, t in zip(items, times)])

        return self._answer("GetHistory", request, context, work, recommender_pb2.GetHistoryResponse)

    def DeleteUser(self, request, context):
        def work():
            deleted = self._stored("DeleteUser", "delete", request.user_id)
            if self._states is not None:  # after the store: a call reading the store from now on sees no events
                self._states.evict(request.user_id)
            return recommender_pb2.DeleteUserResponse(deleted=deleted)

        return self._answer("DeleteUser", request, context, work, recommender_pb2.DeleteUserResponse)

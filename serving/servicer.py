"""The ``sasrec.v1.Recommender`` servicer: request validation and response building only.

History rules (vocabulary, unknown ids, truncation, seen items, cold start) live in the SavedModel
signature and are reached through the micro-batcher and :class:`sasrec.recommender.Recommender`.
Every outcome is a deliberate status code: INVALID_ARGUMENT names the field, UNAVAILABLE means no
model yet or shutting down, DEADLINE_EXCEEDED when the caller's deadline passed before the answer.
An unexpected failure is logged and answered UNAVAILABLE (retryable), never INTERNAL.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from sasrec.v1 import recommender_pb2, recommender_pb2_grpc
from serving.batcher import DeadlineExceeded, KOutOfRange, ShuttingDown

log = logging.getLogger("serving.servicer")
DEFAULT_K = 10
MAX_ID_BYTES = 1024  # a longer "item id" is a client bug, not an item


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def validate(request, model, max_k_flag: int | None) -> tuple[list, int, bool, list]:
    """``(history, k, exclude_seen, exclude_item_ids)`` or RequestError."""
    if model is None:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "no model loaded yet")
    max_k = model.max_k if not max_k_flag else min(model.max_k, max_k_flag)
    k = request.k if request.HasField("k") else DEFAULT_K
    if not 1 <= k <= max_k:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"k must be in 1..{max_k}, got {k}")
    history = list(request.history)
    exclude = list(request.exclude_item_ids)
    for name, values in (("history", history), ("exclude_item_ids", exclude)):
        for i, value in enumerate(values):
            if len(value) > MAX_ID_BYTES:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{name}[{i}] is longer than {MAX_ID_BYTES} characters"
                )
    exclude_seen = request.exclude_seen if request.HasField("exclude_seen") else True
    return history, k, exclude_seen, exclude


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, store, batcher, *, model_name: str, metrics, max_k: int | None = None):
        self._store = store
        self._batcher = batcher
        self._name = model_name
        self._metrics = metrics
        self._max_k = max_k
        self._requests = metrics.requests
        self._latency = {m: metrics.latency.labels(m) for m in ("Recommend", "GetModelInfo")}

    def _finish(self, method, context, start, code=grpc.StatusCode.OK, message=""):
        if code is not grpc.StatusCode.OK:
            context.set_code(code)
            context.set_details(message)
        self._requests.labels(method, code.name).inc()
        self._latency[method].observe(time.perf_counter() - start)

    def Recommend(self, request, context):
        start = time.perf_counter()
        try:
            history, k, exclude_seen, exclude = validate(request, self._store.get(), self._max_k)
            remaining = context.time_remaining()
            deadline = None if remaining is None or remaining > 1e6 else time.monotonic() + remaining
            future = self._batcher.submit(history, k, exclude_seen, exclude, deadline)
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
            response = recommender_pb2.RecommendResponse(
                items=[recommender_pb2.ScoredItem(item_id=i, score=s) for i, s in zip(result.item_ids, result.scores)],
                model_name=self._name,
                model_version=result.version or 0,
                unknown_history_ids=result.unknown_count,
                cold_start=result.cold_start,
            )
            if result.unknown_count:
                self._metrics.unknown_ids.inc(result.unknown_count)
            if result.cold_start:
                self._metrics.cold_starts.inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "Recommend user_id=%r history=%d k=%d unknown=%d cold_start=%s",
                    request.user_id, len(history), k, result.unknown_count, result.cold_start,
                )
            self._finish("Recommend", context, start)
            return response
        except RequestError as exc:
            self._finish("Recommend", context, start, exc.code, exc.message)
        except Exception:
            log.exception("Recommend failed unexpectedly (user_id=%r)", request.user_id)
            self._finish("Recommend", context, start, grpc.StatusCode.UNAVAILABLE, "temporary failure, retry")
        return recommender_pb2.RecommendResponse()

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

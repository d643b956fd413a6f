"""Health, reflection and Prometheus metrics for the recommendation server.

Metrics live in a registry per server (not the global one) so several servers can run in one process
(tests) and a scrape only shows this server's series.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

SERVICE_NAME = "sasrec.v1.Recommender"
log = logging.getLogger("serving")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sasrec_requests", "gRPC requests by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "sasrec_request_latency_seconds", "Server-side request latency", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "sasrec_batch_size", "Requests per model call (micro-batching)", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "sasrec_model_call_seconds", "Time of one batched model call", buckets=LATENCY_BUCKETS, registry=r
        )
        # With --processes N (prometheus-client multiprocess mode): one series per process, labelled pid.
        self.model_version = Gauge(
            "sasrec_model_version", "Loaded model version (0: none)", registry=r, multiprocess_mode="liveall"
        )
        self.model_base_available = Gauge(
            "sasrec_model_base_available",
            "1 while the model base folder can be read; 0: serving the loaded version from memory",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.model_base_available.set(1)
        self.model_loads = Counter("sasrec_model_loads", "Model version loads by result", ["result"], registry=r)
        self.unknown_ids = Counter("sasrec_unknown_history_ids", "History ids not in the vocabulary", registry=r)
        self.cold_starts = Counter("sasrec_cold_start", "Requests answered with the popularity fallback", registry=r)
        for result in ("ok", "failed"):
            self.model_loads.labels(result)
        # Live histories (--history-store).
        self.history_appended = Counter("sasrec_history_events_appended", "Events appended to stored histories",
                                        registry=r)
        self.history_dropped = Counter(
            "sasrec_history_events_dropped", "Oldest stored events dropped by --max-events-per-user", registry=r)
        self.history_store_errors = Counter(
            "sasrec_history_store_errors", "Calls answered UNAVAILABLE because the history store failed",
            ["method"], registry=r)

        # Attention states (RecommendForUser with a model that keeps them; --state-cache-bytes).
        self.state_requests = Counter(
            "sasrec_state_requests", "RecommendForUser answers by how the user's attention state was obtained: "
            "continued (cached state, advanced by the new events); re-encoded from the stored history after a miss, "
            "a new model version or with positions counted from the end; window_full: the history fills maxlen, so "
            "every new event shifts the window (re-encoded in numpy; through the signatures, answered without a state)", ["outcome"],
            registry=r)
        for outcome in ("continued", "miss", "new_version", "positions_from_end", "window_full"):
            self.state_requests.labels(outcome)
        self.state_cache_bytes = Gauge("sasrec_state_cache_bytes", "Bytes of cached attention states", registry=r,
                                       multiprocess_mode="livesum")
        self.state_cache_states = Gauge("sasrec_state_cache_states", "Users with a cached attention state",
                                        registry=r, multiprocess_mode="livesum")

    def serve_http(self, port: int, addr: str = "0.0.0.0"):
        """Expose /metrics on ``port`` (0: pick a free one); returns the HTTP server."""
        return serve_metrics_http(self.registry, port, addr)


def serve_metrics_http(registry: CollectorRegistry, port: int, addr: str):
    """``registry`` on http://addr:port/metrics; a port that cannot be bound is an error naming the flag."""
    from pipelines.errors import InputError

    try:
        httpd, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise InputError(f"--metrics-port: cannot bind {addr}:{port} ({exc.strerror or exc})") from None
    return httpd


def make_health():
    """The standard ``grpc.health.v1`` service, NOT_SERVING until told otherwise."""
    from grpc_health.v1 import health

    servicer = health.HealthServicer(experimental_non_blocking=True)
    set_serving(servicer, False)
    return servicer


def set_serving(servicer, serving: bool) -> None:
    from grpc_health.v1 import health_pb2

    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        servicer.set(name, status)


def add_health_and_reflection(server, health_servicer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from sasrec.v1 import recommender_pb2

    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)

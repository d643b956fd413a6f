"""``sasrec serve``: flags and wiring of the gRPC recommendation server.

    sasrec serve --model-base models/ml-1m --port 8500 --metrics-port 9090

Pieces: a thread-pool ``grpc.server`` (a ``grpc.aio`` version, tried on 2026-11-29, served 10-25%
more requests at 32-64 clients on 2 cores but, under 3x overload, answered RESOURCE_EXHAUSTED only
after ~2 s instead of tens of milliseconds, since its event loop was saturated) with the Recommender
servicer, the standard health service (NOT_SERVING until a model is loaded and warmed) and
reflection; a :class:`~serving.model_store.ModelStore` watching the model base; a
:class:`~serving.batcher.MicroBatcher`; Prometheus metrics on ``--metrics-port``; optional TLS and
bearer-token auth (:mod:`serving.security`). Two batches are in flight, their graphs run on one
TensorFlow thread, and the process's threads run under SCHED_BATCH (``--model-workers``,
``--intra-op-threads``, ``--inter-op-threads``, ``--cpu-scheduling``): on a small machine this
serves more requests per core. SIGTERM or SIGINT: health goes NOT_SERVING, new calls are refused,
in-flight calls finish within ``--grace-period-s``, exit 0. ``--processes N`` runs N such servers on
one port under a supervisor (:mod:`serving.processes`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("serving")


@dataclass
class ServerConfig:
    model_base: str
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8500
    metrics_port: int | None = 9090  # None: no metrics endpoint
    max_batch_size: int = 64
    batch_timeout_ms: float = 0.0  # greedy: requests queued while the model runs form the next batch
    poll_interval_s: float = 5.0
    max_message_bytes: int = 1 << 20
    grace_period_s: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    max_k: int | None = None
    workers: int = 32
    # Two batches in flight whose graphs run on one TensorFlow thread (intra- and inter-op 1): one
    # worker gathers, converts and answers while the other's batch computes, the other core stays free
    # for gRPC's Python threads, and a lone request does not wait for sleeping pool threads to wake.
    # Measured on 2 cores (alternated): 32 clients 1,143-1,233 req/s vs 1,050-1,088 with one worker
    # and two inter-op threads, 1,047 with two of each. An XLA export compiles ~0.6 s per batch size
    # and width on that one thread when a new version warms, stalling every batch meanwhile: serve XLA
    # exports with inter_op_threads=2 (a warning says so).
    model_workers: int = 2
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # "batch": Linux SCHED_BATCH, so a woken handler thread does not preempt the thread that woke it
    # while that one still holds the GIL (measured on 2 cores: +16-20% req/s for the stack with an
    # instant model, about +5-10% with the real one, which is near the machine's noise).
    cpu_scheduling: str = "batch"
    max_concurrent_rpcs: int = 1024
    # Server processes sharing the port (SO_REUSEPORT), each with its own GIL: see serving.processes.
    # Measured on 2 cores over 32 client connections: 2 processes 1,379 vs 1,176 req/s at 64 clients,
    # 983 vs 778 within p99 25 ms; N times the memory, and a soak at 70% of the higher peak lost its
    # tail (RELIABILITY.md): one process stays the default.
    processes: int = 1


def add_arguments(parser) -> None:
    d = ServerConfig(model_base="")
    a = parser.add_argument
    a("--model-base", required=True, help="model base folder with integer version folders (sasrec export)")
    a("--model-name", help="name reported in responses (default: the model base folder name)")
    a("--host", default=d.host, help=f"address to bind (default {d.host}; use 0.0.0.0 in containers)")
    a("--port", type=int, default=d.port, help=f"gRPC port (default {d.port}; 0 picks a free one)")
    a("--metrics-port", type=int, default=d.metrics_port, help=f"Prometheus /metrics port (default {d.metrics_port}; -1 disables)")
    a("--max-batch-size", type=int, default=d.max_batch_size, help=f"most requests per model call (default {d.max_batch_size})")
    a("--batch-timeout-ms", type=float, default=d.batch_timeout_ms,
      help=f"longest wait for a batch to fill after its first request (default {d.batch_timeout_ms}: no wait; "
      "requests that arrive while the model is busy still batch together)")
    a("--poll-interval-s", type=float, default=d.poll_interval_s,
      help=f"how often to look for new model versions (default {d.poll_interval_s})")
    a("--max-message-bytes", type=int, default=d.max_message_bytes,
      help=f"largest accepted request; bigger ones get RESOURCE_EXHAUSTED (default {d.max_message_bytes})")
    a("--grace-period-s", type=float, default=d.grace_period_s,
      help=f"on SIGTERM, time for in-flight requests to finish (default {d.grace_period_s})")
    a("--tls-cert", help="PEM certificate chain: serve over TLS (with --tls-key)")
    a("--tls-key", help="PEM private key for --tls-cert")
    a("--auth-token", help="require 'authorization: Bearer TOKEN' (health checks stay open); "
      "prefer --auth-token-file or SASREC_AUTH_TOKEN, arguments are visible in ps")
    a("--auth-token-file", help="file holding the bearer token")
    a("--max-k", type=int, default=None, help="largest k accepted (default: every item of the model)")
    a("--workers", type=int, default=d.workers, help=f"gRPC handler threads (default {d.workers})")
    a("--model-workers", type=int, default=d.model_workers,
      help=f"threads that form batches and call the model side by side (default {d.model_workers})")
    a("--intra-op-threads", type=int, default=d.intra_op_threads,
      help=f"TensorFlow threads inside one op (default {d.intra_op_threads}: a batch computes on one core; "
      "0: TensorFlow's default, every core)")
    a("--inter-op-threads", type=int, default=d.inter_op_threads,
      help=f"TensorFlow threads running ops (default {d.inter_op_threads}; use 2 for models exported with "
      "--xla, whose warm-up compiles would otherwise stall the batches; 0: TensorFlow's default, one per core)")
    a("--cpu-scheduling", choices=["batch", "default"], default=d.cpu_scheduling,
      help=f"Linux scheduling policy of the server's threads (default {d.cpu_scheduling}: SCHED_BATCH, "
      "woken threads wait for the running one's time slice instead of preempting it, which keeps the "
      "GIL moving; 'default': leave it)")
    a("--max-concurrent-rpcs", type=int, default=d.max_concurrent_rpcs,
      help=f"calls beyond this get RESOURCE_EXHAUSTED (default {d.max_concurrent_rpcs})")
    a("--processes", type=int, default=d.processes,
      help=f"server processes sharing the port, one GIL each (default {d.processes}); each loads the model, "
      "and clients reach them all only over several connections (see README)")
    a("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def config_from_args(args) -> ServerConfig:
    from pipelines.errors import InputError
    from serving.security import read_token

    if args.max_batch_size < 1:
        raise InputError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.batch_timeout_ms < 0:
        raise InputError(f"--batch-timeout-ms must be >= 0, got {args.batch_timeout_ms}")
    if args.max_k is not None and args.max_k < 1:
        raise InputError(f"--max-k must be >= 1, got {args.max_k}")
    for flag, least in (("workers", 1), ("model_workers", 1), ("intra_op_threads", 0), ("inter_op_threads", 0),
                        ("processes", 1)):
        if getattr(args, flag) < least:
            raise InputError(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    return ServerConfig(
        model_base=args.model_base,
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port is not None and args.metrics_port < 0 else args.metrics_port,
        max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms,
        poll_interval_s=args.poll_interval_s,
        max_message_bytes=args.max_message_bytes,
        grace_period_s=args.grace_period_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token=read_token(args.auth_token, args.auth_token_file),
        max_k=args.max_k,
        workers=args.workers,
        model_workers=args.model_workers,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        cpu_scheduling=args.cpu_scheduling,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        processes=args.processes,
    )


def set_batch_scheduling() -> None:
    """SCHED_BATCH for every thread of this process (threads started later inherit it). On Linux a
    thread woken by another usually preempts it at once; when the waker holds the GIL (a model worker
    answering a batch, gRPC's poller), the woken thread can only wait for it, and both lose time."""
    if not hasattr(os, "sched_setscheduler"):
        log.warning("--cpu-scheduling batch needs Linux; the default scheduling stays")
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
        except ProcessLookupError:
            pass  # the thread ended meanwhile
        except PermissionError as exc:
            log.warning("cannot set SCHED_BATCH (%s); the default scheduling stays", exc)
            return


def set_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """Size TensorFlow's thread pools for this process (0: TensorFlow's default). They can only be set
    before TensorFlow first runs an op; a process that already did keeps its pools, with a warning."""
    import tensorflow as tf

    threading_config = tf.config.threading
    for name, value, get, set_ in (
        ("intra-op", intra_op, threading_config.get_intra_op_parallelism_threads,
         threading_config.set_intra_op_parallelism_threads),
        ("inter-op", inter_op, threading_config.get_inter_op_parallelism_threads,
         threading_config.set_inter_op_parallelism_threads),
    ):
        if get() == value:
            continue
        try:
            set_(value)
        except RuntimeError:
            log.warning("TensorFlow already started in this process: %s threads stay at %d, not %d",
                        name, get(), value)


class RecommenderServer:
    """The wired server. ``start()`` binds and starts watching; ``stop()`` drains and shuts down."""

    def __init__(self, config: ServerConfig, *, loader=None):
        """``loader(version folder) -> model`` replaces ``Recommender.load`` (benchmarks, tests)."""
        if config.cpu_scheduling == "batch":
            set_batch_scheduling()
        if loader is None:
            set_tensorflow_threads(config.intra_op_threads, config.inter_op_threads)
        import grpc

        from sasrec.v1 import recommender_pb2_grpc
        from serving import observability, security
        from serving.batcher import MicroBatcher
        from serving.model_store import ModelStore
        from serving.servicer import RecommenderServicer

        self.config = config
        base = Path(config.model_base)
        self.model_name = config.model_name or base.resolve().name
        self.metrics = observability.Metrics()
        # Both ports first: one in use is an error before any thread starts.
        interceptors = [security.TokenAuthInterceptor(config.auth_token)] if config.auth_token else []
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", 64 << 20),
            # Only a process pool shares its port; a lone server must fail to bind a port in use.
            ("grpc.so_reuseport", 1 if config.processes > 1 else 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        address = f"{config.host}:{config.port}"
        creds = security.server_credentials(config.tls_cert, config.tls_key)
        try:
            self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind", e.g. the port is in use
            self.port = 0
        if not self.port:
            from pipelines.errors import InputError

            raise InputError(f"--port: cannot bind {address} (in use, or not an address of this machine)")
        self.metrics_port = None
        self._metrics_http = None
        if config.metrics_port is not None:
            self._metrics_http = self.metrics.serve_http(config.metrics_port, config.host)
            self.metrics_port = self._metrics_http.server_port
        self.health = observability.make_health()
        self.ready = threading.Event()
        self.store = ModelStore(
            base,
            loader=loader,
            poll_interval_s=config.poll_interval_s,
            metrics=self.metrics,
            max_batch_size=config.max_batch_size,
            on_change=self._on_model,
        )
        self.batcher = MicroBatcher(
            self.store.get,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.batch_timeout_ms / 1000.0,
            model_workers=config.model_workers,
            metrics=self.metrics,
        )
        recommender_pb2_grpc.add_RecommenderServicer_to_server(
            RecommenderServicer(
                self.store, self.batcher, model_name=self.model_name, metrics=self.metrics, max_k=config.max_k
            ),
            self.server,
        )
        observability.add_health_and_reflection(self.server, self.health)
        self._stopped = threading.Event()

    def _on_model(self, model) -> None:
        from serving.observability import set_serving

        if getattr(model, "xla", False) and self._single_inter_op_thread():
            log.warning("model version %s is XLA-compiled and TensorFlow runs ops on one thread: warming the "
                        "next version will stall requests while it compiles; serve it with --inter-op-threads 2",
                        model.version)
        if not self._stopped.is_set():
            set_serving(self.health, True)
        self.ready.set()

    @staticmethod
    def _single_inter_op_thread() -> bool:
        import tensorflow as tf

        return tf.config.threading.get_inter_op_parallelism_threads() == 1

    def start(self) -> "RecommenderServer":
        self.server.start()
        self.store.start()
        secure = "TLS" if self.config.tls_cert else "plaintext"
        auth = "bearer token" if self.config.auth_token else "no auth"
        log.info(
            "listening on %s:%d (%s, %s), metrics on %s, watching %s",
            self.config.host, self.port, secure, auth, self.metrics_port, self.config.model_base,
        )
        if self.config.host not in ("127.0.0.1", "localhost", "::1") and not (
            self.config.tls_cert or self.config.auth_token
        ):
            log.warning("serving on %s without TLS or auth: keep this port inside a private network", self.config.host)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight calls finish within ``grace`` seconds, release everything."""
        from serving.observability import set_serving

        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_period_s if grace is None else grace
        set_serving(self.health, False)
        self.store.stop()
        done = self.server.stop(grace)
        done.wait(grace + 1)
        self.batcher.close(timeout=grace + 1)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    if config.processes > 1:
        from serving.processes import serve_processes

        return serve_processes(config)
    return run_server(config)


def stop_on_signals(what: str, grace: float) -> threading.Event:
    """An event that SIGTERM or SIGINT sets, logging that ``what`` drains within ``grace`` seconds."""
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: draining %s(grace %.1f s)", signal.Signals(signum).name, what, grace)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def run_server(config: ServerConfig, on_listening=None) -> int:
    """One server in this process until SIGTERM/SIGINT (``on_listening()`` once it listens)."""
    server = RecommenderServer(config).start()
    if on_listening is not None:
        on_listening()
    stop = stop_on_signals("", config.grace_period_s)
    while not stop.wait(0.5):
        pass
    server.stop()
    log.info("stopped")
    return 0

"""``sasrec serve``: flags and wiring of the gRPC recommendation server.

    sasrec serve --model-base models/ml-1m --port 8500 --metrics-port 9090

Pieces: a thread-pool ``grpc.server`` (not ``grpc.aio``, whose saturated event loop answered overload
late: see BENCHMARKS.md, section serving) with the Recommender servicer, the standard health service
(NOT_SERVING until a model is loaded and warmed) and reflection; a
:class:`~serving.model_store.ModelStore` watching the model base; a
:class:`~serving.batcher.MicroBatcher`; Prometheus metrics on ``--metrics-port``; optional TLS and
bearer-token auth (:mod:`serving.security`). Two batches are in flight, their graphs run on one
TensorFlow thread, and the process's threads run under SCHED_BATCH (``--model-workers``,
``--intra-op-threads``, ``--inter-op-threads``, ``--cpu-scheduling``): on a small machine this
serves more requests per core. SIGTERM or SIGINT: health goes NOT_SERVING, new calls are refused,
in-flight calls finish within ``--grace-period-s``, exit 0. This module runs one server
(:func:`run_server`); ``--processes N`` is :mod:`serving.processes`, which starts N of them.

Each :class:`ServerConfig` field is declared once, with :func:`option`: its default, ``--help`` text
and bounds; :func:`add_arguments` and :func:`config_from_args` derive the flags from the fields.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import types
import typing
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import threadpoolctl

from serving.history_store import HistoryOptions, HistoryStoreUnavailable, open_history_store
from serving.state_cache import StateCache

log = logging.getLogger("serving")
HISTORY_DEFAULTS = HistoryOptions()  # the history-store flags' defaults are the store's own


def option(default=dataclasses.MISSING, *, help: str, minimum: float | None = None, choices=None,
           default_text: str | None = None, value=None, also: dict[str, str] | None = None):
    """A :class:`ServerConfig` field and its ``sasrec serve`` flag (``--`` + the name with ``-``).

    ``help`` is the flag's text; " (default X)" is appended to it (``default_text`` replaces X; a None
    default without one shows nothing; no default makes the flag required). ``minimum``: smaller values
    are an error naming the flag (None passes). ``choices``: the values accepted. Hooks for the few
    special cases: ``value(args)`` computes the field from the parsed flags instead of taking the flag's
    value as it is; ``also`` maps extra flags (not fields) that ``value`` reads to their help texts."""
    metadata = {"help": help, "minimum": minimum, "choices": choices, "default_text": default_text,
                "value": value, "also": also or {}}
    return dataclasses.field(default=default, metadata=metadata)


def _metrics_port(args) -> int | None:
    return None if args.metrics_port is not None and args.metrics_port < 0 else args.metrics_port


def _auth_token(args) -> str | None:
    from serving.security import read_token

    return read_token(args.auth_token, args.auth_token_file)


@dataclass
class ServerConfig:
    model_base: str = option(help="model base folder with integer version folders (sasrec export)")
    model_name: str | None = option(None, help="name reported in responses",
                                    default_text="the model base folder name")
    host: str = option("127.0.0.1", help="address to bind; use 0.0.0.0 in containers")
    port: int = option(8500, help="gRPC port; 0 picks a free one")
    metrics_port: int | None = option(9090, help="Prometheus /metrics port; -1 disables",
                                      value=_metrics_port)
    max_batch_size: int = option(64, help="most requests per model call", minimum=1)
    # Greedy by default: requests queued while the model runs form the next batch.
    batch_timeout_ms: float = option(
        0.0, minimum=0,
        help="longest wait for a batch to fill after its first request; 0: no wait, requests that arrive "
        "while the model is busy still batch together")
    poll_interval_s: float = option(5.0, help="how often to look for new model versions")
    max_message_bytes: int = option(1 << 20, help="largest accepted request; bigger ones get RESOURCE_EXHAUSTED")
    grace_period_s: float = option(10.0, help="on SIGTERM, time for in-flight requests to finish")
    tls_cert: str | None = option(None, help="PEM certificate chain: serve over TLS (with --tls-key)")
    tls_key: str | None = option(None, help="PEM private key for --tls-cert")
    auth_token: str | None = option(
        None, value=_auth_token, also={"--auth-token-file": "file holding the bearer token"},
        help="require 'authorization: Bearer TOKEN' (health checks stay open); prefer --auth-token-file or "
        "SASREC_AUTH_TOKEN, arguments are visible in ps")
    max_k: int | None = option(None, help="largest k accepted", minimum=1, default_text="every item of the model")
    workers: int = option(32, help="gRPC handler threads", minimum=1)
    # Two batches in flight on one TensorFlow thread: one worker answers while the other's batch computes,
    # the other core runs gRPC's Python threads (see BENCHMARKS.md, section serving).
    model_workers: int = option(2, help="threads that form batches and call the model side by side", minimum=1)
    intra_op_threads: int = option(
        1, minimum=0,
        help="TensorFlow threads inside one op; 1: a batch computes on one core, 0: TensorFlow's default, every core")
    inter_op_threads: int = option(
        1, minimum=0,
        help="TensorFlow threads running ops; use 2 for models exported with --xla, whose warm-up compiles would "
        "otherwise stall the batches; 0: TensorFlow's default, one per core")
    # SCHED_BATCH: a woken handler does not preempt the GIL holder that woke it (see BENCHMARKS.md, section serving).
    cpu_scheduling: str = option(
        "batch", choices=["batch", "default"],
        help="Linux scheduling policy of the server's threads: 'batch' is SCHED_BATCH, woken threads wait for "
        "the running one's time slice instead of preempting it, which keeps the GIL moving; 'default' leaves it")
    max_concurrent_rpcs: int = option(1024, help="calls beyond this get RESOURCE_EXHAUSTED")
    # One process by default: more buy peak throughput for N times the memory, not sustained load on 2 cores
    # (see BENCHMARKS.md, section serving, and RELIABILITY.md, section Load).
    processes: int = option(
        1, minimum=1,
        help="server processes sharing the port, one GIL each; each loads the model, and clients reach them all "
        "only over several connections, see README")
    # Off by default: keeping users' events is a decision with obligations (where the file lives, backups,
    # erasure), and a server that silently wrote a database into its working folder (often a container's
    # throw-away layer) would lose it on redeploy. Without it the live-history calls answer
    # FAILED_PRECONDITION saying which flag to set.
    history_store: str | None = option(
        None, default_text="off: AppendEvents, RecommendForUser, GetHistory and DeleteUser answer FAILED_PRECONDITION",
        help="where users' live histories are kept: sqlite:///PATH (one file; shared by --processes N on this "
        "host; sqlite:////abs/path.db for an absolute path) or redis://HOST:PORT/DB (several replicas); see "
        "DESIGN.md for durability")
    max_events_per_user: int = option(
        HISTORY_DEFAULTS.max_events_per_user, minimum=1,
        help="stored events kept per user; an append beyond it drops the oldest (counted in "
        "sasrec_history_events_dropped). A few times the largest maxlen, so a model with a longer maxlen still "
        "finds full histories")
    max_events_per_append: int = option(
        1000, minimum=1, help="most item ids in one AppendEvents or RecommendForUser call; more get RESOURCE_EXHAUSTED")
    max_id_length: int = option(
        HISTORY_DEFAULTS.max_id_length, minimum=1, help="longest stored user id, item id or idempotency key (characters); longer get "
        "INVALID_ARGUMENT")
    idempotency_window_s: float = option(
        HISTORY_DEFAULTS.idempotency_window_s, minimum=1, help="how long a retried append with the same idempotency key is recognised")
    history_store_timeout_s: float = option(
        HISTORY_DEFAULTS.timeout_s, minimum=0.01, help="longest a history-store call may take (Redis: connect and each reply; SQLite: waiting for "
        "another writer's lock); beyond it the call answers UNAVAILABLE")
    live_compute: str = option(
        "numpy", choices=["numpy", "signature"],
        help="how RecommendForUser computes users' attention states: 'numpy' in the request's thread from the "
        "exported weights (a time_bias model, or one exported before this option, falls back to 'signature', logged "
        "when the version loads); 'signature' through the micro-batcher and the SavedModel's state signatures")
    # On by default since states are computed in numpy: an ML-1M-sized RecommendForUser then answered 2.3x as
    # many requests/s unloaded as re-encoding, and as many under load (BENCHMARKS.md, section live-histories);
    # a full state there is ~160 KiB, so 256 MiB holds ~1,600 full windows per process.
    state_cache_mb: float = option(
        256, minimum=0,
        help="memory for users' cached attention states (MiB, least recently used dropped first): RecommendForUser "
        "then continues a user's state by the new events instead of re-encoding the stored history (scores within "
        "1e-4 of Recommend's); 0: off, every call re-encodes the stored history through serving_default (Recommend's "
        "answer exactly); only used with --history-store")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(annotation):
    """``int`` for ``int`` and ``int | None``; the one non-None type of an optional."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def add_arguments(parser) -> None:
    """One flag per :class:`ServerConfig` field (plus the extra flags its ``also`` hooks name), then
    ``--log-level``, which is no server setting."""
    hints = typing.get_type_hints(ServerConfig)
    for field in dataclasses.fields(ServerConfig):
        meta = field.metadata
        kwargs = {"type": _flag_type(hints[field.name]), "help": meta["help"]}
        if field.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
            if meta["default_text"] is not None:
                kwargs["help"] += f" (default: {meta['default_text']})"
            elif field.default is not None:
                kwargs["help"] += f" (default {field.default})"
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(_flag(field.name), **kwargs)
        for flag, help in meta["also"].items():
            parser.add_argument(flag, help=help)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def config_from_args(args) -> ServerConfig:
    """The :class:`ServerConfig` of parsed ``sasrec serve`` flags; a value below a field's minimum is an
    :class:`~pipelines.errors.InputError` naming the flag."""
    from pipelines.errors import InputError

    values = {}
    for field in dataclasses.fields(ServerConfig):
        meta = field.metadata
        given = getattr(args, field.name)
        if meta["minimum"] is not None and given is not None and given < meta["minimum"]:
            raise InputError(f"{_flag(field.name)} must be >= {meta['minimum']}, got {given}")
        values[field.name] = given if meta["value"] is None else meta["value"](args)
    return ServerConfig(**values)


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


def _open_histories(config: ServerConfig):
    """The ``--history-store`` named, or None. A Redis store connects on its first call, so the server
    starts while Redis is down (calls answer UNAVAILABLE until it is back); an SQLite file that cannot
    be opened is a startup error naming the flag."""
    from pipelines.errors import InputError

    if not config.history_store:
        return None
    try:
        return open_history_store(
            config.history_store, max_events_per_user=config.max_events_per_user,
            max_id_length=config.max_id_length, idempotency_window_s=config.idempotency_window_s,
            timeout_s=config.history_store_timeout_s)
    except HistoryStoreUnavailable as exc:
        raise InputError(f"--history-store: {exc}") from None


class RecommenderServer:
    """The wired server. ``start()`` binds and starts watching; ``stop()`` drains and shuts down."""

    def __init__(self, config: ServerConfig, *, loader=None):
        """``loader(version folder) -> model`` replaces ``Recommender.load`` (benchmarks, tests)."""
        if config.cpu_scheduling == "batch":
            set_batch_scheduling()
        if loader is None:
            set_tensorflow_threads(config.intra_op_threads, config.inter_op_threads)
            # numpy (the live-history path) computes one user per handler thread: a BLAS pool per call would
            # only spin on the cores the handlers need (BENCHMARKS.md, section live-histories).
            threadpoolctl.threadpool_limits(limits=1, user_api="blas")
            from sasrec.recommender import Recommender

            loader = functools.partial(Recommender.load, host=config.live_compute == "numpy")
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
        self.histories = _open_histories(config)
        self.states = None
        if self.histories is not None and config.state_cache_mb > 0:
            self.states = StateCache(int(config.state_cache_mb * 2**20), metrics=self.metrics)
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
                self.store, self.batcher, model_name=self.model_name, metrics=self.metrics, max_k=config.max_k,
                histories=self.histories, max_events_per_append=config.max_events_per_append, states=self.states,
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
        if self.states is not None:
            self.states.clear()  # the old version's states can no longer answer (see serving.batcher)
        if self.histories is not None and self.config.live_compute == "numpy" and hasattr(model, "host") \
                and model.host is None:
            log.warning("model version %s: RecommendForUser computes attention states through the SavedModel's "
                        "signatures, not in numpy: %s", model.version, model.host_reason)
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
            "listening on %s:%d (%s, %s), metrics on %s, watching %s, histories in %s",
            self.config.host, self.port, secure, auth, self.metrics_port, self.config.model_base,
            self.histories.name if self.histories is not None else "no store",
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
        if self.histories is not None:
            self.histories.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)


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

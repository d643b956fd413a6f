"""``sasrec serve``: one server in this process, or ``--processes N`` sharing one port, one GIL each.

:func:`serve` is what ``sasrec serve`` runs: :func:`serving.server.run_server` for one process, else
the supervisor below, which starts the servers (this module imports :mod:`serving.server`, never the
other way round).

One Python process serves at most what one GIL lets its gRPC threads do, even with a model that
answers at once (instant-model rows in BENCHMARKS.md, section serving). With ``--processes N`` a
supervisor (which never imports TensorFlow) starts N copies of the server with ``SO_REUSEPORT`` on
the same address; the kernel spreads incoming *connections* over them, so a client needs several
channels (or many clients one each) to reach every process. Each process loads, warms and
hot-reloads the model on its own: N times the memory, and during a reload the processes may answer
with different versions for a few seconds (every response names its version).

The supervisor:
- checks the port is free (a clear error instead of silently sharing it with another server);
- serves ``/metrics`` for all of them (prometheus-client's multiprocess mode: counters and histograms
  summed, ``sasrec_model_version`` one series per process);
- restarts a process that dies (backing off when one keeps dying); one that exits before it listens
  (bad flags, unreadable certificate) stops the pool;
- on SIGTERM/SIGINT passes SIGTERM on, lets each process drain within ``--grace-period-s``, exits 0.
Child processes get SIGTERM if the supervisor dies (Linux), so none is left serving alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, replace

from serving.server import ServerConfig, run_server, stop_on_signals

log = logging.getLogger("serving.processes")

EXIT_CONFIG_ERROR = 2
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a process that lived this long resets the restart back-off


def check_port(host: str, port: int) -> int:
    """The port the pool will share: ``port``, or a free one for 0. Binding without SO_REUSEPORT fails
    while anything listens there, including another pool (whose sockets all carry SO_REUSEPORT)."""
    from pipelines.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"--port: cannot bind {host}:{port} ({exc.strerror or exc})") from None
        return probe.getsockname()[1]


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when the supervisor dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot tie this server process to its supervisor (not Linux?)")
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _child_main(config, log_level: int, parent_pid: int, listening) -> None:
    from pipelines.errors import InputError

    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    _die_with_parent(parent_pid)
    try:
        code = run_server(config, on_listening=listening.set)
    except InputError as exc:
        log.error("%s", exc)
        code = EXIT_CONFIG_ERROR
    raise SystemExit(code)


@dataclass
class _Child:
    index: int
    process: multiprocessing.process.BaseProcess
    listening: object  # multiprocessing Event, set once the process listens
    started_at: float


class ProcessPool:
    """Starts, watches, restarts and stops the server processes (``serve_processes`` runs it)."""

    def __init__(self, config):
        self.config = config
        self._ctx = multiprocessing.get_context("spawn")  # no fork: gRPC and TensorFlow threads
        self._children: list[_Child | None] = [None] * config.processes
        self._crashes = [0] * config.processes
        self._restart_at = [0.0] * config.processes
        self.failed: str | None = None  # why the pool stopped on its own
        self.failed_code = 0

    def _start(self, index: int) -> None:
        listening = self._ctx.Event()
        process = self._ctx.Process(
            target=_child_main,
            args=(self.config, logging.getLogger().getEffectiveLevel(), os.getpid(), listening),
            name=f"server-{index + 1}",
        )
        process.start()
        self._children[index] = _Child(index, process, listening, time.monotonic())
        log.info("started server process %d of %d (pid %d)", index + 1, len(self._children), process.pid)

    def start(self) -> None:
        for index in range(len(self._children)):
            self._start(index)

    def check(self, on_exit=None) -> bool:
        """Restart processes that ended; False once the pool must stop (see ``failed``)."""
        now = time.monotonic()
        for index, child in enumerate(self._children):
            if child is None:
                if now >= self._restart_at[index]:
                    self._start(index)
                continue
            if child.process.is_alive():
                continue
            code = child.process.exitcode
            if on_exit is not None:
                on_exit(child.process.pid)
            if not child.listening.is_set():
                self.failed = f"server process {index + 1} exited with code {code} before it listened"
                self.failed_code = EXIT_CONFIG_ERROR if code == EXIT_CONFIG_ERROR else 1
                log.error("%s: stopping", self.failed)
                return False
            lived = now - child.started_at
            self._crashes[index] = 1 if lived >= STABLE_AFTER_S else self._crashes[index] + 1
            delay = 0.0 if self._crashes[index] == 1 else min(MAX_BACKOFF_S, 2.0 ** (self._crashes[index] - 1))
            log.error("server process %d (pid %d) exited with code %s after %.0f s; restarting it in %.0f s",
                      index + 1, child.process.pid, code, lived, delay)
            self._children[index] = None
            self._restart_at[index] = now + delay
        return True

    def stop(self, grace: float) -> bool:
        """SIGTERM every process, wait for them to drain; True when all exited 0."""
        live = [c for c in self._children if c is not None]
        for child in live:
            if child.process.is_alive():
                os.kill(child.process.pid, signal.SIGTERM)
        end = time.monotonic() + grace + 30  # drain + releasing TensorFlow
        clean = True
        for child in live:
            child.process.join(max(0.0, end - time.monotonic()))
            if child.process.is_alive():
                log.error("server process %d did not stop in time: killing it", child.index + 1)
                child.process.kill()
                child.process.join(5)
                clean = False
            elif child.process.exitcode != 0:
                clean = False
        return clean


def _serve_metrics(config, path: str):
    from prometheus_client import CollectorRegistry, multiprocess

    from serving.observability import serve_metrics_http

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return serve_metrics_http(registry, config.metrics_port, config.host)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT (one server here, or a supervised pool); returns the exit code."""
    if config.processes > 1:
        return serve_processes(config)
    return run_server(config)


def serve_processes(config: ServerConfig) -> int:
    """Run ``config.processes`` servers on one port until SIGTERM/SIGINT; returns the exit code."""
    port = check_port(config.host, config.port)
    metrics_dir = httpd = None
    if config.metrics_port is not None:
        # Every process writes its metrics here (read when prometheus_client is imported, so before
        # the children start); the supervisor's endpoint adds them up.
        metrics_dir = tempfile.mkdtemp(prefix="sasrec-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    pool = ProcessPool(replace(config, port=port, metrics_port=None))
    stop = stop_on_signals(f"{config.processes} server processes ", config.grace_period_s)
    on_exit = None
    try:
        if metrics_dir is not None:
            from prometheus_client import multiprocess

            httpd = _serve_metrics(config, metrics_dir)
            on_exit = lambda pid: multiprocess.mark_process_dead(pid, metrics_dir)  # noqa: E731
        pool.start()
        log.info("%d server processes on %s:%d, metrics on %s", config.processes, config.host, port,
                 httpd.server_port if httpd else None)
        while not stop.wait(0.5):
            if not pool.check(on_exit):
                break
        clean = pool.stop(config.grace_period_s)
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if pool.failed:
        return pool.failed_code
    log.info("stopped")
    return 0 if clean else 1

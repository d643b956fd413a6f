from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.serving.helpers import make_run  # noqa: E402


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="session")
def model_base(run_dir, tmp_path_factory) -> Path:
    """A model base with version 1 exported from ``run_dir`` (XLA off; ``wide`` in
    tests/sasrec/test_export.py and the warm-up test cover XLA exports)."""
    from sasrec.export import export_run

    base = tmp_path_factory.mktemp("models") / "tiny"
    export_run(run_dir, base)
    return base


@pytest.fixture(scope="session")
def recommender(model_base):
    from sasrec.recommender import Recommender

    return Recommender.load(model_base)


@pytest.fixture(scope="session")
def keras_model(run_dir):
    from sasrec.run import RunFolder

    return RunFolder(run_dir).load_best()


@pytest.fixture(scope="session")
def vocab(run_dir):
    from pipelines.dataset import read_items

    return read_items(run_dir / "dataset")[0]


@pytest.fixture
def fresh_base(model_base, tmp_path) -> Path:
    """A private copy of the model base (for tests that add or break versions)."""
    base = tmp_path / "tiny"
    shutil.copytree(model_base, base)
    return base


def start_server(base: Path, **overrides):
    from serving.server import RecommenderServer, ServerConfig

    # Leave the test process's TensorFlow thread pools (already started by the model fixtures) and
    # scheduling policy as they are.
    config = ServerConfig(model_base=str(base), port=0, metrics_port=0, poll_interval_s=0.2, grace_period_s=5.0,
                          intra_op_threads=0, inter_op_threads=0, cpu_scheduling="default")
    for key, value in overrides.items():
        setattr(config, key, value)
    return RecommenderServer(config).start()


@pytest.fixture(scope="module")
def server(model_base):
    srv = start_server(model_base)
    assert srv.wait_ready(60)
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def client(server):
    from serving.client import RecommenderClient

    with RecommenderClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        yield c


# A real redis-server for the history store's Redis backend (tests/serving/test_history_store.py,
# test_live_histories.py); tests that need one skip, with the reason, only when the binary is absent.
REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed (apt-get install redis-server)")


def free_port() -> int:
    """A free port below the kernel's ephemeral range: connecting to a port in that range while nothing listens
    there (a Redis a test keeps down) can connect the client to itself, which then holds the port and keeps
    redis-server from binding it (seen once in CI)."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    for port in random.sample(range(10000, low), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 10000..{low - 1}")


def start_redis(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A redis-server on ``port`` (default: a free one) with AOF ``appendfsync everysec`` (the settings
    serving/history_store.py describes), and its URL once it answers."""
    port = port or free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    proc.send_signal(sig)
    proc.wait(10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop(proc)

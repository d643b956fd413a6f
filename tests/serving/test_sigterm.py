"""`sasrec serve` as a real process: SIGTERM stops accepting, finishes in-flight calls, exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.serving.conftest import free_port
from tests.serving.helpers import item_names

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(model_base):
    from serving.client import RecommenderClient

    port = free_port()
    cmd = [sys.executable, "-m", "sasrec", "serve", "--model-base", str(model_base), "--port", str(port),
           "--metrics-port", "-1", "--grace-period-s", "5", "--max-batch-size", "64",
           "--batch-timeout-ms", "2000", "--poll-interval-s", "0.2"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = RecommenderClient(f"127.0.0.1:{port}", timeout=10)
        end = time.monotonic() + 90
        while client.health() != "SERVING":
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < end, "server never became SERVING"
            time.sleep(0.2)
        # Requests wait up to 2 s for their batch to fill, so these are in flight at SIGTERM. A call counts
        # once a handler has it: one the server has received but not yet handed to a handler is cancelled
        # by gRPC's shutdown, and a server that just warmed can stall its Python threads for a while
        # (garbage collections over TensorFlow's objects), so SIGTERM comes well after the calls.
        results, errors = [], []

        def one():
            try:
                results.append(client.recommend(item_names(40)[:4], k=3))
            except grpc.RpcError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert not errors, [e.code() for e in errors]
        assert len(results) == 8 and all(len(r.items) == 3 for r in results)
        code = proc.wait(timeout=15)
        assert code == 0
        assert time.monotonic() - started < 5 + 5
        # New calls after shutdown fail (the port is closed).
        with pytest.raises(grpc.RpcError):
            client.recommend(["a"], timeout=1)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "received SIGTERM" in log and "stopped" in log

"""`sasrec serve --processes N`: a supervisor and N server processes sharing one port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.serving.helpers import item_names
from tests.serving.test_sigterm import ROOT, free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def version_by_pid(text: str) -> dict[int, float]:
    return {int(pid): float(v) for pid, v in re.findall(r'^sasrec_model_version\{pid="(\d+)"\} (\S+)$', text, re.M)}


def recommend_ok(text: str) -> float:
    match = re.search(r'^sasrec_requests_total\{code="OK",method="Recommend"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def established_on(port: int, pid: int) -> int:
    """TCP connections to ``port`` held open by process ``pid`` (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                count += 1
    return count


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"supervisor exited with {proc.returncode} waiting for {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.slow
def test_two_processes_share_the_port_add_up_metrics_restart_a_killed_one_and_drain(model_base, recommender):
    from serving.client import RecommenderClient

    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "sasrec", "serve", "--model-base", str(model_base), "--port", str(port),
           "--metrics-port", str(metrics_port), "--processes", "2", "--grace-period-s", "5",
           "--poll-interval-s", "0.2"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = []
    try:
        def two_serving():
            try:
                versions = version_by_pid(scrape(metrics_port))
            except OSError:
                return None
            return versions if len(versions) == 2 and set(versions.values()) == {1.0} else None

        pids = set(wait_for(two_serving, 120, "two processes serving version 1", proc))
        # Connections, not calls, are spread over the processes: 16 clients with a connection each
        # reach both (all on one has probability 2 / 2**16).
        clients = [RecommenderClient(f"127.0.0.1:{port}", timeout=10, own_connection=True) for _ in range(16)]
        rng = np.random.default_rng(0)
        names = item_names(40)
        sent = 0
        for client in clients:
            for _ in range(2):
                history = list(rng.choice(names, 6))
                reply = client.recommend(history, k=5)
                expected = recommender.recommend(history, k=5)
                assert [i.item_id for i in reply.items] == expected.item_ids
                np.testing.assert_allclose([i.score for i in reply.items], [s for _, s in expected.items], atol=1e-5)
                sent += 1
        assert all(established_on(port, pid) >= 1 for pid in pids), {pid: established_on(port, pid) for pid in pids}
        assert recommend_ok(scrape(metrics_port)) == sent  # summed over the processes

        # A process that dies is replaced; the other one keeps answering meanwhile.
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        survivors = wait_for(
            lambda: (v := two_serving()) and victim not in v and v, 120, "a replacement process", proc
        )
        assert len(set(survivors) - pids) == 1
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10, own_connection=True) as fresh:
            assert len(fresh.recommend(names[:4], k=3).items) == 3

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 5 + 10
        for pid in survivors:  # no server process outlives the supervisor
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        for client in clients:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "exited with code -9" in log and "restarting it" in log
    assert log.count("received SIGTERM") == 3 and "serving.processes: stopped" in log  # the supervisor and both servers


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_port_in_use_is_an_error_naming_the_flag(model_base, processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "sasrec", "serve", "--model-base", str(model_base), "--port", str(port),
             "--metrics-port", "-1", "--processes", processes],
            cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert f"--port: cannot bind 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_process_that_fails_before_listening_stops_the_pool_with_its_error(model_base, tmp_path):
    missing = tmp_path / "missing.pem"
    proc = subprocess.run(
        [sys.executable, "-m", "sasrec", "serve", "--model-base", str(model_base), "--port", str(free_port()),
         "--metrics-port", "-1", "--processes", "2", "--tls-cert", str(missing), "--tls-key", str(missing)],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{missing}: No such file or directory" in proc.stderr
    assert "before it listened: stopping" in proc.stderr
    assert "restarting" not in proc.stderr


def test_a_metrics_port_in_use_is_an_error_naming_the_flag(model_base):
    from pipelines.errors import InputError
    from tests.serving.conftest import start_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(InputError, match=r"--metrics-port: cannot bind"):
            start_server(model_base, host="127.0.0.1", metrics_port=taken.getsockname()[1])


def test_the_server_module_does_not_import_the_process_supervisor():
    """One-way dependency: serving.processes starts servers; serving.server does not load it, directly or
    through another module (tests/test_layering.py checks the server's own import statements)."""
    script = "import sys, serving.server; print('serving.processes' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("processes, runs", [(1, "run_server"), (3, "serve_processes")])
def test_serve_runs_one_server_here_or_a_pool(monkeypatch, processes, runs):
    from serving import processes as module
    from serving.server import ServerConfig

    called = []
    monkeypatch.setattr(module, "run_server", lambda config: called.append("run_server") or 0)
    monkeypatch.setattr(module, "serve_processes", lambda config: called.append("serve_processes") or 0)
    assert module.serve(ServerConfig(model_base="models/x", processes=processes)) == 0
    assert called == [runs]

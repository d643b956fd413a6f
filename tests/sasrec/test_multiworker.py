"""`sasrec train --multi-worker`: two TensorFlow workers on localhost train the tiny dataset together,
as well as one process, write the run folder once (the chief) and resume after both are killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sasrec.cli import main

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--epochs", "4", "--set", "maxlen=32", "--set", "tensorboard=false", "--set", "eval_every=2", "--quiet"]
TOLERANCE = 0.05  # test HR@10, two workers vs one process (README, Training on several machines: measured figures)

# Runs `sasrec` with an audit hook that records, outside the run folder, every write this process
# makes inside it (open for writing, mkdir, rename, remove): argv[1] is the run folder, argv[2] the record.
AUDITED_SASREC = r"""
import os, sys
run, record = os.path.realpath(sys.argv.pop(1)), sys.argv.pop(1)
WRITES = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree")

def audit(event, args):
    if (event == "open" or event in WRITES) and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        mode, flags = (args[1], args[2]) if event == "open" else ("w", 0)
        writing = any(c in (mode or "") for c in "wax+") or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and path.startswith(run + os.sep):
            targets = [os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            with open(record, "a") as handle:
                handle.write(f"{event} {' '.join(os.path.realpath(t) for t in targets)}\n")

sys.addaudithook(audit)
from sasrec.cli import main
sys.exit(main())
"""


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(args: list, run: Path, records: Path) -> list[subprocess.Popen]:
    """Two TensorFlow workers running the same command, TF_CONFIG naming each one's task."""
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        command = [sys.executable, "-c", AUDITED_SASREC, run, records / f"worker-{index}.txt", *args, "--multi-worker"]
        workers.append(subprocess.Popen([str(a) for a in command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    return workers


def test_hr10(run: Path) -> tuple[float, float]:
    full = next(r for r in json.loads((run / "metrics.json").read_text())["results"] if r["protocol"]["protocol"] == "full")
    return full["metrics"]["hr@10"], full["popularity"]["hr@10"]


test_hr10.__test__ = False  # a helper, not a test


@pytest.mark.slow
def test_two_tensorflow_workers_train_as_well_as_one_write_once_and_resume(tiny_dataset, tmp_path):
    run, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    args = ["train", "--data", tiny_dataset, "--out", run, *TRAIN]
    # Killed together once the chief has written the checkpoint of epoch 2 ...
    workers = start_workers(args, run, records)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "epoch-00002").is_dir() and time.time() < deadline and workers[0].poll() is None:
        time.sleep(0.2)
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    first = [worker.communicate()[0] for worker in workers]
    assert (run / "checkpoints" / "epoch-00002").is_dir(), first[0][-3000:]
    assert not (run / "metrics.json").exists()
    # ... and started again with the same command: both resume from it and finish.
    workers = start_workers(args, run, records)
    outs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, out in zip(workers, outs):
        assert worker.returncode == 0, out[-3000:]
        assert "Resuming" in out, out[-3000:]
    assert "Worker 0 of 2 (chief" in outs[0] and "Worker 1 done" in outs[1]
    state = json.loads(sorted((run / "checkpoints").glob("epoch-*"))[-1].joinpath("state.json").read_text())
    assert state["epoch"] == 4 and [row[0] for row in state["curve"]] == [1, 2, 3, 4]

    # The chief wrote the run folder; the other worker wrote nothing in it, in either launch.
    chief_writes = (records / "worker-0.txt").read_text()
    for name in ("config.toml", "best.keras", "checkpoints/epoch-00004", "log.csv", "metrics.json", "curve.png"):
        assert f"{os.path.realpath(run)}/{name}" in chief_writes, name
    assert not (records / "worker-1.txt").exists(), (records / "worker-1.txt").read_text()

    # As good as one process trained the same way (no XLA: distributed steps are plain tf.functions).
    single = tmp_path / "single"
    assert main(["train", "--data", str(tiny_dataset), "--out", str(single), *TRAIN, "--no-xla"]) == 0
    (two_workers, popularity), (one_process, _) = test_hr10(run), test_hr10(single)
    print(f"test HR@10: 2 workers {two_workers:.4f}, 1 process {one_process:.4f}, popularity {popularity:.4f}")
    assert two_workers >= one_process - TOLERANCE
    assert two_workers >= 3 * popularity


@pytest.mark.parametrize("tf_config, named", [
    (None, "set TF_CONFIG"),
    ("{not json", "TF_CONFIG is not JSON"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 1}}', "not a member"),
    ('{"cluster": {"worker": ["localhost:1"], "ps": ["localhost:2"]}, "task": {"type": "worker", "index": 0}}', "ps"),
])
def test_a_bad_tf_config_is_a_one_line_error(tiny_dataset, tmp_path, monkeypatch, capsys, tf_config, named):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    assert main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--multi-worker"]) == 2
    err = capsys.readouterr().err
    assert named in err and "TF_CONFIG" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, env, named", [
    (["--coordinator", "localhost:1", "--worker-index", "0"], {}, "--num-workers not set"),
    (["--coordinator", "localhost:1", "--worker-index", "0"], {"SASREC_NUM_WORKERS": "two"}, "SASREC_NUM_WORKERS='two'"),
    (["--num-workers", "2", "--worker-index", "2"], {"SASREC_COORDINATOR": "localhost:1"}, "--worker-index 2"),
])
def test_missing_or_bad_jax_cluster_settings_are_one_line_errors(tiny_dataset, tmp_path, monkeypatch, capsys,
                                                                 flags, env, named):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    for name in ("SASREC_COORDINATOR", "SASREC_NUM_WORKERS", "SASREC_WORKER_INDEX"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--multi-worker", *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1, err


def test_cluster_flags_need_multi_worker(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--num-workers", "2"]) == 2
    assert "add --multi-worker" in capsys.readouterr().err

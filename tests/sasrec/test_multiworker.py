"""`sasrec train --multi-worker`: two TensorFlow workers on localhost train the tiny dataset together,
as well as one process, write the run folder once (the chief) and resume after both are killed; two
JAX processes (jax.distributed, gloo collectives) train one epoch on the same global batches as one
process, and only the chief writes the run folder."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
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


# One epoch that compiles one training step: maxlen 16 makes every batch 16 wide (histories of 13-28
# training items), and 75 rows (600 windows: 8 equal batches) are odd, so each JAX process's share is
# padded with an empty history. A small model and a high learning rate, without dropout, learn well
# past popularity in those 8 steps. Most of a run's time on CPU is XLA compiling (each process's
# train_step, and every variable's initializer); optimisation level 0 compiles 3x faster and trains
# the same model.
JAX_BATCH, JAX_STEPS = 75, 8  # ceil(600 training windows / 75)
# A constant rate: the tiny data picks the sparse preset, whose cosine decay would spend the one epoch annealing.
JAX_TRAIN = ["--epochs", "1", "--set", "maxlen=16", "--set", f"batch_size={JAX_BATCH}", "--set", "num_blocks=1",
             "--set", "hidden_units=16", "--set", "dropout=0.0", "--set", "learning_rate=0.01", "--set", "lr_decay=none",
             "--set", "tensorboard=false", "--quiet"]
# The epoch's mean loss, two processes against one: Keras shuffles the batch order with Python's random
# state (not the same in the two runs), and Adam amplifies float rounding (measured 0.4% apart). A global
# batch of each process's whole batch doubles it (the loss is divided by an average batch's targets).
LOSS_TOLERANCE = 0.02

# Prepended to AUDITED_SASREC for JAX workers: records, as JSON lines in $SHARES_RECORD, each batch that
# this process's ProcessShare hands Keras (its share) with the whole global batch it was cut from.
RECORDED_SHARES = r"""
import json, os
import sasrec.train

_share_item = sasrec.train.ProcessShare.__getitem__

def _recorded(self, index):
    ids, y = _share_item(self, index)
    batch_ids, batch_y = self.feed[index]
    with open(os.environ["SHARES_RECORD"], "a") as handle:
        handle.write(json.dumps({"index": index, "ids": ids.tolist(), "pos": y["pos"].tolist(),
                                 "batch_ids": batch_ids.tolist(), "batch_pos": batch_y["pos"].tolist()}) + "\n")
    return ids, y

sasrec.train.ProcessShare.__getitem__ = _recorded
"""


def jax_env(**extra) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL="3",
                PYTHONUNBUFFERED="1", **extra)


def recorded_shares(record: Path) -> list[dict]:
    return [{k: np.asarray(v) for k, v in json.loads(line).items()} for line in record.read_text().splitlines()]


def epoch_loss(run: Path) -> float:
    return float((run / "log.csv").read_text().splitlines()[-1].split(",")[1])


def optimizer_steps(run: Path) -> int:
    """The optimizer's iteration count saved with the last checkpoint (its first variable)."""
    checkpoint = sorted((run / "checkpoints").glob("epoch-*"))[-1]
    with h5py.File(checkpoint / "model.weights.h5", "r") as weights:
        return int(weights["optimizer/vars/0"][()])


@pytest.mark.slow
def test_two_jax_processes_train_on_the_global_batch_and_only_the_chief_writes(tiny_dataset, tmp_path):
    run, single, records = tmp_path / "run", tmp_path / "single", tmp_path / "records"
    records.mkdir()
    args = ["train", "--data", tiny_dataset, "--out", run, *JAX_TRAIN, "--multi-worker"]
    coordinator = f"localhost:{free_ports(1)[0]}"
    workers = []
    try:
        for index in range(2):
            command = [sys.executable, "-c", RECORDED_SHARES + AUDITED_SASREC, run, records / f"worker-{index}.txt",
                       *args, "--coordinator", coordinator, "--num-workers", "2", "--worker-index", index]
            env = jax_env(SHARES_RECORD=str(records / f"shares-{index}.jsonl"))
            workers.append(subprocess.Popen([str(a) for a in command], cwd=ROOT, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [worker.communicate(timeout=180)[0] for worker in workers]
    finally:
        for worker in workers:  # one that failed can leave the other waiting in a collective
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    for worker, out in zip(workers, outs):
        assert worker.returncode == 0, out[-3000:]
    assert "Worker 0 of 2 (chief" in outs[0] and "Worker 1 done" in outs[1], outs[1][-3000:]

    # The chief wrote the run folder; the other process wrote nothing in it.
    chief_writes = (records / "worker-0.txt").read_text()
    for name in ("config.toml", "best.keras", "checkpoints/epoch-00001", "log.csv", "metrics.json", "curve.png"):
        assert f"{os.path.realpath(run)}/{name}" in chief_writes, name
    assert not (records / "worker-1.txt").exists(), (records / "worker-1.txt").read_text()

    # Each step, the two processes cut their shares from the same global batch of batch_size rows, in
    # the same order, every batch once: process 0 the first rows, process 1 the rest and an empty
    # history that pads them to an even count.
    shares = [recorded_shares(records / f"shares-{index}.jsonl") for index in range(2)]
    assert [s["index"] for s in shares[0]] == [s["index"] for s in shares[1]]
    assert sorted(s["index"] for s in shares[0]) == list(range(JAX_STEPS))
    for first, second in zip(*shares):
        for name in ("ids", "pos"):
            batch = first[f"batch_{name}"]
            assert len(batch) == JAX_BATCH and np.array_equal(batch, second[f"batch_{name}"])
            padded = np.concatenate([batch, np.zeros_like(batch[:1])])
            assert len(first[name]) == len(second[name]) == (JAX_BATCH + 1) // 2
            assert np.array_equal(np.concatenate([first[name], second[name]]), padded)

    # One process trained the same way: as many steps, to the same loss and quality.
    one = subprocess.run([sys.executable, "-m", "sasrec", "train", "--data", str(tiny_dataset), "--out", str(single),
                          *JAX_TRAIN], cwd=ROOT, env=jax_env(), capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    assert optimizer_steps(run) == optimizer_steps(single) == JAX_STEPS
    two_loss, one_loss = epoch_loss(run), epoch_loss(single)
    (two_workers, popularity), (one_process, _) = test_hr10(run), test_hr10(single)
    print(f"epoch loss: 2 processes {two_loss:.4f}, 1 process {one_loss:.4f}; test HR@10: 2 processes "
          f"{two_workers:.4f}, 1 process {one_process:.4f}, popularity {popularity:.4f}")
    assert abs(two_loss - one_loss) <= LOSS_TOLERANCE * one_loss
    assert math.isfinite(two_workers) and two_workers >= one_process - TOLERANCE
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

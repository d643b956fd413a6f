"""Training end to end on synthetic data: learning, resume after kill -9, data parallelism, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.errors import InputError
from sasrec.cli import main
from sasrec.run import RunFolder

ROOT = Path(__file__).resolve().parents[2]
# XLA off: compiling costs more than these tiny runs train (the learning test below keeps the default, XLA on).
NO_XLA = ["--set", "tensorboard=false", "--set", "jit_compile=false"]
FAST = [*NO_XLA, "--set", "eval_every=2", "--quiet"]


def sasrec_subprocess(*args, backend="tensorflow", **kwargs):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "sasrec", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_model_beats_popularity_by_far_on_synthetic_chains(tiny_dataset, tmp_path, capsys):
    started = time.perf_counter()
    code = main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--epochs", "12",
                 "--set", "maxlen=32", "--set", "loss=ce", "--set", "dropout=0.1", "--set", "tensorboard=true",
                 "--set", "eval_every=3", "--quiet"])
    elapsed = time.perf_counter() - started
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    full = next(r for r in metrics["results"] if r["protocol"]["protocol"] == "full")
    model_hr, pop_hr = full["metrics"]["hr@10"], full["popularity"]["hr@10"]
    print(f"HR@10 model {model_hr:.3f} vs popularity {pop_hr:.3f} in {elapsed:.0f} s")
    assert model_hr >= 3 * pop_hr and model_hr > 0.5
    assert "hr@10" in capsys.readouterr().out
    run = tmp_path / "run"
    for name in ("config.toml", "best.keras", "log.csv", "curve.png", "dataset/items.parquet", "dataset/manifest.json"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    assert len((run / "log.csv").read_text().splitlines()) == 13  # header + one row per epoch
    assert RunFolder(run).test_metrics("full") == full["metrics"]
    with pytest.raises(InputError, match="no test results with protocol 'sampled-1000'"):
        RunFolder(run).test_metrics("sampled-1000")


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_resumes_from_the_last_checkpoint(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", tiny_dataset, "--out", run, "--epochs", "6", "--set", "maxlen=32", *FAST]
    proc = sasrec_subprocess(*args)
    deadline = time.time() + 240
    while not list((run / "checkpoints").glob("epoch-00002")) and time.time() < deadline:
        time.sleep(0.2)
    assert list((run / "checkpoints").glob("epoch-00002")), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()
    out, _ = sasrec_subprocess(*args).communicate(timeout=300)
    assert "Resuming" in out and "after epoch" in out, out
    state = json.loads(sorted((run / "checkpoints").glob("epoch-*"))[-1].joinpath("state.json").read_text())
    assert state["epoch"] == 6 and len(state["curve"]) == 6  # every epoch exactly once in the loop state
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["training"]["epoch"] == 6
    # Same quality (within noise) as a run that was never interrupted.
    straight = tmp_path / "straight"
    assert main([str(straight if a == run else a) for a in args]) == 0
    hr = lambda folder: RunFolder(folder).test_metrics("full")["hr@10"]  # noqa: E731
    assert abs(hr(run) - hr(straight)) <= 0.05, (hr(run), hr(straight))
    # A different config in the same run folder is refused rather than silently mixed.
    capsys.readouterr()
    assert main(["train", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "7", *FAST]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "Traceback" not in err


# Settings that once broke under a strategy: the dense preset's bool "seen" masks (Keras reduced a batch to
# build the model) and negatives shared by the batch (split among the replicas), 17 of them (split unevenly).
SHARED_NEGATIVES = ["--set", "loss=sampled-softmax", "--set", "num_negatives=17", "--set", "negative_sampling=popularity",
                    "--set", "logq_correction=true"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", [["--set", "loss=ce"], SHARED_NEGATIVES], ids=["ce", "sampled-softmax"])
def test_tensorflow_mirrored_strategy_over_two_cpu_devices(tiny_dataset, tmp_path, loss):
    out, _ = sasrec_subprocess("train", "--data", tiny_dataset, "--out", tmp_path / "run", "--epochs", "2", "--devices", "2",
                               "--set", "maxlen=32", "--set", "length_bucketing=false", "--set", "exclude_seen_negatives=true",
                               *loss, *FAST).communicate(timeout=300)
    assert "2 device(s) (MirroredStrategy)" in out, out
    full = next(r for r in json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]
                if r["protocol"]["protocol"] == "full")
    assert full["metrics"]["ndcg@10"] > full["popularity"]["ndcg@10"], out  # it learned, on both replicas' data


def test_train_on_a_missing_dataset_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "not a dataset folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evaluate_without_a_trained_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "train first" in capsys.readouterr().err


def test_stop_at_ndcg_ends_training_once_validation_reaches_it(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "30", "--set", "maxlen=32",
                 "--set", "loss=ce", "--set", "eval_every=1", "--set", "stop_at_ndcg=0.3", *NO_XLA, "--quiet"])
    assert code == 0
    training = json.loads((run / "metrics.json").read_text())["training"]
    assert training["stopped_early"] and training["epoch"] < 30
    assert training["best"] >= 0.3 and training["best_epoch"] == training["epoch"]


def test_a_sliding_window_step_longer_than_maxlen_is_pointed_out(tiny_dataset, tmp_path, capsys):
    code = main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--set", "maxlen=8", "--set", "sliding_window_step=12", *FAST])
    assert code == 0
    assert "note: sliding_window_step 12 > maxlen 8: the events between windows are never trained on" in (
        capsys.readouterr().out)


def test_a_run_saved_before_a_config_field_existed_still_resumes(tiny_dataset, tmp_path):
    from pipelines.errors import InputError
    from sasrec.config import SASRecConfig
    from sasrec.run import RunFolder

    run, config, info = tmp_path / "run", SASRecConfig(maxlen=16), {"backend": "tensorflow", "loss": "ce"}
    prepare_run_dir = RunFolder(run).create_or_check
    prepare_run_dir(tiny_dataset, config, info)
    saved = (run / "config.toml").read_text()
    # As written by a version without `stop_at_ndcg`: the field is at its default, nothing differs.
    (run / "config.toml").write_text("\n".join(l for l in saved.splitlines() if not l.startswith("stop_at_ndcg")))
    prepare_run_dir(tiny_dataset, config, info)
    with pytest.raises(InputError, match="different config"):
        prepare_run_dir(tiny_dataset, SASRecConfig(maxlen=16, stop_at_ndcg=0.2), info)
    with pytest.raises(InputError, match="different config"):
        prepare_run_dir(tiny_dataset, config, {**info, "loss": "bce"})
    # Started when the presets said loss "ce"; resumed now that they say "auto" (ce on this catalog).
    prepare_run_dir(tiny_dataset, SASRecConfig(maxlen=16, loss="ce"), info)


def test_val_protocol_sampled_100_validates_against_sampled_negatives(tiny_dataset, tmp_path):
    from pipelines.dataset import read_dataset
    from sasrec.evaluate import Protocol, evaluate_scores
    from sasrec.evaluate import model_scorer
    from sasrec.run import RunFolder

    run = tmp_path / "run"
    code = main(["train", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "2", "--set", "maxlen=32",
                 "--set", "loss=ce", "--set", "val_protocol=sampled-100", *NO_XLA, "--set", "eval_every=1", "--quiet"])
    assert code == 0
    training = json.loads((run / "metrics.json").read_text())["training"]
    score, ds = model_scorer(RunFolder(run).load_best()), read_dataset(tiny_dataset)
    validation = {
        name: evaluate_scores(score, ds, Protocol(split="valid", protocol=name), 32, with_popularity=False)
        for name in ("full", "sampled-100")
    }
    assert training["best"] == pytest.approx(validation["sampled-100"]["metrics"]["ndcg@10"], abs=1e-6)
    assert training["best"] != pytest.approx(validation["full"]["metrics"]["ndcg@10"], abs=1e-3)


def test_unknown_val_protocol_is_a_config_error():
    from pipelines.errors import InputError
    from sasrec.config import SASRecConfig

    with pytest.raises(InputError, match="val_protocol"):
        SASRecConfig(val_protocol="sampled-50")


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    """Two epochs of the default training seed (42) on the tiny synthetic data."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    assert main(["train", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "2", "--set", "maxlen=16",
                 "--set", "loss=ce", *FAST]) == 0
    return run


def test_evaluation_uses_its_own_seed_not_the_training_seed(tiny_run):
    from sasrec.evaluate import evaluate_run
    from sasrec.run import RunFolder

    config = RunFolder(tiny_run).config()
    assert config.seed == 42 and config.eval_seed == 0
    result = evaluate_run(tiny_run, protocols=("sampled-100",), write=False)["results"][0]
    assert result["protocol"]["seed"] == config.eval_seed


def test_evaluate_refuses_a_dataset_the_run_was_not_trained_on(tiny_run, tiny_dataset, tmp_path, capsys):
    from tests.conftest import make_synthetic_dataset

    other = make_synthetic_dataset(tmp_path, users=100, items=60, chains=6, min_length=15, max_length=30, seed=5)
    assert main(["evaluate", "--run", str(tiny_run), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(other) in err and str(tiny_run) in err and "not the one" in err
    # The run's own dataset is accepted; results of other splits and protocols stay in metrics.json.
    assert main(["evaluate", "--run", str(tiny_run), "--data", str(tiny_dataset), "--split", "valid"]) == 0
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    kept = {(r["protocol"]["split"], r["protocol"]["protocol"]) for r in metrics["results"]}
    assert kept == {("test", "full"), ("test", "sampled-100"), ("valid", "full")}
    assert metrics["training"]["epoch"] == 2
    out = capsys.readouterr().out
    assert "repeats missed" in out and "targets that repeat an item of the history" in out


def test_a_diverging_run_stops_with_a_one_line_error_and_keeps_no_nan_model(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "3", "--set", "maxlen=16",
                 "--set", "loss=ce", "--set", "learning_rate=1e30", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "training diverged in epoch 1" in err and "learning_rate" in err
    assert not (run / "best.keras").exists() and not list((run / "checkpoints").glob("epoch-*"))


def test_a_model_with_nan_weights_is_never_kept_as_best(tiny_dataset, tmp_path):
    import numpy as np

    from pipelines.dataset import read_dataset
    from sasrec.config import SASRecConfig
    from sasrec.model import build_model
    from sasrec.run import RunFolder
    from sasrec.train import RunState, TrainingDiverged

    ds, config = read_dataset(tiny_dataset), SASRecConfig(maxlen=16, hidden_units=16)
    model = build_model(config, ds.vocab_size)
    for weight in model.weights:
        weight.assign(np.full(weight.shape, np.nan, "float32"))
    run = RunFolder(tmp_path / "run")
    run.create_or_check(tiny_dataset, config, {})
    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "train_seconds": 0.0, "stopped_early": False,
             "curve": []}
    callback = RunState(run, ds, config, feed=None, state=state)
    callback.set_model(model)
    with pytest.raises(TrainingDiverged, match="NaN or infinite scores"):
        callback.on_epoch_end(0, {"loss": 1.0})  # a finite loss cannot hide non-finite scores
    assert not (run.path / "best.keras").exists() and run.latest_checkpoint() is None


def test_a_dataset_without_validation_users_is_refused_before_training(tmp_path, capsys):
    from pipelines.prepare import prepare_file
    from pipelines.synthetic import generate, write_log

    log = write_log(generate(users=100, items=30, chains=3, min_length=10, max_length=20, seed=1), tmp_path / "log.csv")
    # The validation cut equals the test cut: the validation window is empty.
    prepare_file("csv", log, tmp_path / "ds", reader_options=dict(user_col="user_id", item_col="item_id",
                 time_col="timestamp"), kcore="none", split="temporal", cutoff_quantile=0.9, valid_quantile=0.9)
    assert main(["train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no user has a valid item" in err and "--valid-quantile" in err
    assert not (tmp_path / "run").exists()


def test_a_dataset_with_sequences_in_parts_trains_and_evaluates_like_one_file(tiny_run, tiny_dataset, tmp_path):
    from pipelines.dataset import read_dataset, write_dataset

    parts = write_dataset(tmp_path / "parts", read_dataset(tiny_dataset), users_per_part=128)
    assert main(["evaluate", "--run", str(tiny_run), "--data", str(parts), "--protocol", "both"]) == 0
    from_parts = json.loads((tiny_run / "metrics.json").read_text())["results"]
    assert main(["evaluate", "--run", str(tiny_run), "--protocol", "both"]) == 0
    from_file = json.loads((tiny_run / "metrics.json").read_text())["results"]
    assert [r["metrics"] for r in from_parts] == [r["metrics"] for r in from_file]
    assert main(["train", "--data", str(parts), "--out", str(tmp_path / "run"), "--epochs", "1", "--set", "maxlen=16",
                 "--set", "loss=ce", *FAST]) == 0

"""Training a SASRec run: a dataset folder in, a self-contained run folder out.

Run folder (written by :func:`train`)::

    config.toml            the resolved SASRecConfig (plus the backend and the loss actually used)
    dataset/               manifest.json and items.parquet copied from the dataset (vocabulary)
    checkpoints/epoch-N/   weights with optimizer state and the loop state, one folder per epoch,
                           each created by an atomic rename; the newest two are kept
    best.keras             the model with the best validation NDCG@10
    log.csv                one row per epoch (loss, validation metrics, wall time)
    tensorboard/           TensorBoard logs
    metrics.json           test metrics (full and sampled-100) with their protocols and the
                           popularity baseline on the same protocols
    curve.png              validation NDCG@10 against wall time

A run folder that holds checkpoints is resumed, not restarted: a crash or ``kill -9`` loses at most
the epoch in progress.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from pipelines.atomic import atomic_directory, atomic_file
from pipelines.dataset import ITEMS_FILE, MANIFEST_FILE, SequenceDataset, read_dataset
from pipelines.errors import InputError
from sasrec.config import SASRecConfig
from sasrec.distributed import xla_supported
from sasrec.evaluate import Protocol, evaluate_scores
from sasrec.feed import TrainingFeed
from sasrec.losses import SequenceLoss
from sasrec.model import LastPositionScorer, SASRec, build_model

CHECKPOINTS = "checkpoints"
BEST_MODEL = "best.keras"
VALIDATION_METRIC = "ndcg@10"


def make_optimizer(config: SASRecConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    lr: float | keras.optimizers.schedules.LearningRateSchedule = config.learning_rate
    total = max(1, steps_per_epoch * config.epochs)
    if config.lr_decay == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if config.warmup_steps else config.learning_rate,
            decay_steps=max(1, total - config.warmup_steps),
            warmup_target=config.learning_rate if config.warmup_steps else None,
            warmup_steps=config.warmup_steps,
        )
    elif config.warmup_steps:
        lr = LinearWarmup(config.learning_rate, config.warmup_steps)
    kwargs = dict(learning_rate=lr, beta_1=config.beta_1, beta_2=config.beta_2, epsilon=1e-8)
    if config.weight_decay > 0:
        return keras.optimizers.AdamW(weight_decay=config.weight_decay, **kwargs)
    return keras.optimizers.Adam(**kwargs)


@keras.saving.register_keras_serializable(package="sasrec")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to a constant learning rate."""

    def __init__(self, learning_rate: float, warmup_steps: int):
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32") + 1.0
        return self.learning_rate * keras.ops.minimum(1.0, step / self.warmup_steps)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


def model_scorer(model: SASRec):
    """``ids -> scores`` through the backend's compiled predict function."""
    scorer = LastPositionScorer(model)
    scorer.compile(jit_compile=xla_supported())
    return lambda ids: keras.ops.convert_to_numpy(scorer.predict_on_batch(ids))


class RunState(keras.callbacks.Callback):
    """Validation, early stopping, best-model and checkpoint keeping, in this order, each epoch."""

    def __init__(self, run_dir: Path, ds: SequenceDataset, config: SASRecConfig, feed: TrainingFeed, state: dict):
        super().__init__()
        self.run_dir = run_dir
        self.ds = ds
        self.config = config
        self.feed = feed
        self.state = state
        self.protocol = Protocol(split="valid", protocol=config.val_protocol, seed=config.seed)
        self._epoch_start = 0.0
        self._scorer = None  # compiled once, shares the model's weights

    def _score(self, ids):
        if self._scorer is None:
            self._scorer = model_scorer(self.model)
        return self._scorer(ids)

    def on_epoch_begin(self, epoch, logs=None):
        self.feed.set_epoch(epoch)
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        self.state["train_seconds"] += time.perf_counter() - self._epoch_start
        val = math.nan
        last_epoch = epoch + 1 == self.config.epochs
        if (epoch + 1) % self.config.eval_every == 0 or last_epoch:
            result = evaluate_scores(
                self._score, self.ds, self.protocol, self.config.maxlen,
                self.config.eval_batch_size, with_popularity=False,
            )
            val = result["metrics"][VALIDATION_METRIC]
            logs["val_hr@10"] = result["metrics"]["hr@10"]
            if val > self.state["best"]:
                self.state.update(best=val, best_epoch=epoch + 1, bad_evals=0)
                save_model_atomically(self.model, self.run_dir / BEST_MODEL)
                if self.config.stop_at_ndcg and val >= self.config.stop_at_ndcg:
                    self.model.stop_training = True
                    self.state["stopped_early"] = True
            else:
                self.state["bad_evals"] += 1
                if self.config.patience and self.state["bad_evals"] >= self.config.patience:
                    self.model.stop_training = True
                    self.state["stopped_early"] = True
        else:
            logs["val_hr@10"] = math.nan
        logs["val_ndcg@10"] = val
        logs["wall_seconds"] = self.state["train_seconds"]
        self.state["epoch"] = epoch + 1
        self.state["curve"].append([epoch + 1, self.state["train_seconds"], float(logs.get("loss", math.nan)), val])
        save_checkpoint(self.run_dir, self.model, self.state)


def save_model_atomically(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: SASRec, state: dict) -> None:
    root = run_dir / CHECKPOINTS
    with atomic_directory(root / f"epoch-{state['epoch']:05d}") as tmp:
        model.save_weights(tmp / "model.weights.h5")  # includes the optimizer state
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for old in sorted(root.glob("epoch-*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / CHECKPOINTS).glob("epoch-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def prepare_run_dir(run_dir: Path, data_dir: Path, config: SASRecConfig, extra: dict) -> None:
    """Create the run folder, or check that an existing one was made with the same config and data."""
    config_path = run_dir / "config.toml"
    manifest = (data_dir / MANIFEST_FILE).read_text()
    if config_path.exists():
        # Compared as values, so a run saved before a config field was added (at its default) resumes.
        if SASRecConfig.from_toml(config_path) != config or _run_info(run_dir) != extra:
            raise InputError(f"{run_dir} holds a run with a different config; use a new --out folder to start another run")
        if (run_dir / "dataset" / MANIFEST_FILE).read_text() != manifest:
            raise InputError(f"{run_dir} holds a run on a different dataset; use a new --out folder")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_directory(run_dir / "dataset") as tmp:
        shutil.copyfile(data_dir / MANIFEST_FILE, tmp / MANIFEST_FILE)
        shutil.copyfile(data_dir / ITEMS_FILE, tmp / ITEMS_FILE)
    with atomic_file(config_path, "w") as handle:
        handle.write(config.to_toml() + _extra_toml(extra))


def _extra_toml(extra: dict) -> str:
    import tomli_w

    return "\n" + tomli_w.dumps({"run": extra})


def train(data_dir: str | Path, run_dir: str | Path, config: SASRecConfig, *, verbose: int | str = "auto") -> dict:
    """Train (or resume) a run and evaluate its best model on the test split. Returns metrics.json."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    ds = read_dataset(data_dir)
    loss_name = config.resolved_loss(ds.num_items)
    run_info = {"backend": keras.backend.backend(), "loss": loss_name, "data": str(data_dir.resolve())}
    prepare_run_dir(run_dir, data_dir, config, run_info)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    feed = TrainingFeed(
        ds, maxlen=config.maxlen, batch_size=config.batch_size, loss=loss_name,
        num_negatives=config.num_negatives, negative_sampling=config.negative_sampling,
        logq_correction=config.logq_correction, sliding_window_step=config.sliding_window_step,
        length_bucketing=config.length_bucketing, exclude_seen_negatives=config.exclude_seen_negatives,
        seed=config.seed,
    )
    model = build_model(config, ds.vocab_size)
    model.training_loss = SequenceLoss(
        loss_name, ds.num_items, config.num_negatives, config.gbce_t, targets_per_batch=feed.targets_per_batch
    )
    model.compile(optimizer=make_optimizer(config, len(feed)), jit_compile=config.jit_compile and xla_supported())

    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "train_seconds": 0.0,
             "stopped_early": False, "curve": []}
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        model.optimizer.build(model.trainable_variables)
        model.load_weights(checkpoint / "model.weights.h5")
        state = json.loads((checkpoint / "state.json").read_text())
        print(f"Resuming {run_dir} after epoch {state['epoch']} (best {VALIDATION_METRIC} {state['best']:.4f})")

    done = state["stopped_early"] or state["epoch"] >= config.epochs
    if not done:
        callbacks = [RunState(run_dir, ds, config, feed, state), keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=True)]
        if config.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False))
        model.fit(feed, epochs=config.epochs, initial_epoch=state["epoch"], callbacks=callbacks, verbose=verbose)
    write_training_curve(run_dir, state["curve"], config.val_protocol)
    return evaluate_run(run_dir, ds=ds, training=state)


def evaluate_run(run_dir: str | Path, ds: SequenceDataset | None = None, training: dict | None = None,
                 splits=("test",), protocols=("full", "sampled-100"), data_dir: str | Path | None = None,
                 write: bool = True) -> dict:
    """Evaluate ``RUN/best.keras`` on the given splits and protocols; writes ``RUN/metrics.json``."""
    run_dir = Path(run_dir)
    if not (run_dir / BEST_MODEL).is_file():
        raise InputError(f"{run_dir}: no {BEST_MODEL}; train first with `sasrec train --out {run_dir}`")
    config = SASRecConfig.from_toml(run_dir / "config.toml")
    if ds is None:
        data_dir = Path(data_dir) if data_dir else Path(_run_info(run_dir)["data"])
        ds = read_dataset(data_dir)
    model = keras.saving.load_model(run_dir / BEST_MODEL, compile=False)
    score = model_scorer(model)
    started = time.perf_counter()
    results = []
    for split in splits:
        for name in protocols:
            protocol = Protocol(split=split, protocol=name, seed=config.seed)
            results.append(evaluate_scores(score, ds, protocol, config.maxlen, config.eval_batch_size))
    out = {"results": results, "evaluation_seconds": time.perf_counter() - started}
    if training is not None:
        out["training"] = {k: training[k] for k in ("epoch", "best", "best_epoch", "train_seconds", "stopped_early")}
    if write:
        with atomic_file(run_dir / "metrics.json", "w") as handle:
            json.dump(out, handle, indent=2)
    return out


def _run_info(run_dir: Path) -> dict:
    import tomllib

    return tomllib.loads((run_dir / "config.toml").read_text()).get("run", {})


def write_training_curve(run_dir: Path, curve: list, protocol: str = "full") -> None:
    """Validation NDCG@10 against training wall time, as ``RUN/curve.png``."""
    points = [(seconds, val) for _, seconds, _, val in curve if val == val]  # skip NaN (no evaluation)
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*points), marker="o", markersize=3)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel(f"validation {VALIDATION_METRIC} ({protocol})")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(run_dir / "curve.png") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def check_tensorboard(config: SASRecConfig) -> None:
    """TensorBoard logs need TensorFlow; without it (JAX-only GPU machines) say so before training."""
    if config.tensorboard:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise InputError("tensorboard = true needs TensorFlow installed; pass --set tensorboard=false") from None

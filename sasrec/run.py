"""The run folder: the contract between training, evaluation and export.

Layout (this module is the only one that knows it)::

    config.toml            the resolved SASRecConfig ([sasrec]) and how the run was made ([run]: backend,
                           loss actually used, dataset folder)
    dataset/               manifest.json and items.parquet copied from the dataset: the vocabulary that
                           gives internal item ids their meaning
    checkpoints/epoch-N/   weights with optimizer state (model.weights.h5) and the loop state
                           (state.json), one folder per epoch, each created by an atomic rename; the
                           newest two are kept
    best.keras             the model with the best validation NDCG@10 (replaced atomically)
    log.csv                one row per epoch (loss, validation metrics, wall time)
    tensorboard/           TensorBoard logs
    metrics.json           evaluation results, each with its protocol, and the training summary
    curve.png              validation NDCG@10 against training wall time

A run folder that holds checkpoints is resumed, not restarted: a crash or ``kill -9`` loses at most
the epoch in progress. Keras is imported only by the functions that save or load a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipelines.atomic import atomic_directory, atomic_file
from pipelines.dataset import ITEMS_FILE, MANIFEST_FILE, read_items, read_manifest
from pipelines.errors import InputError
from sasrec.config import SASRecConfig

CONFIG_FILE = "config.toml"
DATASET_DIR = "dataset"
CHECKPOINTS = "checkpoints"
BEST_MODEL = "best.keras"
LOG_FILE = "log.csv"
TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.json"
CURVE_FILE = "curve.png"
KEEP_CHECKPOINTS = 2
TRAINING_SUMMARY = ("epoch", "best", "best_epoch", "train_seconds", "stopped_early")


def dataset_mismatch(copy_dir: Path, data_dir: Path) -> str | None:
    """Why the dataset folder ``data_dir`` is not the one whose manifest and vocabulary were copied to
    ``copy_dir`` (None when it is): the same internal item id must name the same item."""
    copied, given = read_manifest(copy_dir), read_manifest(data_dir)
    if copied != given:
        differing = sorted(k for k in set(copied) | set(given) if copied.get(k) != given.get(k))
        return f"manifest.json differs in {', '.join(differing)}"
    if not np.array_equal(read_items(copy_dir)[0], read_items(data_dir)[0]):
        return "items.parquet holds other item ids"
    return None


class RunFolder:
    """One run folder (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # --- creation and identity
    def create_or_check(self, data_dir: Path, config: SASRecConfig, info: dict, *, create: bool = True) -> None:
        """Create the folder for a new run, or check that an existing one was made with the same
        config, run info and dataset (so it can be resumed). Without ``create`` (a multi-worker run's
        workers other than the chief) only an existing folder is checked."""
        data_dir = Path(data_dir)
        if (self.path / CONFIG_FILE).exists():
            # Compared as values, so a run saved before a config field was added (at its default) resumes,
            # and the loss as resolved (info "loss"): a run started with a preset's former `ce` resumes under
            # its `auto`, which resolves to the same loss on the same catalog.
            resolved = {"loss": info.get("loss", config.loss)}
            if replace(self.config(), **resolved) != replace(config, **resolved) or self.info() != info:
                raise InputError(f"{self.path} holds a run with a different config; use a new --out folder to start "
                                 "another run")
            if dataset_mismatch(self.path / DATASET_DIR, data_dir):
                raise InputError(f"{self.path} holds a run on a different dataset; use a new --out folder")
            return
        if not create:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_directory(self.path / DATASET_DIR) as tmp:
            shutil.copyfile(data_dir / MANIFEST_FILE, tmp / MANIFEST_FILE)
            shutil.copyfile(data_dir / ITEMS_FILE, tmp / ITEMS_FILE)
        import tomli_w

        with atomic_file(self.path / CONFIG_FILE, "w") as handle:
            handle.write(config.to_toml() + "\n" + tomli_w.dumps({"run": info}))

    def require(self, *names: str) -> None:
        """Fail with one line unless the run folder holds ``config.toml``, its dataset copy and ``names``."""
        if not self.path.is_dir():
            raise InputError(f"{self.path}: run folder not found")
        for name in (CONFIG_FILE, f"{DATASET_DIR}/{MANIFEST_FILE}", f"{DATASET_DIR}/{ITEMS_FILE}", *names):
            if not (self.path / name).is_file():
                hint = f"train first with `sasrec train --out {self.path}`"
                raise InputError(f"{self.path}: not a complete run folder (no {name}); {hint}")

    def config_tables(self) -> dict:
        """``config.toml`` as read: the ``sasrec`` and ``run`` tables."""
        path = self.path / CONFIG_FILE
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path}: {exc}") from None

    def config(self) -> SASRecConfig:
        return SASRecConfig.from_toml(self.path / CONFIG_FILE)

    def info(self) -> dict:
        return self.config_tables().get("run", {})

    def manifest(self) -> dict:
        return read_manifest(self.path / DATASET_DIR)

    def items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(item_ids, counts, train_counts)`` of the run's vocabulary (see :func:`read_items`)."""
        return read_items(self.path / DATASET_DIR)

    def dataset_dir(self, given: str | os.PathLike | None = None) -> Path:
        """The dataset folder to evaluate on: ``given`` or the one the run was trained on, refused
        (one line naming both folders) unless it is the dataset the run's vocabulary came from."""
        recorded = self.info().get("data")
        if not given and not recorded:
            raise InputError(f"{self.path} does not record its dataset folder; pass it with --data")
        data_dir = Path(given or recorded)
        if not (data_dir / MANIFEST_FILE).is_file():
            raise InputError(f"{'--data ' if given else f'the dataset of {self.path}, '}{data_dir}: not a dataset "
                             f"folder (no {MANIFEST_FILE})")
        why = dataset_mismatch(self.path / DATASET_DIR, data_dir)
        if why:
            raise InputError(f"dataset {data_dir} is not the one run {self.path} was trained on (compared with "
                             f"{self.path / DATASET_DIR}: {why}); internal item ids would name other items")
        return data_dir

    # --- models
    def save_best(self, model) -> None:
        target = self.path / BEST_MODEL
        tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}.keras")
        model.save(tmp)
        os.replace(tmp, target)

    def load_best(self):
        """The best Keras model (needs this project's model code)."""
        self.require(BEST_MODEL)
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        import keras

        import sasrec.model  # noqa: F401  (registers the SASRec classes)

        return keras.saving.load_model(self.path / BEST_MODEL, compile=False)

    # --- checkpoints
    def save_checkpoint(self, model, state: dict) -> None:
        root = self.path / CHECKPOINTS
        with atomic_directory(root / f"epoch-{state['epoch']:05d}") as tmp:
            model.save_weights(tmp / "model.weights.h5")  # includes the optimizer state
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for old in sorted(root.glob("epoch-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        found = sorted(p for p in (self.path / CHECKPOINTS).glob("epoch-*") if (p / "state.json").is_file())
        return found[-1] if found else None

    def restore_checkpoint(self, model) -> dict | None:
        """Load the newest checkpoint's weights and optimizer state into ``model``; its loop state, or None."""
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            return None
        model.optimizer.build(model.trainable_variables)
        model.load_weights(checkpoint / "model.weights.h5")
        return _loop_state(checkpoint)

    def training_summary(self) -> dict | None:
        """Epochs, best validation NDCG@10 and its epoch, training seconds, early stop: from the newest
        checkpoint (None before the first epoch ends)."""
        checkpoint = self.latest_checkpoint()
        return None if checkpoint is None else {k: v for k, v in _loop_state(checkpoint).items() if k in TRAINING_SUMMARY}

    # --- results
    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def read_metrics(self) -> dict | None:
        path = self.path / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def test_metrics(self, protocol: str = "full") -> dict:
        """The test split's metrics under ``protocol`` ("full" or "sampled-100") from ``metrics.json``."""
        metrics = self.read_metrics()
        found = [r["metrics"] for r in (metrics or {}).get("results", [])
                 if r["protocol"]["split"] == "test" and r["protocol"]["protocol"] == protocol]
        if not found:
            raise InputError(f"{self.path / METRICS_FILE}: no test results with protocol {protocol!r}")
        return found[0]

    def write_metrics(self, metrics: dict) -> None:
        with atomic_file(self.path / METRICS_FILE, "w") as handle:
            json.dump(metrics, handle, indent=2)

    def write_curve(self, curve: list, metric: str, protocol: str) -> None:
        """Validation ``metric`` against training wall time (``curve`` rows: epoch, seconds, loss, value)."""
        points = [(seconds, val) for _, seconds, _, val in curve if val == val]  # skip NaN (no evaluation)
        if not points:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(*zip(*points), marker="o", markersize=3)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(f"validation {metric} ({protocol})")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_file(self.path / CURVE_FILE) as handle:
            fig.savefig(handle, format="png")
        plt.close(fig)


def _loop_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())

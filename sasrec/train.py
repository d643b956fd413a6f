"""Training a SASRec run: a dataset folder in, a self-contained run folder out (layout: :mod:`sasrec.run`).

Each epoch: validation NDCG@10 on ``val_protocol``, early stopping, the best model kept, a checkpoint
(in this order). A NaN or infinite loss, or a model whose validation scores are not finite, stops
training with :class:`TrainingDiverged`: the run keeps the best model and checkpoint of the last good
epoch. At the end the best model is evaluated on the test split (:func:`sasrec.evaluate.evaluate_run`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import keras

from pipelines.dataset import SequenceDataset, read_dataset
from pipelines.errors import InputError
from sasrec.config import SASRecConfig
from sasrec.distributed import xla_supported
from sasrec.evaluate import Protocol, evaluate_run, evaluate_scores, evaluation_set, model_scorer
from sasrec.feed import TrainingFeed
from sasrec.losses import SequenceLoss
from sasrec.model import build_model
from sasrec.run import RunFolder

VALIDATION_METRIC = "ndcg@10"


class TrainingDiverged(InputError):
    """The loss or the model's scores stopped being finite: the config (learning rate, warm-up,
    precision) does not train on this data. The CLI prints it as one line."""


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


class RunState(keras.callbacks.Callback):
    """Divergence check, validation, early stopping, best-model and checkpoint keeping, in this order,
    each epoch. Runs after ``keras.callbacks.TerminateOnNaN``, which ends the epoch at the first
    non-finite batch loss."""

    def __init__(self, run: RunFolder, ds: SequenceDataset, config: SASRecConfig, feed: TrainingFeed, state: dict):
        super().__init__()
        self.run = run
        self.ds = ds
        self.config = config
        self.feed = feed
        self.state = state
        self.protocol = Protocol(split="valid", protocol=config.val_protocol, seed=config.eval_seed)
        self._epoch_start = 0.0
        self._scorer = None  # compiled once, shares the model's weights

    def _score(self, ids):
        if self._scorer is None:
            self._scorer = model_scorer(self.model)
        return self._scorer(ids)

    def _diverged(self, epoch: int, what: str) -> TrainingDiverged:
        saved = [f"best.keras (epoch {self.state['best_epoch']})"] if self.state["best_epoch"] else []
        saved += [f"the checkpoint of epoch {self.state['epoch']}"] if self.state["epoch"] else []
        kept = f"{self.run.path} keeps " + " and ".join(saved) if saved else f"{self.run.path} holds no model yet"
        return TrainingDiverged(f"training diverged in epoch {epoch + 1}: {what}; {kept}. Start a new run with a "
                                "lower learning_rate, warmup_steps or without mixed_precision")

    def on_epoch_begin(self, epoch, logs=None):
        self.feed.set_epoch(epoch)
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        loss = float(logs.get("loss", math.nan))
        if not math.isfinite(loss):
            raise self._diverged(epoch, f"the training loss is {loss}")
        self.state["train_seconds"] += time.perf_counter() - self._epoch_start
        val = math.nan
        last_epoch = epoch + 1 == self.config.epochs
        if (epoch + 1) % self.config.eval_every == 0 or last_epoch:
            result = evaluate_scores(
                self._score, self.ds, self.protocol, self.config.maxlen,
                self.config.eval_batch_size, with_popularity=False,
            )
            if result["non_finite_targets"]:
                raise self._diverged(epoch, f"{result['non_finite_targets']} validation users got NaN or infinite scores")
            val = result["metrics"][VALIDATION_METRIC]
            logs["val_hr@10"] = result["metrics"]["hr@10"]
            if val > self.state["best"]:
                self.state.update(best=val, best_epoch=epoch + 1, bad_evals=0)
                self.run.save_best(self.model)
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
        self.state["curve"].append([epoch + 1, self.state["train_seconds"], loss, val])
        self.run.save_checkpoint(self.model, self.state)


def check_held_out(ds: SequenceDataset, data_dir: Path) -> None:
    """Refuse at once a dataset on which validation or the final test would find no user."""
    protocol = ds.manifest.get("split", {}).get("protocol", "?")
    for name, window in (("valid", "--valid-quantile or --valid-time"), ("test", "--cutoff-quantile or --cutoff-time")):
        if len(evaluation_set(ds, name).users) == 0:
            how = (f"prepare it again with a {name} window that holds events ({window})" if protocol == "temporal"
                   else "users need at least 3 events for a leave-one-out split")
            raise InputError(f"--data {data_dir}: no user has a {name} item with a history before it "
                             f"(split {protocol}); {how}")


def train(data_dir: str | Path, run_dir: str | Path, config: SASRecConfig, *, verbose: int | str = "auto") -> dict:
    """Train (or resume) a run and evaluate its best model on the test split. Returns metrics.json."""
    data_dir = Path(data_dir)
    run = RunFolder(run_dir)
    ds = read_dataset(data_dir)
    check_held_out(ds, data_dir)
    loss_name = config.resolved_loss(ds.num_items)
    run.create_or_check(data_dir, config, {"backend": keras.backend.backend(), "loss": loss_name,
                                           "data": str(data_dir.resolve())})
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

    state = run.restore_checkpoint(model)
    if state is not None:
        print(f"Resuming {run.path} after epoch {state['epoch']} (best {VALIDATION_METRIC} {state['best']:.4f})")
    else:
        state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "train_seconds": 0.0,
                 "stopped_early": False, "curve": []}

    done = state["stopped_early"] or state["epoch"] >= config.epochs
    if not done:
        callbacks = [keras.callbacks.TerminateOnNaN(), RunState(run, ds, config, feed, state),
                     keras.callbacks.CSVLogger(str(run.log_path), append=True)]
        if config.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(run.tensorboard_dir), write_graph=False))
        model.fit(feed, epochs=config.epochs, initial_epoch=state["epoch"], callbacks=callbacks, verbose=verbose)
    run.write_curve(state["curve"], VALIDATION_METRIC, config.val_protocol)
    return evaluate_run(run.path, ds=ds)


def check_tensorboard(config: SASRecConfig) -> None:
    """TensorBoard logs need TensorFlow; without it (JAX-only GPU machines) say so before training."""
    if config.tensorboard:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise InputError("tensorboard = true needs TensorFlow installed; pass --set tensorboard=false") from None

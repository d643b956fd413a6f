"""Training a SASRec run: a dataset folder in, a self-contained run folder out (layout: :mod:`sasrec.run`).

Each epoch: validation NDCG@10 on ``val_protocol``, early stopping, the best model kept, a checkpoint
(in this order). A NaN or infinite loss, or a model whose validation scores are not finite, stops
training with :class:`TrainingDiverged`: the run keeps the best model and checkpoint of the last good
epoch. At the end the best model is evaluated on the test split (:func:`sasrec.evaluate.evaluate_run`).

In a multi-worker run (:class:`sasrec.distributed.Cluster`) every worker trains; the chief alone
validates, on a local copy of the model, and alone writes the run folder, and every worker takes the
chief's validation numbers, so all stop at the same epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import keras
import numpy as np

from pipelines.dataset import SequenceDataset, read_dataset, read_manifest
from pipelines.errors import InputError
from sasrec.config import SASRecConfig
from sasrec.distributed import Cluster, prepare_for_strategy, xla_supported
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


class ProcessShare(keras.utils.PyDataset):
    """This JAX process's share of every global batch of ``feed``: Keras joins the processes' shares
    into one global batch (``DataParallel`` with ``auto_shard_dataset=False``), so the global batch stays
    ``batch_size``. Every process builds the same global batch (same seed) and keeps one contiguous
    block of it: rows are first padded to a multiple of the worker count with empty histories (no
    targets, so the loss and its gradient do not change)."""

    def __init__(self, feed: TrainingFeed, cluster: Cluster):
        super().__init__()
        self.feed = feed
        self.cluster = cluster

    def __len__(self) -> int:
        return len(self.feed)

    def __getitem__(self, index: int):
        ids, y = self.feed[index]
        return self._share(ids), {name: self._share(array) for name, array in y.items()}

    def _share(self, array: np.ndarray) -> np.ndarray:
        rows = -(-len(array) // self.cluster.size) * self.cluster.size
        array = np.pad(array, [(0, rows - len(array))] + [(0, 0)] * (array.ndim - 1))
        block = len(array) // self.cluster.size
        return array[self.cluster.index * block : (self.cluster.index + 1) * block]


class RunState(keras.callbacks.Callback):
    """Divergence check, validation, early stopping, best-model and checkpoint keeping, in this order,
    each epoch. Runs after ``keras.callbacks.TerminateOnNaN``, which ends the epoch at the first
    non-finite batch loss.

    With a ``cluster``, the chief validates and saves ``local_copy`` (the trained model's weights and
    optimizer state copied into a model of this process alone) and the other workers write nothing."""

    def __init__(self, run: RunFolder, ds: SequenceDataset, config: SASRecConfig, feed: TrainingFeed, state: dict,
                 cluster: Cluster | None = None, local_copy: keras.Model | None = None):
        super().__init__()
        self.run = run
        self.ds = ds
        self.config = config
        self.feed = feed
        self.state = state
        self.cluster = cluster
        self.local_copy = local_copy
        self.writes = cluster is None or cluster.is_chief
        self.protocol = Protocol(split="valid", protocol=config.val_protocol, seed=config.eval_seed,
                                 max_users=config.eval_max_users)
        self._epoch_start = 0.0
        self._scorer = None  # compiled once, shares the weights of the model it scores

    def _saved_model(self) -> keras.Model:
        """The model to validate and save, up to date with this epoch's training."""
        if self.local_copy is None:
            return self.model
        self.local_copy.set_weights(self.model.get_weights())
        for copy, trained in zip(self.local_copy.optimizer.variables, self.model.optimizer.variables, strict=True):
            copy.assign(keras.ops.convert_to_numpy(trained.value))
        return self.local_copy

    def _validate(self, model: keras.Model | None) -> tuple[float, float, float]:
        """Validation ``(NDCG@10, HR@10, users with non-finite scores)``: the chief's on every worker."""
        values = [math.nan] * 3
        if self.writes:
            if self._scorer is None:
                self._scorer = model_scorer(model)
            result = evaluate_scores(self._scorer, self.ds, self.protocol, self.config.maxlen,
                                     self.config.eval_batch_size, with_popularity=False,
                                     timestamps=self.config.time_bias)
            values = [result["metrics"][VALIDATION_METRIC], result["metrics"]["hr@10"], result["non_finite_targets"]]
        return tuple(self.cluster.chief_values(values) if self.cluster else values)

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
        # A multi-worker chief's copy of the model, its scorer and its saves stay on this process.
        with self.cluster.local() if self.cluster else contextlib.nullcontext():
            self._end_epoch(epoch, logs if logs is not None else {})

    def _end_epoch(self, epoch: int, logs: dict) -> None:
        loss = float(logs.get("loss", math.nan))
        if not math.isfinite(loss):
            raise self._diverged(epoch, f"the training loss is {loss}")
        self.state["train_seconds"] += time.perf_counter() - self._epoch_start
        model = self._saved_model() if self.writes else None
        val = math.nan
        last_epoch = epoch + 1 == self.config.epochs
        if (epoch + 1) % self.config.eval_every == 0 or last_epoch:
            val, logs["val_hr@10"], non_finite = self._validate(model)
            if non_finite:
                raise self._diverged(epoch, f"{int(non_finite)} validation users got NaN or infinite scores")
            if val > self.state["best"]:
                self.state.update(best=val, best_epoch=epoch + 1, bad_evals=0)
                if self.writes:
                    self.run.save_best(model)
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
        if self.writes:
            self.run.save_checkpoint(model, self.state)


def check_held_out(ds: SequenceDataset, data_dir: Path) -> None:
    """Refuse at once a dataset on which validation or the final test would find no user."""
    protocol = ds.manifest.get("split", {}).get("protocol", "?")
    for name, window in (("valid", "--valid-quantile or --valid-time"), ("test", "--cutoff-quantile or --cutoff-time")):
        if len(evaluation_set(ds, name).users) == 0:
            how = (f"prepare it again with a {name} window that holds events ({window})" if protocol == "temporal"
                   else "users need at least 3 events for a leave-one-out split")
            raise InputError(f"--data {data_dir}: no user has a {name} item with a history before it "
                             f"(split {protocol}); {how}")


def check_time_bias(config: SASRecConfig, data_dir: Path) -> None:
    """``time_bias`` reads the dataset's timestamps: refuse file-order ones (input positions, not times)."""
    if config.time_bias and read_manifest(data_dir).get("reader", {}).get("timestamp") == "file-order":
        raise InputError(f"config field 'time_bias': --data {data_dir} has no event times (prepared from a format "
                         "without them, its timestamps are file order); prepare a log with timestamps or set "
                         "time_bias = false")


def train(data_dir: str | Path, run_dir: str | Path, config: SASRecConfig, *, verbose: int | str = "auto",
          cluster: Cluster | None = None) -> dict | None:
    """Train (or resume) a run and evaluate its best model on the test split. Returns metrics.json.

    In a multi-worker run every worker calls this with the same arguments (dataset and run folder on a
    shared filesystem) and its ``cluster``; the chief writes the run folder and returns metrics.json,
    the other workers return None."""
    writes = cluster is None or cluster.is_chief
    data_dir = Path(data_dir)
    run = RunFolder(run_dir)
    ds = read_dataset(data_dir)
    check_held_out(ds, data_dir)
    check_time_bias(config, data_dir)
    loss_name = config.resolved_loss(ds.num_items)
    run.create_or_check(data_dir, config, {"backend": keras.backend.backend(), "loss": loss_name,
                                           "data": str(data_dir.resolve())}, create=writes)
    if writes and config.sliding_window_step > config.maxlen:
        print(f"note: sliding_window_step {config.sliding_window_step} > maxlen {config.maxlen}: the events between "
              f"windows are never trained on (set sliding_window_step to at most maxlen)")
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    feed = TrainingFeed(
        ds, maxlen=config.maxlen, batch_size=config.batch_size, loss=loss_name,
        num_negatives=config.num_negatives, negative_sampling=config.negative_sampling,
        logq_correction=config.logq_correction, sliding_window_step=config.sliding_window_step,
        length_bucketing=config.length_bucketing, exclude_seen_negatives=config.exclude_seen_negatives,
        timestamps=config.time_bias, seed=config.seed,
    )
    with cluster.scope() if cluster else contextlib.nullcontext():
        model = build_model(config, ds.vocab_size)
        model.training_loss = SequenceLoss(
            loss_name, ds.num_items, config.num_negatives, config.gbce_t, targets_per_batch=feed.targets_per_batch
        )
        model.compile(optimizer=make_optimizer(config, len(feed)), jit_compile=config.jit_compile and xla_supported())
        state = run.restore_checkpoint(model)  # every worker: each holds the whole model
        if cluster is not None:
            cluster.prepare(model)
        else:
            prepare_for_strategy(model)  # --devices N on TensorFlow
    if state is not None:
        print(f"Resuming {run.path} after epoch {state['epoch']} (best {VALIDATION_METRIC} {state['best']:.4f})")
    else:
        state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "train_seconds": 0.0,
                 "stopped_early": False, "curve": []}
    local_copy = None
    if cluster is not None:  # on every worker: creating variables is a collective step on JAX
        with cluster.local():
            local_copy = build_model(config, ds.vocab_size)
            local_copy.compile(optimizer=make_optimizer(config, len(feed)))  # saved with checkpoints
            local_copy.optimizer.build(local_copy.trainable_variables)

    done = state["stopped_early"] or state["epoch"] >= config.epochs
    if not done:
        callbacks = [keras.callbacks.TerminateOnNaN(), RunState(run, ds, config, feed, state, cluster, local_copy)]
        if writes:
            callbacks.append(keras.callbacks.CSVLogger(str(run.log_path), append=True))
            if config.tensorboard:
                callbacks.append(keras.callbacks.TensorBoard(str(run.tensorboard_dir), write_graph=False))
        batches = feed if cluster is None or cluster.splits_batches else ProcessShare(feed, cluster)
        model.fit(batches, epochs=config.epochs, initial_epoch=state["epoch"], callbacks=callbacks, verbose=verbose)
    result = None
    if writes:
        run.write_curve(state["curve"], VALIDATION_METRIC, config.val_protocol)
        with cluster.local() if cluster else contextlib.nullcontext():
            result = evaluate_run(run.path, ds=ds)
    if cluster is not None:
        cluster.barrier()  # the others wait for the chief's test evaluation, which can outlast shutdown timeouts
    return result


def check_tensorboard(config: SASRecConfig) -> None:
    """TensorBoard logs need TensorFlow; without it (JAX-only GPU machines) say so before training."""
    if config.tensorboard:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise InputError("tensorboard = true needs TensorFlow installed; pass --set tensorboard=false") from None

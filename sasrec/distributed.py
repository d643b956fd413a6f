"""Data-parallel training through each backend's own machinery.

One machine (``--devices N``): TensorFlow ``tf.distribute.MirroredStrategy`` over local devices (on a
CPU-only machine the CPU is split into logical devices, which is how tests exercise it); JAX
``keras.distribution.DataParallel`` (on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
must be set before JAX starts: see :func:`expose_host_devices`).

Several processes or machines (``--multi-worker``, :func:`join_cluster`): TensorFlow
``tf.distribute.MultiWorkerMirroredStrategy`` with the cluster from ``TF_CONFIG``; JAX
``jax.distributed.initialize`` and ``DataParallel`` over every process's devices.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.errors import InputError


@contextlib.contextmanager
def data_parallel(num_devices: int):
    """Build, compile and fit inside this block to replicate the model over ``num_devices``."""
    if num_devices <= 1:
        yield None
        return
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow":
        strategy = _mirrored_strategy(num_devices)
        with strategy.scope():
            yield strategy
    elif backend == "jax":
        import keras

        distribution = keras.distribution.DataParallel(devices=_jax_devices(num_devices))
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(distribution)
        try:
            yield distribution
        finally:
            keras.distribution.set_distribution(previous)
    else:
        raise InputError(f"--devices {num_devices}: data-parallel training is supported on tensorflow and jax, not {backend}")


def _mirrored_strategy(num_devices: int):
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= num_devices:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(num_devices)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError:  # already initialised: usable only if it was split the same way
        pass
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < num_devices:
        raise InputError(f"--devices {num_devices}: only {len(devices)} device(s) available")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:num_devices]])


def expose_host_devices(num_devices: int) -> None:
    """On a CPU-only JAX, split the host into ``num_devices`` devices. Must run before JAX is imported
    (before Keras, with the JAX backend); on a machine with accelerators it changes nothing."""
    if num_devices > 1 and os.environ.get("KERAS_BACKEND") == "jax" and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()


def _jax_devices(num_devices: int):
    import jax

    devices = jax.devices()
    if len(devices) < num_devices:
        raise InputError(f"--devices {num_devices}: only {len(devices)} JAX device(s) available")
    return devices[:num_devices]


def _tensorflow_strategy() -> bool:
    """Whether a TensorFlow distribution strategy (``--devices N``, ``--multi-worker``) is in scope."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow" or "tensorflow" not in sys.modules:
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy()


def xla_supported() -> bool:
    """XLA cannot place MirroredStrategy's per-replica variables (TensorFlow known issue), so compiled
    steps are plain tf.functions inside a strategy scope."""
    return not _tensorflow_strategy()


def prepare_for_strategy(model) -> None:
    """Ready a compiled model for ``fit`` under a TensorFlow strategy. Before the first step Keras 3
    reduces a whole input batch with ``strategy.reduce`` only to build what is still unbuilt, which fails
    on a nested batch (keras-team/keras#20585, open) and on bool inputs such as the ``seen`` masks (AddN
    has no bool kernel): the one thing our model leaves unbuilt, the optimizer, is built here and that
    step skipped. Nothing to do without a strategy."""
    if _tensorflow_strategy():
        model.optimizer.build(model.trainable_variables)
        model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


COORDINATOR_ENV = "SASREC_COORDINATOR"
NUM_WORKERS_ENV = "SASREC_NUM_WORKERS"
WORKER_INDEX_ENV = "SASREC_WORKER_INDEX"
TF_CONFIG_HELP = 'e.g. {"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}'


@dataclass
class Cluster:
    """This process's place in a multi-worker run: every worker runs the same training, worker 0 (the
    chief) alone validates and writes the run folder, and :meth:`chief_values` hands its numbers to
    the others, so every early-stopping and divergence decision is the same on all workers."""

    index: int
    size: int
    strategy: Any = None  # TensorFlow: the MultiWorkerMirroredStrategy; JAX: None

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def splits_batches(self) -> bool:
        """True when the backend splits every global batch among the workers itself (TensorFlow: every
        worker builds the whole batch); False when each process must feed only its share (JAX:
        :class:`sasrec.train.ProcessShare`)."""
        return self.strategy is not None

    def scope(self):
        """Create and restore the model inside this block (TensorFlow: mirrored variables; JAX already
        holds the DataParallel distribution for the whole run)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def prepare(self, model) -> None:
        """Ready a compiled model for ``fit`` (inside :meth:`scope`). TensorFlow: besides
        :func:`prepare_for_strategy`, Keras 3's ``fit`` under MultiWorkerMirroredStrategy averages every
        worker's logs along axis 0 after each step, which fails on scalars (keras-team/keras#20585): each
        step's logs become 1-element vectors, so ``logs["loss"]`` is the mean over all workers, the same on
        each (and TerminateOnNaN stops them all at the same batch)."""
        if self.strategy is None:  # JAX
            model.optimizer.build(model.trainable_variables)
            return
        import tensorflow as tf

        prepare_for_strategy(model)
        step = model.train_step
        model.train_step = lambda data: {name: tf.reshape(value, [1]) for name, value in step(data).items()}

    @contextlib.contextmanager
    def local(self):
        """A block where a model built inside lives on this process alone (the chief's copy for
        validation and saving: the trained model's JAX arrays span every process, so even reading them
        for a prediction or a save would need all processes to join)."""
        if self.strategy is not None:  # TensorFlow: outside the strategy scope is already local
            yield
            return
        import keras

        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)

    def chief_values(self, values: list[float]) -> list[float]:
        """The chief's ``values`` on every worker (a collective: all workers call it at the same point;
        what the others pass is ignored)."""
        sent = np.asarray(values if self.is_chief else [0.0] * len(values), dtype=np.float64)
        if self.strategy is not None:
            import tensorflow as tf

            per_replica = self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(sent if ctx.replica_id_in_sync_group == 0 else np.zeros_like(sent)))
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy().tolist()
        from jax.experimental import multihost_utils

        # As 32-bit words: JAX computes in float32 unless x64 is on, and the numbers must arrive exact.
        words = multihost_utils.broadcast_one_to_all(sent.view(np.uint32), is_source=self.is_chief)
        return np.asarray(words, dtype=np.uint32).view(np.float64).tolist()

    def barrier(self) -> None:
        """Wait for every worker (the end of a run: the chief's final evaluation can outlast the
        backends' own shutdown timeouts)."""
        self.chief_values([0.0])


def join_cluster(backend: str, coordinator: str | None, num_workers: int | None, worker_index: int | None) -> Cluster:
    """Join the multi-worker run this process belongs to. TensorFlow: the cluster and this worker's task
    come from ``TF_CONFIG``. JAX: ``coordinator`` (process 0's HOST:PORT), ``num_workers`` and
    ``worker_index``, or, when all three are None, what ``jax.distributed.initialize`` detects (Slurm,
    Open MPI, Cloud TPU). Must run before the backend computes anything."""
    if backend == "tensorflow":
        if coordinator or num_workers is not None or worker_index is not None:
            raise InputError("--coordinator, --num-workers and --worker-index are for the jax backend; tensorflow "
                             "reads the cluster from TF_CONFIG")
        index, size = _tf_config_task()
        import tensorflow as tf

        return Cluster(index, size, tf.distribute.MultiWorkerMirroredStrategy())
    if backend == "jax":
        return _join_jax(coordinator, num_workers, worker_index)
    raise InputError(f"--multi-worker: multi-worker training is supported on tensorflow and jax, not {backend}")


def _tf_config_task() -> tuple[int, int]:
    """This worker's index (the chief first) and the number of workers, from ``TF_CONFIG``."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise InputError(f"--multi-worker on tensorflow: set TF_CONFIG on every worker ({TF_CONFIG_HELP})")
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"TF_CONFIG is not JSON ({exc}); {TF_CONFIG_HELP}") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise InputError(f"TF_CONFIG needs a 'cluster' and a 'task' object; {TF_CONFIG_HELP}")
    others = sorted(set(cluster) - {"chief", "worker"})
    if others:
        raise InputError(f"TF_CONFIG cluster has {', '.join(others)} tasks; multi-worker training runs chief and "
                         "worker tasks only")
    chiefs, workers = cluster.get("chief", []), cluster.get("worker", [])
    if not all(isinstance(a, str) and ":" in a for a in [*chiefs, *workers]) or len(chiefs) > 1 or not workers + chiefs:
        raise InputError(f"TF_CONFIG cluster must list HOST:PORT addresses, at most one chief; {TF_CONFIG_HELP}")
    kind, index = task.get("type"), task.get("index")
    members = {"chief": chiefs, "worker": workers}.get(kind, [])
    if not isinstance(index, int) or not 0 <= index < len(members):
        raise InputError(f"TF_CONFIG task {task} is not a member of the cluster; {TF_CONFIG_HELP}")
    return index if kind == "chief" else len(chiefs) + index, len(chiefs) + len(workers)


def _join_jax(coordinator: str | None, num_workers: int | None, worker_index: int | None) -> Cluster:
    import jax

    given = {"--coordinator": coordinator, "--num-workers": num_workers, "--worker-index": worker_index}
    missing = [flag for flag, value in given.items() if value is None]
    if missing and len(missing) < len(given):
        raise InputError(f"--multi-worker on jax: {', '.join(missing)} not set (flags, or {COORDINATOR_ENV}, "
                         f"{NUM_WORKERS_ENV}, {WORKER_INDEX_ENV}); give all three, or none on Slurm")
    if not missing and not 0 <= worker_index < num_workers:
        raise InputError(f"--worker-index {worker_index}: must be in 0..{num_workers - 1} (--num-workers {num_workers})")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_workers, process_id=worker_index)
    except ValueError:  # nothing given, and no cluster environment that JAX knows was detected
        raise InputError(f"--multi-worker on jax: no --coordinator given and no Slurm, Open MPI or Cloud TPU cluster "
                         f"detected; pass --coordinator HOST:PORT, --num-workers and --worker-index (or "
                         f"{COORDINATOR_ENV}, {NUM_WORKERS_ENV}, {WORKER_INDEX_ENV})") from None
    import keras

    # The feed hands each process its share of every global batch (sasrec.train.ProcessShare).
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False))
    return Cluster(jax.process_index(), jax.process_count())

"""Data-parallel training through each backend's own machinery.

TensorFlow: ``tf.distribute.MirroredStrategy`` over local devices (on a CPU-only machine the CPU is
split into logical devices, which is how tests exercise it). JAX: ``keras.distribution.DataParallel``
(on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before JAX starts:
see :func:`expose_host_devices`).
"""

from __future__ import annotations

import contextlib
import os
import sys

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


def xla_supported() -> bool:
    """XLA cannot place MirroredStrategy's per-replica variables (TensorFlow known issue), so compiled
    steps are plain tf.functions inside a strategy scope."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow" or "tensorflow" not in sys.modules:
        return True
    import tensorflow as tf

    return not tf.distribute.has_strategy()

"""sasrec.layers.Dropout: the masks of the XLA paths (TensorFlow + XLA, JAX), 8, 16 or 32 random bits per element."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (64, 50, 50)  # 160,000 elements: the kept share's standard error is ~0.001
JAX_RATES = {0.2: 8, 0.1: 16, 1e-4: 32}  # rate: bits per element
JAX_SCRIPT = """
import json, sys, numpy as np, keras
from sasrec.layers import Dropout
x = np.ones((64, 50, 50), "float32")
got = {}
for rate in json.loads(sys.argv[1]):
    layer = Dropout(rate, seed=3)
    first, second = (keras.ops.convert_to_numpy(layer(x, training=True)) for _ in range(2))
    got[str(rate)] = {"kept": float((first != 0).mean()), "values": sorted(set(first[first != 0].tolist())),
                      "same_mask": bool(((first != 0) == (second != 0)).all())}
print(json.dumps(got))
"""


def rounded_keep(rate: float, bits: int) -> float:
    return 1 - round(rate * 2**bits) / 2**bits


@pytest.mark.parametrize("rate, bits", [(0.2, 8), (0.5, 8), (0.1, 16), (0.001, 16), (1e-5, 32)])
def test_the_rate_sets_how_many_random_bits_an_element_takes(rate, bits):
    from sasrec.layers import Dropout

    layer = Dropout(rate)
    assert layer.bits_per_element == bits
    # Within 1% of the asked rate whatever the bits.
    assert abs((1 - rounded_keep(rate, bits)) - rate) <= 0.01 * rate


@pytest.mark.parametrize("rate, bits", [(0.2, 8), (0.5, 8), (0.1, 16), (1e-4, 32)])
def test_tensorflow_xla_dropout_keeps_the_rounded_share_and_preserves_the_mean(rate, bits):
    import tensorflow as tf

    from sasrec.layers import Dropout

    layer = Dropout(rate, seed=7)
    assert layer.bits_per_element == bits
    x = tf.ones(SHAPE)
    step = tf.function(lambda: layer(x, training=True), jit_compile=True)
    first, second = step().numpy(), step().numpy()
    keep = rounded_keep(rate, bits)
    assert abs((first != 0).mean() - keep) < 0.005
    np.testing.assert_allclose(np.unique(first[first != 0]), [1 / keep], rtol=1e-6)
    assert abs(first.mean() - 1.0) < 0.01
    assert ((first != 0) != (second != 0)).any()  # each call draws a new mask
    # Not training, or without XLA: the input as it is / Keras's own dropout at the exact rate.
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    eager = layer(x, training=True).numpy()
    np.testing.assert_allclose(np.unique(eager[eager != 0]), [1 / (1 - rate)], rtol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed (pip install '.[jax]')")
def test_jax_dropout_keeps_the_rounded_share():
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", JAX_SCRIPT, json.dumps(list(JAX_RATES))], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for rate, bits in JAX_RATES.items():
        got, keep = results[str(rate)], rounded_keep(rate, bits)
        assert abs(got["kept"] - keep) < 0.005, rate
        np.testing.assert_allclose(got["values"], [1 / keep], rtol=1e-6)
        assert not got["same_mask"], rate

"""Attention variants (issue 19): cosine similarity, SiLU and linear normalisation, local windows,
relative and rotary positions. Each stays causal, ignores left padding, round-trips through get_config and .keras
files, and one combination learns synthetic chains."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from sasrec.config import SASRecConfig
from sasrec.layers import (
    CAUSAL_CHUNKS,
    LINEAR_CHUNK,
    MIN_CAUSAL_CHUNK,
    RELATIVE_BUCKETS,
    TIME_BUCKETS,
    CausalSelfAttentionBlock,
    causal_chunks,
    relative_bucket,
)
from sasrec.model import SASRec, build_model

VOCAB = 40
MAXLEN = 12
# name -> config fields; "combined" stacks every variant that can go together.
VARIANTS = {
    "cosine": dict(attention_similarity="cosine"),
    "silu": dict(attention_normalisation="silu"),
    "window": dict(attention_window=[3, 0]),
    "relative": dict(position_bias="relative"),
    "rotary": dict(position_bias="rotary", absolute_positions=False),
    "combined": dict(attention_similarity="cosine", attention_normalisation="silu", attention_window=[2, 5],
                     position_bias="relative"),
    "linear": dict(attention_normalisation="linear"),
    "linear cosine": dict(attention_normalisation="linear", attention_similarity="cosine"),
}


def variant_model(fields: dict, seed: int = 0, positions: str = "from_start") -> SASRec:
    """A small model whose variant weights are random (a zero relative bias would test nothing)."""
    keras.utils.set_random_seed(seed)
    config = SASRecConfig(maxlen=MAXLEN, hidden_units=16, num_heads=2, init_std=0.3, positions=positions, **fields)
    model = build_model(config, VOCAB)
    rng = np.random.default_rng(seed)
    for block in model.blocks:
        if block.position_bias == "relative":
            block.relative_bias.assign(rng.normal(0, 1, (RELATIVE_BUCKETS, 2)).astype("float32"))
    return model


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def left_padded(rows, width):
    out = np.zeros((len(rows), width), "int32")
    for i, row in enumerate(rows):
        out[i, width - len(row):] = row
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_are_causal_ignore_left_padding_and_round_trip(name, tmp_path):
    model = variant_model(VARIANTS[name])
    rng = np.random.default_rng(1)
    history = rng.integers(2, VOCAB, size=9)
    base = numpy(model(left_padded([history], 10)))[0]
    # Causality: a later item does not change what earlier positions computed.
    changed = history.copy()
    changed[6] = (changed[6] - 1) % (VOCAB - 2) + 2
    after = numpy(model(left_padded([changed], 10)))[0]
    np.testing.assert_allclose(after[:7], base[:7], atol=1e-5)  # column 7 holds item 6
    assert np.abs(after[7:] - base[7:]).max() > 1e-3
    # Padding: two more padding columns change nothing at the real positions.
    wider = numpy(model(left_padded([history], MAXLEN)))[0]
    np.testing.assert_allclose(wider[-9:], base[-9:], atol=1e-5)
    # The variant changes the model (not silently ignored).
    plain = variant_model({})
    assert np.abs(numpy(plain(left_padded([history], 10)))[0][-9:] - base[-9:]).max() > 1e-3
    # Serialization: get_config and a .keras file restore the variant and its weights.
    block = model.blocks[0]
    clone = CausalSelfAttentionBlock.from_config(json.loads(json.dumps(block.get_config())))
    for attribute in ("similarity", "normalisation", "window", "position_bias"):
        assert getattr(clone, attribute) == getattr(block, attribute)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(numpy(loaded(left_padded([history], 10)))[0], base, atol=1e-6)


def test_a_local_window_only_sees_its_most_recent_items():
    """With a window of 1 in every block, each position's output depends on its own item alone."""
    model = variant_model(dict(attention_window=1, absolute_positions=False))
    first = numpy(model(left_padded([[5, 6, 7, 8]], 6)))[0, -1]
    second = numpy(model(left_padded([[9, 3, 7, 8]], 6)))[0, -1]
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_relative_buckets_are_exact_near_and_logarithmic_far():
    buckets = numpy(relative_bucket(keras.ops.convert_to_tensor(np.arange(0, 1000), "int32")))
    assert list(buckets[:16]) == list(range(16))
    assert (np.diff(buckets) >= 0).all() and buckets[-1] == RELATIVE_BUCKETS - 1 and buckets[40] < buckets[200]


@pytest.mark.parametrize("variant", ["combined", "linear cosine"])
def test_export_serves_a_variant_model_and_continues_its_state_exactly(variant, tmp_path):
    """Every variant is exact in the cached state, so the export keeps offering it (positions from start)."""
    from sasrec.export import export_model
    from sasrec.recommender import Recommender

    items = np.array(["<pad>", "<oov>"] + [f"i{i}" for i in range(2, VOCAB)], dtype=object)
    model = variant_model(VARIANTS[variant])
    rec = Recommender.load(export_model(model, tmp_path, item_ids=items, train_counts=np.arange(VOCAB)))
    assert rec.advances_state
    history = [f"i{i}" for i in (5, 9, 13, 2, 30, 7, 21)]
    expected = numpy(model.score_last(left_padded([[int(x[1:]) for x in history]], MAXLEN)))[0]
    result = rec.recommend_batch([history], 5, False)
    top = np.argsort(-expected[2:])[:5] + 2
    assert list(result.item_ids[0]) == [f"i{i}" for i in top]
    np.testing.assert_allclose(result.scores[0], expected[top], atol=1e-4)
    _, (state,) = rec.encode_states([history[:3]], 5, False, [[]])
    result, (state,) = rec.advance_states([state], [history[3:]], 5, False, [[]])
    assert state is not None
    np.testing.assert_allclose(result.scores[0], expected[top], atol=1e-4)


@pytest.mark.slow
def test_a_variant_model_beats_popularity_by_far_on_synthetic_chains(tiny_dataset, tmp_path):
    from sasrec.train import train

    config = SASRecConfig(maxlen=32, hidden_units=32, loss="ce", dropout=0.1, epochs=8, eval_every=4,
                          tensorboard=False, attention_similarity="cosine", attention_normalisation="silu",
                          attention_window=[4, 0], position_bias="relative", absolute_positions=False)
    train(tiny_dataset, tmp_path / "run", config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    full = next(r for r in metrics["results"] if r["protocol"]["protocol"] == "full")
    model_hr, pop_hr = full["metrics"]["hr@10"], full["popularity"]["hr@10"]
    print(f"HR@10 variant model {model_hr:.3f} vs popularity {pop_hr:.3f}")
    assert model_hr >= 3 * pop_hr and model_hr > 0.5


def test_attention_map_is_what_explanations_compute_for_the_default_attention():
    """``CausalSelfAttentionBlock.attention_map`` (what explanations and their plots read) follows every
    variant; for today's attention it equals softmax(q k^T / sqrt(d)) under the causal and padding masks."""
    model = variant_model({})
    block = model.blocks[0]
    ids = left_padded([[5, 6, 7, 8], [9, 3]], 6)
    x, valid = model._embed(keras.ops.convert_to_tensor(ids), model._positions(keras.ops.convert_to_tensor(ids)))
    q = numpy(block.attention.query_dense(block._query_input(x)))
    k = numpy(block.key_values(x)[0])
    scores = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    real = numpy(valid)
    mask = np.tril(np.ones((6, 6), bool))[None, None] & real[:, None, None, :]
    masked = np.where(mask, scores, -1e30)
    expected = np.exp(masked - masked.max(-1, keepdims=True))
    expected = expected / expected.sum(-1, keepdims=True) * real[:, None, :, None]
    for last_only in (False, True):
        ours, _ = block.attention_map(x, valid, last_only)
        np.testing.assert_allclose(numpy(ours), expected[:, :, -1:] if last_only else expected, atol=1e-6)
    weights, _ = variant_model(VARIANTS["window"]).blocks[0].attention_map(x, valid)
    assert (numpy(weights)[0, :, -1, :3] == 0).all()  # window 3: the last query sees its 3 most recent items


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_linear_attention_in_chunks_equals_its_explicit_weights(similarity):
    """The chunked prefix-sum form that training runs equals the explicit weights that the cached-state
    step and explanations use (``attention_map``), over several chunks, a partial last chunk, left padding
    of every length and a row of padding only; each attending query's weights sum to 1."""
    keras.utils.set_random_seed(0)
    block = CausalSelfAttentionBlock(16, 2, 0.0, init_std=0.3, similarity=similarity, normalisation="linear")
    block.build((None, None, 16))
    length = 2 * LINEAR_CHUNK + 13
    valid = np.arange(length)[None, :] >= length - np.array([length, 100, 3, 0])[:, None]
    x = np.random.default_rng(0).normal(size=(4, length, 16)).astype("float32") * valid[:, :, None]
    x, valid = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(valid)
    weights, values = block.attention_map(x, valid)
    explicit = block.attention.output_dense(keras.ops.einsum("bhnm,bmhd->bnhd", weights, values))
    query = block._query_input(x)
    chunked = block._linear_attend(query, *block.key_values(x), valid)
    np.testing.assert_allclose(numpy(chunked), numpy(explicit), atol=1e-5)
    np.testing.assert_allclose(numpy(weights).sum(-1), np.broadcast_to(numpy(valid)[:, None, :], (4, 2, length)),
                               atol=1e-5)


def test_causal_chunks_cover_the_window_in_a_few_ranges_of_at_least_the_minimum():
    for length in (MIN_CAUSAL_CHUNK, 2 * MIN_CAUSAL_CHUNK - 1, 2 * MIN_CAUSAL_CHUNK, 100, 200, 1000):
        ranges = causal_chunks(length)
        assert len(ranges) == max(1, min(CAUSAL_CHUNKS, length // MIN_CAUSAL_CHUNK))
        assert [start for start, _ in ranges] == [0] + [end for _, end in ranges[:-1]] and ranges[-1][1] == length
        assert max(end - start for start, end in ranges) - min(end - start for start, end in ranges) <= 1
        # A length known only when the step runs: always CAUSAL_CHUNKS ranges, the same ones and then empty ones.
        traced = [(int(numpy(start)), int(numpy(end)))
                  for start, end in causal_chunks(keras.ops.convert_to_tensor(length, "int32"))]
        assert traced == ranges + [(length, length)] * (CAUSAL_CHUNKS - len(ranges))


@pytest.mark.parametrize("variant", [{}, *[VARIANTS[name] for name in ("cosine", "silu", "window", "relative",
                                                                       "rotary")], dict(time_bias=True)])
def test_causal_attention_in_query_chunks_equals_it_over_the_whole_window(variant, monkeypatch):
    """Training's chunked causal attention (each chunk of queries over the keys up to its end) gives the
    outputs of the whole window at once at every real position, for every attention variant but linear (its
    own chunked form), over left padding of every length, a row of padding only, unequal chunks and
    timestamps; the block's outputs are the same everywhere (padding queries' are zeroed either way), also in a
    TensorFlow step traced for windows of any width and compiled with XLA (where the slices' bounds are tensors)."""
    fields = {"similarity": variant.get("attention_similarity", "dot"),
              "normalisation": variant.get("attention_normalisation", "softmax"),
              "window": variant.get("attention_window", [0])[0], "position_bias": variant.get("position_bias", "none"),
              "time_bias": variant.get("time_bias", False)}
    keras.utils.set_random_seed(0)
    block = CausalSelfAttentionBlock(16, 2, 0.0, init_std=0.3, **fields)
    block.build((None, None, 16))
    rng = np.random.default_rng(0)
    if block.position_bias == "relative":
        block.relative_bias.assign(rng.normal(0, 1, (RELATIVE_BUCKETS, 2)).astype("float32"))
    if block.time_bias:
        block.time_gap_bias.assign(rng.normal(0, 1, (TIME_BUCKETS, 2)).astype("float32"))
    length = CAUSAL_CHUNKS * MIN_CAUSAL_CHUNK + 7
    assert len(causal_chunks(length)) == CAUSAL_CHUNKS
    valid = np.arange(length)[None, :] >= length - np.array([length, 100, 3, 0])[:, None]
    x = rng.normal(size=(4, length, 16)).astype("float32") * valid[:, :, None]
    times = np.where(valid, np.cumsum(rng.integers(0, 5000, (4, length)), axis=1), -1)
    x, valid = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(valid)
    timestamps = keras.ops.convert_to_tensor(times) if block.time_bias else None
    query, keys, values, mask, _, index, _, key_time = block._self_attention_inputs(x, valid, timestamps=timestamps)
    whole = block._attend(query, keys, values, mask, False, index, index, key_time, key_time)
    chunked = block._causal_attend(query, keys, values, mask, True, index, key_time)  # dropout 0: no randomness
    real = numpy(valid)
    np.testing.assert_allclose(numpy(chunked)[real], numpy(whole)[real], atol=1e-5)
    assert np.abs(numpy(whole)[real]).max() > 0.1
    outputs = numpy(block(x, valid, training=True, timestamps=timestamps))
    if keras.backend.backend() == "tensorflow" and (not variant or block.time_bias):  # XLA compiles take seconds
        import tensorflow as tf

        spec = tf.TensorSpec([None, None, 16], "float32"), tf.TensorSpec([None, None], "bool")
        step = tf.function(lambda x, valid: block(x, valid, training=True, timestamps=timestamps),
                           input_signature=spec, jit_compile=True)
        np.testing.assert_allclose(numpy(step(x, valid)), outputs, atol=1e-5)
    monkeypatch.setattr("sasrec.layers.CAUSAL_CHUNKS", 1)
    np.testing.assert_allclose(outputs, numpy(block(x, valid, training=True, timestamps=timestamps)), atol=1e-5)

"""SASRec model: causality, padding invariance, masking, serialisation."""

from __future__ import annotations

import numpy as np
import keras
import pytest

from sasrec.config import SASRecConfig
from sasrec.layers import CausalSelfAttentionBlock
from sasrec.model import SASRec, build_model

VOCAB = 40


@pytest.fixture(
    params=[("pre", "from_end", 0.0), ("post", "from_end", 0.0), ("pre", "from_start", 0.02)],
    ids=lambda p: "-".join(map(str, p)),
)
def model(request):
    keras.utils.set_random_seed(0)
    norm, positions, init_std = request.param
    config = SASRecConfig(maxlen=12, hidden_units=16, num_heads=2, norm=norm, positions=positions, init_std=init_std)
    return build_model(config, VOCAB)


def random_ids(rng, batch=3, width=12):
    return rng.integers(2, VOCAB, size=(batch, width)).astype("int32")


def test_changing_a_later_item_never_changes_earlier_outputs(model):
    rng = np.random.default_rng(0)
    ids = random_ids(rng)
    base = keras.ops.convert_to_numpy(model(ids))
    for position in (4, 11):
        changed = ids.copy()
        changed[:, position] = (changed[:, position] + 7) % (VOCAB - 2) + 2
        out = keras.ops.convert_to_numpy(model(changed))
        np.testing.assert_allclose(out[:, :position], base[:, :position], atol=1e-5)
        assert np.abs(out[:, position] - base[:, position]).max() > 1e-4  # the change is seen from there on


def test_padding_is_invisible_and_width_does_not_matter(model):
    rng = np.random.default_rng(1)
    history = rng.integers(2, VOCAB, size=5).astype("int32")
    full = np.zeros((1, 12), "int32")
    full[0, -5:] = history
    cut = full[:, -8:]  # what length bucketing feeds: the same history in a narrower window
    a = keras.ops.convert_to_numpy(model(full))[0, -5:]
    b = keras.ops.convert_to_numpy(model(cut))[0, -5:]
    np.testing.assert_allclose(a, b, atol=1e-5)
    # Padding positions carry nothing: garbage embeddings at id 0 would otherwise leak in.
    out = keras.ops.convert_to_numpy(model.score_last(full))
    np.testing.assert_allclose(out, keras.ops.convert_to_numpy(model.score_last(cut)), atol=1e-4)


def test_position_encoding_counts_from_the_chosen_end(model):
    # The first item of a 1-item and of a 5-item history: the same position only when counting from
    # the start (causality makes everything else equal).
    alone, five = np.zeros((1, 12), "int32"), np.zeros((1, 12), "int32")
    alone[0, -1] = 7
    five[0, -5:] = [7, 3, 9, 4, 5]
    a = keras.ops.convert_to_numpy(model(alone))[0, -1]
    b = keras.ops.convert_to_numpy(model(five))[0, -5]
    assert np.allclose(a, b, atol=1e-5) == (model.positions == "from_start")


def test_init_std_sets_the_weight_scale():
    keras.utils.set_random_seed(0)
    small = build_model(SASRecConfig(maxlen=12, hidden_units=32, init_std=0.02), VOCAB)
    glorot = build_model(SASRecConfig(maxlen=12, hidden_units=32), VOCAB)
    kernel = lambda m: keras.ops.convert_to_numpy(m.blocks[0].ffn_inner.kernel)  # noqa: E731
    assert abs(kernel(small).std() - 0.02) < 0.004
    assert abs(kernel(glorot).std() - (2 / 64) ** 0.5) < 0.03


def test_last_position_shortcut_matches_the_full_forward_pass(model):
    ids = random_ids(np.random.default_rng(4))
    ids[0, :5] = 0  # a padded row too
    full = keras.ops.convert_to_numpy(model.item_logits(model(ids)[:, -1, :]))
    last = keras.ops.convert_to_numpy(model.score_last(ids))
    np.testing.assert_allclose(last[:, 2:], full[:, 2:], atol=1e-4)


def test_padding_and_oov_are_never_scored(model):
    scores = keras.ops.convert_to_numpy(model.score_last(random_ids(np.random.default_rng(2))))
    assert scores.shape == (3, VOCAB)
    assert np.isneginf(scores[:, :2]).all()
    assert np.isfinite(scores[:, 2:]).all()


def test_keras_file_round_trip(model, tmp_path):
    ids = random_ids(np.random.default_rng(3))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, SASRec) and loaded.get_config() == model.get_config()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.score_last(ids))[:, 2:],
        keras.ops.convert_to_numpy(model.score_last(ids))[:, 2:],
        atol=1e-5,
    )


def test_block_config_round_trip():
    block = CausalSelfAttentionBlock(16, num_heads=4, dropout=0.3, norm="post", init_std=0.02, name="b")
    clone = CausalSelfAttentionBlock.from_config(block.get_config())
    assert clone.get_config() == block.get_config()


def test_item_scores_are_float32_under_mixed_precision():
    """bfloat16 keeps 8 bits of mantissa: near-equal scores of a large catalog would collapse into ties."""
    vocab = 3000
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = build_model(SASRecConfig(maxlen=12, hidden_units=32), vocab)
        ids = np.random.default_rng(0).integers(2, vocab, size=(4, 12)).astype("int32")
        scores = np.asarray(model.score_last(ids))
        hidden = np.asarray(model(ids, last_only=True)[:, -1, :])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert scores.dtype == np.float32 and hidden.dtype == np.float32
    table = np.asarray(model.item_embedding.embeddings, np.float32)
    np.testing.assert_allclose(scores[:, 2:], (hidden @ table.T)[:, 2:], rtol=1e-4, atol=1e-4)
    top20 = np.sort(scores[:, 2:], axis=1)[:, -20:]
    assert all(len(np.unique(row)) == 20 for row in top20)

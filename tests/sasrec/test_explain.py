"""Explanations (sasrec/explain.py, the export's explain signature, Recommender.explain_batch, score_frame
explain columns, `sasrec explain`): a model that learned "B follows A" names A; explain answers what
serving_default answers; attention rows are distributions over the window; hostile input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.dataset import FIRST_ITEM_ID
from pipelines.errors import InputError
from tests.serving.helpers import item_names

NAMES = item_names(40)


def test_a_model_that_learned_what_follows_what_names_the_cause(tmp_path):
    """Synthetic sequences of random filler items in which item B always comes right after item A, and
    item D always 1 to 3 steps after item C: after a history ending with A (or with C and one filler) the
    model recommends B (D), and the explanation of B (D) names A (C) first."""
    import keras
    import tensorflow as tf

    from sasrec.explain import DEFAULT_METHOD, attributions, block_inputs
    from sasrec.export import build_serving_module
    from sasrec.model import SASRec

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    a, b, c, d = range(FIRST_ITEM_ID, FIRST_ITEM_ID + 4)
    fillers = np.arange(FIRST_ITEM_ID + 4, FIRST_ITEM_ID + 16)
    vocab_size, maxlen, n = int(fillers[-1]) + 1, 8, 512
    seqs = rng.choice(fillers, size=(n, maxlen + 1))
    where, half = rng.integers(0, maxlen - 1, n), np.arange(n) < n // 2
    seqs[half, where[half]], seqs[half, where[half] + 1] = a, b
    where[~half] = rng.integers(0, maxlen - 3, n - n // 2)
    seqs[~half, where[~half]], seqs[~half, where[~half] + rng.integers(1, 4, n - n // 2)] = c, d
    model = SASRec(vocab_size=vocab_size, maxlen=maxlen, hidden_units=16, num_blocks=2, num_heads=1, dropout=0.0,
                   positions="from_start", init_std=0.02)
    model.build((None, maxlen))
    optimizer = keras.optimizers.Adam(0.01)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, model.item_logits(model(x))))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    order = np.random.default_rng(1).permutation(n)
    for epoch in range(60):
        for i in range(0, n, 128):
            rows = seqs[order[i:i + 128]]
            step(tf.constant(rows[:, :-1], tf.int32), tf.constant(rows[:, 1:], tf.int32))

    f = fillers
    histories = np.array([[0, 0, 0, f[3], f[7], f[1], f[5], a], [0, 0, f[2], f[6], f[0], f[4], c, f[8]]], np.int32)
    assert np.argmax(np.asarray(model.score_last(histories)), axis=1).tolist() == [b, d]
    weights = np.asarray(attributions(model, histories, *block_inputs(model, histories), tf.constant([[b], [d]]),
                                      DEFAULT_METHOD))
    assert np.argmax(weights[:, 0], axis=1).tolist() == [maxlen - 1, maxlen - 2]

    # Through the serving module: external ids, the explain signature's outputs.
    names = np.array(["", "<oov>"] + [f"i{i}" for i in range(FIRST_ITEM_ID, vocab_size)], dtype=object)
    module = build_serving_module(model, names, np.arange(vocab_size) + 1)
    out = module.explain(history=tf.constant([[f"i{i}" if i else "" for i in h] for h in histories]),
                         k=tf.constant(3), exclude_seen=tf.constant(False), exclude_item_ids=tf.constant([[""], [""]]),
                         explain_items=tf.constant(2))
    assert out["item_ids"].numpy()[:, 0].tolist() == [f"i{b}".encode(), f"i{d}".encode()]
    assert out["explanation_item_ids"].numpy()[:, 0, 0].tolist() == [f"i{a}".encode(), f"i{c}".encode()]


def test_explain_answers_what_recommend_answers(recommender, keras_model):
    history = [NAMES[i] for i in (3, 7, 7, 1, 12, 30)] + ["not-an-item"]
    plain = recommender.recommend_batch([history, history[:2]], k=8)
    explained = recommender.explain_batch([history, history[:2]], k=8, explain_items=4)
    assert (explained.item_ids == plain.item_ids).all()
    np.testing.assert_allclose(explained.scores, plain.scores, rtol=1e-5, atol=1e-5)
    assert explained.unknown_count.tolist() == [1, 0]
    ids, weights = explained.explanation_item_ids, explained.explanation_weights
    assert ids.shape == weights.shape == (2, 8, 4)
    # Largest weight first; only history items; a history of 2 items has 2 entries then none.
    assert (np.diff(np.where(np.isinf(weights), -1e30, weights), axis=2) <= 0).all()
    assert set(ids[0].ravel()) <= set(history)
    assert (ids[1, :, 2:] == "").all() and (ids[1, :, :2] != "").all()
    row = explained.row(1)
    assert [name for name, _ in row.explanations[0]] == list(ids[1, 0, :2])
    # The plot's attention: per block and head, a distribution over the window's real items.
    attention, window = explained.attention, explained.window_item_ids
    assert attention.shape == (2, len(keras_model.blocks), keras_model.num_heads, window.shape[1])
    np.testing.assert_allclose(attention.sum(axis=3), 1.0, rtol=1e-5)
    assert (attention[window[:, None, None, :].repeat(2, 1) == ""] == 0).all()
    assert [w for w in window[0] if w] == [h for h in history if h in NAMES]


def test_explain_hostile_input(recommender):
    cold = recommender.explain_batch([[], ["unknown-a", "unknown-b"]], k=5, explain_items=3)
    assert cold.cold_start.all()
    assert (cold.item_ids == recommender.recommend_batch([[], []], k=5).item_ids).all()
    assert cold.row(0).explanations == [[]] * 5 and cold.row(1).explanations == [[]] * 5
    assert (cold.attention == 0).all()
    for bad in (0, 51, -1):
        with pytest.raises(InputError, match="explain_items must be in 1..50"):
            recommender.explain_batch([[NAMES[2]]], k=5, explain_items=bad)
    with pytest.raises(InputError, match="k must be in"):
        recommender.explain_batch([[NAMES[2]]], k=0)


def test_score_frame_explain_columns(recommender):
    frame = pd.DataFrame({"user_id": ["u1", "u2", "cold"],
                          "history": [[NAMES[i] for i in (1, 4, 9, 16)], [NAMES[5]], []]})
    plain = recommender.score_frame(frame, k=4)
    got = recommender.score_frame(frame, k=4, explain=True, explain_items=2, chunk_size=2)
    pd.testing.assert_frame_equal(got[plain.columns], plain, check_exact=False, rtol=1e-5)
    assert list(got.columns[-2:]) == ["explanation_item_ids", "explanation_weights"]
    lists = got["explanation_item_ids"].tolist()
    expected = recommender.explain_batch([frame["history"][0]], k=4, explain_items=2).row(0).explanations
    assert [list(x) for x in lists[:4]] == [[name for name, _ in e] for e in expected]
    assert [len(x) for x in lists[4:8]] == [1] * 4 and [len(x) for x in lists[8:]] == [0] * 4
    assert all(list(w) == sorted(w, reverse=True) for w in got["explanation_weights"])
    with pytest.raises(InputError, match="explain_items"):
        recommender.score_frame(frame, k=4, explain=True, explain_items=0)


def test_explain_command_prints_and_plots(model_base, tmp_path, capsys):
    from sasrec.cli import main

    history = ",".join(NAMES[i] for i in (2, 8, 3, 11))
    assert main(["explain", "--model", str(model_base), "--history", history, "-k", "3", "--items", "2",
                 "--plot", str(tmp_path / "attention.png")]) == 0
    out = capsys.readouterr().out
    assert "because of (rollout_occlusion" in out and len(out.splitlines()) == 6
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["explain", "--model", str(model_base), "--history", history, "--plot", "out.jpg"]) == 2
    assert "--plot" in capsys.readouterr().err

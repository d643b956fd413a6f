"""Time-interval attention bias (issue 19, "time"): a learned per-head bias by log2 bucket of the gap
between the query's and the key's timestamps. Causal, padding-invariant, serializable, exact in the
cached state, off without timestamps; the feed and the evaluation pass history times only."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from pipelines.dataset import read_dataset
from pipelines.errors import InputError
from sasrec.config import SASRecConfig
from sasrec.evaluate import Protocol, evaluation_set, rank_targets
from sasrec.feed import TrainingFeed, left_pad, rebase_times
from sasrec.layers import TIME_BUCKETS, UNKNOWN_TIME, CausalSelfAttentionBlock, time_bucket
from sasrec.model import build_model

VOCAB = 40
MAXLEN = 12


def time_model(seed: int = 0, **fields):
    """A small time-bias model whose bias is random (a zero bias would test nothing)."""
    keras.utils.set_random_seed(seed)
    config = SASRecConfig(maxlen=MAXLEN, hidden_units=16, num_heads=2, init_std=0.3, positions="from_start",
                          time_bias=True, **fields)
    model = build_model(config, VOCAB)
    rng = np.random.default_rng(seed)
    for block in model.blocks:
        block.time_gap_bias.assign(rng.normal(0, 2, (TIME_BUCKETS, 2)).astype("float32"))
    return model


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def padded(rows, width, fill=0):
    out = np.full((len(rows), width), fill, "int64")
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row):] = row
    return out


def inputs(histories, times, width):
    ids = padded(histories, width).astype("int32")
    return {"ids": ids, "timestamps": rebase_times(padded(times, width), ids)}


HISTORY = np.array([5, 9, 13, 2, 30, 7, 21, 11, 3])
# Gaps from seconds to months: several buckets.
TIMES = 1_700_000_000 + np.cumsum([0, 5, 60, 3_600, 2, 86_400, 30, 2_000_000, 700])


def test_time_buckets_are_exact_log2_gaps():
    powers = 2 ** np.arange(1, 31, dtype=np.int64)
    gaps = np.concatenate([[0, -5, 59, 3_600, 86_400, 2**31 - 1], powers - 2, powers - 1])
    expected = np.floor(np.log2(1 + np.maximum(gaps, 0).astype(np.float64) + 0.5)).astype(int).clip(max=TIME_BUCKETS - 1)
    assert numpy(time_bucket(keras.ops.convert_to_tensor(gaps, "int32"))).tolist() == expected.tolist()


def test_time_bias_is_causal_ignores_padding_and_round_trips(tmp_path):
    model = time_model()
    base = numpy(model(inputs([HISTORY], [TIMES], 10)))[0]
    # Causality: a later event's time does not change what earlier positions computed.
    later = TIMES.copy()
    later[6:] += 10_000_000
    after = numpy(model(inputs([HISTORY], [later], 10)))[0]
    np.testing.assert_allclose(after[:7], base[:7], atol=1e-5)  # column 7 holds event 6
    assert np.abs(after[7:] - base[7:]).max() > 1e-3
    # Padding: wider windows change nothing; only gaps matter, not the origin.
    np.testing.assert_allclose(numpy(model(inputs([HISTORY], [TIMES], MAXLEN)))[0][-9:], base[-9:], atol=1e-5)
    shifted = {"ids": inputs([HISTORY], [TIMES], 10)["ids"], "timestamps": padded([TIMES - TIMES[0] + 7], 10)}
    np.testing.assert_allclose(numpy(model(shifted))[0][-9:], base[-9:], atol=1e-5)
    # Serialization: get_config and a .keras file restore the bias and its weights.
    block = model.blocks[0]
    assert CausalSelfAttentionBlock.from_config(json.loads(json.dumps(block.get_config()))).time_bias
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(numpy(loaded(inputs([HISTORY], [TIMES], 10)))[0], base, atol=1e-6)


def test_without_timestamps_the_bias_is_off():
    model = time_model()
    ids = padded([HISTORY], 10).astype("int32")
    plain = numpy(model(ids))
    unknown = numpy(model({"ids": ids, "timestamps": np.full(ids.shape, UNKNOWN_TIME, "int32")}))
    np.testing.assert_allclose(unknown, plain, atol=1e-6)
    # The same weights without the time-bias blocks answer the same.
    keras.utils.set_random_seed(0)
    untimed = build_model(SASRecConfig(maxlen=MAXLEN, hidden_units=16, num_heads=2, init_std=0.3,
                                       positions="from_start"), VOCAB)
    untimed.set_weights([w for w in model.get_weights() if w.shape != (TIME_BUCKETS, 2)])
    np.testing.assert_allclose(numpy(untimed(ids)), plain, atol=1e-5)
    assert np.abs(numpy(model(inputs([HISTORY], [TIMES], 10))) - plain).max() > 1e-3


def test_cached_state_with_timestamps_equals_re_encoding():
    model = time_model(seed=1)
    full = numpy(model.score_last(inputs([HISTORY], [TIMES], MAXLEN)))[0, 2:]
    for cut in (0, 1, 4, 8):
        state = inputs([HISTORY[:cut]], [TIMES[:cut]], MAXLEN)
        origin = TIMES[:cut].min() if cut else TIMES[0]
        cached_times = np.where(state["ids"] != 0, padded([TIMES[:cut] - origin], MAXLEN), UNKNOWN_TIME)
        _, keys, values, valid = model.encode_state(state["ids"], state["timestamps"])
        new = len(HISTORY) - cut
        hidden, _, _ = model.advance_state(
            padded([HISTORY[cut:]], new).astype("int32"), np.array([cut]), keys, values, valid,
            timestamps=padded([TIMES[cut:] - origin], new).astype("int32"), cached_timestamps=cached_times)
        np.testing.assert_allclose(numpy(model.item_logits(hidden))[0, 2:], full, atol=1e-4)


def test_the_feed_and_the_evaluation_pass_history_times_only(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    feed = TrainingFeed(ds, maxlen=20, batch_size=32, loss="ce", timestamps=True, seed=1)
    x, y = feed[1]
    ids, times = x["ids"], x["timestamps"]
    assert ids.shape == times.shape == y["pos"].shape and times.dtype == np.int32
    assert ((times == UNKNOWN_TIME) == (ids == 0)).all() and (times[ids != 0] >= 0).all()
    # Row by row the times are the input events' own (the targets' times would leak them).
    batch = feed._epoch_batches()[1]
    for row, user in enumerate(feed.window_users[batch][:5]):
        start = ds.offsets[user]
        n = int(np.count_nonzero(ids[row]))
        own = ds.timestamps[start + ds.train_end[user] - 1 - n : start + ds.train_end[user] - 1]
        assert (times[row][-n:] == own - own.min()).all()
    assert TrainingFeed(ds, maxlen=20, batch_size=32, loss="ce", seed=1)[1][0].shape == ids.shape

    evalset = evaluation_set(ds, "valid")
    seen = []

    def score(x):
        seen.append(x)
        return np.zeros((len(x["ids"]), ds.vocab_size), np.float32)

    rank_targets(score, ds, evalset, Protocol(split="valid"), maxlen=20, batch_size=64, timestamps=True)
    x = seen[0]
    history = left_pad(ds.timestamps, evalset.history_starts[:64], evalset.history_ends[:64], 20, dtype=np.int64)
    # The spans end before each target: its own time is never passed.
    np.testing.assert_array_equal(x["timestamps"], rebase_times(history, x["ids"]))


def test_linear_attention_refuses_the_time_bias():
    with pytest.raises(InputError, match="time_bias"):
        SASRecConfig(time_bias=True, attention_normalisation="linear")


def test_the_export_reads_timestamps_through_recommend_timed(tmp_path):
    import pandas as pd

    from sasrec.export import export_model
    from sasrec.recommender import Recommender

    items = np.array(["<pad>", "<oov>"] + [f"i{i}" for i in range(2, VOCAB)], dtype=object)
    model = time_model(seed=2)
    rec = Recommender.load(export_model(model, tmp_path, item_ids=items, train_counts=np.arange(VOCAB)))
    assert rec.reads_timestamps and rec.card["time_bias"]
    # Longer than maxlen, with an unknown id: the window keeps the last 12 known items and their own times.
    ids = np.concatenate([HISTORY, HISTORY[:6] + 1])
    times = 1_700_000_000 + np.cumsum(np.arange(len(ids) + 1) ** 4)
    history = [f"i{i}" for i in ids[:7]] + ["unknown"] + [f"i{i}" for i in ids[7:]]
    stamps = np.concatenate([times[:7], [times[-1] + 50], times[7:-1]]).tolist()

    def top5(scores):
        top = np.argsort(-scores[2:])[:5] + 2
        return [f"i{i}" for i in top], scores[top]

    def check(result, inputs_):
        expected_ids, expected_scores = top5(numpy(model.score_last(inputs_))[0])
        assert list(result.item_ids[0]) == expected_ids
        np.testing.assert_allclose(result.scores[0], expected_scores, atol=1e-4)

    check(rec.recommend_batch([history], 5, False, timestamps=[stamps]), inputs([ids[-MAXLEN:]], [times[:-1][-MAXLEN:]], MAXLEN))
    # Without timestamps (or with unknown ones) the bias is off and the model still answers.
    plain = padded([ids[-MAXLEN:]], MAXLEN).astype("int32")
    untimed = rec.recommend_batch([history], 5, False)
    check(untimed, plain)
    assert np.abs(untimed.scores[0] - rec.recommend_batch([history], 5, False, timestamps=[stamps]).scores[0]).max() > 1e-3
    check(rec.recommend_batch([history], 5, False, timestamps=[[-1] * len(history)]), plain)
    with pytest.raises(InputError, match=r"timestamps\[0\]"):
        rec.recommend_batch([history], 5, False, timestamps=[stamps[1:]])
    # score_frame reads the events frame's time column.
    frame = pd.DataFrame({"user_id": 1, "item_id": history, "timestamp": stamps})
    scored = rec.score_frame(frame, k=5, exclude_seen=False)
    np.testing.assert_allclose(scored["score"].to_numpy(),
                               rec.recommend_batch([history], 5, False, timestamps=[stamps]).scores[0], atol=1e-5)
    # Explanations read no times: refused with them, the untimed answer without them.
    with pytest.raises(InputError, match="explain"):
        rec.score_frame(frame, k=5, exclude_seen=False, explain=True)
    explained = rec.score_frame(frame, k=5, exclude_seen=False, explain=True, time_col=None)
    np.testing.assert_allclose(explained["score"].to_numpy(), untimed.scores[0], atol=1e-5)


def test_training_refuses_the_time_bias_on_file_order_timestamps(tmp_path):
    from pipelines.prepare import prepare_file
    from sasrec.train import train

    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{user} {item}\n" for user in (1, 2) for item in range(1, 6)))
    prepare_file("pairs", pairs, tmp_path / "data", kcore="none")
    with pytest.raises(InputError, match="time_bias"):
        train(tmp_path / "data", tmp_path / "run", SASRecConfig(time_bias=True, tensorboard=False))


def test_exported_states_with_timestamps_continue_as_recommend_timed(tmp_path):
    """encode_state_timed / advance_state_timed: a state advanced a few events at a time, with unknown
    ids, unknown times and a time earlier than the cached ones (a new origin), answers as
    recommend_timed on the whole history, and keeps its items' times."""
    from sasrec.export import export_model
    from sasrec.recommender import Recommender

    items = np.array(["<pad>", "<oov>"] + [f"i{i}" for i in range(2, VOCAB)], dtype=object)
    rec = Recommender.load(export_model(time_model(seed=4), tmp_path, item_ids=items, train_counts=np.arange(VOCAB)))
    assert rec.keeps_state and rec.advances_state
    rng = np.random.default_rng(5)
    histories, stamps = [], []
    for n in (9, 11):
        histories.append([f"i{i}" for i in rng.integers(2, VOCAB, n)])
        stamps.append((1_700_000_000 + np.cumsum(rng.integers(1, 10**6, n))).tolist())
    histories[0][3] = "unknown"
    stamps[0][4] = None
    stamps[1][7] = stamps[1][0] - 86_400  # earlier than every cached event when it arrives
    cuts = [(0, 2, 3, 6, 9), (1, 5, 6, 8, 11)]
    result, states = rec.encode_states([h[:c[0]] for h, c in zip(histories, cuts)], 5, True, [[], []],
                                       timestamps=[t[:c[0]] for t, c in zip(stamps, cuts)])
    for step in range(1, 5):
        ends = [c[step] for c in cuts]
        starts = [c[step - 1] for c in cuts]
        result, states = rec.advance_states(
            states, [h[s:e] for h, s, e in zip(histories, starts, ends)], 5, True, [[], []],
            timestamps=[t[s:e] for t, s, e in zip(stamps, starts, ends)])
        expected = rec.recommend_batch([h[:e] for h, e in zip(histories, ends)], 5, True,
                                       timestamps=[t[:e] for t, e in zip(stamps, ends)])
        np.testing.assert_array_equal(result.item_ids, expected.item_ids)
        np.testing.assert_allclose(result.scores, expected.scores, atol=1e-4)
    # The state's times are its known items' own; the timed answer differs from the untimed one.
    assert states[0].times.tolist() == [-1 if t is None else t for h, t in zip(histories[0], stamps[0]) if h != "unknown"]
    assert np.abs(rec.recommend_batch(histories, 5, True).scores - result.scores).max() > 1e-3
    with pytest.raises(InputError, match=r"timestamps\[1\]"):
        rec.advance_states(states, [["i3"], ["i4"]], 5, True, [[], []], timestamps=[[1], [1, 2]])

"""Cached attention state: encode a history once, continue it by new events, same scores as re-encoding."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipelines.errors import InputError
from sasrec.config import SASRecConfig
from sasrec.model import build_model
from tests.sasrec.test_attention_variants import VARIANTS, variant_model

VOCAB = 40
MAXLEN = 12
ITEMS = np.array(["<pad>", "<oov>"] + [f"i{i}" for i in range(2, VOCAB)], dtype=object)
SETTINGS = [(norm, positions) for norm in ("pre", "post") for positions in ("from_start", "from_end")]


def small_model(norm: str, positions: str, seed: int = 0):
    keras.utils.set_random_seed(seed)
    # init_std 0.3: scores spread enough that 1e-4 is a strict tolerance
    config = SASRecConfig(maxlen=MAXLEN, hidden_units=16, num_heads=2, norm=norm, positions=positions, init_std=0.3)
    return build_model(config, VOCAB)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def left_padded(rows, width):
    out = np.zeros((len(rows), width), "int32")
    for i, row in enumerate(rows):
        if len(row):
            out[i, -len(row):] = row
    return out


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_a_state_advanced_event_by_event_scores_as_the_whole_history(norm):
    advance_event_by_event(small_model(norm, "from_start"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_attention_variant_continues_a_state_exactly(variant):
    """Windows and position biases count items, not columns: the cached step sees the same distances."""
    advance_event_by_event(variant_model(VARIANTS[variant]))


def advance_event_by_event(model):
    rng = np.random.default_rng(0)
    for trial in range(4):
        history = rng.integers(2, VOCAB, size=MAXLEN)
        cut = int(rng.integers(1, 6))
        hidden, keys, values, valid = map(numpy, model.encode_state(left_padded([history[:cut]], MAXLEN)))
        keys, values = keys[:, :, valid[0]], values[:, :, valid[0]]
        position = cut
        while position < MAXLEN:
            step = int(rng.integers(1, 4))
            new = history[position : position + step]
            cached = np.ones((1, keys.shape[2]), bool)
            hidden, new_keys, new_values = map(
                numpy, model.advance_state(left_padded([new], len(new)), np.array([position]), keys, values, cached)
            )
            keys = np.concatenate([keys, new_keys], axis=2)
            values = np.concatenate([values, new_values], axis=2)
            position += len(new)
            expected = numpy(model.score_last(left_padded([history[:position]], MAXLEN)))[0, 2:]
            got = numpy(model.item_logits(hidden))[0, 2:]
            np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"trial {trial}, {position} items")
            assert np.abs(expected).max() > 0.5  # scores large enough for the tolerance to mean something


@pytest.mark.parametrize("variant", ["default", "combined", "rotary"])
def test_padding_inside_a_batch_of_states_changes_nothing(variant):
    model = small_model("pre", "from_start") if variant == "default" else variant_model(VARIANTS[variant])
    rng = np.random.default_rng(1)
    histories = [rng.integers(2, VOCAB, size=n) for n in (2, 7, 4)]
    news = [rng.integers(2, VOCAB, size=n) for n in (3, 1, 2)]
    states = [model.encode_state(left_padded([h], MAXLEN)) for h in histories]
    lengths = [len(h) for h in histories]
    longest = max(lengths)
    keys = np.zeros((3, 2, longest, 2, 8), "float32")
    values = np.zeros_like(keys)
    cached = np.zeros((3, longest), bool)
    for i, (_, k, v, valid) in enumerate(states):
        valid = numpy(valid)[0]
        keys[i, :, : lengths[i]] = numpy(k)[0][:, valid]
        values[i, :, : lengths[i]] = numpy(v)[0][:, valid]
        cached[i, : lengths[i]] = True
    # Garbage in the padded slots must not leak in.
    keys[~cached[:, None, :, None, None].repeat(2, 1).repeat(2, 3).repeat(8, 4)] = 7.0
    hidden, _, _ = model.advance_state(left_padded(news, 3), np.array(lengths), keys, values, cached)
    for i in range(3):
        expected = numpy(model.score_last(left_padded([np.concatenate([histories[i], news[i]])], MAXLEN)))[0, 2:]
        np.testing.assert_allclose(numpy(model.item_logits(hidden))[i, 2:], expected, atol=1e-4)


@pytest.fixture
def exported(state_paths):
    """The export through its state signatures (tests/sasrec/conftest.py; test_host_model.py checks the
    numpy path against them)."""
    (_, positions), (_, signature) = state_paths
    assert signature.keeps_state and signature.advances_state == (positions == "from_start")
    return signature


def test_the_export_continues_states_exactly_and_says_when_it_cannot(exported):
    """Random histories with unknown ids, fed in random chunks: every answer equals the stateless
    signature's on the whole history; a continuation is refused exactly when the window would slide
    (or, with positions from the end, whenever a known item arrives), and re-encoding then matches."""
    rng = np.random.default_rng(2)
    incremental = exported.advances_state
    advanced = refused = 0
    for trial in range(6):
        history = [f"i{x}" if rng.random() > 0.15 else f"unknown-{x}" for x in rng.integers(2, VOCAB, size=20)]
        exclude = [[f"i{rng.integers(2, VOCAB)}"]]
        result, (state,) = exported.encode_states([history[:2]], 8, True, exclude)
        position = 2
        while position < len(history):
            new = history[position : position + int(rng.integers(0, 4))]
            result, (next_state,) = exported.advance_states([state], [new], 8, True, exclude)
            position += len(new)
            known_new = sum(1 for x in new if not x.startswith("unknown"))
            should_refuse = known_new > 0 and (not incremental or state.length + known_new > MAXLEN)
            assert (next_state is None) == should_refuse
            if next_state is None:
                refused += 1
                result, (next_state,) = exported.encode_states([history[:position]], 8, True, exclude)
            else:
                advanced += 1
            expected = exported.recommend_batch([history[:position]], 8, True, exclude)
            assert list(result.item_ids[0]) == list(expected.item_ids[0])
            np.testing.assert_allclose(result.scores, expected.scores, atol=1e-4)
            assert result.unknown_count[0] == expected.unknown_count[0]
            assert result.cold_start[0] == expected.cold_start[0]
            state = next_state
    assert advanced > 10 and refused > 3


def test_cold_starts_and_unknown_only_events(exported):
    _, (state,) = exported.encode_states([[]], 5, True, [[]])
    assert state.length == 0
    result, (state,) = exported.advance_states([state], [["nope", "never"]], 5, True, [[]])
    expected = exported.recommend_batch([["nope", "never"]], 5, True)
    assert result.cold_start[0] and expected.cold_start[0] and result.unknown_count[0] == 2
    assert list(result.item_ids[0]) == list(expected.item_ids[0])
    result, (state,) = exported.advance_states([state], [["i5"]], 5, True, [[]])
    if exported.advances_state:
        expected = exported.recommend_batch([["nope", "never", "i5"]], 5, True)
        assert not result.cold_start[0] and "i5" not in result.item_ids[0]
        np.testing.assert_allclose(result.scores, expected.scores, atol=1e-4)
    else:
        assert state is None


def test_a_model_without_time_bias_checks_timestamps_and_answers_without_them(exported):
    """As recommend_batch: a hot swap can hand a plain model a request with times."""
    plain = exported.encode_states([["i3", "i4"]], 5, True, [[]])
    timed = exported.encode_states([["i3", "i4"]], 5, True, [[]], timestamps=[[100, 200]])
    np.testing.assert_array_equal(timed[0].scores, plain[0].scores)
    assert timed[1][0].times is None
    advanced = exported.advance_states(plain[1], [["i5"]], 5, True, [[]], timestamps=[[300]])
    np.testing.assert_array_equal(advanced[0].scores, exported.advance_states(plain[1], [["i5"]], 5, True, [[]])[0].scores)
    with pytest.raises(InputError, match=r"timestamps\[0\]"):
        exported.advance_states(plain[1], [["i5"]], 5, True, [[]], timestamps=[[1, 2]])


def test_a_state_of_another_version_is_refused(exported):
    _, (state,) = exported.encode_states([["i3"]], 5, True, [[]])
    state.version = (exported.version or 0) + 1
    with pytest.raises(ValueError, match="another model version"):
        exported.advance_states([state], [["i4"]], 5, True, [[]])


def test_a_state_no_event_can_continue_keeps_no_keys_and_still_answers(state_paths):
    """A full window (positions from the start) or any window (from the end) keeps neither keys nor values:
    any new known item re-encodes it anyway. Its hidden state still answers a call that brings no known
    item, on both paths, and a known item is refused (re-encoded) even when the caller skips state_route."""
    (_, positions), paths = state_paths
    signature = paths[1]
    full = [f"i{2 + i % (VOCAB - 2)}" for i in range(MAXLEN + 3)]
    short = full[:3]
    for model in paths:
        _, (full_state, short_state) = model.encode_states([full, short], 5, True, [[], []])
        assert full_state.length == MAXLEN and full_state.keys.nbytes == full_state.values.nbytes == 0
        assert short_state.length == 3 and short_state.keys.shape[1] == (3 if positions == "from_start" else 0)
        result, (same,) = model.advance_states([full_state], [["nope"]], 5, True, [[]])
        expected = signature.recommend_batch([full + ["nope"]], 5, True)
        assert list(result.item_ids[0]) == list(expected.item_ids[0])
        np.testing.assert_allclose(result.scores[0], expected.scores[0], atol=1e-4)
        assert (same.length, same.keys.shape[1], same.unknown_count) == (MAXLEN, 0, 1)
        _, (refused,) = model.advance_states([full_state], [["i3"]], 5, True, [[]])
        assert refused is None
        assert model.state_route(full_state, ["i3"]) == ("window_full" if positions == "from_start"
                                                          else "positions_from_end")

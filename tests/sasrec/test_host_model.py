"""The numpy path of live histories (sasrec.host_model): the same states, items and scores as the
SavedModel's signatures, for both norms, both position schemes and every attention variant; explicit
fallback to the signatures for what it does not compute."""

from __future__ import annotations

import numpy as np
import pytest

from sasrec import host_model, layers
from sasrec.export import export_model
from sasrec.recommender import Recommender
from tests.sasrec.conftest import TRAIN_COUNTS, both_paths
from tests.sasrec.test_attention_state import ITEMS
from tests.sasrec.test_attention_variants import VARIANTS, variant_model

VOCAB = 40
MAXLEN = 12


def test_constants_and_relative_buckets_are_the_layers():
    assert (host_model.MASKED_SCORE, host_model.RELATIVE_BUCKETS, host_model.RELATIVE_MAX_DISTANCE,
            host_model.ROTARY_BASE) == (layers.MASKED_SCORE, layers.RELATIVE_BUCKETS, layers.RELATIVE_MAX_DISTANCE,
                                        layers.ROTARY_BASE)
    distances = np.arange(-3, 2048, dtype=np.int32)
    np.testing.assert_array_equal(host_model.relative_bucket(distances),
                                  np.asarray(layers.relative_bucket(distances)))


def random_history(rng, length):
    return [f"i{x}" if rng.random() > 0.15 else f"unknown-{x}" for x in rng.integers(2, VOCAB, size=length)]


def assert_same_answer(got, expected, what):
    assert [list(r) for r in got.item_ids] == [list(r) for r in expected.item_ids], what
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4, err_msg=what)
    np.testing.assert_array_equal(got.unknown_count, expected.unknown_count, err_msg=what)
    np.testing.assert_array_equal(got.cold_start, expected.cold_start, err_msg=what)


def check_event_by_event(host: Recommender, signature: Recommender, seed: int = 2):
    """Random histories (with unknown ids) fed in random chunks through the numpy path: every answer is
    stateless Recommend's on the whole history; the numpy state equals the signatures' state; a
    continuation is refused exactly where the signatures refuse it, and re-encoding then answers."""
    rng = np.random.default_rng(seed)
    continued = refused = 0
    for trial in range(5):
        history = random_history(rng, 20)
        exclude = [[f"i{rng.integers(2, VOCAB)}", "not-an-item", ""]]
        exclude_seen = bool(trial % 2 == 0)
        _, (state,) = host.encode_states([history[:2]], 8, exclude_seen, exclude)
        position = 2
        while position < len(history):
            new = history[position : position + int(rng.integers(0, 4))]
            result, (next_state,) = host.advance_states([state], [new], 8, exclude_seen, exclude)
            _, (expected_state,) = signature.advance_states([state], [new], 8, exclude_seen, exclude)
            position += len(new)
            assert (next_state is None) == (expected_state is None), f"trial {trial}, {position} events"
            if next_state is None:
                refused += 1
                result, (next_state,) = host.encode_states([history[:position]], 8, exclude_seen, exclude)
                _, (expected_state,) = signature.encode_states([history[:position]], 8, exclude_seen, exclude)
            else:
                continued += 1
            expected = signature.recommend_batch([history[:position]], 8, exclude_seen, exclude)
            assert_same_answer(result, expected, f"trial {trial}, {position} events")
            np.testing.assert_allclose(next_state.keys, expected_state.keys, atol=1e-4)
            np.testing.assert_allclose(next_state.values, expected_state.values, atol=1e-4)
            np.testing.assert_array_equal(next_state.seen_ids, expected_state.seen_ids)
            assert next_state.unknown_count == expected_state.unknown_count
            assert np.abs(expected.scores[np.isfinite(expected.scores)]).max() > 0.5  # the tolerance means something
            state = next_state
    return continued, refused


def check_many_at_once(host: Recommender, signature: Recommender, seed: int = 3):
    """Stored histories of different lengths with 0-2 new events each, cache misses, mixed ``k`` and
    ``exclude_seen``, more than one padded pass: ``recommend_stored`` answers each as it does alone and as
    stateless Recommend."""
    rng = np.random.default_rng(seed)
    requests = []
    for u in range(2 * host_model.STATES_PER_PASS + 5):
        history = random_history(rng, int(rng.integers(2, MAXLEN + 3)))
        seen = len(history) - int(rng.integers(0, 3))
        _, (state,) = host.encode_states([history[:seen]], 8, True, [[]])
        requests.append((history, None if u % 7 == 3 else state, history[seen:], int(rng.integers(1, 9)),
                         u % 3 != 0, [f"i{rng.integers(2, VOCAB)}"]))
    answers = host.recommend_stored(requests)
    outcomes = []
    for u, ((history, _, _, k, exclude_seen, exclude), (out, row, state, outcome)) in enumerate(zip(requests, answers)):
        expected = signature.recommend_batch([history], k, exclude_seen, [exclude])
        assert list(out.item_ids[row][:k]) == list(expected.item_ids[0]), f"user {u}"
        np.testing.assert_allclose(out.scores[row][:k], expected.scores[0], atol=1e-4, err_msg=f"user {u}")
        assert (out.unknown_count[row], out.cold_start[row]) == (expected.unknown_count[0], expected.cold_start[0])
        ((alone, _, alone_state, alone_outcome),) = host.recommend_stored([requests[u]])
        assert outcome == alone_outcome, f"user {u}"
        np.testing.assert_allclose(out.scores[row][:k], alone.scores[0][:k], atol=1e-5, err_msg=f"user {u}")
        np.testing.assert_allclose(state.keys, alone_state.keys, atol=1e-5, err_msg=f"user {u}")
        np.testing.assert_allclose(state.values, alone_state.values, atol=1e-5, err_msg=f"user {u}")
        np.testing.assert_allclose(state.hidden, alone_state.hidden, atol=1e-5, err_msg=f"user {u}")
        outcomes.append(outcome)
    return outcomes


def test_numpy_states_answer_as_the_signatures(state_paths):
    (_, positions), (host, signature) = state_paths
    continued, refused = check_event_by_event(host, signature)
    outcomes = check_many_at_once(host, signature)
    if positions == "from_start":
        assert continued > 10 and refused >= 1
        assert outcomes.count("continued") > host_model.STATES_PER_PASS  # more than one padded pass
    else:  # positions from the end: every known event re-encodes (in numpy)
        assert refused > 10


# "combined" holds cosine, silu, a window per block and the relative bias.
@pytest.mark.parametrize("variant", ["combined", "rotary", "linear cosine"])
def test_every_attention_variant_answers_as_the_signatures(variant, tmp_path):
    paths = both_paths(variant_model(VARIANTS[variant]), tmp_path)
    continued, _ = check_event_by_event(*paths)
    assert continued > 10
    assert check_many_at_once(*paths).count("continued") > host_model.STATES_PER_PASS


def test_a_batch_mixes_cold_starts_long_histories_and_exclusions(state_paths):
    _, (host, signature) = state_paths
    rng = np.random.default_rng(5)
    histories = [[], ["nope"], random_history(rng, 3), random_history(rng, 40), [f"i{i}" for i in range(2, VOCAB)]]
    excludes = [["i3"], [], ["i7", "i7"], [f"i{i}" for i in range(2, 30)], []]
    for k in (1, 5, VOCAB - 2):
        for exclude_seen in (True, False):
            got, states = host.encode_states(histories, k, exclude_seen, excludes)
            expected, _ = signature.encode_states(histories, k, exclude_seen, excludes)
            assert_same_answer(got, expected, f"k {k}, exclude_seen {exclude_seen}")
            assert_same_answer(got, signature.recommend_batch(histories, k, exclude_seen, excludes), f"k {k}")
            # Every item of the last history was seen: nothing is left to return.
            assert (got.item_ids[-1][0] == "") == exclude_seen and np.isneginf(got.scores[-1]).all() == exclude_seen
    assert [s.length for s in states] == [0, 0, len(host.host.lookup(histories[2])[0]), MAXLEN, MAXLEN]


def test_equal_scores_rank_the_lower_id_first_as_top_k(state_paths):
    """Cold starts rank by popularity, and items from i10 on tie."""
    _, (host, signature) = state_paths
    got, _ = host.encode_states([[], ["nope"]], 10, True, [["i12"], []])
    assert_same_answer(got, signature.recommend_batch([[], ["nope"]], 10, True, [["i12"], []]), "ties")
    assert list(got.item_ids[0]) == [f"i{i}" for i in (10, 11, 13, 14, 15, 16, 17, 18, 19, 20)]


def test_states_cross_between_the_paths(state_paths):
    """A state cached before a server switched paths continues on the other one."""
    _, (host, signature) = state_paths
    history = [f"i{i}" for i in (4, 9, 2, 33, 17, 8)]
    _, (from_signature,) = signature.encode_states([history[:3]], 5, True, [[]])
    _, (from_host,) = host.encode_states([history[:3]], 5, True, [[]])
    expected = signature.recommend_batch([history], 5, True)
    on_host, (state,) = host.advance_states([from_signature], [history[3:]], 5, True, [[]])
    if state is None:  # positions from the end: both paths refuse, and say so the same way
        assert signature.advance_states([from_host], [history[3:]], 5, True, [[]])[1] == [None]
        return
    assert_same_answer(on_host, expected, "host")
    assert_same_answer(signature.advance_states([from_host], [history[3:]], 5, True, [[]])[0], expected, "signature")


def test_what_numpy_does_not_compute_falls_back_to_the_signatures_with_a_reason(tmp_path):
    from tests.sasrec.test_time_bias import time_model

    timed = Recommender.load(export_model(time_model(seed=1), tmp_path, item_ids=ITEMS, train_counts=TRAIN_COUNTS))
    assert timed.host is None and "time_bias" in timed.host_reason and timed.keeps_state
    plain = {**timed.card["architecture"], "time_bias": False}
    assert host_model.load(timed._loaded, {**timed.card, "architecture": plain})[0] is not None
    model, reason = host_model.load(timed._loaded, {k: v for k, v in timed.card.items() if k != "architecture"})
    assert model is None and "export it again" in reason
    model, reason = host_model.load(timed._loaded, {**timed.card, "architecture": {**plain, "compute_dtype": "bfloat16"}})
    assert model is None and "bfloat16" in reason
    assert Recommender.load(timed.path, host=False).host_reason == "turned off"

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.errors import InputError
from pipelines.split import SortedTimes, leave_one_out_split, lower_quantile_index, temporal_cutoffs, temporal_split


@given(st.lists(st.integers(1, 50), min_size=1, max_size=50))
def test_leave_one_out_invariants(lengths):
    lengths = np.array(lengths)
    train_end, valid_end = leave_one_out_split(lengths)
    assert np.all(train_end <= valid_end) and np.all(valid_end <= lengths)
    long = lengths >= 3
    assert np.all(valid_end[long] == lengths[long] - 1) and np.all(train_end[long] == lengths[long] - 2)
    assert np.all(train_end[~long] == lengths[~long]) and np.all(valid_end[~long] == lengths[~long])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 100), min_size=1, max_size=20), min_size=1, max_size=20), st.integers(0, 100), st.integers(0, 100))
def test_temporal_split_invariants(per_user, a, b):
    valid_cut, test_cut = min(a, b), max(a, b)
    times = np.concatenate([np.sort(t) for t in per_user]).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum([len(t) for t in per_user])))
    train_end, valid_end = temporal_split(times, offsets, valid_cut, test_cut)
    for u in range(len(per_user)):
        t = times[offsets[u] : offsets[u + 1]]
        assert np.all(t[: train_end[u]] < valid_cut)
        assert np.all((t[train_end[u] : valid_end[u]] >= valid_cut) & (t[train_end[u] : valid_end[u]] < test_cut))
        assert np.all(t[valid_end[u] :] >= test_cut)


def test_temporal_cutoffs():
    times = SortedTimes(np.arange(100))
    assert temporal_cutoffs(times, cutoff_quantile=0.9) == (78, 89)  # default: a validation window as big as the test one
    assert temporal_cutoffs(times, cutoff_quantile=0.9, valid_quantile=0.8) == (79, 89)
    assert temporal_cutoffs(times, cutoff_time=50, valid_time=40) == (40, 50)
    with pytest.raises(InputError, match="exactly one"):
        temporal_cutoffs(times)
    with pytest.raises(InputError, match="after the test cut"):
        temporal_cutoffs(times, cutoff_time=10, valid_time=20)


def test_temporal_default_validation_window_holds_as_many_events_as_the_test_window():
    times = np.repeat(np.arange(100), 3)  # ties: 3 events per time
    valid_cut, test_cut = temporal_cutoffs(SortedTimes(times), cutoff_quantile=0.9)
    assert test_cut == 89
    n_test = (times >= test_cut).sum()
    assert ((times >= valid_cut) & (times < test_cut)).sum() == n_test and valid_cut == 78
    with pytest.raises(InputError, match="half of the events"):
        temporal_cutoffs(SortedTimes(times), cutoff_quantile=0.4)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10**9), st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
def test_the_quantile_rank_is_the_one_numpy_picks(n, q):
    """Both engines cut at the value of this rank; on an array it must be numpy's "lower" quantile."""
    k = lower_quantile_index(n, q)
    assert 0 <= k < n
    if n <= 10**6:
        assert np.quantile(np.arange(n), q, method="lower") == k

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.clean import consecutive_duplicate_mask, dedupe_consecutive, filter_min_rating, kcore, kcore_mask

events = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=200)
cores = st.integers(1, 6)


def frame_of(pairs) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Categorical([str(u) for u, _ in pairs]),
            "item_id": pd.Categorical([str(i) for _, i in pairs]),
            "timestamp": np.arange(len(pairs), dtype=np.int64),
        }
    )


@settings(max_examples=150, deadline=None)
@given(events, cores, cores)
def test_iterative_kcore_is_a_fixed_point_meeting_thresholds(pairs, user_core, item_core):
    result = kcore(frame_of(pairs), user_core, item_core, iterative=True)
    if len(result):
        assert result["user_id"].value_counts()[lambda c: c > 0].min() >= user_core
        assert result["item_id"].value_counts()[lambda c: c > 0].min() >= item_core
    again = kcore(result, user_core, item_core, iterative=True)
    assert again["timestamp"].tolist() == result["timestamp"].tolist()  # fixed point, order kept


@settings(max_examples=150, deadline=None)
@given(events, cores, cores)
def test_kcore_keeps_a_superset_of_the_iterative_core_when_single_pass(pairs, user_core, item_core):
    users = np.array([u for u, _ in pairs], dtype=np.int64)
    items = np.array([i for _, i in pairs], dtype=np.int64)
    iterative = kcore_mask(users, items, user_core, item_core, iterative=True)
    single = kcore_mask(users, items, user_core, item_core, iterative=False)
    assert not np.any(iterative & ~single)
    if len(pairs):  # single pass = one round of counting on the input
        u_ok = np.bincount(users)[users] >= user_core
        i_ok = np.bincount(items)[items] >= item_core
        assert np.array_equal(single, u_ok & i_ok)


def test_single_pass_differs_from_iterative_on_a_cascade():
    # item 9 has 2 events; dropping it leaves user 1 with 1 event, which only the iterative core removes
    users = np.array([0, 0, 0, 1, 1, 0, 1])
    items = np.array([1, 2, 3, 9, 1, 9, 2])
    assert kcore_mask(users, items, 2, 2, iterative=False).tolist() == [1, 1, 0, 1, 1, 1, 1]
    assert kcore_mask(users, items, 2, 3, iterative=True).sum() == 0


def test_dedupe_consecutive_and_min_rating():
    frame = frame_of([(1, 5), (1, 5), (2, 5), (1, 6), (1, 5)])
    assert dedupe_consecutive(frame)["timestamp"].tolist() == [0, 2, 3, 4]
    assert consecutive_duplicate_mask(np.array([0, 0, 1, 1]), np.array([3, 3, 3, 4])).tolist() == [1, 0, 1, 1]
    frame["rating"] = np.array([1, 4, 5, 3, 4], dtype=np.float32)
    assert filter_min_rating(frame, 4)["timestamp"].tolist() == [1, 2, 4]

"""Counts on the public data sets in ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import pytest

from pipelines.prepare import prepare
from pipelines.readers import read_interactions

pytestmark = pytest.mark.realdata


def counts(frame):
    return frame["user_id"].nunique(), frame["item_id"].nunique(), len(frame)


def need(path):
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def test_ml100k(shared_data):
    frame = read_interactions("movielens", need(shared_data / "ml-100k" / "u.data"))
    assert counts(frame) == (943, 1682, 100_000)
    stats = prepare(frame, kcore="none").manifest["statistics"]
    assert (stats["users"], stats["items"], stats["events"]) == (943, 1682, 100_000)
    # Users all have >= 20 ratings, but 333 items have fewer than 5: 5/5 keeps every user, not every item.
    manifest = prepare(frame, kcore="iterative").manifest
    assert (manifest["statistics"]["users"], manifest["statistics"]["items"], manifest["statistics"]["events"]) == (943, 1349, 99_287)
    assert manifest["dropped"]["kcore"] == 713


def test_ml1m_pairs_reproduce_the_paper_file(shared_data):
    frame = read_interactions("pairs", need(shared_data / "ml-1m" / "ml-1m.txt.gz"))
    assert counts(frame) == (6040, 3416, 999_611)
    ds = prepare(frame, kcore="single-pass")
    stats = ds.manifest["statistics"]
    assert (stats["users"], stats["items"], stats["events"]) == (6040, 3416, 999_611)
    assert list(ds.item_ids[2:5]) == ["1", "2", "3"]  # item "k" -> internal id k + 1
    assert stats["valid_users"] == stats["test_users"] == 6040


def test_ml1m_raw_double_colon_gzip(shared_data):
    frame = read_interactions("movielens", need(shared_data / "ml-1m" / "ratings.users1-2999.dat.gz"))
    assert counts(frame) == (2999, 3615, 487_650)
    assert frame.attrs["timestamp"] == "column" and frame["timestamp"].iloc[0] == 978300760


def test_amazon_musical_instruments_zip(shared_data):
    folder = shared_data / "amazon-musical-instruments"
    zips = sorted(folder.glob("*.zip")) if folder.is_dir() else []
    if not zips:
        pytest.skip(f"no zip in {folder}")
    assert counts(read_interactions("amazon-json", zips[0])) == (1429, 900, 10_261)


def test_beauty_sequences(shared_data):
    frame = read_interactions("sequences", need(shared_data / "beauty" / "Beauty.txt"))
    assert counts(frame) == (22_363, 12_101, 198_502)

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.dataset import ITEMS_FILE, MANIFEST_FILE, SEQUENCES_FILE, read_dataset
from pipelines.errors import InputError
from pipelines.prepare import prepare, prepare_file
from pipelines.readers import read_interactions
from pipelines.synthetic import generate, write_log


def frame_of(users, items, times) -> pd.DataFrame:
    return pd.DataFrame(
        {"user_id": pd.Categorical(users), "item_id": pd.Categorical(items), "timestamp": np.array(times, dtype=np.int64)}
    )


def test_vocabulary_numeric_order_stable_ties_and_leave_one_out():
    frame = frame_of(["10", "9", "9", "9", "10", "9"], ["3", "10", "2", "1", "2", "3"], [5, 7, 7, 1, 5, 9])
    ds = prepare(frame, kcore="none")
    assert list(ds.user_ids) == ["9", "10"]  # numeric, not "10" < "9"
    assert list(ds.item_ids[2:]) == ["1", "2", "3", "10"]  # item "k" -> k + 1 here
    # user 9: t=1 item 1, t=7 item 10 then item 2 (file order breaks the tie), t=9 item 3
    assert ds.user_items(0).tolist() == [2, 5, 3, 4]
    assert ds.user_items(1).tolist() == [4, 3]  # user 10: tie at t=5 keeps file order
    assert ds.train_end.tolist() == [2, 2] and ds.valid_end.tolist() == [3, 2]
    assert ds.item_counts[2:].tolist() == [1, 2, 2, 1]
    assert ds.train_counts[2:].tolist() == [1, 1, 1, 1]  # training: user 9 items 1, 10; user 10 items 3, 2


def test_lexicographic_when_an_id_is_not_an_integer():
    ds = prepare(frame_of(["b", "a", "a"], ["10", "9", "x"], [0, 1, 2]), kcore="none")
    assert list(ds.user_ids) == ["a", "b"] and list(ds.item_ids[2:]) == ["10", "9", "x"]


def test_temporal_split_keeps_users_without_history():
    frame = frame_of(["1", "1", "1", "2"], ["a", "b", "c", "a"], [1, 5, 9, 9])
    ds = prepare(frame, kcore="none", split="temporal", cutoff_time=9, valid_time=5)
    assert ds.train_end.tolist() == [1, 0] and ds.valid_end.tolist() == [2, 0]
    assert ds.manifest["split"]["test_cut"] == 9 and ds.manifest["statistics"]["test_users"] == 2


def test_empty_result_after_filtering_is_an_input_error():
    with pytest.raises(InputError, match="no events left after filtering.*kcore 2"):
        prepare(frame_of(["1", "2"], ["a", "b"], [0, 1]), user_core=5, item_core=5)


def test_same_input_gives_identical_bytes(tmp_path):
    log = write_log(generate(users=300, items=100, seed=5), tmp_path / "log.csv")
    opts = dict(user_col="user_id", item_col="item_id", time_col="timestamp")
    prepare_file("csv", log, tmp_path / "a", reader_options=opts, dedupe_consecutive=True)
    prepare_file("csv", log, tmp_path / "b", reader_options=opts, dedupe_consecutive=True)
    for name in (SEQUENCES_FILE, ITEMS_FILE, MANIFEST_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_round_trip_and_manifest_contents(tmp_path):
    log = write_log(generate(users=200, items=60, chains=3, seed=2), tmp_path / "log.csv")
    ds = prepare_file(
        "csv", log, tmp_path / "out", reader_options=dict(user_col="user_id", item_col="item_id", time_col="timestamp")
    )
    back = read_dataset(tmp_path / "out")
    assert np.array_equal(back.items, ds.items) and np.array_equal(back.offsets, ds.offsets)
    assert np.array_equal(back.train_counts, ds.train_counts) and list(back.item_ids) == list(ds.item_ids)
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["source"][0]["path"] == "log.csv" and len(manifest["source"][0]["sha256"]) == 64
    assert manifest["reader"]["format"] == "csv" and manifest["split"]["protocol"] == "leave-one-out"
    assert manifest["filters"]["kcore"] == "iterative" and manifest["vocabulary"]["first_item_id"] == 2
    assert set(manifest["dropped"]) >= {"bad_lines", "min_rating", "dedupe", "kcore"}
    stats = manifest["statistics"]
    assert stats["events"] == len(ds.items) == stats["train_events"] + stats["valid_events"] + stats["test_events"]
    assert ds.train_counts.sum() == stats["train_events"]


def test_reader_frame_round_trips_through_prepare_for_pairs(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"{u} {i}\n" for u in (1, 2, 3) for i in (1, 2, 3, 4, 5)))
    ds = prepare(read_interactions("pairs", tmp_path / "p.txt"), kcore="single-pass", user_core=5, item_core=3)
    assert ds.manifest["reader"]["timestamp"] == "file-order"
    assert ds.user_items(2).tolist() == [2, 3, 4, 5, 6]


def test_sequences_in_parts_read_back_as_one_table(tmp_path):
    """The multi-part layout (sequences/part-NNNNN.parquet) holds the same dataset as one file."""
    import shutil

    from pipelines.dataset import SEQUENCES_PARTS, write_dataset

    log = write_log(generate(users=230, items=60, chains=3, seed=4), tmp_path / "log.csv")
    ds = prepare_file("csv", log, tmp_path / "one", reader_options=dict(user_col="user_id", item_col="item_id",
                                                                         time_col="timestamp"))
    write_dataset(tmp_path / "parts", ds, users_per_part=50)
    assert sorted(p.name for p in (tmp_path / "parts" / SEQUENCES_PARTS).iterdir()) == [
        f"part-{i:05d}.parquet" for i in range(5)]
    assert not (tmp_path / "parts" / SEQUENCES_FILE).exists()
    one, parts = read_dataset(tmp_path / "one"), read_dataset(tmp_path / "parts")
    for field in ("user_ids", "items", "timestamps", "offsets", "train_end", "valid_end", "item_ids", "train_counts"):
        assert np.array_equal(getattr(one, field), getattr(parts, field)), field
    # Parts out of order, or both layouts at once, are refused naming the file or folder.
    (tmp_path / "parts" / SEQUENCES_PARTS / "part-00001.parquet").rename(tmp_path / "parts" / SEQUENCES_PARTS /
                                                                          "part-00009.parquet")
    with pytest.raises(InputError, match="part-00002.parquet: user_index must continue from 50"):
        read_dataset(tmp_path / "parts")
    shutil.copyfile(tmp_path / "one" / SEQUENCES_FILE, tmp_path / "parts" / SEQUENCES_FILE)
    with pytest.raises(InputError, match="keep one layout"):
        read_dataset(tmp_path / "parts")

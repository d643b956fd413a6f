"""Batch scoring from pandas (`Recommender.score_frame`, `sasrec score`): same answers as the gRPC
service, both input shapes agree, clear errors for bad input, and metrics on recommendation frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.errors import InputError
from tests.serving.helpers import item_names


def make_histories(vocab, users=40, seed=3):
    """Histories with unknown ids, one empty (cold start), one all-unknown and one longer than maxlen."""
    rng = np.random.default_rng(seed)
    names = item_names(len(vocab) - 2)
    out = {}
    for u in range(users):
        length = int(rng.integers(1, 30))
        hist = [names[i] for i in rng.integers(0, len(names), length)]
        if u % 7 == 3:
            hist.insert(int(rng.integers(0, len(hist))), f"unknown-{u}")
        out[f"user-{u:03d}"] = hist
    out["user-cold"] = []
    out["user-unknown-only"] = ["nope-1", "nope-2"]
    return out


def events_from(histories, seed=5, shuffle=True):
    """An events frame whose (time-sorted, ties in row order) histories are ``histories``."""
    rows = []
    for user, hist in histories.items():
        for t, item in enumerate(hist):
            rows.append((user, item, t // 2))  # pairs of equal timestamps: ties must keep row order
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    if shuffle:  # interleave users but keep each user's rows in order (stable sort by a random user key)
        key = {u: r for u, r in zip(histories, np.random.default_rng(seed).permutation(len(histories)))}
        frame = frame.iloc[np.argsort(frame["user_id"].map(key).to_numpy(), kind="stable")]
        # ...then shuffle whole timestamp groups' order of appearance while keeping tie order.
        frame = frame.sample(frac=1.0, random_state=seed)
        frame = frame.sort_values(["timestamp"], kind="stable").reset_index(drop=True)
        frame["_tie"] = frame.groupby(["user_id", "timestamp"]).cumcount()
        rank = {(u, t // 2, t % 2): t for u, h in histories.items() for t in range(len(h))}
        frame["_pos"] = [rank[(u, ts, tie)] for u, ts, tie in zip(frame.user_id, frame.timestamp, frame._tie)]
        frame["item_id"] = [histories[u][p] for u, p in zip(frame.user_id, frame._pos)]
        frame = frame.drop(columns=["_tie", "_pos"])
    return frame


def test_score_frame_matches_grpc_service(recommender, client, vocab):
    histories = make_histories(vocab)
    names = item_names(len(vocab) - 2)
    hist_frame = pd.DataFrame({"user_id": list(histories), "history": list(histories.values()),
                               "exclude": [names[i % 7: i % 7 + 3] for i in range(len(histories))]})
    for kwargs in ({}, {"exclude_seen": False}, {"exclude_col": "exclude", "exclude_item_ids": [names[10]]}):
        recs = recommender.score_frame(hist_frame, k=7, chunk_size=8, **kwargs)
        for i, (user, hist) in enumerate(histories.items()):
            exclude = list(hist_frame["exclude"][i]) + [names[10]] if "exclude_col" in kwargs else []
            resp = client.recommend(hist, k=7, exclude_seen=kwargs.get("exclude_seen", True), exclude_item_ids=exclude)
            mine = recs[recs["user_id"] == user]
            assert mine["item_id"].tolist() == [it.item_id for it in resp.items], (user, kwargs)
            np.testing.assert_allclose(mine["score"].to_numpy(), [it.score for it in resp.items], rtol=0, atol=1e-5)
            assert mine["rank"].tolist() == list(range(1, len(resp.items) + 1))
            assert set(mine["cold_start"]) == {resp.cold_start}
            assert set(mine["unknown_count"]) == {resp.unknown_history_ids}
    cold = recs[recs["user_id"].isin(["user-cold", "user-unknown-only"])]
    assert cold["cold_start"].all() and len(cold) == 14
    assert recs.loc[recs["user_id"] == "user-unknown-only", "unknown_count"].eq(2).all()


def test_events_and_history_frames_give_identical_output(recommender, vocab):
    histories = make_histories(vocab)
    events = events_from(histories)
    assert events["user_id"].iloc[0] != "user-000"  # not grouped, not in the dict's order
    hist_frame = pd.DataFrame({"user_id": list(histories), "history": list(histories.values())})
    from_hist = recommender.score_frame(hist_frame, k=5)
    # The events frame has no row for "user-cold" (no events): drop it from the history side.
    from_events = recommender.score_frame(events, k=5)
    order = list(dict.fromkeys(events["user_id"]))
    expected = (from_hist[from_hist["user_id"] != "user-cold"]
                .set_index("user_id").loc[order].reset_index())
    pd.testing.assert_frame_equal(from_events, expected)
    # Output contract: users in first-appearance order, 1-based ranks, dtypes.
    assert list(dict.fromkeys(from_events["user_id"])) == order
    assert from_events["rank"].dtype == np.int32 and from_events["score"].dtype == np.float32
    assert from_events["item_id"].dtype == "str" and from_events["unknown_count"].dtype == np.int32
    assert from_events.groupby("user_id", sort=False)["rank"].apply(list).map(lambda r: r == [1, 2, 3, 4, 5]).all()
    # Without timestamps, row order is the history order.
    grouped = events.sort_values(["user_id", "timestamp"], kind="stable").drop(columns="timestamp")
    no_time = recommender.score_frame(grouped, k=5)
    pd.testing.assert_frame_equal(
        no_time.set_index("user_id").sort_index(), from_events.set_index("user_id").sort_index())


def test_chunking_sorting_and_dtypes_do_not_change_answers(recommender, vocab):
    histories = make_histories(vocab, users=30)
    events = events_from(histories, shuffle=False)
    base = recommender.score_frame(events, k=4)
    for options in ({"chunk_size": 1}, {"chunk_size": 7, "sort_by_length": False}, {"progress": True}):
        pd.testing.assert_frame_equal(recommender.score_frame(events, k=4, **options), base, atol=1e-5)
    # Integer user ids keep their dtype; custom column names; datetime timestamps.
    renamed = events.rename(columns={"user_id": "u", "item_id": "i", "timestamp": "t"})
    renamed["u"] = renamed["u"].map({u: n for n, u in enumerate(histories)}).astype(np.int64)
    renamed["t"] = pd.to_datetime(renamed["t"], unit="s")
    out = recommender.score_frame(renamed, k=4, user_col="u", item_col="i", time_col="t")
    assert out["user_id"].dtype == np.int64
    assert out["item_id"].tolist() == base["item_id"].tolist()


def test_integer_item_ids_are_matched_as_strings(tmp_path):
    """Vocabulary ids "1".."n" match integer (and integral float) item columns."""
    import keras

    from sasrec.export import export_model
    from sasrec.model import SASRec
    from sasrec.recommender import Recommender

    vocab = np.array(["", "<oov>"] + [str(i) for i in range(1, 13)], dtype=object)
    model = SASRec(vocab_size=len(vocab), maxlen=6, hidden_units=8, num_blocks=1, num_heads=1, dropout=0.0)
    model.build((None, 6))
    keras.utils.set_random_seed(0)
    rec = Recommender.load(export_model(model, tmp_path / "models", item_ids=vocab,
                                        train_counts=np.arange(len(vocab))))
    ints = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [3, 5, 7]})
    strs = ints.assign(item_id=ints["item_id"].astype(str))
    floats = ints.assign(item_id=ints["item_id"].astype(float))
    a, b, c = (rec.score_frame(f, k=3) for f in (ints, strs, floats))
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)
    assert not a["cold_start"].any() and a["unknown_count"].eq(0).all()
    # Exclusion ids follow the same rule as history ids: 7, 7.0 and "7" are the same item.
    best = a.loc[a["user_id"] == 1, "item_id"].iloc[0]
    for excluded in ([int(best)], [float(best)], [best]):
        out = rec.score_frame(ints, k=3, exclude_item_ids=excluded)
        assert best not in out["item_id"].tolist(), excluded


@pytest.mark.parametrize(
    "frame, kwargs, message",
    [
        (pd.DataFrame({"user": ["a"], "item_id": ["x"]}), {}, "missing column 'user_id'"),
        (pd.DataFrame({"user_id": ["a"], "item": ["x"]}), {}, "missing column 'item_id'"),
        (pd.DataFrame({"user_id": ["a"], "item_id": ["x"]}), {"time_col": "when"}, "missing column 'when'"),
        (pd.DataFrame({"user_id": ["a", "b"], "history": [["x"], "x y"]}), {}, "row 1"),
        (pd.DataFrame({"user_id": ["a", "b"], "h": [["x"], 3]}), {"history_col": "h"}, "column 'h' must hold a list"),
        (pd.DataFrame({"user_id": ["a", "a"], "history": [["x"], ["y"]]}), {}, "more than one history row"),
        (pd.DataFrame({"user_id": [], "item_id": []}), {}, "empty"),
        (pd.DataFrame({"user_id": ["a", None], "item_id": ["x", "y"]}), {}, "missing user ids"),
        (pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", None]}), {}, "missing item ids"),
        (pd.DataFrame({"user_id": ["a"], "item_id": ["x"]}), {"exclude_col": "ex"}, "missing column 'ex'"),
        (pd.DataFrame({"user_id": ["a"], "item_id": ["x"]}), {"k": 0}, "k must be in"),
        (pd.DataFrame({"user_id": ["a"], "item_id": ["x"], "timestamp": ["soon"]}), {}, "column 'timestamp'"),
    ],
)
def test_bad_input_gets_a_clear_error(recommender, frame, kwargs, message):
    with pytest.raises(InputError, match=message):
        recommender.score_frame(frame, **kwargs)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    from sasrec import Recommender

    with pytest.raises(InputError, match="model not found"):
        Recommender.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a SavedModel"):
        Recommender.load(tmp_path / "empty")


def test_score_command_events_csv_and_history_parquet(model_base, recommender, vocab, tmp_path, capsys):
    from sasrec.cli import main

    histories = make_histories(vocab, users=12)
    del histories["user-cold"]
    events = events_from(histories)
    events.to_csv(tmp_path / "events.csv", index=False)
    assert main(["score", "--model", str(model_base), "--input", str(tmp_path / "events.csv"),
                 "--output", str(tmp_path / "recs.parquet"), "-k", "6", "--chunk-size", "5"]) == 0
    assert "scored 13 users" in capsys.readouterr().out
    got = pd.read_parquet(tmp_path / "recs.parquet")
    expected = recommender.score_frame(events, k=6)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)

    frame = pd.DataFrame({"uid": list(histories), "items": list(histories.values()),
                          "ex": [[h[0]] if h else [] for h in histories.values()]})
    frame.to_parquet(tmp_path / "hist.parquet")
    assert main(["score", "--model", str(model_base / "1"), "--input", str(tmp_path / "hist.parquet"),
                 "--output", str(tmp_path / "recs.csv"), "-k", "6", "--user-col", "uid", "--history-col", "items",
                 "--exclude-col", "ex", "--exclude", "item-0001,item-0002", "--include-seen", "--no-progress"]) == 0
    csv = pd.read_csv(tmp_path / "recs.csv", dtype={"user_id": str})
    expected = recommender.score_frame(frame, k=6, user_col="uid", history_col="items", exclude_col="ex",
                                       exclude_item_ids=["item-0001", "item-0002"], exclude_seen=False)
    assert csv["item_id"].tolist() == expected["item_id"].tolist()
    assert not csv["item_id"].isin(["item-0001", "item-0002"]).any()
    assert not list(tmp_path.glob(".recs*"))  # no temporary files left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", "recs.txt"], "unknown extension '.txt'"),
        (["--input", "events.json"], "unknown extension '.json'"),
        (["--input", "absent.csv"], "file not found"),
        (["--model", "no-such-model"], "model not found"),
        (["--item-col", "item"], "missing column 'item'"),
    ],
)
def test_score_command_errors_exit_2(model_base, tmp_path, capsys, monkeypatch, args, message):
    from sasrec.cli import main

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"user_id": ["a"], "item_id": ["item-0003"]}).to_csv("events.csv", index=False)
    base = {"--model": str(model_base), "--input": "events.csv", "--output": "recs.parquet"}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main(["score", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "recs.parquet").exists()


# --- metrics on recommendation frames ------------------------------------------------------------

def test_evaluate_recommendations_hand_computed():
    from sasrec.metrics import evaluate_recommendations

    recs = pd.DataFrame({
        "user_id": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
        "rank": [1, 2, 3] * 3,
        "item_id": ["x", "y", "z", "y", "x", "w", "p", "q", "r"],
    })
    heldout = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "item_id": ["x", "w", "zz", "x"]})
    # a: rank 0, b: rank 2, c: miss, d: no recommendations (miss).
    got = evaluate_recommendations(recs, heldout, k=(1, 3))
    assert got["users"] == 4
    assert got["hr@1"] == pytest.approx(1 / 4)
    assert got["hr@3"] == pytest.approx(2 / 4)
    assert got["ndcg@1"] == pytest.approx(1 / 4)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / np.log2(4)) / 4)
    assert got["mrr@3"] == pytest.approx((1 + 1 / 3) / 4)
    # Without a rank column, the row order within a user is the ranking; int vs str ids compare as strings.
    shuffled = recs.drop(columns="rank")
    held_int = pd.DataFrame({"user": [1, 2], "movie": [7, 8]})
    recs_int = pd.DataFrame({"user_id": ["1", "1", "2"], "item_id": ["8", "7", "8"]})
    assert evaluate_recommendations(shuffled, heldout, k=3) == {k: v for k, v in got.items() if "@1" not in k}
    got_int = evaluate_recommendations(recs_int, held_int, k=[1, 2], heldout_user_col="user", heldout_item_col="movie")
    assert got_int["hr@1"] == 0.5 and got_int["mrr@2"] == pytest.approx((0.5 + 1) / 2)


def test_evaluate_recommendations_errors_and_warning():
    from sasrec.metrics import evaluate_recommendations

    recs = pd.DataFrame({"user_id": ["a"], "rank": [1], "item_id": ["x"]})
    with pytest.raises(InputError, match="missing column 'item_id'"):
        evaluate_recommendations(recs, pd.DataFrame({"user_id": ["a"], "item": ["x"]}))
    with pytest.raises(InputError, match="more than one row"):
        evaluate_recommendations(recs, pd.DataFrame({"user_id": ["a", "a"], "item_id": ["x", "y"]}))
    with pytest.raises(InputError, match="empty"):
        evaluate_recommendations(recs, pd.DataFrame({"user_id": [], "item_id": []}))
    with pytest.warns(UserWarning, match="exceeds"):
        assert evaluate_recommendations(recs, pd.DataFrame({"user_id": ["a"], "item_id": ["x"]}), k=5)["hr@5"] == 1.0

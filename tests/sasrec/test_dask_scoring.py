"""Batch scoring on Dask (`sasrec.dask_scoring`, `sasrec score --engine dask`): the rows of `score_frame`,
its errors before anything is computed, one model load per worker, atomic Parquet folders."""

from __future__ import annotations

import logging
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from pipelines.errors import InputError
from sasrec import dask_scoring
from tests.sasrec.test_score_frame import events_from, make_histories
from tests.serving.helpers import item_names

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # distributed: "port in use" and the like


@pytest.fixture(scope="module")
def dask_client():
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def to_dask(frame: pd.DataFrame, npartitions: int) -> dd.DataFrame:
    # Keep list-valued columns as lists (from_pandas would turn object columns into strings).
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(frame, npartitions=npartitions, sort=False)


def by_user(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["user_id", "rank"], kind="stable").reset_index(drop=True)


def test_rows_identical_to_score_frame_and_one_load_per_worker(dask_client, recommender, model_base, vocab):
    histories = make_histories(vocab, users=60)  # unknown ids, an empty and an all-unknown history
    names = item_names(len(vocab) - 2)
    events = events_from(histories)  # interleaved users, equal timestamps in pairs (ties keep row order)
    # A different exclusion list on every row: the user's first row in input order must win.
    events["exclude"] = [names[i % 11: i % 11 + 2] for i in range(len(events))]
    hist_frame = pd.DataFrame({"user_id": list(histories), "history": list(histories.values()),
                               "exclude": [names[i % 5: i % 5 + 3] for i in range(len(histories))]})
    cases = [
        (events, {}),
        (events, {"exclude_col": "exclude", "exclude_item_ids": [names[3]], "chunk_size": 7}),
        (events.drop(columns="timestamp"), {"exclude_seen": False}),  # row order is the history order
        (hist_frame, {}),  # the "history" column is found as score_frame finds it
        (hist_frame, {"history_col": "history", "exclude_col": "exclude", "exclude_item_ids": [names[0]]}),
    ]
    for frame, kwargs in cases:
        expected = recommender.score_frame(frame, k=6, **kwargs)
        recs = dask_scoring.score_dask(model_base, to_dask(frame, 5), k=6, npartitions=8, **kwargs)
        assert recs.npartitions == 8  # more partitions than workers
        got = recs.compute()
        pd.testing.assert_frame_equal(by_user(got), by_user(expected))  # same values and dtypes
        pd.testing.assert_frame_equal(recs._meta, expected.iloc[:0])  # the lazy frame announces them too
    assert expected["cold_start"].any() and expected["unknown_count"].gt(0).any()
    assert sorted(dask_client.run(lambda: dask_scoring.LOADS).values()) == [1, 1]


def test_integer_users_and_default_string_conversion(dask_client, recommender, model_base, vocab):
    events = events_from(make_histories(vocab, users=20))
    events["user_id"] = pd.factorize(events["user_id"])[0].astype(np.int64) + 100
    expected = recommender.score_frame(events, k=3)
    got = dask_scoring.score_dask(model_base, dd.from_pandas(events, npartitions=3), k=3).compute()
    assert got["user_id"].dtype == np.int64
    pd.testing.assert_frame_equal(by_user(got), by_user(expected))


def never_computed(_):
    raise AssertionError("a bad input must be refused before anything is computed")


@pytest.mark.parametrize(
    "columns, kwargs",
    [
        (["user", "item_id"], {}),
        (["user_id", "item"], {}),
        (["user_id", "item_id"], {"time_col": "when"}),
        (["user_id", "item_id"], {"exclude_col": "ex"}),
        (["user_id", "h"], {"history_col": "hist"}),
        (["user_id", "item_id"], {"k": 0}),
        (["user_id", "item_id"], {"k": 10_000}),
        (["user_id", "item_id"], {"chunk_size": 0}),
    ],
)
def test_bad_input_refused_on_the_client_as_score_frame_does(recommender, model_base, columns, kwargs):
    meta = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    lazy = dd.from_map(never_computed, [0, 1], meta=meta)  # computing any partition fails the test
    with pytest.raises(InputError) as pandas_error:
        recommender.score_frame(pd.DataFrame({c: ["x"] for c in columns}), **kwargs)
    with pytest.raises(InputError) as dask_error:
        dask_scoring.score_dask(model_base, lazy, **kwargs)
    assert str(dask_error.value) == str(pandas_error.value)
    assert "\n" not in str(dask_error.value)


def test_other_bad_input(dask_client, model_base):
    with pytest.raises(InputError, match="needs a Dask DataFrame"):
        dask_scoring.score_dask(model_base, pd.DataFrame({"user_id": ["a"], "item_id": ["x"]}))
    with pytest.raises(InputError, match="model not found"):
        dask_scoring.score_dask(model_base / "absent", dd.from_pandas(pd.DataFrame({"user_id": ["a"]})))
    stringified = dd.from_pandas(pd.DataFrame({"user_id": ["a"], "history": [["x", "y"]]}), npartitions=1)
    with pytest.raises(InputError, match="column 'history' holds strings, not lists"):
        dask_scoring.score_dask(model_base, stringified)
    # Errors in the values are score_frame's, raised on a worker and re-raised here.
    bad = dd.from_pandas(pd.DataFrame({"user_id": ["a", None], "item_id": ["x", "y"]}), npartitions=2)
    with pytest.raises(InputError, match="missing user ids"):
        dask_scoring.score_dask(model_base, bad).compute()


def test_write_parquet_is_a_folder_written_atomically(dask_client, recommender, model_base, vocab, tmp_path):
    events = events_from(make_histories(vocab, users=30))
    recs = dask_scoring.score_dask(model_base, dd.from_pandas(events, npartitions=3), k=4)
    out = tmp_path / "recs"
    assert dask_scoring.write_parquet(recs, out) == 31 * 4
    assert len(list(out.glob("*.parquet"))) == 3
    pd.testing.assert_frame_equal(by_user(pd.read_parquet(out)), by_user(recommender.score_frame(events, k=4)),
                                  check_dtype=False)
    # A failure on a worker leaves the existing folder as it was and no temporary folder behind.
    before = sorted(p.name for p in out.iterdir())
    bad = events.assign(timestamp=events["timestamp"].astype(str).where(events.index != 40, "soon"))
    with pytest.raises(InputError, match="column 'timestamp'"):
        dask_scoring.write_parquet(dask_scoring.score_dask(model_base, dd.from_pandas(bad, npartitions=3)), out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["recs"]


def test_score_command_dask_engine(dask_client, model_base, recommender, vocab, tmp_path, capsys):
    from sasrec.cli import main

    scheduler = dask_client.scheduler.address
    histories = make_histories(vocab, users=25)
    del histories["user-cold"]  # an events file has no row for a user without events
    events = events_from(histories)
    events.to_csv(tmp_path / "events.csv", index=False)
    assert main(["score", "--engine", "dask", "--scheduler", scheduler, "--model", str(model_base),
                 "--input", str(tmp_path / "events.csv"), "--output", str(tmp_path / "recs"), "-k", "5"]) == 0
    assert "on 2 Dask worker(s)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(by_user(pd.read_parquet(tmp_path / "recs")),
                                  by_user(recommender.score_frame(events, k=5)), check_dtype=False)

    # A folder of Parquet histories read through a glob; CSV list cells split as the pandas engine does.
    frame = pd.DataFrame({"uid": list(histories), "items": [" ".join(h) for h in histories.values()]})
    (tmp_path / "hist").mkdir()
    for i in range(3):
        frame.iloc[i::3].to_csv(tmp_path / "hist" / f"part-{i}.csv", index=False)
    frame.assign(items=frame["items"].str.split()).to_parquet(tmp_path / "hist" / "all.parquet")
    for pattern in ("*.csv", "all.parquet"):
        out = tmp_path / f"recs-{pattern[-3:]}"
        assert main(["score", "--engine", "dask", "--scheduler", scheduler, "--model", str(model_base),
                     "--input", str(tmp_path / "hist" / pattern), "--output", str(out), "-k", "5",
                     "--user-col", "uid", "--history-col", "items", "--exclude", "item-0001", "--include-seen"]) == 0
        expected = recommender.score_frame(pd.DataFrame({"uid": list(histories), "items": list(histories.values())}),
                                           k=5, user_col="uid", history_col="items", exclude_item_ids=["item-0001"],
                                           exclude_seen=False)
        pd.testing.assert_frame_equal(by_user(pd.read_parquet(out)), by_user(expected), check_dtype=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engine", "pandas", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --engine dask"),
        (["--engine", "dask", "--output", "recs.csv"], "not CSV"),
        (["--engine", "dask", "--input", "absent/*.parquet"], "file not found"),
        (["--engine", "dask", "--item-col", "item"], "missing column 'item'"),
    ],
)
def test_score_command_dask_errors_exit_2(dask_client, model_base, tmp_path, capsys, monkeypatch, args, message):
    from sasrec.cli import main

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"user_id": ["a"], "item_id": ["item-0003"]}).to_csv("events.csv", index=False)
    base = {"--model": str(model_base), "--input": "events.csv", "--output": "recs",
            "--scheduler": dask_client.scheduler.address}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main(["score", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv"]


def test_pandas_engine_never_imports_dask(model_base, tmp_path):
    import subprocess
    import sys

    pd.DataFrame({"user_id": ["a", "a"], "item_id": ["item-0003", "item-0004"]}).to_csv(tmp_path / "e.csv", index=False)
    code = ("import sys; from sasrec.cli import main; "
            f"assert main(['score', '--model', {str(model_base)!r}, '--input', {str(tmp_path / 'e.csv')!r}, "
            f"'--output', {str(tmp_path / 'r.parquet')!r}]) == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"

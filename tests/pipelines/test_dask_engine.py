"""The Dask engine of `prepare` writes the pandas engine's dataset folder, byte for byte."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.dask_engine import prepare_on_dask
from pipelines.dataset import read_dataset
from pipelines.errors import InputError
from pipelines.prepare import prepare_file
from pipelines.synthetic import generate

distributed = pytest.importorskip("distributed")
ROOT = Path(__file__).resolve().parents[2]
CSV = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"}


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def both_engines(client, tmp_path, fmt, path, *, events_per_partition=2_000, **options) -> tuple[dict, dict]:
    """The files each engine writes for the same input and options (the Dask one in several partitions)."""
    prepare_file(fmt, path, tmp_path / "pandas", **options)
    prepare_on_dask(client, fmt, path, tmp_path / "dask", events_per_partition=events_per_partition, **options)
    return files_of(tmp_path / "pandas"), files_of(tmp_path / "dask")


def synthetic_log(users=300, items=120, seed=0) -> pd.DataFrame:
    return generate(users=users, items=items, min_length=3, max_length=25, chains=6, noise=0.3, seed=seed)


def split_into_files(frame: pd.DataFrame, folder: Path, n: int, *, fmt: str = "csv") -> Path:
    """Rows in ``n`` consecutive files (users spread over several), names sorting in row order."""
    folder.mkdir(parents=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), n)):
        part = frame.iloc[chunk]
        if fmt == "csv":
            text = part.to_csv(index=False).encode()
            (folder / f"log-{i:03d}.csv.gz").write_bytes(gzip.compress(text, mtime=0)) if i % 2 else \
                (folder / f"log-{i:03d}.csv").write_bytes(text)
        elif fmt == "parquet":  # hive-partitioned, as data lakes write it
            (folder / f"day={i:03d}").mkdir()
            part.to_parquet(folder / f"day={i:03d}" / "part-0.parquet", index=False)
        else:  # pairs: line order is time order
            (folder / f"pairs-{i:03d}.txt").write_text("".join(f"{u} {t}\n" for u, t in zip(part["user_id"], part["item_id"])))
    (folder / "_SUCCESS").write_text("")  # written by Spark beside the data: not an input
    return folder


@pytest.mark.parametrize("options", [
    {},
    {"kcore": "single-pass", "user_core": 4, "item_core": 6, "dedupe_consecutive": True},
    {"split": "temporal", "cutoff_quantile": 0.85, "kcore": "none", "users_per_part": 70},
    {"split": "temporal", "cutoff_quantile": 0.9, "valid_quantile": 0.75, "user_core": 3, "item_core": 3},
])
def test_a_log_split_over_many_files_gives_identical_folders(client, tmp_path, options):
    frame = synthetic_log()
    folder = split_into_files(frame, tmp_path / "log", 13)
    pandas_files, dask_files = both_engines(client, tmp_path, "csv", folder, reader_options=CSV, **options)
    assert pandas_files == dask_files
    ds = read_dataset(tmp_path / "dask")
    assert len(ds.items) > 0.5 * len(frame) and len(ds.manifest["source"]) == 13
    if options.get("users_per_part"):
        assert (tmp_path / "dask" / "sequences" / "part-00001.parquet").is_file()
    # Many files read in order are the same log as one file.
    (tmp_path / "one.csv").write_text(frame.to_csv(index=False))
    prepare_file("csv", tmp_path / "one.csv", tmp_path / "single", reader_options=CSV, **options)
    single = read_dataset(tmp_path / "single")
    assert np.array_equal(single.items, ds.items) and np.array_equal(single.timestamps, ds.timestamps)


def test_hive_partitioned_parquet_and_a_file_url_give_identical_folders(client, tmp_path):
    folder = split_into_files(synthetic_log(seed=1), tmp_path / "lake", 7, fmt="parquet")
    pandas_files, dask_files = both_engines(client, tmp_path, "parquet", f"file://{folder}", reader_options=CSV)
    assert pandas_files == dask_files
    prepare_file("parquet", folder, tmp_path / "plain-path", reader_options=CSV)
    assert files_of(tmp_path / "plain-path") == pandas_files  # the URL names the same files
    assert [s["path"] for s in read_dataset(tmp_path / "dask").manifest["source"]][:2] == ["day=000/part-0.parquet", "day=001/part-0.parquet"]


def test_file_order_time_continues_across_files(client, tmp_path):
    frame = synthetic_log(seed=2)
    folder = split_into_files(frame, tmp_path / "pairs", 9, fmt="pairs")
    pandas_files, dask_files = both_engines(client, tmp_path, "pairs", folder)
    assert pandas_files == dask_files
    ds = read_dataset(tmp_path / "dask")
    assert ds.manifest["reader"]["timestamp"] == "file-order"
    assert ds.manifest["statistics"]["last_timestamp"] > len(frame) * 0.9  # positions in the whole input, not per file


def test_ties_keep_file_order_across_files(client, tmp_path):
    """Equal times: the event read first (earlier file, then earlier line) comes first, in both engines."""
    folder = tmp_path / "ties"
    folder.mkdir()
    # User u1 has five events at time 100 spread over three files, plus earlier and later ones.
    (folder / "a.csv").write_text("user_id,item_id,timestamp\nu1,i3,100\nu2,i1,5\nu1,i1,100\n")
    (folder / "b.csv").write_text("user_id,item_id,timestamp\nu2,i2,5\nu1,i5,100\nu1,i0,50\n")
    (folder / "c.csv").write_text("user_id,item_id,timestamp\nu1,i2,100\nu2,i3,5\nu1,i4,100\nu1,i9,200\n")
    pandas_files, dask_files = both_engines(client, tmp_path, "csv", folder, reader_options=CSV, kcore="none",
                                            events_per_partition=1)
    assert pandas_files == dask_files
    ds = read_dataset(tmp_path / "dask")
    names = ds.item_ids[ds.user_items(0)]
    assert list(names) == ["i0", "i3", "i1", "i5", "i2", "i4", "i9"]
    assert list(ds.item_ids[ds.user_items(1)]) == ["i1", "i2", "i3"]


@pytest.mark.parametrize("events_per_partition", [6, 1_000])  # one user per partition; all in one
def test_survivors_that_sort_differently_are_ordered_as_the_pandas_engine_orders_them(client, tmp_path, events_per_partition):
    """All ids sort as text ("10" < "9" < "x"); once k-core drops "x" they are numbers (9 < 10)."""
    rows = [(user, f"i{k % 4}", k) for user in ("10", "9", "11", "200") for k in range(6)] + [("x", "i0", 1)]
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    pandas_files, dask_files = both_engines(client, tmp_path, "csv", tmp_path / "log.csv", reader_options=CSV,
                                            user_core=2, item_core=2, events_per_partition=events_per_partition)
    assert pandas_files == dask_files
    assert list(read_dataset(tmp_path / "dask").user_ids) == ["9", "10", "11", "200"]


def test_a_bad_line_in_one_of_50_files_is_the_pandas_error_and_leaves_no_folder(client, tmp_path):
    folder = split_into_files(synthetic_log(seed=3), tmp_path / "log", 50)
    bad = folder / "log-036.csv"
    lines = bad.read_text().splitlines()
    lines[4] = lines[4] + ",extra"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as pandas_error:
        prepare_file("csv", folder, tmp_path / "pandas", reader_options=CSV)
    with pytest.raises(InputError) as dask_error:
        prepare_on_dask(client, "csv", folder, tmp_path / "dask", reader_options=CSV)
    assert str(dask_error.value) == str(pandas_error.value)
    assert f"{bad}: line 5: expected 3 fields" in str(dask_error.value)
    assert not list(tmp_path.glob("dask*")) and not list(tmp_path.glob(".dask*"))


def test_prepare_command_on_dask_matches_the_pandas_command(tmp_path):
    """The CLI path: a LocalCluster started by the command; the pandas engine never imports Dask."""
    frame = synthetic_log(seed=4)
    folder = split_into_files(frame, tmp_path / "log", 4)
    common = [sys.executable, "-m", "sasrec", "prepare", "--format", "csv", "--input", str(folder / "log-*.csv*"),
              "--user-col", "user_id", "--item-col", "item_id", "--time-col", "timestamp"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    probe = ("import runpy, sys; sys.argv = ['sasrec'] + sys.argv[1:]; "
             "from sasrec.cli import main; code = main(sys.argv[1:]); "
             "assert 'dask' not in sys.modules and 'distributed' not in sys.modules, 'pandas engine imported dask'; "
             "sys.exit(code)")
    pandas_run = subprocess.run([sys.executable, "-c", probe, *common[3:], "--out", str(tmp_path / "pandas")],
                                capture_output=True, text=True, env=env, cwd=ROOT)
    assert pandas_run.returncode == 0, pandas_run.stderr
    dask_run = subprocess.run([*common, "--out", str(tmp_path / "dask"), "--engine", "dask", "--workers", "2",
                               "--memory-limit", "1GB"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert dask_run.returncode == 0, dask_run.stderr
    assert dask_run.stdout == pandas_run.stdout.replace(str(tmp_path / "pandas"), str(tmp_path / "dask"))
    assert files_of(tmp_path / "pandas") == files_of(tmp_path / "dask")
    wrong = subprocess.run([*common, "--out", str(tmp_path / "x"), "--scheduler", "tcp://127.0.0.1:1"],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    assert wrong.returncode != 0 and wrong.stderr.strip().splitlines()[-1].endswith("--scheduler needs --engine dask")


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_is_retried_and_the_output_is_identical(tmp_path):
    frame = synthetic_log(users=2000, items=300, seed=5)
    folder = split_into_files(frame, tmp_path / "log", 40)
    prepare_file("csv", folder, tmp_path / "pandas", reader_options=CSV)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
        result: dict = {}

        def job():
            try:
                prepare_on_dask(client, "csv", folder, tmp_path / "dask", reader_options=CSV, events_per_partition=5_000)
            except BaseException as exc:  # reported by the assertion below
                result["error"] = exc

        worker = threading.Thread(target=job)
        worker.start()
        victim, pid = next(iter(pids.items()))
        deadline = time.monotonic() + 60
        while not client.who_has() and time.monotonic() < deadline:  # wait until results sit on workers
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        killed_while_running = worker.is_alive()
        worker.join(timeout=180)
        assert killed_while_running and not worker.is_alive()
        assert "error" not in result, result.get("error")
        assert victim not in client.scheduler_info()["workers"]  # the nanny started a new worker
    assert files_of(tmp_path / "dask") == files_of(tmp_path / "pandas")


def test_the_ml100k_folder_is_identical_on_both_engines(client, tmp_path):
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k" / "u.data"
    if not data.is_file():
        pytest.skip(f"real data {data} is absent")
    pandas_files, dask_files = both_engines(client, tmp_path, "movielens", data, events_per_partition=20_000)
    assert pandas_files == dask_files
    assert read_dataset(tmp_path / "dask").manifest["statistics"]["users"] == 943

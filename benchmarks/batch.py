"""Batch scoring from pandas (``Recommender.score_frame``) vs the bare SavedModel signature.

    python -m benchmarks.batch [--run RUN] [--data ml-1m.txt.gz] [--quick] [--synthetic-users 1000000]

1. Model: ``--run RUN`` is exported (XLA off, as `sasrec export` does by default; ``--xla``); otherwise an
   ML-1M-sized SASRec (maxlen 200, d 50, 2 blocks, 1 head) with random weights over the 3,416 ML-1M
   item ids (from ``--data``, or "1".."3416" when it is absent) is exported. Throughput does not
   depend on the weight values.
2. ML-1M: all 6,040 users' real histories (events frame from ``read_interactions("pairs", ...)``;
   synthetic histories with ML-1M's length distribution when the data is absent), k = 10.
   - ceiling: the signature alone on the very batches ``score_frame`` sends (same users per chunk,
     same padding), prepared as tensors beforehand, so only the model call is timed;
   - ``score_frame`` on the events frame and on a list-valued history frame: everything from the
     pandas frame to the long output frame.
   The two are timed alternately, best of ``--repeats``; the ratio is the figure to read.
3. Synthetic: ``--synthetic-users`` users (default 1M; 50k with ``--quick``) with 10-30 events each,
   scored by ``score_frame`` in a fresh subprocess that reports its wall time and peak RSS.
Results go to the ``batch`` section of BENCHMARKS.md.

4. Dask (``--engines dask``, or both with the default ``pandas,dask``): the same synthetic users as a
   time-ordered event log in Parquet parts, scored end to end (read, score, write Parquet) by
   ``score_frame`` in one fresh process and by ``sasrec.dask_scoring`` (shuffle by user, one model per
   worker) on a LocalCluster of ``--dask-workers`` processes started by another fresh process, one after
   the other in one run. Results go to the ``batch-dask`` section.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import SHARED_DATA  # noqa: E402

DATA = SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"
NUM_ITEMS, MAXLEN, D = 3416, 200, 50


def read_ml1m(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    from pipelines.readers import read_interactions

    frame = read_interactions("pairs", path)
    return frame[["user_id", "item_id", "timestamp"]]


def synthetic_ml1m(users: int = 6040, seed: int = 1) -> pd.DataFrame:
    """Histories with ML-1M's shape (20..2,300 events, median ~96) when the data folder is absent."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(np.log(96), 0.9, users).astype(int).clip(20, 2300)
    return pd.DataFrame({
        "user_id": np.repeat(np.arange(1, users + 1), lengths),
        "item_id": rng.integers(1, NUM_ITEMS + 1, lengths.sum()),
        "timestamp": np.concatenate([np.arange(n) for n in lengths]),
    })


def export_model_for_bench(base: Path, run: str | None, events: pd.DataFrame | None, xla: bool = False) -> str:
    from pipelines.dataset import FIRST_ITEM_ID
    from sasrec.export import export_model, export_run
    from sasrec.model import SASRec

    if run:
        export_run(run, base, jit_compile=xla)
        return f"run {run}"
    if events is not None:
        counts_by_item = events["item_id"].astype(str).value_counts()
        names = sorted(counts_by_item.index, key=int)
    else:
        names = [str(i) for i in range(1, NUM_ITEMS + 1)]
        counts_by_item = pd.Series(1, index=names)
    vocab = np.array(["", "<oov>", *names], dtype=object)
    counts = np.zeros(len(vocab), np.int64)
    counts[FIRST_ITEM_ID:] = counts_by_item.reindex(names).to_numpy()
    model = SASRec(vocab_size=len(vocab), maxlen=MAXLEN, hidden_units=D, num_blocks=2, num_heads=1, dropout=0.2)
    model.build((None, MAXLEN))
    export_model(model, base, item_ids=vocab, train_counts=counts, source_run="benchmarks/batch.py", jit_compile=xla)
    return f"random-weight ML-1M-sized SASRec ({len(names):,} items, maxlen {MAXLEN}, d {D}, 2 blocks)"


def signature_batches(rec, events: pd.DataFrame, chunk_size: int) -> list:
    """The exact (history, exclusions) tensors score_frame sends, built before timing."""
    import tensorflow as tf

    from sasrec.recommender import _padded_codes, bucket_size, frame_histories

    batch = frame_histories(events)
    order = np.argsort(np.diff(batch.offsets), kind="stable")
    table = tf.constant(batch.item_table)
    out = []
    for start in range(0, batch.num_users, chunk_size):
        rows = order[start : start + chunk_size]
        hist = tf.gather(table, _padded_codes(batch.offsets, batch.item_codes, rows, len(batch.item_table) - 1))
        if rec.xla and bucket_size(len(rows)) != len(rows):
            hist = tf.pad(hist, [[0, bucket_size(len(rows)) - len(rows)], [0, 0]])
        out.append((hist, tf.zeros([hist.shape[0], 0], tf.string)))
    return out


def time_signature(rec, batches, k: int = 10) -> float:
    import tensorflow as tf

    kt, seen = tf.constant(k, tf.int32), tf.constant(True)
    start = time.perf_counter()
    for hist, excl in batches:
        out = rec._fn(history=hist, k=kt, exclude_seen=seen, exclude_item_ids=excl)
        out["item_ids"].numpy()  # wait for the result, as a caller must
    return time.perf_counter() - start


def time_score_frame(rec, frame: pd.DataFrame, chunk_size: int, **kwargs) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    recs = rec.score_frame(frame, k=10, chunk_size=chunk_size, progress=False, **kwargs)
    return time.perf_counter() - start, recs


def synthetic_events(users: int) -> pd.DataFrame:
    """``users`` users with 10-30 events each, grouped by user, timestamps in random order."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(10, 31, users)
    return pd.DataFrame({
        "user_id": np.repeat(np.arange(1, users + 1, dtype=np.int64), lengths),
        "item_id": rng.integers(1, NUM_ITEMS + 1, lengths.sum()),
        "timestamp": rng.integers(0, 1_000_000, lengths.sum()),  # unsorted: score_frame sorts
    })


def synthetic_child(model: str, users: int, chunk_size: int) -> None:
    """Run in a fresh process: generate ``users`` users with 10-30 events, score them, print JSON."""
    from sasrec.recommender import Recommender

    t0 = time.perf_counter()
    events = synthetic_events(users)
    gen_s = time.perf_counter() - t0
    rec = Recommender.load(model)
    # Compile the two batch shapes of the timed run (full chunks and the remainder) before timing.
    for n in {min(users, chunk_size), users % chunk_size}:
        if n:
            rec.score_frame(events[events["user_id"] <= n], k=10, chunk_size=chunk_size, progress=False)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    recs = rec.score_frame(events, k=10, chunk_size=chunk_size, progress=False)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "users": users, "events": len(events), "wall_s": wall, "generate_s": gen_s,
        "rows": len(recs), "rss_before_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def engine_child(engine: str, model: str, source: str, out: str, workers: int, chunk_size: int) -> None:
    """Run in a fresh process: read the Parquet event log ``source``, score it with ``engine``, write
    ``out``; print JSON with the end-to-end wall time (model load included, cluster start apart)."""
    if engine == "pandas":
        from sasrec.recommender import Recommender

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        rec = Recommender.load(model)
        events = pd.read_parquet(source)
        t1 = time.perf_counter()
        recs = rec.score_frame(events, k=10, chunk_size=chunk_size, progress=False)
        t2 = time.perf_counter()
        recs.to_parquet(out, index=False)
        wall = time.perf_counter() - t0
        print(json.dumps({"wall_s": wall, "cpu_s": cpu_seconds() - cpu0, "score_frame_s": t2 - t1, "rows": len(recs),
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    import dask.dataframe as dd

    from pipelines.dask_cluster import dask_client
    from sasrec import dask_scoring

    t0 = time.perf_counter()
    with dask_client(workers=workers) as client:
        started = time.perf_counter() - t0
        cpu0, t0 = sum(client.run(cpu_seconds).values()) + cpu_seconds(), time.perf_counter()
        recs = dask_scoring.score_dask(model, dd.read_parquet(source), k=10, chunk_size=chunk_size)
        rows = dask_scoring.write_parquet(recs, out)
        wall = time.perf_counter() - t0
        cpu = sum(client.run(cpu_seconds).values()) + cpu_seconds() - cpu0  # workers, and this client
        loads = client.run(lambda: dask_scoring.LOADS)
        peak = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "cluster_start_s": started, "rows": rows, "partitions": recs.npartitions,
                      "loads_per_worker": sorted(loads.values()), "peak_rss_mb": max(peak.values())}))


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dask_case(base: Path, model_desc: str, users: int, workers: int, parts: int, chunk_size: int,
              quick: bool, no_report: bool) -> None:
    """Section ``batch-dask``: the same Parquet event log scored by score_frame in one process and on a
    LocalCluster, end to end, one after the other."""
    tmp = base.parent
    t0 = time.perf_counter()
    # An event log in time order (as logs are written): every part holds events of many users, so the
    # Dask engine really has to shuffle them by user.
    events = synthetic_events(users).sort_values("timestamp", kind="stable").reset_index(drop=True)
    source = tmp / "events"
    source.mkdir()
    for i, start in enumerate(range(0, len(events), -(-len(events) // parts))):
        events.iloc[start : start + -(-len(events) // parts)].to_parquet(source / f"part-{i:05d}.parquet", index=False)
    num_events, gen_s = len(events), time.perf_counter() - t0
    del events
    chunk = ["--chunk-size", str(chunk_size)]
    loads = [os.getloadavg()[0]]  # other jobs on the machine take cores from either run
    pandas = run_child("--engine-child", "pandas", str(base), str(source), str(tmp / "pandas.parquet"), "1", *chunk)
    loads.append(os.getloadavg()[0])
    dask = run_child("--engine-child", "dask", str(base), str(source), str(tmp / "dask"), str(workers), *chunk)
    loads.append(os.getloadavg()[0])
    assert pandas["rows"] == dask["rows"], (pandas["rows"], dask["rows"])
    ratio = pandas["wall_s"] / dask["wall_s"]
    rows = [
        {"case": "score_frame, one process: read Parquet, score, write Parquet", "users": users,
         "wall s": pandas["wall_s"], "users/s": users / pandas["wall_s"], "vs score_frame": 1.0,
         "cores busy": pandas["cpu_s"] / pandas["wall_s"], "peak RSS MB": pandas["peak_rss_mb"]},
        {"case": f"dask_scoring, LocalCluster of {workers} workers x 1 thread: read, shuffle, score, write",
         "users": users, "wall s": dask["wall_s"], "users/s": users / dask["wall_s"], "vs score_frame": ratio,
         "cores busy": dask["cpu_s"] / dask["wall_s"], "peak RSS MB": f"{dask['peak_rss_mb']:,.0f} per worker"},
    ]
    notes = f"""
- Model: {model_desc}, XLA off. k = 10, seen items excluded, chunk size {chunk_size} users per call.
- Input: {users:,} synthetic users, {num_events:,} events (10-30 per user), sorted by time (a log as it is written)
  into {parts} Parquet parts, so every part holds events of many users (generated in {gen_s:.1f} s, untimed).
  Both engines read the same folder and write {pandas['rows']:,} rows of Parquet; wall time from reading to written
  output, model load included (Dask: each worker loads the model once; loads per worker
  {dask['loads_per_worker']}). The LocalCluster started in {dask['cluster_start_s']:.1f} s
  (not timed). score_frame alone took {pandas['score_frame_s']:.1f} s of the one-process run
  ({users / pandas['score_frame_s']:,.0f} users/s); Dask shuffled {dask['partitions']} partitions.
- Both runs on the same {os.cpu_count()} cores, one after the other, the cluster's workers with one thread each and
  TensorFlow's default thread pools. Cores busy: CPU seconds of the run's processes (Dask: workers, nannies
  excluded, and the client) per wall second. 1-minute load average before, between and after the runs:
  {", ".join(f"{x:.2f}" for x in loads)}; a load above {os.cpu_count()} means other jobs took cores from the runs.
"""
    title = "Batch scoring on Dask: `score_dask` on a LocalCluster vs `score_frame` in one process"
    if no_report:
        print(rows, notes)
    else:
        from benchmarks.report import write_section

        write_section("batch-dask" + ("-quick" if quick else ""), title, rows, notes)


def pandas_cases(base: Path, model_desc: str, events: pd.DataFrame, real: bool, args, synthetic_users: int,
                 repeats: int) -> None:
    """Section ``batch``: ML-1M through the bare signature and through score_frame, then the synthetic users."""
    from sasrec.recommender import Recommender

    rec = Recommender.load(base)
    histories = (events.assign(item_id=events["item_id"].astype(str))
                 .groupby("user_id", sort=False, observed=True)["item_id"].agg(list).reset_index()
                 .rename(columns={"item_id": "history"}))
    users = len(histories)
    batches = signature_batches(rec, events, args.chunk_size)
    # Warm-up: compile every batch shape, both paths.
    time_signature(rec, batches)
    time_score_frame(rec, events, args.chunk_size)
    best = {"signature": np.inf, "events": np.inf, "history": np.inf}
    for _ in range(repeats):
        best["signature"] = min(best["signature"], time_signature(rec, batches))
        seconds, recs = time_score_frame(rec, events, args.chunk_size)
        best["events"] = min(best["events"], seconds)
        seconds, recs_h = time_score_frame(rec, histories, args.chunk_size)
        best["history"] = min(best["history"], seconds)
    same = recs["item_id"].tolist() == recs_h["item_id"].tolist()
    ceiling = users / best["signature"]

    child = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(base), str(synthetic_users),
         "--chunk-size", str(args.chunk_size)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"synthetic child failed:\n{child.stderr[-3000:]}")
    synth = json.loads(child.stdout.strip().splitlines()[-1])
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    data_desc = f"ML-1M ({'real histories' if real else 'synthetic ML-1M-shaped histories'})"
    rows = [
        {"case": f"{data_desc}: SavedModel signature only (ceiling)", "users": users, "wall s": best["signature"],
         "users/s": ceiling, "% of ceiling": 100.0, "peak RSS MB": ""},
        {"case": f"{data_desc}: score_frame, events frame", "users": users, "wall s": best["events"],
         "users/s": users / best["events"], "% of ceiling": 100 * best["signature"] / best["events"],
         "peak RSS MB": ""},
        {"case": f"{data_desc}: score_frame, list-valued history frame", "users": users, "wall s": best["history"],
         "users/s": users / best["history"], "% of ceiling": 100 * best["signature"] / best["history"],
         "peak RSS MB": ""},
        {"case": f"synthetic {synthetic_users:,} users x 10-30 events: score_frame (fresh process)",
         "users": synthetic_users, "wall s": synth["wall_s"], "users/s": synthetic_users / synth["wall_s"],
         "% of ceiling": "", "peak RSS MB": max(synth["peak_rss_mb"], children_peak)},
    ]
    notes = f"""
- Model: {model_desc}, exported with XLA {'on' if args.xla else 'off (the `sasrec export` default)'} to a temporary model base. Throughput
  does not depend on the weight values. k = 10, seen items excluded, chunk size {args.chunk_size} users per call.
  `score_frame` sorts users by history length, and the signature pads each chunk only to the smallest of the
  model's sequence widths (50, 100, 200 for maxlen 200) that holds its longest history: short histories cost less.
- Ceiling: the `serving_default` signature alone, called on the same batches `score_frame` sends (same users per
  chunk, same padding, tensors prepared before timing). `score_frame` rows include everything from the pandas frame
  (factorize, stable sort by timestamp, CSR histories, padded batches) to the long output frame. Best of {repeats},
  timed alternately in one process; target: `score_frame` >= 80% of the ceiling. Events and history frames give
  identical items: {same}.
- Synthetic: {synthetic_users:,} users, {synth['events']:,} events in random time order (generated in
  {synth['generate_s']:.1f} s, untimed), {synth['rows']:,} output rows; peak RSS of that process
  ({synth['rss_before_mb']:,.0f} MB after generating the frame and loading the model, before scoring).
- Machine shared with background training jobs: absolute figures are noisy, the ratio is measured in one run.
"""
    section = (lambda *a, **kw: print(rows, notes)) if args.no_report else None
    if section is None:
        from benchmarks.report import write_section

        write_section("batch" + ("-quick" if args.quick else ""), "Batch scoring from pandas: `score_frame` vs the SavedModel signature", rows, notes)
    else:
        section()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="run folder to export (default: random-weight ML-1M-sized model)")
    parser.add_argument("--data", default=str(DATA), help="ML-1M pairs file (default: the shared data folder)")
    parser.add_argument("--quick", action="store_true", help="CI size: 50k synthetic users, 1 repeat")
    parser.add_argument("--synthetic-users", type=int, help="users in the synthetic run (default 1M, quick 50k)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="users per model call (default 1024)")
    parser.add_argument("--xla", action="store_true", help="export with XLA (`sasrec export --xla`; default off, as there)")
    parser.add_argument("--repeats", type=int, help="timed repeats of the ML-1M cases (default 3, quick 1)")
    parser.add_argument("--no-report", action="store_true", help="print, do not write BENCHMARKS.md")
    parser.add_argument("--engines", default="pandas,dask",
                        help="pandas: section batch (ML-1M, synthetic users); dask: section batch-dask (default both)")
    parser.add_argument("--dask-workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    parser.add_argument("--dask-parts", type=int, default=16, help="Parquet parts of the Dask case's input (default 16)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "USERS"), help=argparse.SUPPRESS)
    parser.add_argument("--engine-child", nargs=5, metavar=("ENGINE", "MODEL", "SOURCE", "OUT", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        synthetic_child(args.child[0], int(args.child[1]), args.chunk_size)
        return 0
    if args.engine_child:
        engine, model, source, out, workers = args.engine_child
        engine_child(engine, model, source, out, int(workers), args.chunk_size)
        return 0
    engines = set(args.engines.split(","))
    if not engines or engines - {"pandas", "dask"}:
        parser.error(f"--engines: pandas, dask or both, got {args.engines!r}")
    synthetic_users = args.synthetic_users or (50_000 if args.quick else 1_000_000)
    repeats = args.repeats or (1 if args.quick else 3)

    events = read_ml1m(Path(args.data))
    real = events is not None
    if events is None:
        events = synthetic_ml1m()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        base = Path(tmp) / "models"
        model_desc = export_model_for_bench(base, args.run, events if real else None, xla=args.xla)
        if "pandas" in engines:
            pandas_cases(base, model_desc, events, real, args, synthetic_users, repeats)
        if "dask" in engines:
            dask_case(base, model_desc, synthetic_users, args.dask_workers, args.dask_parts, args.chunk_size,
                      args.quick, args.no_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

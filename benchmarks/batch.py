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


def synthetic_child(model: str, users: int, chunk_size: int) -> None:
    """Run in a fresh process: generate ``users`` users with 10-30 events, score them, print JSON."""
    from sasrec.recommender import Recommender

    t0 = time.perf_counter()
    rng = np.random.default_rng(7)
    lengths = rng.integers(10, 31, users)
    events = pd.DataFrame({
        "user_id": np.repeat(np.arange(1, users + 1, dtype=np.int64), lengths),
        "item_id": rng.integers(1, NUM_ITEMS + 1, lengths.sum()),
        "timestamp": rng.integers(0, 1_000_000, lengths.sum()),  # unsorted: score_frame sorts
    })
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
        "users": users, "events": int(lengths.sum()), "wall_s": wall, "generate_s": gen_s,
        "rows": len(recs), "rss_before_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


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
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "USERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        synthetic_child(args.child[0], int(args.child[1]), args.chunk_size)
        return 0
    synthetic_users = args.synthetic_users or (50_000 if args.quick else 1_000_000)
    repeats = args.repeats or (1 if args.quick else 3)

    from sasrec.recommender import Recommender

    events = read_ml1m(Path(args.data))
    real = events is not None
    if events is None:
        events = synthetic_ml1m()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        base = Path(tmp) / "models"
        model_desc = export_model_for_bench(base, args.run, events if real else None, xla=args.xla)
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
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

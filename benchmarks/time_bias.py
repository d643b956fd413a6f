"""Time-interval attention bias (issue 19, "time"): the same model with and without ``time_bias`` on
MovieLens data with real timestamps.

    python -m benchmarks.time_bias [--datasets ml-100k,users1-2999] [--seeds 3] [--epochs 100] [--epochs-1m 40]

Data (raw MovieLens, never copied into the repository): ``ml-100k/u.data`` and
``ml-1m/ratings.users1-2999.dat.gz`` under ``../shared/data`` (or ``$SASREC_SHARED_DATA``), each prepared
with ``sasrec prepare --format movielens`` defaults (leave-one-out) into a temporary folder. ``ml-1m.txt.gz``
has no timestamps (file order), so it cannot show the bias.

Both arms train the ``dense`` preset (configs/dense.toml: full softmax, d 128, maxlen 200)
from scratch, identical but for ``time_bias``; validation on every user every ``eval_every`` epochs
with early stopping, the best validation model tested on every user (full ranking, seen items
removed). ML-100K: ``--seeds`` seeds per arm, at most ``--epochs`` epochs; users1-2999: one seed per
arm (42), at most ``--epochs-1m`` epochs (a fixed budget). Reported per data set and arm: mean and
spread (population standard deviation over seeds; 0 with one seed) of validation (at the best epoch)
and test HR@10 / NDCG@10, epochs run and training seconds per epoch. Results go to the ``time-bias``
section of BENCHMARKS.md, rewritten after every arm; a run of some ``--datasets`` keeps the other data
sets' rows (column ``measured``: the date of each row's run).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import SHARED_DATA, accelerator, write_section_keeping  # noqa: E402

DATASETS = {
    "ml-100k": SHARED_DATA / "ml-100k" / "u.data",
    "users1-2999": SHARED_DATA / "ml-1m" / "ratings.users1-2999.dat.gz",
}
METRICS = ("val HR@10", "val NDCG@10", "test HR@10", "test NDCG@10")


def train_arm(data: Path, run: Path, time_bias: bool, seed: int, epochs: int) -> dict:
    """One training run of the dense preset; its best-validation and test metrics."""
    from sasrec.config import SASRecConfig
    from sasrec.run import RunFolder
    from sasrec.train import train

    config = SASRecConfig(**{**SASRecConfig.preset("dense").to_dict(), "time_bias": time_bias, "seed": seed,
                             "epochs": epochs, "tensorboard": False})
    started = time.perf_counter()
    train(data, run, config, verbose=0)
    wall = time.perf_counter() - started
    with open(run / "log.csv") as f:
        log = list(csv.DictReader(f))
    evaluated = [row for row in log if row.get("val_ndcg@10") not in (None, "", "nan")]
    best = max(evaluated, key=lambda row: float(row["val_ndcg@10"]))
    test = RunFolder(run).test_metrics("full")
    seconds = [float(row["wall_seconds"]) for row in log]
    per_epoch = [b - a for a, b in zip(seconds, seconds[1:])] or seconds
    return {
        "val HR@10": float(best["val_hr@10"]), "val NDCG@10": float(best["val_ndcg@10"]),
        "test HR@10": test["hr@10"], "test NDCG@10": test["ndcg@10"],
        "epochs": len(log), "best epoch": int(best["epoch"]) + 1, "s / epoch": statistics.median(per_epoch),
        "wall s": wall,
    }


def summary(dataset: str, time_bias: bool, runs: list[dict], seeds: list[int]) -> dict:
    row = {"data": dataset, "time_bias": str(time_bias).lower(), "seeds": ",".join(map(str, seeds))}
    for metric in METRICS:
        values = [r[metric] for r in runs]
        row[metric] = f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"
    row["test NDCG@10 per seed"] = " ".join(f"{r['test NDCG@10']:.4f}" for r in runs)
    row["epochs (best)"] = " ".join(f"{r['epochs']} ({r['best epoch']})" for r in runs)
    row["s / epoch"] = statistics.mean(r["s / epoch"] for r in runs)
    row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from: {', '.join(DATASETS)}")
    parser.add_argument("--seeds", type=int, default=3, help="ML-100K seeds per arm (42, 43, ...)")
    parser.add_argument("--epochs", type=int, default=100, help="ML-100K: most epochs (early stopping may end sooner)")
    parser.add_argument("--epochs-1m", type=int, default=40, help="users1-2999: most epochs, one seed per arm")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        parser.error(f"unknown data set(s) {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    missing = [str(DATASETS[n]) for n in names if not DATASETS[n].is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} absent; this benchmark needs raw MovieLens with timestamps", file=sys.stderr)
        return 0
    from pipelines.prepare import prepare_file
    from sasrec.config import SASRecConfig

    dense = SASRecConfig.preset("dense")
    rows = []
    notes = (
        f"Dense preset (full softmax CE, {dense.num_blocks} blocks, d {dense.hidden_units}, maxlen {dense.maxlen}, dropout "
        f"{dense.dropout}, positions {dense.positions}), the two arms "
        f"identical but for time_bias (per-head bias by bucket floor(log2(1 + gap seconds)) of query and key event). "
        f"Data: raw MovieLens with timestamps, `sasrec prepare --format movielens` defaults, leave-one-out. "
        f"Validation every eval_every=2 epochs on every user (full ranking, seen items removed), early stopping "
        f"(patience 5), the best validation model tested on every user. ML-100K: {args.seeds} seeds per arm, at most "
        f"{args.epochs} epochs; users1-2999: 1 seed (42) per arm, at most {args.epochs_1m} epochs. Mean ± population "
        f"standard deviation over seeds (0 with one seed). Device {accelerator()}, shared with other work: s / epoch "
        "is indicative only. A gain counts only when larger than the spread. Rows of data sets not in the latest "
        "run are kept from earlier runs (measured: each row's date; the command and settings above are the latest "
        "run's)."
    )
    with tempfile.TemporaryDirectory(prefix="time-bias-") as tmp:
        for name in names:
            data = Path(tmp) / name
            prepare_file("movielens", DATASETS[name], data)
            seeds = [42 + i for i in range(args.seeds)] if name == "ml-100k" else [42]
            epochs = args.epochs if name == "ml-100k" else args.epochs_1m
            for time_bias in (False, True):
                runs = []
                for seed in seeds:
                    run = train_arm(data, Path(tmp) / f"{name}-{time_bias}-{seed}", time_bias, seed, epochs)
                    print(name, time_bias, seed, run, flush=True)
                    runs.append(run)
                rows.append(summary(name, time_bias, runs, seeds))
                write_section_keeping("time-bias", "Time-interval attention bias on MovieLens with timestamps", rows,
                                      key="data", notes=notes, measured=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

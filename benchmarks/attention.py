"""Attention variants (issue 19): a short screen of each variant against today's attention on ML-1M.

    python -m benchmarks.attention [--dataset DIR] [--epochs 4] [--eval-max-users 1000] [--variants a,b]

Each variant trains the ``dense`` preset (configs/dense.toml) with its attention fields changed and
nothing else, from scratch, for a fixed small number of epochs (``--epochs``), validating on a
seeded sample of ``--eval-max-users`` users (full ranking, seen items removed) after the last epoch.
Reported per variant: validation NDCG@10 / HR@10 after those epochs and training seconds per epoch
(the mean over epochs after the first, which also compiles). This is a screen, not the issue's
protocol: a few epochs of one seed rank how fast each variant learns, not where it ends; the leaders
need full runs (early stopping, all users, test split, 3 seeds) before a preset changes.

``--dataset`` is a prepared ML-1M folder (``sasrec prepare --format pairs`` of ml-1m.txt.gz, no
k-core); without it the script prepares ``../shared/data/ml-1m/ml-1m.txt.gz`` (or
``$SASREC_SHARED_DATA``) into a temporary folder. When neither is there it says so and exits 0.
Results go to the ``attention`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import SHARED_DATA, accelerator, write_section  # noqa: E402

DATA = SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"
# name -> config overrides on top of the dense preset; "default" is today's attention.
VARIANTS = {
    "default": {},
    "cosine": dict(attention_similarity="cosine"),
    "silu": dict(attention_normalisation="silu"),
    "window 50 / global": dict(attention_window=[50, 0]),
    "relative bias": dict(position_bias="relative"),
    "rotary (no absolute)": dict(position_bias="rotary", absolute_positions=False),
}


def screen(name: str, fields: dict, data: Path, work: Path, args) -> dict:
    from sasrec.config import SASRecConfig
    from sasrec.train import train

    config = SASRecConfig(**{**SASRecConfig.preset("dense").to_dict(), **fields, "epochs": args.epochs,
                             "eval_every": args.epochs, "eval_max_users": args.eval_max_users,
                             "tensorboard": False})
    run = work / name.replace(" ", "-").replace("/", "").replace("(", "").replace(")", "")
    started = time.perf_counter()
    train(data, run, config, verbose=0)
    wall = time.perf_counter() - started
    with open(run / "log.csv") as f:
        log = list(csv.DictReader(f))
    seconds = [float(row["wall_seconds"]) for row in log]
    per_epoch = [b - a for a, b in zip(seconds, seconds[1:])] or seconds
    last = log[-1]
    return {
        "variant": name,
        "fields": " ".join(f"{k}={v}" for k, v in fields.items()) or "(dense preset)",
        "epochs": len(log),
        "val NDCG@10": float(last["val_ndcg@10"]),
        "val HR@10": float(last["val_hr@10"]),
        "s / epoch": sum(per_epoch) / len(per_epoch),
        "first epoch s": seconds[0],
        "wall s": wall,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="prepared ML-1M dataset folder")
    parser.add_argument("--data", type=Path, default=DATA, help="ml-1m.txt.gz, prepared when --dataset is not given")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--eval-max-users", type=int, default=1000)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    if not SHARED_DATA.is_dir() or not (args.dataset or args.data.is_file()):
        print(f"skipped: {SHARED_DATA} (ML-1M, ml-1m/ml-1m.txt.gz) is absent; this benchmark needs it", file=sys.stderr)
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    notes = (
        f"Screen, not the full protocol: each variant is the dense preset with only its attention fields changed, "
        f"trained from scratch for {args.epochs} epochs (one seed, 42), validated once at the end on "
        f"{args.eval_max_users or 'all'} seeded users (full ranking, seen items removed); device {accelerator()}. "
        "s / epoch: mean training seconds of the epochs after the first (the first also compiles). "
        "A short screen ranks how fast a variant learns, not where it converges; only full runs with early stopping, "
        "all users, the test split and 3 seeds may change the presets (none has yet)."
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="attention-") as tmp:
        data = args.dataset
        if data is None:
            from pipelines.prepare import prepare_file

            data = Path(tmp) / "ml-1m"
            prepare_file("pairs", args.data, data, kcore="none")
        for name in names:
            row = screen(name, VARIANTS[name], data, Path(tmp), args)
            print(row, flush=True)
            rows.append(row)
            write_section("attention", "Attention variants: short screen on ML-1M (dense preset)", rows, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

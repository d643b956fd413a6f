"""Quality benchmark: train the shipped configs on real data and compare with published SASRec results.

    python -m benchmarks.quality [--cases ml1m-bce,ml1m-ce,beauty-ce] [--work runs/quality] [--quick]

Each case prepares its dataset (once), trains with ``sasrec train`` into ``WORK/run-CASE`` (an
interrupted benchmark resumes where it stopped) and reads the run's ``metrics.json``. The rows, with
the published figures and the targets, go to the "quality" section of BENCHMARKS.md.
``--quick`` trains the synthetic demo data instead (CI-sized) to check that the machinery works.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import SHARED_DATA, write_section
from sasrec.run import RunFolder

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    data: str  # dataset folder name under WORK
    prepare: tuple[str, ...]  # `sasrec prepare` arguments (without --out)
    config: str
    protocol: str  # the protocol the target is stated on
    published: str
    target: dict  # metric -> minimum


CASES = {
    c.name: c
    for c in (
        Case("ml1m-bce", "ml1m", ("--format", "pairs", "--input", str(SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"), "--kcore", "none"),
             "configs/ml-1m-paper.toml", "sampled-100", "SASRec paper: HR@10 0.8245, NDCG@10 0.5905",
             {"hr@10": 0.82, "ndcg@10": 0.59}),
        Case("ml1m-ce", "ml1m", ("--format", "pairs", "--input", str(SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"), "--kcore", "none"),
             "configs/dense.toml", "full", "SASRec+ 3000: HR@10 0.3159, NDCG@10 0.1857",
             {"hr@10": 0.316, "ndcg@10": 0.186}),
        Case("beauty-ce", "beauty", ("--format", "sequences", "--input", str(SHARED_DATA / "beauty" / "Beauty.txt"), "--kcore", "none"),
             "configs/sparse.toml", "full", "SASRec+SS (eSASRec paper): HR@10 0.0921, NDCG@10 0.0531",
             {"hr@10": 0.092, "ndcg@10": 0.053}),
    )
}


def sasrec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sasrec", *args], cwd=ROOT, check=True)


def synthetic_source(work: Path) -> tuple[str, ...]:
    """`sasrec prepare` arguments (without --out) for the seeded synthetic log, written once into ``work``."""
    log = work / "log.csv"
    if not log.exists():
        sasrec("synth", "--out", str(log))
    return ("--format", "csv", "--input", str(log), "--user-col", "user_id", "--item-col", "item_id",
            "--time-col", "timestamp")


def run_case(case: Case, work: Path, extra: list[str], collect: bool = False) -> dict:
    """Train (or resume) the case's run and return its metrics. With ``collect``, the run is not trained
    further: its best model so far is evaluated (again, with the current protocol code) and a run that
    has not finished says so."""
    data = work / case.data
    run = work / f"run-{case.name}"
    if collect:
        sasrec("evaluate", "--run", str(run), "--protocol", "both")
        folder = RunFolder(run)
        metrics = folder.read_metrics()
        training = metrics["training"]
        training["unfinished"] = not training["stopped_early"] and training["epoch"] < folder.config().epochs
        return metrics
    if not (data / "manifest.json").exists():
        sasrec("prepare", *case.prepare, "--out", str(data))
    sasrec("train", "--data", str(data), "--out", str(run), "--config", case.config, "--quiet", *extra)
    return RunFolder(run).read_metrics()


def rows_for(case: Case, metrics: dict) -> list[dict]:
    rows = []
    for result in (r for r in metrics["results"] if r["protocol"]["split"] == "test"):
        p, m, d = result["protocol"], result["metrics"], result["deliverable_metrics"]
        on_target = p["protocol"] == case.protocol
        rows.append({
            "case": case.name,
            "config": case.config,
            "protocol": f"{p['split']} {p['protocol']}" + (f" (seed {p['seed']})" if p["protocol"] != "full" else ""),
            "users": p["users_evaluated"],
            "HR@10": m["hr@10"],
            "NDCG@10": m["ndcg@10"],
            "MRR@10": m["mrr@10"],
            "repeat targets": result["repeat_targets"],
            "HR@10 / NDCG@10, repeats missed": f"{d['hr@10']:.4f} / {d['ndcg@10']:.4f}",
            "popularity HR@10": result["popularity"]["hr@10"],
            "target": ", ".join(f"{k} >= {v}" for k, v in case.target.items()) if on_target else "",
            "met": ("yes" if all(m[k] >= v for k, v in case.target.items()) else "no") if on_target else "",
            "published": case.published if on_target else "",
            "epochs (best)": f"{metrics['training']['epoch']} ({metrics['training']['best_epoch']})"
            + (" unfinished" if metrics["training"].get("unfinished") else ""),
            "train s": metrics["training"]["train_seconds"],
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="datasets and run folders")
    parser.add_argument("--quick", action="store_true", help="synthetic demo data only (CI-sized)")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every case")
    parser.add_argument("--collect", action="store_true",
                        help="do not train: report existing runs, evaluating the best model of unfinished ones")
    args = parser.parse_args(argv)
    extra = [a for s in args.set for a in ("--set", s)]
    rows = []
    if args.quick:
        work = args.work / "quick"
        case = Case("synthetic", "synthetic", synthetic_source(work), "configs/demo.toml", "full", "", {"hr@10": 0.0})
        rows += rows_for(case, run_case(case, work, extra))
    else:
        if not SHARED_DATA.is_dir():
            print(f"{SHARED_DATA} is absent: the quality benchmark needs the real data sets", file=sys.stderr)
            return 1
        for name in args.cases.split(","):
            rows += rows_for(CASES[name], run_case(CASES[name], args.work, extra, args.collect))
    write_section("quality" + ("-quick" if args.quick else ""), "Quality (leave-one-out, all users)", rows,
                  notes="Targets apply to the row of the protocol they are stated on. Full ranking removes the "
                  "user's seen items (the target stays a candidate); sampled-100 uses 100 uniform never-interacted "
                  "negatives drawn with the evaluation's own seed (the same for every run). 'Repeat targets': test "
                  "items the user already had in the history; 'repeats missed' counts them as misses, which is "
                  "what the service with exclude_seen (its default) can deliver. Protocol details are saved in "
                  "each run's metrics.json.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark `prepare` (file -> dataset folder): ML-1M pair file and a synthetic 20M-event log.

Run: ``python -m benchmarks.pipeline [--quick]`` (``--quick``: a 1M-event synthetic log instead of 20M).
Each case runs in a fresh child process, so wall time includes reading and writing, and the peak
RSS (``ru_maxrss`` of the child) is the case's own. The synthetic log is generated first, untimed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import SHARED_DATA, write_section

ROOT = Path(__file__).resolve().parent.parent
ML1M = SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"
CASE_SCRIPT = """
import json, resource, sys, time
from pipelines.prepare import prepare_file
fmt, path, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
start = time.perf_counter()
ds = prepare_file(fmt, path, out, reader_options=options)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "events": int(len(ds.items)), "users": ds.num_users, "items": ds.num_items,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
SYNTH_OPTIONS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"}


def run_case(fmt: str, path: Path, out: Path, options: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CASE_SCRIPT, fmt, str(path), str(out), json.dumps(options)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M-event synthetic log instead of 20M")
    args = parser.parse_args(argv)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="sasrec-bench-") as tmp:
        tmp = Path(tmp)
        if ML1M.is_file():
            result = run_case("pairs", ML1M, tmp / "ml1m", {})
            rows.append(_row("ML-1M pair file (ml-1m.txt.gz)", result, "<= 5 s"))
        else:
            notes.append(f"ML-1M row skipped: {ML1M} is absent.")
        users = 25_000 if args.quick else 500_000
        log = tmp / "synthetic.csv"
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sasrec", "synth", "--out", str(log), "--users", str(users), "--items", "50000",
             "--chains", "500", "--min-length", "20", "--max-length", "60", "--seed", "0"],
            cwd=ROOT, check=True, capture_output=True,
        )
        notes.append(
            f"Synthetic log: `sasrec synth --users {users} --items 50000 --chains 500` -> {log.stat().st_size / 2**20:,.0f} MiB CSV, "
            f"generated in {time.perf_counter() - started:.1f} s (untimed)."
        )
        result = run_case("csv", log, tmp / "synthetic", SYNTH_OPTIONS)
        target = "<= 5 s" if args.quick else "<= 120 s, peak RSS < 6 GB"
        rows.append(_row(f"synthetic CSV, {result['events'] / 1e6:.0f}M events", result, target))
    notes.append(
        "`prepare` defaults: iterative 5/5 k-core, leave-one-out split; time = read + clean + sort + vocabulary + split + "
        "atomic write of the dataset folder, in a fresh process (peak RSS = that process's ru_maxrss)."
    )
    write_section("pipeline" + ("-quick" if args.quick else ""), "Data pipeline: `prepare` wall time and peak memory", rows, "\n".join(f"- {n}" for n in notes))
    return 0


def _row(case: str, result: dict, target: str) -> dict:
    return {
        "case": case,
        "users": f"{result['users']:,}",
        "items": f"{result['items']:,}",
        "events": f"{result['events']:,}",
        "wall s": round(result["seconds"], 2),
        "peak RSS MB": round(result["peak_rss_mb"]),
        "target": target,
    }


if __name__ == "__main__":
    sys.exit(main())

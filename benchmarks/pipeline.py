"""Benchmark `prepare` (raw log -> dataset folder) on the pandas and the Dask engine.

Run: ``python -m benchmarks.pipeline [--quick] [--only pandas|dask]``.

Section ``pipeline`` (pandas engine): the ML-1M pair file and a synthetic 20M-event CSV.
Section ``pipeline-dask``: the same 20M events as 20 CSV files on both engines (Dask: a LocalCluster of
2 workers started by the case), the pandas engine's peak memory at 5M/10M/20M events and its
projection, and a 200M-event log as 200 Parquet files (more than the pandas engine can hold here) on
Dask with 2 workers limited to 6 GB each. ``--quick``: 1M/10M events instead of 20M/200M.

Each case runs in a fresh child process, so wall time includes starting the cluster, reading and
writing; peak RSS is ``ru_maxrss`` of the child (the client, which also hosts the LocalCluster's
scheduler) and of each Dask worker process. Synthetic logs are generated first, untimed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import SHARED_DATA, write_section

ROOT = Path(__file__).resolve().parent.parent
ML1M = SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"
PANDAS_CASE = """
import json, resource, sys, time
from pipelines.prepare import prepare_file
fmt, path, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
start = time.perf_counter()
ds = prepare_file(fmt, path, out, reader_options=options)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "events": int(len(ds.items)), "users": ds.num_users, "items": ds.num_items,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
DASK_CASE = """
import json, resource, sys, time
start = time.perf_counter()
from pipelines.dask_cluster import dask_client
from pipelines.dask_engine import prepare_on_dask
fmt, path, out, options, workers, memory = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]), sys.argv[6]

def worker_peak_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

with dask_client(None, workers=workers, memory_limit=memory, local_directory=sys.argv[7]) as client:
    manifest = prepare_on_dask(client, fmt, path, out, reader_options=options)
    workers_mb = sorted(client.run(worker_peak_mb).values())
seconds = time.perf_counter() - start
stats = manifest["statistics"]
print(json.dumps({"seconds": seconds, "events": stats["events"], "users": stats["users"], "items": stats["items"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "workers_mb": workers_mb}))
"""
SYNTH = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"}


def run_case(script: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark case failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synth(out: Path, users: int, items: int, *extra: str) -> tuple[float, str]:
    """Generate a log with ``sasrec synth`` (untimed in the results); returns seconds and its size."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sasrec", "synth", "--out", str(out), "--users", str(users), "--items", str(items),
                    "--chains", str(items // 100), "--min-length", "20", "--max-length", "60", "--seed", "0", *extra],
                   cwd=ROOT, check=True, capture_output=True)
    size = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
    return time.perf_counter() - started, f"{size / 2**20:,.0f} MiB"


def pandas_section(tmp: Path, quick: bool) -> None:
    rows, notes = [], []
    if ML1M.is_file():
        rows.append(_row("ML-1M pair file (ml-1m.txt.gz)", run_case(PANDAS_CASE, "pairs", ML1M, tmp / "ml1m", "{}"), "<= 5 s"))
    else:
        notes.append(f"ML-1M row skipped: {ML1M} is absent.")
    users = 25_000 if quick else 500_000
    seconds, size = synth(tmp / "synthetic.csv", users, 50_000)
    notes.append(f"Synthetic log: `sasrec synth --users {users} --items 50000 --chains 500` -> {size} CSV, generated in {seconds:.1f} s (untimed).")
    result = run_case(PANDAS_CASE, "csv", tmp / "synthetic.csv", tmp / "synthetic", json.dumps(SYNTH))
    rows.append(_row(f"synthetic CSV, {result['events'] / 1e6:.0f}M events", result, "<= 5 s" if quick else "<= 120 s, peak RSS < 6 GB"))
    notes.append("`prepare` defaults: iterative 5/5 k-core, leave-one-out split; time = read + clean + sort + vocabulary + split + "
                 "atomic write of the dataset folder, in a fresh process (peak RSS = that process's ru_maxrss).")
    write_section("pipeline" + ("-quick" if quick else ""), "Data pipeline: `prepare` wall time and peak memory", rows,
                  "\n".join(f"- {n}" for n in notes))


def dask_section(tmp: Path, quick: bool) -> None:
    scale = 20 if quick else 1  # --quick: 1M and 10M events instead of 20M and 200M
    workers, big_memory = 2, "6GB"
    rows, notes, memory_points = [], [], []
    for users in (125_000 // scale, 250_000 // scale):  # pandas memory at 5M and 10M events, for the projection
        seconds, _ = synth(tmp / f"log-{users}", users, 50_000, "--parts", "20")
        result = run_case(PANDAS_CASE, "csv", tmp / f"log-{users}", tmp / "out", json.dumps(SYNTH))
        memory_points.append((result["events"], result["peak_rss_mb"]))
        rows.append(_row(f"pandas, {result['events'] / 1e6:.1f}M events, 20 CSV files", result, "(memory projection)"))
        shutil.rmtree(tmp / "out")
    users = 500_000 // scale
    seconds, size = synth(tmp / "log-20m", users, 50_000, "--parts", "20")
    notes.append(f"Logs: `sasrec synth --users {users:,} --items 50000 --chains 500 --parts 20` ({size} of CSV for the "
                 f"largest), generated untimed; ML-1M-like lengths 20-60.")
    pandas = run_case(PANDAS_CASE, "csv", tmp / "log-20m", tmp / "pandas-out", json.dumps(SYNTH))
    memory_points.append((pandas["events"], pandas["peak_rss_mb"]))
    rows.append(_row(f"pandas, {pandas['events'] / 1e6:.0f}M events, 20 CSV files", pandas, "baseline"))
    dask = run_case(DASK_CASE, "csv", tmp / "log-20m", tmp / "dask-out", json.dumps(SYNTH), workers, "auto", tmp / "spill")
    ratio = dask["seconds"] / pandas["seconds"]
    rows.append(_row(f"Dask, {workers} workers, same 20 files", dask, f"<= 2x pandas: {ratio:.2f}x"))
    identical = _files(tmp / "pandas-out") == _files(tmp / "dask-out")
    notes.append(f"Same input, both engines: the dataset folders are {'byte-identical' if identical else 'DIFFERENT'}.")
    for out in ("pandas-out", "dask-out", "log-20m"):
        shutil.rmtree(tmp / out)

    big_users = 5_000_000 // scale
    seconds, size = synth(tmp / "log-big", big_users, 200_000, "--parts", "200", "--file-format", "parquet")
    notes.append(f"Large log: `sasrec synth --users {big_users:,} --items 200000 --chains 2000 --parts 200 --file-format parquet` "
                 f"-> {size} of Parquet, generated in {seconds:.0f} s (untimed).")
    big = run_case(DASK_CASE, "parquet", tmp / "log-big", tmp / "big-out", json.dumps(SYNTH), workers, big_memory, tmp / "spill")
    rows.append(_row(f"Dask, {workers} workers x {big_memory}, {big['events'] / 1e6:.0f}M events, 200 Parquet files", big,
                     "completes within the memory limit"))
    linear = pandas["seconds"] * big["events"] / pandas["events"]
    notes.append(f"Dask took {big['seconds']:.0f} s for {big['events'] / 1e6:.0f}M events: {big['seconds'] / linear:.1f}x the pandas "
                 f"engine's 20M-event time scaled linearly ({linear:.0f} s), the price of fitting in {workers} x {big_memory} by "
                 "spilling to disk.")
    slope = (memory_points[-1][1] - memory_points[0][1]) / (memory_points[-1][0] - memory_points[0][0])
    projected = memory_points[-1][1] + slope * (big["events"] - memory_points[-1][0])
    notes.append(
        f"pandas engine projected on the large log: peak RSS grows {slope * 1e6:,.0f} MB per million events "
        f"(from {memory_points[0][0] / 1e6:.1f}M to {memory_points[-1][0] / 1e6:.0f}M events: {memory_points[0][1]:,.0f} -> "
        f"{memory_points[-1][1]:,.0f} MB), so {big['events'] / 1e6:.0f}M events need about {memory_points[-1][1]:,.0f} + "
        f"{slope:.6f} x {big['events'] - memory_points[-1][0]:,} = {projected / 1024:,.1f} GB in one process; not run here."
    )
    notes.append("Dask wall time includes starting the LocalCluster; `workers peak MB` is each worker process's ru_maxrss, "
                 "`peak RSS MB` the client's (which hosts the LocalCluster's scheduler). Workers spill to disk above 60% "
                 "of their memory limit (Dask's default).")
    write_section("pipeline-dask" + ("-quick" if quick else ""), "Data pipeline on Dask: pandas vs Dask, and a log larger than memory",
                  rows, "\n".join(f"- {n}" for n in notes))


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _row(case: str, result: dict, target: str) -> dict:
    return {
        "case": case,
        "users": f"{result['users']:,}",
        "items": f"{result['items']:,}",
        "events": f"{result['events']:,}",
        "wall s": round(result["seconds"], 2),
        "peak RSS MB": round(result["peak_rss_mb"]),
        "workers peak MB": " / ".join(f"{mb:,.0f}" for mb in result.get("workers_mb", [])) or "-",
        "target": target,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller logs (1M/10M events instead of 20M/200M)")
    parser.add_argument("--only", choices=("pandas", "dask"), help="write one section only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sasrec-bench-") as tmp:
        if args.only != "dask":
            pandas_section(Path(tmp), args.quick)
        if args.only != "pandas":
            dask_section(Path(tmp), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

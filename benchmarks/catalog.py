"""Catalogs of 10^4, 10^5 and 10^6 items, end to end with the same model (issue 20): section ``catalog``.

Run: ``python -m benchmarks.catalog [--items 10000,100000,1000000] [--users 500000] [--epochs 1]
[--popularity 0.8] [--workdir DIR] [--reuse-runs]``. Per catalog: ``sasrec synth`` (power law, noise 0.3)
-> ``prepare --kcore none``
-> ``train`` (``CONFIG``) -> ``evaluate`` full and sampled-100 on a seeded sample of test users ->
``export`` -> load and warm the SavedModel, and the same version loaded again beside it (what a hot
reload holds) -> ``score_frame`` -> ``sasrec serve`` with one client (unloaded ``Recommend``). Every step
runs in a fresh child process; peak RSS is that child's own (``os.wait4``), the server's from
``/proc/PID/status`` (VmHWM). Data folders in ``--workdir`` are reused when present (generation untimed
then); ``--reuse-runs`` also reuses the trained runs and their figures and measures from the export on
(after a change to export or serving). Run it alone on the machine: every step uses both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import tomli_w

from benchmarks.report import write_section

ROOT = Path(__file__).resolve().parent.parent
# The same model for every catalog (only the item table grows with it): the shipped large-catalog config.
CONFIG = tomllib.loads((ROOT / "configs" / "large-catalog.toml").read_text())["sasrec"]
EVAL_USERS = CONFIG["eval_max_users"]  # seeded sample of test users for validation and evaluation
SCORE_USERS = 20_000  # users scored by score_frame
REQUESTS = 300  # sequential Recommend calls (one client, unloaded)


def child(step: str, *args: str) -> tuple[dict, float, float]:
    """Run ``python -m benchmarks.catalog --child STEP ARGS`` (or a ``sasrec`` command when ``step`` is
    ``sasrec``): (its JSON output or {}, wall seconds, peak RSS MB)."""
    cmd = [sys.executable, "-m", "sasrec", *args] if step == "sasrec" else \
        [sys.executable, "-m", "benchmarks.catalog", "--child", step, *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=devnull, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines and step != "sasrec" else {}), wall, usage.ru_maxrss / 1024


def test_histories(data: Path, users: int, seed: int = 1) -> list[list[str]]:
    """External item ids of the test histories of a seeded sample of users (what a service is asked)."""
    from pipelines.dataset import read_dataset
    from sasrec.evaluate import evaluation_set

    ds = read_dataset(data)
    ev = evaluation_set(ds, "test", users, seed)
    return [ds.item_ids[ds.items[s:e]].tolist() for s, e in zip(ev.history_starts, ev.history_ends)]


def probe_child(version: str, data: str) -> None:
    """Load + warm, score_frame users/s, in-process single-history latency, and the RSS of two copies."""
    import pandas as pd

    from sasrec.recommender import Recommender

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    base_rss = rss_mb()
    started = time.perf_counter()
    rec = Recommender.load(version)
    loaded = time.perf_counter() - started
    rec.warm_up(max_batch_size=64)
    warm = time.perf_counter() - started - loaded
    one_rss = rss_mb()
    histories = test_histories(Path(data), SCORE_USERS)
    frame = pd.DataFrame({"user_id": np.arange(len(histories)), "history": histories})
    rec.score_frame(frame.head(256), k=10, progress=False)  # first call of each chunk shape
    started = time.perf_counter()
    recs = rec.score_frame(frame, k=10, progress=False)
    frame_seconds = time.perf_counter() - started
    latencies = []
    for history in histories[:REQUESTS]:
        t = time.perf_counter()
        rec.recommend(history, k=10)
        latencies.append(time.perf_counter() - t)
    second = Recommender.load(version)  # a hot reload holds the old and the new version
    second.warm_up(max_batch_size=64)
    two_rss = rss_mb()
    print(json.dumps({
        "load_s": loaded, "warm_s": warm, "rss_one_mb": one_rss - base_rss, "rss_two_mb": two_rss - base_rss,
        "frame_users": len(histories), "frame_users_per_s": len(histories) / frame_seconds,
        "frame_rows": len(recs), "inproc_p50_ms": 1000 * float(np.percentile(latencies, 50)),
    }))


def serve_case(base: Path, data: Path, flags: list[str], reload: bool) -> dict:
    """Unloaded Recommend p50/p99 over gRPC and the server's RSS; with ``reload`` also its peak through a
    hot reload (the same SavedModel copied in as the next version)."""
    from benchmarks.serving import free_port, serve_command, start_server
    from serving.client import RecommenderClient

    port = free_port()
    proc = start_server(serve_command(base, port, ["--poll-interval-s", "1", *flags]), port)
    status = Path(f"/proc/{proc.pid}/status")

    def memory(field: str) -> float:
        return next(int(line.split()[1]) / 1024 for line in status.read_text().splitlines() if line.startswith(field))

    try:
        histories = test_histories(data, REQUESTS)
        latencies = []
        with RecommenderClient(f"127.0.0.1:{port}", timeout=30) as client:
            for history in histories[:20]:
                client.recommend(history, k=10)
            for history in histories:
                t = time.perf_counter()
                client.recommend(history, k=10)
                latencies.append(time.perf_counter() - t)
            serving_rss = memory("VmRSS:")
            if not reload:
                return {"p50": float(np.percentile(np.array(latencies) * 1000, 50)),
                        "p99": float(np.percentile(np.array(latencies) * 1000, 99)), "serving_rss_mb": serving_rss}
            # Hot reload: a new version appears; the server loads and warms it beside the old one.
            versions = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
            shutil.copytree(base / str(versions[-1]), base / ".reload-tmp")
            os.rename(base / ".reload-tmp", base / str(versions[-1] + 1))
            started = time.perf_counter()
            while client.model_info().model_version != versions[-1] + 1:
                if time.perf_counter() - started > 600:
                    raise RuntimeError("the new version was not served within 600 s")
                time.sleep(0.2)
            reload_seconds = time.perf_counter() - started
            peak = memory("VmHWM:")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lat = np.array(latencies) * 1000
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "serving_rss_mb": serving_rss, "reload_peak_mb": peak, "reload_s": reload_seconds}


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def data_and_training(items: int, users: int, epochs: int, popularity: float, workdir: Path, raw: Path,
                      data: Path, run: Path) -> tuple[dict, dict]:
    """synth + prepare (unless ``data`` exists), train, evaluate: (row, figures) as in :func:`catalog_case`."""
    row: dict = {"catalog": f"{items:,}"}
    fig: dict = {}
    if not (data / "manifest.json").exists():
        child("sasrec", "synth", "--users", str(users), "--items", str(items), "--popularity", str(popularity),
              "--noise", "0.3", "--parts", "10", "--file-format", "parquet", "--out", str(raw))
        _, seconds, peak = child(
            "sasrec", "prepare", "--format", "parquet", "--input", str(raw), "--user-col", "user_id", "--item-col",
            "item_id", "--time-col", "timestamp", "--kcore", "none", "--out", str(data))
        row["prepare s (peak MB)"] = f"{seconds:.1f} ({peak:,.0f})"
    stats = json.loads((data / "manifest.json").read_text())["statistics"]
    fig["items"] = stats["items"]
    row["items in data / events"] = f"{stats['items']:,} / {stats['events']:,}"
    shutil.rmtree(run, ignore_errors=True)
    config = workdir / "catalog.toml"
    config.write_text(tomli_w.dumps({"sasrec": {**CONFIG, "epochs": epochs, "tensorboard": False}}))
    _, _, peak = child("sasrec", "train", "--data", str(data), "--out", str(run), "--quiet", "--config", str(config))
    metrics = json.loads((run / "metrics.json").read_text())
    fig["train s/epoch"] = metrics["training"]["train_seconds"] / metrics["training"]["epoch"]
    row["train s/epoch (peak MB)"] = f"{fig['train s/epoch']:.0f} ({peak:,.0f})"
    full = next(r for r in metrics["results"] if r["protocol"]["protocol"] == "full")
    row["test HR@10 (popularity)"] = f"{full['metrics']['hr@10']:.4f} ({full['popularity']['hr@10']:.4f})"
    for protocol in ("full", "sampled-100"):
        _, _, peak = child("sasrec", "evaluate", "--run", str(run), "--protocol", protocol,
                           "--max-users", str(EVAL_USERS))
        seconds = json.loads((run / "metrics.json").read_text())["evaluation_seconds"]
        fig[f"eval {protocol} ms/user"] = 1000 * seconds / EVAL_USERS
        row[f"eval {protocol} ms/user (peak MB)"] = f"{fig[f'eval {protocol} ms/user']:.2f} ({peak:,.0f})"
    return row, fig


def catalog_case(items: int, users: int, epochs: int, popularity: float, workdir: Path,
                 reuse_runs: bool) -> tuple[dict, dict]:
    """One catalog end to end: (the table row, its figures as numbers for the projection)."""
    raw, data, run, base = (workdir / f"{name}-{items}-{popularity}" for name in ("raw", "data", "run", "models"))
    # Data, training and evaluation figures, kept for --reuse-runs (which then measures from the export on).
    trained = workdir / f"trained-{items}-{popularity}-{epochs}.json"
    if reuse_runs and trained.exists():
        row, fig = json.loads(trained.read_text()).values()
    else:
        row, fig = data_and_training(items, users, epochs, popularity, workdir, raw, data, run)
        trained.write_text(json.dumps({"row": row, "fig": fig}))
    shutil.rmtree(base, ignore_errors=True)
    _, seconds, _ = child("sasrec", "export", "--run", str(run), "--model-base", str(base))
    fig["export MB"] = du_mb(base / "1")
    row["export s (MB)"] = f"{seconds:.1f} ({fig['export MB']:,.0f})"
    probe, _, _ = child("probe", str(base / "1"), str(data))
    fig["load+warm s"] = probe["load_s"] + probe["warm_s"]
    row["load+warm s"] = f"{fig['load+warm s']:.1f}"
    row["model RSS MB, 1 / 2 loaded"] = f"{probe['rss_one_mb']:,.0f} / {probe['rss_two_mb']:,.0f}"
    fig["score_frame ms/user"] = 1000 / probe["frame_users_per_s"]
    row["score_frame users/s"] = f"{probe['frame_users_per_s']:,.0f}"
    row["in-process p50 ms"] = f"{probe['inproc_p50_ms']:.2f}"
    served = serve_case(base, data, [], reload=True)
    fig["served p50 ms"] = served["p50"]
    row["served p50 / p99 ms"] = f"{served['p50']:.2f} / {served['p99']:.2f}"
    two = serve_case(base, data, ["--intra-op-threads", "2"], reload=False)
    fig["served p50 ms, 2 threads"] = two["p50"]
    row["served p50 / p99 ms, 2 intra-op threads"] = f"{two['p50']:.2f} / {two['p99']:.2f}"
    row["server RSS MB (hot reload peak)"] = f"{served['serving_rss_mb']:,.0f} ({served['reload_peak_mb']:,.0f})"
    row["hot reload s"] = f"{served['reload_s']:.1f}"
    print(json.dumps({**row, **fig}), flush=True)
    return row, fig


def growth_notes(figs: list[dict]) -> str:
    """Per-item slopes between the two largest catalogs and their projection to 10^7 items."""
    if len(figs) < 2:
        return ""
    small, large = figs[-2], figs[-1]
    target = 10_000_000
    lines = []
    for key in [k for k in large if k != "items"]:
        slope = (large[key] - small[key]) / (large["items"] - small["items"])
        value = large[key] + slope * (target - large["items"])
        lines.append(f"- {key}: {large[key]:,.4g} at {large['items']:,} items + {slope * 1e6:,.4g} per million items "
                     f"x {(target - large['items']) / 1e6:,.2f}M more = **{value:,.4g}** at 10^7")
    return ("Projection to 10^7 items, linear in the number of items between the two largest catalogs (each of "
            "these costs is a fixed part plus a part proportional to the item table):\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="10000,100000,1000000", help="catalog sizes given to sasrec synth")
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--popularity", type=float, default=0.8, help="power-law exponent of sasrec synth")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sasrec-catalog"),
                        help="synthetic logs, datasets, runs and models (kept: data is reused)")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="reuse the data, trained runs and their figures of an earlier run in --workdir; measure "
                        "from the export on")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        {"probe": probe_child}[args.child[0]](*args.child[1:])
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    cases = [catalog_case(int(n), args.users, args.epochs, args.popularity, args.workdir, args.reuse_runs)
             for n in args.items.split(",")]
    rows, figs = [row for row, _ in cases], [fig for _, fig in cases]
    config = ", ".join(f"{k} {v}" for k, v in CONFIG.items() if k != "epochs")
    notes = (
        f"Synthetic logs: `sasrec synth --users {args.users:,} --items N --popularity {args.popularity} --noise 0.3 "
        "--parts 10 "
        f"--file-format parquet` (items never drawn are not in the data), `prepare --kcore none`. Model: "
        f"`configs/large-catalog.toml` ({config}); "
        f"{args.epochs} epoch(s), validation and test on a seeded sample of {EVAL_USERS:,} users (eval_max_users). "
        f"eval ms/user: `sasrec evaluate --max-users {EVAL_USERS}` evaluation_seconds per user (model and popularity "
        f"baseline, seen items removed, every item a candidate for full). score_frame: {SCORE_USERS:,} test "
        f"histories, k 10. Served: {REQUESTS} sequential `Recommend` calls from one client over gRPC, k 10, "
        "test histories, default `sasrec serve` flags (one intra-op thread per batch) and `--intra-op-threads 2`; "
        "server RSS while serving and its peak (VmHWM) through a hot reload (the same SavedModel copied in as the "
        "next version; reload s: from the copy to the first answer of the new version).\n\n" + growth_notes(figs))
    write_section("catalog", "Catalogs of 10^4-10^6 items, end to end", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

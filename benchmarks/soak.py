"""Soak, overload, recovery and SIGTERM under load of `sasrec serve` with the ML-1M-sized model.

    python -m benchmarks.soak [--minutes 10] [--quick] [--no-report]

1. Exports a randomly initialised ML-1M-sized SASRec (as ``benchmarks/serving.py`` does) and starts
   `sasrec serve` as a subprocess with its default flags (plus ``--server-args``; it looks for new
   versions every second).
2. Maximum throughput: closed-loop ``grpc.aio`` clients (32 and 64 in flight); the best rate is "max".
3. Soak: open loop (a fixed arrival rate, latency counted from the scheduled send time, so a stalled
   server cannot hide behind a slow client) at 70% of max for ``--minutes``. Per window (a minute,
   10 s with --quick): requests, failures, p50/p99 and the server's RSS (``/proc/PID/status`` VmRSS).
   Pass: zero failed requests, every window's p99 within 2x of the first window's, RSS growth < 10%
   from the end of the first window to the end.
4. Overload: 3x max for 30 s (10 s quick), 2 s client deadline: status codes and their latency. Pass:
   excess load is shed with RESOURCE_EXHAUSTED/UNAVAILABLE (or deadlines), not queued without bound.
5. Recovery: 50% of max for 30 s (10 s quick). Pass: no failures in its second half, p99 back near
   the soak figure.
6. Hot reload under load (50% of max for 60 s): 2 s in, a copy of the model appears as version 2
   in the model base (written beside it, then renamed). Pass: zero failed requests and version 2
   served before the end (the server loads and warms it beside the serving one, then swaps).
7. SIGTERM under load (50% of max): every request completes or gets a clean UNAVAILABLE (or CANCELLED
   for a call caught in the instant the listener closes), exit code 0.

Results go to RELIABILITY.md (the section between the ``soak`` markers) unless --no-report.
Clients run in this process on the same cores as the server, as in ``benchmarks/serving.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "RELIABILITY.md"
# UNAVAILABLE: refused once the server stopped accepting; CANCELLED: grpc's status for a call that
# arrives in the instant the server shuts its listener (it never reached a handler).
CLEAN_ON_SHUTDOWN = {"OK", "UNAVAILABLE", "CANCELLED"}
SHED = {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}


def rss_kb(pid: int) -> int | None:
    """VmRSS of the server: summed over its processes (``--processes N`` pool), None once it ended."""
    from benchmarks.serving import process_tree

    total = None
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = (total or 0) + int(line.split()[1])
        except OSError:
            continue
    return total


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    lat = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max())}


async def open_loop(stubs, requests, rate: float, seconds: float, *, timeout: float, pid: int | None = None,
                    window_s: float | None = None, on_start=None) -> dict:
    """Send at ``rate`` req/s for ``seconds`` whatever the answers, round robin over ``stubs`` (one per
    connection); returns records and windows."""
    import grpc

    loop = asyncio.get_running_loop()
    records: list[tuple[float, float, str]] = []  # (scheduled offset s, latency s, code)
    rss: list[tuple[float, int]] = []
    start = loop.time()

    async def one(i: int, scheduled: float) -> None:
        try:
            await stubs[i % len(stubs)].Recommend(requests[i % len(requests)], timeout=timeout)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        records.append((scheduled - start, loop.time() - scheduled, code))

    async def sample_rss() -> None:
        while True:
            value = rss_kb(pid) if pid else None
            if value:
                rss.append((loop.time() - start, value))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_rss()) if pid else None
    if on_start is not None:
        on_start(loop, start)
    tasks = set()
    sent, tick = 0, 0.005
    while True:
        now = loop.time()
        due = min(int((now - start) * rate) + 1, int(seconds * rate))
        while sent < due:
            task = asyncio.create_task(one(sent, start + sent / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        if sent >= int(seconds * rate):
            break
        await asyncio.sleep(tick)
    if tasks:
        await asyncio.gather(*list(tasks))
    if sampler is not None:
        sampler.cancel()
    out = {"rate": rate, "seconds": seconds, "sent": sent, "codes": _codes(records), **_latency_by_code(records)}
    if window_s:
        out["windows"] = _windows(records, rss, window_s, seconds)
    out["records"] = records
    return out


def _codes(records) -> dict:
    codes: dict[str, int] = {}
    for _, _, code in records:
        codes[code] = codes.get(code, 0) + 1
    return codes


def _latency_by_code(records) -> dict:
    by: dict[str, list[float]] = {}
    for _, latency, code in records:
        by.setdefault(code, []).append(latency)
    return {"latency": {code: _percentiles(values) for code, values in by.items()}}


def _windows(records, rss, window_s: float, seconds: float) -> list[dict]:
    n = max(1, int(round(seconds / window_s)))
    rows = []
    for w in range(n):
        lo, hi = w * window_s, (w + 1) * window_s
        inside = [(lat, code) for t, lat, code in records if lo <= t < hi]
        ok = [lat for lat, code in inside if code == "OK"]
        mem = [kb for t, kb in rss if t < hi]
        rows.append({
            "window": w + 1, "requests": len(inside), "failed": sum(1 for _, c in inside if c != "OK"),
            **_percentiles(ok), "rss_mib": (mem[-1] / 1024) if mem else None,
        })
    return rows


async def hot_reload(stubs, requests, rate: float, base: Path, seconds: float = 60.0) -> dict:
    """Open-loop load while version 2 (a copy of version 1) appears in ``base``; when every connection
    (so every process of a pool the connections reach) served it."""
    from sasrec.v1 import recommender_pb2

    served: dict = {}

    def arm(loop, start):
        def publish():
            shutil.copytree(base / "1", base / ".reload-2")
            os.rename(base / ".reload-2", base / "2")
            served["published_at_s"] = loop.time() - start

        async def watch():
            while "version_2_at_s" not in served:
                infos = await asyncio.gather(
                    *(stub.GetModelInfo(recommender_pb2.GetModelInfoRequest(), timeout=5) for stub in stubs))
                if all(info.model_version == 2 for info in infos):
                    served["version_2_at_s"] = loop.time() - start
                await asyncio.sleep(0.5)

        loop.call_at(start + 2.0, lambda: loop.run_in_executor(None, publish))
        served["watcher"] = asyncio.ensure_future(watch())

    out = await open_loop(stubs, requests, rate, seconds, timeout=10.0, window_s=5.0, on_start=arm)
    served.pop("watcher").cancel()
    out.update(served)
    out["failed"] = sum(v for k, v in out["codes"].items() if k != "OK")
    out["pass"] = out["failed"] == 0 and "version_2_at_s" in out
    return out


async def measure(target: str, users, args, proc, base: Path) -> dict:
    from benchmarks.serving import aio_channels, closed_loop, recommend_calls
    from sasrec.v1 import recommender_pb2, recommender_pb2_grpc

    quick = args.quick
    results: dict = {"quick": quick}
    probe = []
    for concurrency in (32, 64):
        r = await closed_loop(target, recommend_calls(users), concurrency, 3.0 if quick else 10.0, channels=args.channels)
        probe.append({"clients": concurrency, **r})
        print(f"max throughput probe, {concurrency} clients: {r['rps']:.0f} req/s, p99 {r['p99']:.1f} ms, "
              f"errors {r['errors']}", flush=True)
    max_rps = max(p["rps"] for p in probe)
    results["max"] = {"rps": max_rps, "probe": probe}

    requests = [recommender_pb2.RecommendRequest(history=h, k=10) for h in users]
    # One TCP connection per channel: a `--processes N` pool spreads connections over its processes.
    channels = aio_channels(target, args.channels, [("grpc.max_send_message_length", 16 << 20)])
    try:
        stubs = [recommender_pb2_grpc.RecommenderStub(channel) for channel in channels]
        soak_s = 30.0 if quick else args.minutes * 60.0
        window = 10.0 if quick else 60.0
        print(f"soak: {0.7 * max_rps:.0f} req/s (70%) for {soak_s:.0f} s", flush=True)
        soak = await open_loop(stubs, requests, 0.7 * max_rps, soak_s, timeout=10.0, pid=proc.pid, window_s=window)
        for row in soak["windows"]:
            print(f"  window {row['window']}: {row['requests']} requests, {row['failed']} failed, "
                  f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, RSS {row['rss_mib']:.0f} MiB", flush=True)
        first = soak["windows"][0]
        worst = max(row["p99_ms"] for row in soak["windows"])
        rss_first = first["rss_mib"]
        rss_last = soak["windows"][-1]["rss_mib"]
        soak["verdict"] = {
            "failed": sum(row["failed"] for row in soak["windows"]),
            "p99_first_ms": first["p99_ms"], "p99_worst_ms": worst,
            "p99_ratio": worst / first["p99_ms"],
            "rss_growth_pct": 100 * (rss_last - rss_first) / rss_first if rss_first else None,
        }
        soak["verdict"]["pass"] = (
            soak["verdict"]["failed"] == 0 and soak["verdict"]["p99_ratio"] <= 2.0
            and (soak["verdict"]["rss_growth_pct"] or 0) < 10.0
        )
        results["soak"] = soak

        over_s = 10.0 if quick else 30.0
        print(f"overload: {3 * max_rps:.0f} req/s (3x) for {over_s:.0f} s, 2 s deadline", flush=True)
        over = await open_loop(stubs, requests, 3 * max_rps, over_s, timeout=2.0)
        done = sum(over["codes"].values())
        over["achieved_send_rps"] = over["sent"] / over_s
        over["ok_rps"] = over["codes"].get("OK", 0) / over_s
        over["shed_share"] = sum(v for k, v in over["codes"].items() if k in SHED) / max(done, 1)
        over["other_errors"] = {k: v for k, v in over["codes"].items() if k != "OK" and k not in SHED}
        first_shed = [t for t, _, code in over["records"] if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE")]
        over["first_fast_shed_after_s"] = min(first_shed) if first_shed else None
        print(f"  codes {over['codes']}; OK {over['ok_rps']:.0f} req/s; latency {json.dumps(over['latency'])}",
              flush=True)
        results["overload"] = over

        rec_s = 10.0 if quick else 30.0
        print(f"recovery: {0.5 * max_rps:.0f} req/s (50%) for {rec_s:.0f} s", flush=True)
        rec = await open_loop(stubs, requests, 0.5 * max_rps, rec_s, timeout=10.0, window_s=rec_s / 2)
        second_half = rec["windows"][-1]
        rec["verdict"] = {
            "second_half_failed": second_half["failed"], "second_half_p99_ms": second_half["p99_ms"],
            "pass": second_half["failed"] == 0 and second_half["p99_ms"] <= 2 * soak["verdict"]["p99_first_ms"],
        }
        print(f"  windows {rec['windows']}", flush=True)
        results["recovery"] = rec

        print(f"hot reload under load: {0.5 * max_rps:.0f} req/s for 60 s, version 2 published after 2 s", flush=True)
        reload = await hot_reload(stubs, requests, 0.5 * max_rps, base)
        print(f"  codes {reload['codes']}, version 2 served after {reload.get('version_2_at_s')} s", flush=True)
        results["reload"] = reload

        term_s = 5.0 if quick else 10.0
        print(f"SIGTERM under load: {0.5 * max_rps:.0f} req/s, SIGTERM after 2 s", flush=True)
        sent_at = {}

        def arm(loop, start):
            def fire():
                sent_at["t"] = loop.time() - start
                proc.send_signal(signal.SIGTERM)

            loop.call_at(start + 2.0, fire)

        term = await open_loop(stubs, requests, 0.5 * max_rps, term_s, timeout=15.0, on_start=arm)
        exit_code = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(60))
        unclean = {k: v for k, v in term["codes"].items() if k not in CLEAN_ON_SHUTDOWN}
        term.update(exit_code=exit_code, sigterm_at_s=sent_at.get("t"), unclean=unclean,
                    ok_after_sigterm=sum(1 for t, _, c in term["records"] if c == "OK" and t >= sent_at.get("t", 0)),
                    in_flight_at_sigterm=[c for t, lat, c in term["records"] if t < sent_at.get("t", 0) <= t + lat])
        term["in_flight_at_sigterm"] = _codes([(0, 0, c) for c in term["in_flight_at_sigterm"]])
        term["pass"] = exit_code == 0 and not unclean
        print(f"  codes {term['codes']}, exit code {exit_code}", flush=True)
        results["sigterm"] = term
    finally:
        for channel in channels:
            await channel.close()
    for phase in ("soak", "overload", "recovery", "reload", "sigterm"):
        results[phase].pop("records", None)
    return results


def render(results: dict, command: str) -> str:
    from benchmarks.report import machine

    soak, over, rec, term = results["soak"], results["overload"], results["recovery"], results["sigterm"]
    reload = results["reload"]
    quick = results["quick"]
    label = "QUICK run (proof that the script works, not the 10-minute figure)" if quick else "full run"
    lines = [
        f"Command: `{command}` ({label})",
        f"Date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; machine: {machine()}; "
        f"load average at start: {results.get('loadavg', '?')}",
        "",
        f"Maximum throughput (closed loop): **{results['max']['rps']:.0f} req/s** "
        f"(" + ", ".join(f"{p['clients']} clients {p['rps']:.0f} req/s p99 {p['p99']:.1f} ms" for p in results["max"]["probe"]) + ")",
        "",
        f"Soak at 70% ({soak['rate']:.0f} req/s) for {soak['seconds']:.0f} s:",
        "",
        "| window | requests | failed | p50 ms | p99 ms | server RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in soak["windows"]:
        lines.append(f"| {row['window']} | {row['requests']} | {row['failed']} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {row['rss_mib']:.0f} |")
    v = soak["verdict"]
    lines += [
        "",
        f"Soak verdict: failed {v['failed']}, worst p99 / first p99 = {v['p99_ratio']:.2f} (target <= 2), "
        f"RSS growth {v['rss_growth_pct']:.1f}% (target < 10%): **{'PASS' if v['pass'] else 'FAIL'}**",
        "",
        f"Overload at 3x ({over['rate']:.0f} req/s asked, {over['achieved_send_rps']:.0f} req/s actually sent by the "
        f"client) for {over['seconds']:.0f} s, 2 s deadline: codes {over['codes']}; OK throughput "
        f"{over['ok_rps']:.0f} req/s; shed share {100 * over['shed_share']:.0f}%; first RESOURCE_EXHAUSTED/UNAVAILABLE "
        f"after {over['first_fast_shed_after_s'] if over['first_fast_shed_after_s'] is None else round(over['first_fast_shed_after_s'], 2)} s; "
        "latency by code: " + "; ".join(
            f"{code} p50 {s['p50_ms']:.0f} ms p99 {s['p99_ms']:.0f} ms" for code, s in over["latency"].items()),
        "",
        f"Recovery at 50% ({rec['rate']:.0f} req/s) for {rec['seconds']:.0f} s: "
        + "; ".join(f"half {w['window']}: {w['requests']} requests, {w['failed']} failed, p99 {w['p99_ms']:.1f} ms"
                    for w in rec["windows"])
        + f": **{'PASS' if rec['verdict']['pass'] else 'FAIL'}**",
        "",
        f"Hot reload under load ({reload['rate']:.0f} req/s for {reload['seconds']:.0f} s; version 2 published at "
        f"{reload['published_at_s']:.1f} s, served from "
        + (f"{reload['version_2_at_s']:.1f} s" if "version_2_at_s" in reload else "never (FAIL)") + "): codes "
        f"{reload['codes']}; p99 per 5 s window: "
        + ", ".join(f"{w['p99_ms']:.0f}" if w["p99_ms"] is not None else "-" for w in reload["windows"])
        + f" ms: **{'PASS' if reload['pass'] else 'FAIL'}**",
        "",
        f"SIGTERM under load ({term['rate']:.0f} req/s, signal at {term['sigterm_at_s']:.1f} s): codes {term['codes']}, "
        f"in flight at the signal: {term['in_flight_at_sigterm'] or 'none'}, unclean statuses {term['unclean'] or 'none'}, "
        f"exit code {term['exit_code']}: **{'PASS' if term['pass'] else 'FAIL'}**",
    ]
    return "\n".join(lines)


def write_report(text: str, section: str = "soak") -> None:
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    body = REPORT.read_text() if REPORT.exists() else "# Reliability\n"
    if begin not in body:
        body += f"\n{begin}\n{end}\n"
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    REPORT.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.serving import export_ml1m_sized, free_port, histories, serve_command, start_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    parser.add_argument("--quick", action="store_true", help="about 2 minutes of load in all: proves the script works")
    parser.add_argument("--server-args", default="", help="extra `sasrec serve` flags")
    parser.add_argument("--channels", type=int, default=32,
                        help="client connections the load is spread over (default 32; --processes needs many)")
    parser.add_argument("--section", default="soak",
                        help="RELIABILITY.md section to write (default soak: the default server flags)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write RELIABILITY.md")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    command = "python -m benchmarks.soak " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    tmp = Path(tempfile.mkdtemp(prefix="sasrec-soak-"))
    proc = None
    try:
        base = tmp / "ml1m"
        export_ml1m_sized(base)
        users = histories(4096)
        port = free_port()
        proc = start_server(serve_command(base, port, ["--grace-period-s", "10", "--poll-interval-s", "1",
                                                       *args.server_args.split()]), port)
        results = asyncio.run(measure(f"127.0.0.1:{port}", users, args, proc, base))
        results["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    text = render(results, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.report:
        write_report(text, args.section)
    ok = (results["soak"]["verdict"]["pass"] and results["recovery"]["verdict"]["pass"] and results["reload"]["pass"]
          and results["sigterm"]["pass"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

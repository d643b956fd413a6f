"""Live histories: "append one event and recommend" from cached attention states vs stateless Recommend.

    python -m benchmarks.live_histories [--seconds 5] [--concurrency 1,8,16,32]

1. Exports the ML-1M-sized SASRec of ``benchmarks/serving.py`` (3,416 items, maxlen 200, d 50,
   2 blocks) with positions counted from the start, as the dense preset has them.
2. Stateless: `sasrec serve` answering Recommend with each user's whole history (4,096 ML-1M-like
   histories, cut to the store's 1,000 events per user), with each `--processes` value (default 1 and 2).
3. Live, once per store (SQLite, then a local `redis-server` with AOF everysec) with states computed in
   numpy (`--live-compute numpy`, the default) with each `--processes` value, then SQLite through the state
   signatures and SQLite without a state cache (one process): the same histories are stored, every user's
   state is built by one RecommendForUser call, then each request is one RecommendForUser call appending
   one new event (round robin over users). The share of answers
   continued from a cached state comes from the server's `sasrec_state_requests_total`. Each setting's CPU
   bound is the req/s the 2 cores allow at its CPU per request (server and client) at the most clients.
4. The stores alone: acknowledged appends/s from 1 and 8 threads; memory of a cached state by length.
5. Share of requests a state can serve when each user's events arrive one at a time (ML-1M, Beauty from
   ../shared/data when present): the first request of a user builds the state, later ones continue it
   while the window has room (positions from the start); positions from the end never continue.
6. In process, per call: continuing 1 and 16 states by one event in numpy and through the advance
   signature vs serving_default on the same histories, at d 50 and at d 128 (the dense preset's width).
Results go to the `live-histories` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.report import SHARED_DATA
from benchmarks.serving import (
    MAXLEN,
    P99_BUDGET_MS,
    POOLS_NOTE,
    export_ml1m_sized,
    free_port,
    histories,
    measure,
    serve_command,
)

USERS = 4096
STORED_EVENTS = 1000  # the store's default --max-events-per-user
# name: (folder in ../shared/data, file, its `sasrec prepare` format, the maxlen of its preset)
REPLAY_SETS = {"ML-1M": ("ml-1m", "ml-1m.txt.gz", "pairs", 200), "Beauty": ("beauty", "Beauty.txt", "sequences", 50)}


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
         "--appendonly", "yes", "--appendfsync", "everysec"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def state_outcomes(metrics_port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("sasrec_state_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def fill_and_warm(users: list[list[str]], target: str) -> None:
    """Store every user's history afresh, then build every user's state with one call."""
    from serving.client import RecommenderClient

    with RecommenderClient(target, timeout=60) as client:
        for u, history in enumerate(users):
            client.delete_user(f"user-{u}")
            client.append_events(f"user-{u}", history)
        for u in range(len(users)):
            client.recommend_for_user(f"user-{u}", k=10)


def append_one_calls(num_users: int, seed: int = 2):
    """``call(stub, i)``: RecommendForUser appending one random item to user ``i mod num_users``."""
    from benchmarks.serving import NUM_ITEMS
    from sasrec.v1 import recommender_pb2

    items = np.random.default_rng(seed).integers(1, NUM_ITEMS + 1, 1 << 16)

    def call(stub, i):
        request = recommender_pb2.RecommendForUserRequest(
            user_id=f"user-{i % num_users}", item_ids=[str(items[i % len(items)])], k=10)
        return stub.RecommendForUser(request, timeout=10)
    return call


def store_rates(url: str, appends: int = 2000) -> dict:
    """Acknowledged appends/s of one event, from 1 and from 8 threads (distinct users)."""
    from serving.history_store import open_history_store

    out = {}
    with open_history_store(url) as store:
        for threads in (1, 8):
            per_thread = appends // threads

            def work(t: int) -> None:
                for i in range(per_thread):
                    store.append(f"rate-{threads}-{t}-{i % 50}", ["1"], None, None)

            workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            out[threads] = per_thread * threads / (time.perf_counter() - start)
    return out


def state_bytes(base: Path) -> dict:
    """Bytes a cached state takes (arrays + the cache's per-entry overhead) by known history length: up to
    maxlen - 1 items with the keys and values that continue it, from maxlen on (a full window) without."""
    from sasrec.recommender import Recommender
    from serving.state_cache import ENTRY_OVERHEAD_BYTES

    rec = Recommender.load(base)
    out = {}
    for length in (1, 50, 100, MAXLEN - 1, MAXLEN, 1000):
        _, (state,) = rec.encode_states([[str(i) for i in range(1, length + 1)]], 10, True, [[]])
        out[length] = state.nbytes + ENTRY_OVERHEAD_BYTES
    return out


def in_process(base: Path, users: list[list[str]], batch: int, calls: int = 100) -> tuple[float, float, float]:
    """Milliseconds per call, in process: continuing ``batch`` users' states by one event in numpy and through
    the advance signature, and scoring the same users' whole histories with serving_default (histories under
    maxlen, so every state continues)."""
    import threadpoolctl

    from sasrec.recommender import Recommender

    threadpoolctl.threadpool_limits(limits=1, user_api="blas")  # as `sasrec serve` runs numpy
    rec, by_signature = Recommender.load(base), Recommender.load(base, host=False)
    rec.warm_up(batch)
    by_signature.warm_up(batch)
    short = [h for h in users if len(h) < MAXLEN - 1][: 16 * batch]
    _, states = rec.encode_states(short, 10, True, [[]] * len(short))

    def per_call(call) -> float:
        call(0)
        start = time.perf_counter()
        for i in range(calls):
            call(i)
        return 1000 * (time.perf_counter() - start) / calls

    rows = lambda i: slice((i * batch) % (len(short) - batch), (i * batch) % (len(short) - batch) + batch)  # noqa: E731
    advance = per_call(lambda i: rec.advance_states(states[rows(i)], [["5"]] * batch, 10, True, [[]] * batch))
    signature = per_call(lambda i: by_signature.advance_states(states[rows(i)], [["5"]] * batch, 10, True,
                                                               [[]] * batch))
    encode = per_call(lambda i: rec.recommend_batch(short[rows(i)], 10, True, [[]] * batch))
    return advance, signature, encode


def replay_share(lengths: np.ndarray, maxlen: int) -> float:
    """Share of one-event-at-a-time requests continued from a state (positions from the start, no eviction):
    a user's first request builds it; request j continues it while j <= maxlen."""
    return float(np.maximum(np.minimum(lengths, maxlen) - 1, 0).sum() / lengths.sum())


def real_lengths(folder: str, name: str, fmt: str) -> np.ndarray | None:
    """Events per user of a data set: ``pairs`` (a "user item" line per event) or ``sequences`` (a line per user)."""
    path = SHARED_DATA / folder / name
    if not path.is_file():
        return None
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = [line.split() for line in f if line.strip()]
    if fmt == "sequences":
        return np.array([len(fields) - 1 for fields in lines])
    return np.unique(np.array([fields[0] for fields in lines]), return_counts=True)[1]


def _processes(n: int) -> str:
    return "" if n == 1 else f", {n} processes"


def stateless_setting(n: int) -> str:
    return f"Recommend, whole history sent (stateless{_processes(n)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load level")
    parser.add_argument("--concurrency", default="1,8,16,32", help="closed-loop client counts")
    parser.add_argument("--channels", type=int, default=32, help="client connections the load is spread over")
    parser.add_argument("--state-cache-mb", type=float, default=1024, help="the live servers' --state-cache-mb")
    parser.add_argument("--no-redis", dest="redis", action="store_false", help="skip the Redis store")
    parser.add_argument("--processes", default="1,2",
                        help="`sasrec serve --processes` values for stateless and the numpy live servers")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    pools = [int(x) for x in args.processes.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="sasrec-live-"))
    redis_proc = None
    rows = []
    try:
        base = tmp / "ml1m"
        export_ml1m_sized(base, positions="from_start")
        models = {50: base, 128: tmp / "ml1m-d128"}  # d 128: the dense preset's width
        export_ml1m_sized(models[128], positions="from_start", hidden_units=128)
        users = [h[-STORED_EVENTS:] for h in histories(USERS)]
        known = np.array([len(h) for h in users])
        port = free_port()
        pool_of = {}  # setting -> its server processes
        for n in pools:
            pool_of[stateless_setting(n)] = n
            rows += measure(serve_command(base, port, ["--processes", str(n)]), port, users, levels, args.seconds,
                            1.0, stateless_setting(n), args.channels)
        stores = {"SQLite": f"sqlite:///{tmp / 'histories.db'}"}
        if args.redis and shutil.which("redis-server"):
            redis_proc, stores["Redis"] = start_redis(tmp)
        shares = {}
        # The numpy path's own effect (--live-compute signature: the state signatures through the micro-batcher)
        # and the cache's (--state-cache-mb 0: every stored history re-encoded by serving_default).
        runs = ([(name, url, args.state_cache_mb, "numpy", n) for n in pools for name, url in stores.items()]
                + [("SQLite", stores["SQLite"], args.state_cache_mb, "signature", 1),
                   ("SQLite", stores["SQLite"], 0, "numpy", 1)])
        for name, url, cache_mb, compute, n in runs:
            metrics_port = free_port()
            cmd = serve_command(base, port, ["--history-store", url, "--state-cache-mb", str(cache_mb),
                                             "--live-compute", compute, "--processes", str(n)])
            cmd[cmd.index("--metrics-port") + 1] = str(metrics_port)
            setting = (f"RecommendForUser, one new event ({name} store, "
                       + (f"cached states in {compute}" if cache_mb else "no state cache: re-encoded")
                       + _processes(n) + ")")
            pool_of[setting] = n
            counts = []

            def snapshot(_target, _port=metrics_port, _counts=counts):
                _counts.append(state_outcomes(_port))

            def prepare(target, _snapshot=snapshot):
                fill_and_warm(users, target)
                _snapshot(target)

            rows += measure(cmd, port, users, levels, args.seconds, 1.0, setting, args.channels,
                            call=append_one_calls(len(users)), prepare=prepare, finish=snapshot)
            delta = {k: counts[1].get(k, 0) - counts[0].get(k, 0) for k in counts[1]}
            shares[setting] = delta.get("continued", 0) / max(sum(delta.values()), 1)
        rates = {name: store_rates(f"sqlite:///{tmp / 'rates.db'}" if name == "SQLite" else url)
                 for name, url in stores.items()}
        sizes = state_bytes(base)
        calls = {(d, b): in_process(model, users, b) for d, model in models.items() for b in (1, 16)}
        for r in rows:
            r.pop("% of ceiling")
            r["answers continued from a state"] = (f"{100 * shares[r['setting']]:.0f}%"
                                                   if r["setting"] in shares else "")
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    def best(setting: str) -> dict | None:
        within = [r for r in rows if r["setting"] == setting and r["p99 ms"] <= P99_BUDGET_MS]
        return max(within, key=lambda r: r["throughput (req/s)"]) if within else None

    def cpu_bound(setting: str) -> float:
        """The req/s the 2 cores allow at the setting's CPU per request (server and client) at its most clients:
        what no scheduling, batching or locking change can exceed."""
        r = max((r for r in rows if r["setting"] == setting), key=lambda r: r["clients"])
        return 2000 / (r["server CPU ms/req"] + r["client CPU ms/req"])

    summary = []
    for n in pools:
        stateless = stateless_setting(n)
        base_best = best(stateless)
        one = next(r for r in rows if r["setting"] == stateless and r["clients"] == 1)
        summary.append(f"{stateless}: best within p99 <= {P99_BUDGET_MS:g} ms "
                       + (f"{base_best['throughput (req/s)']:.0f} req/s at {base_best['clients']} clients"
                          if base_best else "none") + f", unloaded p50 {one['p50 ms']:.2f} ms, CPU bound "
                       f"{cpu_bound(stateless):.0f} req/s.")
        for setting in sorted(s for s, m in pool_of.items() if m == n and s != stateless):
            b = best(setting)
            one = next(r for r in rows if r["setting"] == setting and r["clients"] == 1)
            ratio = b["throughput (req/s)"] / base_best["throughput (req/s)"] if b and base_best else float("nan")
            # The ratio above flips with stateless's p99 near the budget; at equal load it does not.
            equal = ", ".join(
                f"{r['clients']} {r['throughput (req/s)'] / s['throughput (req/s)']:.2f}x"
                for r in rows if r["setting"] == setting
                for s in rows if s["setting"] == stateless and s["clients"] == r["clients"])
            summary.append(
                f"{setting}: best within p99 <= {P99_BUDGET_MS:g} ms "
                + (f"{b['throughput (req/s)']:.0f} req/s at {b['clients']} clients ({ratio:.2f}x stateless)"
                   if b else "none") + f", unloaded p50 {one['p50 ms']:.2f} ms; req/s over stateless's at equal"
                f" clients: {equal}; CPU bound {cpu_bound(setting):.0f} req/s "
                f"({cpu_bound(setting) / cpu_bound(stateless):.2f}x stateless's).")
    shares = [f"this workload {100 * np.mean(known < MAXLEN):.0f}% of users (stored history under maxlen)"]
    for label, (folder, name, fmt, maxlen) in REPLAY_SETS.items():
        lengths = real_lengths(folder, name, fmt)
        if lengths is not None:
            shares.append(f"{label} replayed one event at a time {100 * replay_share(lengths, maxlen):.1f}% "
                          f"(maxlen {maxlen}; {len(lengths):,} users, mean {lengths.mean():.1f} events)")
    store_line = "; ".join(f"{name} {r[1]:,.0f} appends/s from 1 thread, {r[8]:,.0f} from 8" for name, r in rates.items())
    size_line = ", ".join(f"{n} items {b / 1024:.1f} KiB" for n, b in sizes.items())
    call_line = "; ".join(
        f"d {d}, {b} per call: continue in numpy {a:.2f} ms, through the advance signature {g:.2f} ms, re-encode "
        f"{e:.2f} ms ({e / a:.1f}x numpy)" for (d, b), (a, g, e) in calls.items())
    text = (" ".join(summary) + f" Requests a cached state can serve (positions from the start): {'; '.join(shares)};"
            " with positions from the end (the paper's, the sparse preset's) none that carry a new event."
            f" Stores (acknowledged one-event appends): {store_line}. Memory per cached state: {size_line}."
            f" In process, one event per state vs serving_default on the same histories (the live servers' "
            f"`--live-compute numpy` is the first figure): {call_line}.")
    print(text, flush=True)
    if args.report:
        from benchmarks.report import write_section

        notes_text = (
            "ML-1M-sized SASRec (3,416 items, maxlen 200, d 50, 2 blocks, positions from the start), random "
            f"weights; {USERS:,} users with ML-1M-like history lengths (median ~96, cut to {STORED_EVENTS:,} "
            "stored events). `sasrec serve` with its defaults and `--processes N` (1 unless the setting says); "
            "live servers add "
            f"`--history-store URL --state-cache-mb {args.state_cache_mb:g}` and get every state built before "
            "the load. Closed loop as in the serving section (`grpc.aio` clients in the benchmark process on the "
            f"same 2 cores, {args.channels} connections). {POOLS_NOTE} SQLite: WAL, synchronous=FULL (fsync per commit); Redis: "
            "AOF appendfsync everysec. " + text
            + " Targets: RecommendForUser with one new event >= 2x the stateless req/s, both within p99 <= 25 ms; "
            "unloaded p50 <= 2 ms.")
        write_section("live-histories", "Live histories: RecommendForUser from cached states vs stateless Recommend",
                      rows, notes_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

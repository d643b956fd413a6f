"""Serving latency and throughput of the ML-1M-sized model (maxlen 200, d 50, 3,416 items).

    python -m benchmarks.serving [--seconds 5] [--concurrency 1,16,64]

1. Exports a randomly initialised ML-1M-sized SASRec (weights do not change the cost) to a temporary
   model base, as `sasrec export` does by default (XLA off; ``--xla`` turns it on).
2. Ceiling: in-process batched SavedModel throughput (``Recommender.recommend_batch``, batch 64),
   best of three rounds.
3. Starts `sasrec serve` as a subprocess and drives it with closed-loop ``grpc.aio`` clients on
   localhost, spread over ``--channels`` connections: one client (unloaded latency), then N
   concurrent clients. Clients share the cores with the server, as they would on a single machine.
   Once per ``--processes`` value (``sasrec serve --processes N``: N processes share the port and
   the kernel spreads connections over them).
4. The same load against two floors (``benchmarks/serving_floor.py``): the server with a model that
   answers at once, and a bare gRPC server with a fixed answer; with the ceiling's CPU per user they
   bound what any Python gRPC server could serve here.
Results go to the `serving` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
NUM_ITEMS, MAXLEN, D = 3416, 200, 50
P99_BUDGET_MS = 25.0  # the throughput target is stated at this tail latency


def export_ml1m_sized(base: Path, xla: bool = False, config=None, **model_fields) -> None:
    """A randomly initialised SASRec over 3,416 items exported to ``base``: maxlen 200, d 50, 2 blocks unless
    ``model_fields`` (keyword arguments of :class:`sasrec.model.SASRec`) say otherwise, or the model of a
    :class:`sasrec.config.SASRecConfig` ``config``."""
    from pipelines.dataset import FIRST_ITEM_ID
    from sasrec.export import export_model
    from sasrec.model import SASRec, build_model

    vocab = np.array(["", "<oov>"] + [str(i) for i in range(1, NUM_ITEMS + 1)], dtype=object)
    rng = np.random.default_rng(0)
    counts = np.zeros(len(vocab), np.int64)
    counts[FIRST_ITEM_ID:] = rng.zipf(1.3, NUM_ITEMS).clip(1, 10_000)
    fields = dict(maxlen=MAXLEN, hidden_units=D, num_blocks=2, num_heads=1, dropout=0.2, positions="from_end")
    if config:
        model = build_model(config, len(vocab))  # built
    else:
        model = SASRec(vocab_size=len(vocab), **{**fields, **model_fields})
        model.build((None, model.maxlen))
    export_model(model, base, item_ids=vocab, train_counts=counts, source_run="benchmarks/serving.py",
                 jit_compile=xla)


def histories(n: int, seed: int = 1) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    # ML-1M users have 20..2,300 ratings, median ~96: lengths drawn around that, many longer than maxlen.
    lengths = rng.lognormal(np.log(96), 0.9, n).astype(int).clip(1, 2300)
    return [[str(i) for i in rng.integers(1, NUM_ITEMS + 1, length)] for length in lengths]


def ceiling(base: Path, users: list[list[str]], batch: int = 64, seconds: float = 5.0, rounds: int = 3) -> dict:
    from sasrec.recommender import Recommender

    rec = Recommender.load(base)
    rec.warm_up(batch)
    single = []
    for h in users[:300]:
        t = time.perf_counter()
        rec.recommend(h, k=10)
        single.append(time.perf_counter() - t)
    best = None
    for _ in range(rounds):  # best of several: a noisy neighbour must not lower the ceiling (and flatter the ratio)
        done, start, cpu, i = 0, time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - start < seconds:
            rec.recommend_batch(users[i : i + batch], k=10)
            done += batch
            i = (i + batch) % (len(users) - batch)
        rate, cpu_ms = done / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / done
        if best is None or rate > best[0]:
            best = (rate, cpu_ms)
    return {"users_per_s": best[0], "single_p50_ms": 1000 * float(np.median(single)), "cpu_ms": best[1]}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (Linux /proc): a `sasrec serve --processes N` pool."""
    try:
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except OSError:  # ended meanwhile
        return []
    return [pid] + [p for child in children for p in process_tree(child)]


def process_cpu_seconds(pid: int, tensorflow_pools: bool = False) -> float:
    """User + system CPU time of a process and its live descendants (Linux /proc); with
    ``tensorflow_pools``, only their TensorFlow thread-pool threads (named ``tf_*``), whose work the
    Python threads (gRPC handlers, batchers) hand over, apart from what those run inline themselves."""
    total = 0
    for p in process_tree(pid):
        tasks = sorted(Path(f"/proc/{p}/task").glob("*")) if tensorflow_pools else [Path(f"/proc/{p}")]
        for task in tasks:
            try:
                if tensorflow_pools and not (task / "comm").read_text().startswith("tf_"):
                    continue
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


POOLS_NOTE = ("Of which TensorFlow pools: the server's CPU in TensorFlow's thread-pool threads (named tf_*); the rest "
              "ran in Python threads (gRPC handlers, batchers, history-store calls and the TensorFlow work they run "
              "inline).")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, health: bool = True) -> subprocess.Popen:
    """Start a server process; return once it answers (``health``: once its health service says SERVING)."""
    import grpc

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    from serving.client import RecommenderClient

    end = time.monotonic() + 180
    # Several connections: with --processes N each lands on some process, and all must be ready.
    clients = [RecommenderClient(f"127.0.0.1:{port}", timeout=2, own_connection=True) for _ in range(8)]
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            if time.monotonic() > end:
                proc.kill()
                raise RuntimeError(f"{' '.join(cmd)}: not ready within 180 s")
            try:
                if all(c.health() == "SERVING" if health else c.recommend(["1"]).items for c in clients):
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    finally:
        for c in clients:
            c.close()


def serve_command(base: Path, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "sasrec", "serve", "--model-base", str(base), "--port", str(port),
            "--metrics-port", "-1", "--log-level", "WARNING", *extra]


def aio_channels(target: str, n: int, options: list | None = None) -> list:
    """``n`` ``grpc.aio`` channels to ``target``, each on its own TCP connection."""
    import grpc

    from serving.client import OWN_CONNECTION

    return [grpc.aio.insecure_channel(target, options=[*(options or []), OWN_CONNECTION]) for _ in range(n)]


def recommend_calls(users: list[list[str]]):
    """``call(stub, i)`` for :func:`closed_loop`: Recommend with the i-th history (round robin)."""
    from sasrec.v1 import recommender_pb2

    requests = [recommender_pb2.RecommendRequest(history=h, k=10) for h in users]
    return lambda stub, i: stub.Recommend(requests[i % len(requests)], timeout=10)


async def closed_loop(target: str, call, concurrency: int, seconds: float,
                      server_pid: int | None = None, channels: int = 1) -> dict:
    """``concurrency`` clients each awaiting ``call(stub, i)`` (i: the client's next request number) back to
    back for ``seconds``; throughput, latency percentiles and CPU per request."""
    import grpc

    from sasrec.v1 import recommender_pb2_grpc

    latencies: list[float] = []
    errors = [0]
    opened = aio_channels(target, channels)
    try:
        stubs = [recommender_pb2_grpc.RecommenderStub(channel) for channel in opened]
        for stub in stubs:
            for i in range(2):  # connect and warm
                await call(stub, i)
        stop_at = time.perf_counter() + seconds

        async def client(offset: int) -> None:
            stub = stubs[offset % channels]
            i = offset
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    await call(stub, i)
                    latencies.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    errors[0] += 1
                i += concurrency

        start, client_cpu = time.perf_counter(), time.process_time()
        server_cpu = process_cpu_seconds(server_pid) if server_pid else 0.0
        pools_cpu = process_cpu_seconds(server_pid, tensorflow_pools=True) if server_pid else 0.0
        await asyncio.gather(*(client(c) for c in range(concurrency)))
        elapsed = time.perf_counter() - start
        client_cpu = time.process_time() - client_cpu
        server_cpu = process_cpu_seconds(server_pid) - server_cpu if server_pid else float("nan")
        pools_cpu = process_cpu_seconds(server_pid, tensorflow_pools=True) - pools_cpu if server_pid else float("nan")
    finally:
        for channel in opened:
            await channel.close()
    lat = np.array(latencies) * 1000
    return {
        "server_cpu_ms": 1000 * server_cpu / max(len(lat), 1),
        "server_pools_cpu_ms": 1000 * pools_cpu / max(len(lat), 1),
        "client_cpu_ms": 1000 * client_cpu / max(len(lat), 1),
        "rps": len(lat) / elapsed,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "errors": errors[0],
    }


def measure(cmd: list[str], port: int, users, levels: list[int], seconds: float, ceiling_rate: float,
            setting: str, channels: int, health: bool = True, call=None, prepare=None, finish=None) -> list[dict]:
    """Closed-loop load at each level against the server ``cmd`` starts; one row per level. ``call``:
    the request (default: Recommend with ``users``' histories); ``prepare(target)``/``finish(target)``:
    run once before the first level / after the last, while the server runs."""
    proc = start_server(cmd, port, health)
    call = call or recommend_calls(users)
    rows = []
    try:
        if prepare is not None:
            prepare(f"127.0.0.1:{port}")
        for c in levels:
            r = asyncio.run(closed_loop(f"127.0.0.1:{port}", call, c, seconds, proc.pid, channels))
            share = 100 * r["rps"] / ceiling_rate
            print(f"{setting} clients={c}: {r['rps']:.0f} req/s ({share:.0f}% of ceiling), p50 {r['p50']:.2f} ms, "
                  f"p95 {r['p95']:.2f} ms, p99 {r['p99']:.2f} ms, errors {r['errors']}, "
                  f"CPU ms/req server {r['server_cpu_ms']:.3f} client {r['client_cpu_ms']:.3f}", flush=True)
            rows.append({"setting": setting, "clients": c, "throughput (req/s)": r["rps"], "p50 ms": r["p50"],
                         "p95 ms": r["p95"], "p99 ms": r["p99"], "% of ceiling": share, "errors": r["errors"],
                         "server CPU ms/req": r["server_cpu_ms"],
                         "of which TensorFlow pools": r["server_pools_cpu_ms"], "client CPU ms/req": r["client_cpu_ms"]})
        if finish is not None:
            finish(f"127.0.0.1:{port}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load level")
    parser.add_argument("--concurrency", default="1,8,16,32,64", help="closed-loop client counts")
    parser.add_argument("--server-args", default="", help="extra `sasrec serve` flags")
    parser.add_argument("--processes", default="1,2", help="`sasrec serve --processes` values to measure")
    parser.add_argument("--channels", type=int, default=32,
                        help="client connections the load is spread over (default 32; --processes needs many)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the echo and instant-model servers (benchmarks/serving_floor.py)")
    parser.add_argument("--xla", action="store_true", help="export with XLA (`sasrec export --xla`; default off, as there)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    pools = [int(x) for x in args.processes.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="sasrec-bench-"))
    try:
        base = tmp / "ml1m"
        export_ml1m_sized(base, xla=args.xla)
        users = histories(4096)
        ceil = ceiling(base, users, seconds=args.seconds)
        print(f"ceiling: {ceil['users_per_s']:.0f} users/s (in-process, batch 64); "
              f"single call p50 {ceil['single_p50_ms']:.2f} ms", flush=True)
        rows = [{"setting": "in-process SavedModel, batch 64 (ceiling)", "clients": "-",
                 "throughput (req/s)": ceil["users_per_s"], "p50 ms": ceil["single_p50_ms"],
                 "p95 ms": "", "p99 ms": "", "% of ceiling": 100.0, "errors": 0,
                 "server CPU ms/req": ceil["cpu_ms"], "of which TensorFlow pools": "", "client CPU ms/req": ""}]
        port = free_port()
        served = {}
        for n in pools:
            flags = [*args.server_args.split(), "--processes", str(n)]
            served[n] = ("gRPC `sasrec serve` (thread pool, micro-batching, "
                         + (f"{n} processes" if n > 1 else "1 process")
                         + (f", {args.server_args}" if args.server_args else "") + ")")
            rows += measure(serve_command(base, port, flags), port, users, levels, args.seconds,
                            ceil["users_per_s"], served[n], args.channels)
        floor = []
        if args.floor:
            floor_cmd = [sys.executable, "-m", "benchmarks.serving_floor"]
            floor += measure([*floor_cmd, "instant", "--port", str(port)], port, users, levels, args.seconds,
                             ceil["users_per_s"], "same server, instant model (no model cost)", args.channels)
            floor += measure([*floor_cmd, "echo", "--port", str(port)], port, users, levels, args.seconds,
                             ceil["users_per_s"], "gRPC floor: fixed answer, no server logic", args.channels,
                             health=False)
            rows += floor
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best_line = ""
    for n, setting in served.items():
        within = [r for r in rows if r["setting"] == setting and r["p99 ms"] <= P99_BUDGET_MS]
        best = max(within, key=lambda r: r["throughput (req/s)"]) if within else None
        best_line += (
            f" Best served throughput with p99 <= {P99_BUDGET_MS:g} ms, --processes {n}: "
            f"{best['throughput (req/s)']:.0f} req/s ({best['% of ceiling']:.0f}% of the ceiling) at "
            f"{best['clients']} clients (p99 {best['p99 ms']:.1f} ms)."
            if best else f" --processes {n}: no served level kept p99 <= {P99_BUDGET_MS:g} ms."
        )
    print(best_line.strip(), flush=True)
    bound = ""
    if floor:
        # Every served request costs at least the model's CPU per user (ceiling row) plus what a server
        # and the clients spend on one call (a floor row at its best level); on all cores that caps the
        # served rate. Bare gRPC: no Python gRPC server can do better; instant model: this server's own
        # stack (validation, batching, threads, metrics) on top, with no contention between them.
        def cap(prefix: str) -> tuple[float, dict]:
            row = max((r for r in floor if r["setting"].startswith(prefix)), key=lambda r: r["throughput (req/s)"])
            per_request = ceil["cpu_ms"] + row["server CPU ms/req"] + row["client CPU ms/req"]
            return 1000 * (os.cpu_count() or 1) / per_request, row

        bare, echo = cap("gRPC floor")
        stack, instant = cap("same server, instant model")
        bound = (f" CPU bound: model {ceil['cpu_ms']:.3f} + bare gRPC server {echo['server CPU ms/req']:.3f} + "
                 f"clients {echo['client CPU ms/req']:.3f} CPU ms per request on {os.cpu_count()} cores caps the "
                 f"served rate at {bare:.0f} req/s ({100 * bare / ceil['users_per_s']:.0f}% of the ceiling) with "
                 "every core busy and no server logic at all; with this server's stack (instant-model server "
                 f"{instant['server CPU ms/req']:.3f} + clients {instant['client CPU ms/req']:.3f} CPU ms per "
                 f"request) at {stack:.0f} req/s ({100 * stack / ceil['users_per_s']:.0f}% of the ceiling).")
        print(bound.strip(), flush=True)
    if args.report:
        from benchmarks.report import write_section

        notes = (
            "Ceiling: best of three 5 s rounds. ML-1M-sized SASRec (3,416 items, maxlen 200, d 50, 2 blocks), random weights, exported with "
            f"XLA {'on' if args.xla else 'off'}; histories with ML-1M-like lengths (median ~96, many > 200). "
            "Closed loop: each `grpc.aio` client sends its next request when the previous answer arrives; "
            f"clients run in the benchmark process on the same cores as the server, over {args.channels} "
            "connections. CPU ms/req: CPU time of the "
            "server's processes (ceiling row: of the in-process model calls, per user) and of the clients per answered "
            f"request. {POOLS_NOTE} Floor rows (`benchmarks/serving_floor.py`, same clients and port): the `sasrec serve` stack "
            "with a model that answers at once (its own cost: validation, batching, threads, metrics), and a "
            "bare thread-pool gRPC server returning a fixed 10-item answer (the cost of a Python gRPC call)."
            f"{best_line}{bound} Targets: unloaded (1 client) p50 <= 3 ms; served throughput as measured before "
            "(~780 req/s within p99 <= 25 ms, ~1,180 at most, one process); the earlier 60%-of-ceiling target is "
            "retired: it lies above the CPU bound printed here."
        )
        write_section("serving", "Serving: gRPC latency and throughput vs in-process ceiling", rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

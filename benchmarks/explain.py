"""Explanations: how faithful each attribution method is on ML-1M, and what explain costs.

    python -m benchmarks.explain --run RUN [--data ml-1m.txt.gz | --dataset DIR] [--users 1000] [--quick]

``RUN`` is a run folder trained on ML-1M (``sasrec train --data ...``); its vocabulary must be the
data's. Without the data (``../shared/data/ml-1m/ml-1m.txt.gz``, or ``$SASREC_SHARED_DATA``) the
benchmark says so and exits 0.

1. Faithfulness (deletion test). ``--users`` test users drawn with ``--seed`` (leave-one-out: the
   history is every event before the test item; the model reads its last ``maxlen``). The model
   recommends ``k`` items (seen items removed). For every method and every (user, recommended item):
   delete from the history the item the method ranks first, and, separately, one other item of the
   window drawn uniformly at random; re-score both shortened histories through the model (the window
   slides as it would for a real shorter history). A case passes when the item's score drops more
   for the top-attributed deletion than for the random one (strictly). Reported: the share of
   passing cases over all ``k`` recommended items and over the top-1 item alone, and the mean drops.
2. Cost. The same ``--cost-requests`` single-history requests (batch 1, k 10, 3 explanation items)
   through ``serving_default`` and through ``explain``, in alternation, median per call, in process on
   the serving module of every method; then the exported SavedModel of the default method through
   :class:`sasrec.recommender.Recommender` and through a gRPC server (``Recommend`` with and without
   ``explain``, one client, sequential).
Results go to the ``explain`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import SHARED_DATA  # noqa: E402

DATA = SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"
RECENCY = "most recent item (reference, no model)"


def load_dataset(args, tmp: Path):
    from pipelines.dataset import read_dataset
    from pipelines.prepare import prepare_file

    if args.dataset:
        return read_dataset(args.dataset)
    # The SASRec paper's file: "user item" lines in time order, leave-one-out, no k-core (as the quality section).
    return prepare_file("pairs", args.data, tmp / "ml-1m", kcore="none")


def batched(fn, arrays, size):
    """``fn`` on row chunks of ``arrays`` (same first dimension), outputs concatenated as numpy."""
    n = len(arrays[0])
    return np.concatenate([np.asarray(fn(*[a[i:i + size] for a in arrays])) for i in range(0, n, size)])


def faithfulness(model, ds, methods, *, users: int, k: int, seed: int, batch: int) -> list[dict]:
    import tensorflow as tf

    from sasrec.explain import attributions, block_inputs
    from sasrec.feed import pad_histories

    maxlen = int(model.maxlen)
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(ds.valid_end >= 2)  # a deletion must leave a history
    chosen = np.sort(rng.choice(eligible, size=min(users, len(eligible)), replace=False))
    histories = [ds.user_items(u)[: ds.valid_end[u]] for u in chosen]
    ids = pad_histories([h[-maxlen:] for h in histories], maxlen)

    scores_fn = tf.function(lambda x: model.score_last(x), reduce_retracing=True)
    logits = batched(scores_fn, [ids], batch)
    for row, history in enumerate(histories):
        logits[row, history] = -np.inf  # seen items are never recommended
    targets = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int32)
    base = np.take_along_axis(logits, targets, axis=1)

    def target_scores(rows: list[np.ndarray], items: np.ndarray) -> np.ndarray:
        padded = pad_histories([r[-maxlen:] for r in rows], maxlen)
        gather = tf.function(lambda x, t: tf.gather(model.score_last(x), t, batch_dims=1), reduce_retracing=True)
        return batched(gather, [padded, items], batch)

    lengths = np.minimum([len(h) for h in histories], maxlen)
    uniform = rng.random((len(histories), k))  # the random deletions' draws, the same for every method
    rows = []
    for method in methods:
        start = time.perf_counter()
        if method == RECENCY:  # the reference: always name the most recent item
            weights = np.broadcast_to(np.where(ids > 0, np.arange(maxlen), -np.inf)[:, None, :], (len(ids), k, maxlen))
        else:
            fn = tf.function(lambda x, t, m=method: attributions(model, x, *block_inputs(model, x), t, m),
                             reduce_retracing=True)
            weights = batched(fn, [ids, targets], max(8, batch // (4 * k)))
        seconds = time.perf_counter() - start
        top = weights.argmax(axis=2)  # (users, k) position in the padded window
        deleted_top, deleted_random = [], []
        for u, history in enumerate(histories):
            pad = maxlen - lengths[u]
            first = len(history) - lengths[u]  # history index of the window's first item
            for j in range(k):
                p = top[u, j] - pad
                others = [q for q in range(lengths[u]) if q != p]
                r = others[int(uniform[u, j] * len(others))]
                deleted_top.append(np.delete(history, first + p))
                deleted_random.append(np.delete(history, first + r))
        flat_targets = targets.reshape(-1, 1)
        drop_top = base.reshape(-1) - target_scores(deleted_top, flat_targets)[:, 0]
        drop_random = base.reshape(-1) - target_scores(deleted_random, flat_targets)[:, 0]
        wins = (drop_top > drop_random).reshape(len(histories), k)
        rows.append({
            "method": method,
            "faithful (all k)": f"{100 * wins.mean():.1f}%",
            "faithful (top-1 item)": f"{100 * wins[:, 0].mean():.1f}%",
            "top = most recent item": f"{100 * (top == maxlen - 1).mean():.1f}%",
            "mean drop, top-attributed": round(float(drop_top.mean()), 4),
            "mean drop, random": round(float(drop_random.mean()), 4),
            "attribution s / 1k users": round(seconds * 1000 / len(histories), 2),
        })
        print(rows[-1], flush=True)
    return rows


def _alternate(plain, explain, repeats: int) -> tuple[float, float]:
    """Median ms per call of ``plain(i)`` and ``explain(i)``, called in alternation on the same requests."""
    for i in range(3):
        plain(i), explain(i)
    times = ([], [])
    for i in range(repeats):
        for fn, out in ((plain, times[0]), (explain, times[1])):
            start = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def cost_rows(model, ds, run, methods, requests: list[list[str]], k: int, items: int, tmp: Path) -> list[dict]:
    import tensorflow as tf

    from sasrec.export import build_serving_module, export_run
    from sasrec.explain import DEFAULT_METHOD
    from sasrec.recommender import Recommender

    rows = []
    item_ids, _, train_counts = run.items()
    tensors = [tf.constant(np.array([r], dtype=object), tf.string) for r in requests]
    none = tf.constant(np.zeros((1, 0), dtype=object), tf.string)
    common = lambda i: dict(history=tensors[i % len(tensors)], k=tf.constant(k), exclude_seen=tf.constant(True),  # noqa: E731
                            exclude_item_ids=none)
    for method in methods:
        module = build_serving_module(model, item_ids, train_counts, explain_method=method)
        plain, explained = _alternate(lambda i: module.recommend(**common(i)),
                                      lambda i: module.explain(**common(i), explain_items=tf.constant(items)),
                                      len(requests))
        rows.append({"path": f"in process, serving module ({method})", "plain ms": round(plain, 2),
                     "explain ms": round(explained, 2), "ratio": round(explained / plain, 2)})
        print(rows[-1], flush=True)

    base = tmp / "models" / "ml-1m"
    export_run(run.path, base)
    rec = Recommender.load(base)
    plain, explained = _alternate(lambda i: rec.recommend_batch([requests[i % len(requests)]], k=k),
                                  lambda i: rec.explain_batch([requests[i % len(requests)]], k=k, explain_items=items),
                                  len(requests))
    rows.append({"path": f"exported SavedModel, Recommender ({DEFAULT_METHOD})", "plain ms": round(plain, 2),
                 "explain ms": round(explained, 2), "ratio": round(explained / plain, 2)})
    print(rows[-1], flush=True)

    from serving.client import RecommenderClient
    from serving.server import RecommenderServer, ServerConfig

    # In this process TensorFlow already runs (the model above): leave its thread pools as they are.
    server = RecommenderServer(ServerConfig(model_base=str(base), port=0, metrics_port=0, intra_op_threads=0,
                                            inter_op_threads=0, cpu_scheduling="default")).start()
    try:
        if not server.wait_ready(120):
            raise RuntimeError("the server did not become ready")
        with RecommenderClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            plain, explained = _alternate(
                lambda i: client.recommend(requests[i % len(requests)], k=k),
                lambda i: client.recommend(requests[i % len(requests)], k=k, explain_items=items), len(requests))
    finally:
        server.stop(1)
    rows.append({"path": f"gRPC Recommend ({DEFAULT_METHOD})", "plain ms": round(plain, 2),
                 "explain ms": round(explained, 2), "ratio": round(explained / plain, 2)})
    print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from sasrec.explain import DEFAULT_METHOD, METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder trained on ML-1M")
    parser.add_argument("--data", type=Path, default=DATA, help="ml-1m.txt.gz (prepared here, leave-one-out)")
    parser.add_argument("--dataset", type=Path, help="an already prepared dataset folder of the same data")
    parser.add_argument("--users", type=int, default=1000, help="test users of the deletion test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-k", type=int, default=10, help="recommended items per user")
    parser.add_argument("--explain-items", type=int, default=3, help="explanation items per recommended item (cost)")
    parser.add_argument("--cost-requests", type=int, default=300, help="requests timed per path")
    parser.add_argument("--methods", default=",".join(METHODS), help="attribution methods to compare (the "
                        "most-recent-item reference is always added)")
    parser.add_argument("--batch", type=int, default=256, help="histories per model call (deletion test)")
    parser.add_argument("--quick", action="store_true", help="200 users, 100 requests")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.cost_requests = min(args.users, 200), min(args.cost_requests, 100)
    if args.dataset is None and not Path(args.data).is_file():
        print(f"skipped: ML-1M not found at {args.data} (the shared data folder is absent; set "
              f"SASREC_SHARED_DATA or give --data / --dataset)")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")

    from sasrec.run import RunFolder

    run = RunFolder(args.run)
    model = run.load_best()
    with tempfile.TemporaryDirectory(prefix="sasrec-explain-") as tmp:
        tmp = Path(tmp)
        ds = load_dataset(args, tmp)
        item_ids = run.items()[0]
        if list(map(str, item_ids)) != list(map(str, ds.item_ids)):
            raise SystemExit(f"{args.run}: its vocabulary is not the data's; train the run on this data")
        print(f"deletion test: {args.users} test users, k {args.k}, seed {args.seed}", flush=True)
        faithful = faithfulness(model, ds, methods + [RECENCY], users=args.users, k=args.k, seed=args.seed, batch=args.batch)
        rng = np.random.default_rng(args.seed + 1)
        users = rng.choice(np.flatnonzero(ds.valid_end >= 1), size=args.cost_requests, replace=False)
        requests = [[str(ds.item_ids[i]) for i in ds.user_items(u)[: ds.valid_end[u]]] for u in users]
        cost = cost_rows(model, ds, run, methods, requests, args.k, args.explain_items, tmp)

    metrics = run.read_metrics() or {}
    quality = ""
    for result in metrics.get("results", []):
        if result.get("protocol", {}).get("protocol") == "full" and result.get("protocol", {}).get("split") == "test":
            quality = f" (test NDCG@10 {result['metrics']['ndcg@10']:.4f}, HR@10 {result['metrics']['hr@10']:.4f})"
    notes = f"""
Model: `{args.run}`{quality}. Deletion test: {args.users} seeded test users (seed
{args.seed}), k = {args.k} recommended items each (seen items removed); for each (user, item) the
method's top-attributed history item is deleted and, separately, a uniformly drawn other item of the
window; both shortened histories are re-scored through the model. "faithful" = share of cases where
the item's score dropped more for the top-attributed deletion (strictly). Cost: {args.cost_requests}
single-history requests (batch 1, k {args.k}, {args.explain_items} explanation items), plain and explain
in alternation, median per call. The exported model explains with `{DEFAULT_METHOD}`.

Cost:

{_table(cost)}"""
    if args.report:
        from benchmarks.report import write_section

        write_section("explain", "Explanations: faithfulness (deletion test on ML-1M) and cost", faithful, notes)
    else:
        print(_table(faithful))
        print(notes)
    return 0


def _table(rows):
    from benchmarks.report import markdown_table

    return markdown_table(rows)


if __name__ == "__main__":
    raise SystemExit(main())

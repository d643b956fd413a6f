"""CLI commands ``train``, ``evaluate``, ``export`` and ``score``: the model's life outside a server (Keras and
TensorFlow load inside the functions)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipelines.dask_cluster import add_dask_arguments, check_dask_arguments
from pipelines.errors import InputError

BACKENDS = ("tensorflow", "jax", "torch")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train SASRec on a dataset folder",
        description="Train SASRec on a dataset folder made by `sasrec prepare`. A run folder that already "
        "holds checkpoints is resumed. Settings: --config FILE (TOML, see configs/), then --set key=value.",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset folder (from `sasrec prepare`)")
    p.add_argument("--out", required=True, type=Path, help="run folder to create or resume")
    p.add_argument("--config", help="TOML config file, or a preset: dense | sparse (default: the preset that fits "
                   "the data, dense when the mean history has >= 30 events)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field (repeatable)")
    p.add_argument("--backend", choices=BACKENDS, help="Keras backend (default: $KERAS_BACKEND or tensorflow)")
    p.add_argument("--epochs", type=int, help="shortcut for --set epochs=N")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None, help="XLA-compile steps (config jit_compile)")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 compute")
    p.add_argument("--devices", type=int, default=1, help="data-parallel over this many local devices (TF MirroredStrategy / JAX DataParallel)")
    p.add_argument("--multi-worker", action="store_true",
                   help="train together with the other processes or machines that run this same command (tensorflow: "
                   "MultiWorkerMirroredStrategy, cluster and task from $TF_CONFIG; jax: jax.distributed, from the "
                   "three flags below or, without them, detected on Slurm); --data and --out on a shared filesystem; "
                   "worker 0 alone writes the run folder (README: Training on several machines)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="jax --multi-worker: address of worker 0, reachable from every worker (default $SASREC_COORDINATOR)")
    p.add_argument("--num-workers", type=int, help="jax --multi-worker: number of workers (default $SASREC_NUM_WORKERS)")
    p.add_argument("--worker-index", type=int,
                   help="jax --multi-worker: this worker's index, 0 = the chief (default $SASREC_WORKER_INDEX)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run (HR, NDCG, MRR at 1/5/10/20)",
        description="Evaluate RUN/best.keras. Protocols: full (every item, seen items removed) and "
        "sampled-100 (100 uniform unseen negatives, the SASRec paper's). The results replace those of the same "
        "split and protocol in RUN/metrics.json, with repeat targets and the metrics counting them as misses.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (from `sasrec train`)")
    p.add_argument("--data", type=Path, help="dataset folder (default: the one the run was trained on; another "
                   "folder must hold the same manifest and vocabulary)")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--protocol", choices=("full", "sampled-100", "both"), default="full")
    p.add_argument("--max-users", type=int, default=None,
                   help="evaluate a seeded sample of this many users (0: all; default: the run's eval_max_users)")
    p.add_argument("--backend", choices=BACKENDS)
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "export",
        help="export a trained run as a SavedModel version (models/NAME/<N>/)",
        description="Write the run's best model, vocabulary, top-k and model card as the next integer "
        "version of a model base, atomically (TensorFlow Serving layout).",
    )
    p.add_argument("--run", required=True, help="run folder written by `sasrec train`")
    p.add_argument("--model-base", required=True, help="model base folder, e.g. models/ml-1m")
    p.add_argument("--version", type=int, help="version number (default: newest + 1)")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=False,
                   help="XLA-compile the scoring part (default off: it compiles one program per batch size and "
                   "sequence width when a server warms the version, and on a small CPU machine it served no faster; "
                   "BENCHMARKS.md, section serving; serve XLA exports with --inter-op-threads 2)")
    p.add_argument("--explain-method", default=None,
                   help="attribution method of the explain signature (default rollout_occlusion, the one measured "
                   "faithful and cheap: README, Explanations; others: grad_occlusion, grad_input, "
                   "grad_input_last_block, integrated_gradients, attention, rollout, attention_value)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "score",
        help="batch-score users from a parquet/CSV file with an exported model (no server needed)",
        description="Recommend k items for every user of an events file (one row per event: user, item, "
        "optional timestamp) or a history file (one row per user, a list-valued history column), with the "
        "same history rules as the gRPC service. Writes a long table user_id, rank, item_id, score, "
        "cold_start, unknown_count atomically. In CSV, list cells (--history-col, --exclude-col) hold ids "
        "separated by --list-sep. With --engine dask the input is shuffled by user over a Dask cluster, each "
        "worker loads the model once and scores whole users, and --output is a folder of Parquet parts.",
    )
    p.add_argument("--model", required=True, help="model base (newest version) or a version folder")
    p.add_argument("--input", required=True, help="events or histories: .parquet or .csv (dask: also a folder of "
                   "Parquet files or a glob such as 'events/*.parquet')")
    p.add_argument("--output", required=True, help="recommendations: .parquet or .csv (dask: a folder of Parquet "
                   "parts that the workers can write); written atomically")
    p.add_argument("-k", type=int, default=10, help="items per user (default 10)")
    p.add_argument("--user-col", default="user_id", help="user id column (default user_id)")
    p.add_argument("--item-col", default="item_id", help="item id column of an events file (default item_id)")
    p.add_argument("--time-col", default=None,
                   help="timestamp column of an events file (default: 'timestamp' if present, else row order)")
    p.add_argument("--history-col", default=None, help="list-valued history column: the file has one row per user")
    p.add_argument("--exclude-col", default=None, help="list-valued column of item ids to leave out, per user")
    p.add_argument("--exclude", default="", help="comma-separated item ids to leave out for everyone")
    p.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    p.add_argument("--chunk-size", "--batch-size", dest="chunk_size", type=int, default=None,
                   help="users per model call (default 1024)")
    p.add_argument("--list-sep", default=" ", help="separator of ids inside CSV list cells (default: space)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_dask_arguments(p)
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser(
        "explain",
        help="recommend for one history and show which history items drove each item",
        description="Recommend k items for a history with an exported model (the explain signature: the same "
        "items and scores as the service) and print, for each, the history items that contributed most to its "
        "score with their weights (the model card's explain_method; README: Explanations). --plot draws the "
        "attention of the last position over the history, per block and head, as a PNG heat map.",
    )
    p.add_argument("--model", required=True, help="model base (newest version) or a version folder")
    p.add_argument("--history", required=True, help="comma-separated item ids, oldest first")
    p.add_argument("-k", type=int, default=10, help="items (default 10)")
    p.add_argument("--items", type=int, default=3, help="history items per explanation (default 3)")
    p.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    p.add_argument("--exclude", default="", help="comma-separated item ids to leave out")
    p.add_argument("--plot", help="write the attention heat map to this PNG file")
    p.set_defaults(func=cmd_explain)


def select_backend(name: str | None) -> None:
    """Keras reads KERAS_BACKEND once, at import: set it before anything imports keras."""
    if name:
        os.environ["KERAS_BACKEND"] = name
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_config(args) -> "SASRecConfig":  # noqa: F821
    from pipelines.dataset import read_manifest
    from sasrec.config import PRESETS, SASRecConfig

    if args.config in PRESETS:
        config = SASRecConfig.preset(args.config)
    elif args.config:
        config = SASRecConfig.from_toml(args.config)
    else:
        mean_length = read_manifest(args.data)["statistics"]["mean_length"]
        name = SASRecConfig.preset_for(mean_length)
        print(f"Config: the {name} preset (mean history length {mean_length:.1f}); see configs/{name}.toml")
        config = SASRecConfig.preset(name)
    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    if args.xla is not None:
        overrides.append(f"jit_compile={str(args.xla).lower()}")
    if args.mixed_precision is not None:
        overrides.append(f"mixed_precision={str(args.mixed_precision).lower()}")
    return config.with_overrides(overrides)


def cluster_flag(args, name: str, env: str, kind=str):
    """A --multi-worker flag's value, else its environment variable's, else None."""
    value = getattr(args, name)
    raw = os.environ.get(env, "") if value is None else ""
    if not raw:
        return value
    try:
        return kind(raw)
    except ValueError:
        raise InputError(f"{env}={raw!r}: not an integer (it stands for --{name.replace('_', '-')})") from None


def cmd_train(args) -> int:
    select_backend(args.backend)
    from sasrec import distributed

    given = [f for f in ("coordinator", "num_workers", "worker_index") if getattr(args, f) is not None]
    if given and not args.multi_worker:
        raise InputError(f"--{given[0].replace('_', '-')} is a --multi-worker setting; add --multi-worker")
    if args.multi_worker and args.devices != 1:
        raise InputError("--multi-worker uses every device of each worker; leave out --devices")
    distributed.expose_host_devices(args.devices)
    if not (args.data / "manifest.json").is_file():
        raise InputError(f"--data {args.data}: not a dataset folder (no manifest.json); make one with `sasrec prepare`")
    cluster = None
    if args.multi_worker:  # before the backend computes anything
        cluster = distributed.join_cluster(
            os.environ.get("KERAS_BACKEND", "tensorflow"),
            cluster_flag(args, "coordinator", distributed.COORDINATOR_ENV),
            cluster_flag(args, "num_workers", distributed.NUM_WORKERS_ENV, int),
            cluster_flag(args, "worker_index", distributed.WORKER_INDEX_ENV, int),
        )
        print(f"Worker {cluster.index} of {cluster.size}{' (chief: writes the run folder)' if cluster.is_chief else ''}")
    config = load_config(args)
    from sasrec.train import check_tensorboard, train

    check_tensorboard(config)
    verbose = 0 if args.quiet else "auto"
    if cluster is not None:
        result = train(args.data, args.out, config, verbose=verbose, cluster=cluster)
        if result is None:
            print(f"Worker {cluster.index} done; worker 0 wrote the run folder {args.out}")
            return 0
    else:
        with distributed.data_parallel(args.devices) as strategy:
            if strategy is not None:
                print(f"Training on {args.devices} device(s) ({type(strategy).__name__})")
            result = train(args.data, args.out, config, verbose=verbose)
    print_results(result)
    return 0


def cmd_evaluate(args) -> int:
    select_backend(args.backend)
    from sasrec.evaluate import evaluate_run

    protocols = ("full", "sampled-100") if args.protocol == "both" else (args.protocol,)
    if args.max_users is not None and args.max_users < 0:
        raise InputError(f"--max-users must be >= 0 (0: every user), got {args.max_users}")
    result = evaluate_run(args.run, splits=(args.split,), protocols=protocols, data_dir=args.data,
                          max_users=args.max_users)
    print_results(result)
    return 0


def print_results(result: dict) -> None:
    ks = (1, 5, 10, 20)
    header = f"{'split':<6} {'protocol':<12} {'model':<22} " + " ".join(
        f"{m + '@' + str(k):>8}" for m in ("hr", "ndcg", "mrr") for k in ks)
    print(header)
    for r in result["results"]:
        p = r["protocol"]
        for name, key in (("sasrec", "metrics"), ("sasrec, repeats missed", "deliverable_metrics"),
                          ("popularity", "popularity")):
            metrics = r.get(key)
            if metrics:
                row = " ".join(f"{metrics[f'{m}@{k}']:>8.4f}" for m in ("hr", "ndcg", "mrr") for k in ks)
                print(f"{p['split']:<6} {p['protocol']:<12} {name:<22} {row}")
    for r in result["results"][:1]:
        users = r["protocol"]["users_evaluated"]
        print(f"users evaluated: {users:,}; targets that repeat an item of the history: {r['repeat_targets']:,} "
              f"({r['repeat_targets'] / users:.1%}; 'repeats missed' counts them as misses, as the service with "
              "exclude_seen would); protocol details in metrics.json")
    if "training" in result:
        t = result["training"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}))


def cmd_export(args: argparse.Namespace) -> int:
    from sasrec.export import export_run

    options = {} if args.explain_method is None else {"explain_method": args.explain_method}
    target = export_run(args.run, args.model_base, version=args.version, jit_compile=args.xla, **options)
    print(f"exported {args.run} -> {target}")
    return 0


SCORE_FORMATS = (".parquet", ".csv")


def split_ids(text: str) -> list[str]:
    """A comma-separated id list of a flag (``--exclude a,b``), blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_explain(args: argparse.Namespace) -> int:
    select_backend(None)
    from sasrec.recommender import Recommender

    if args.plot and not args.plot.lower().endswith(".png"):
        raise InputError(f"--plot: {args.plot} must be a .png file")
    history = split_ids(args.history)
    rec = Recommender.load(args.model)
    result = rec.explain_batch([history], k=args.k, exclude_seen=not args.include_seen,
                               exclude_item_ids=split_ids(args.exclude), explain_items=args.items)
    row = result.row(0)
    method = rec.card.get("explain_method", "")
    print(f"{'rank':>4}  {'item_id':<24} {'score':>10}  because of ({method}: weight)")
    for rank, ((item, score), explanation) in enumerate(zip(row, row.explanations), 1):
        because = ", ".join(f"{name} ({weight:.3g})" for name, weight in explanation)
        print(f"{rank:>4}  {item:<24} {score:>10.4f}  {because}")
    notes = [f"model v{rec.version}" if rec.version is not None else f"model {rec.path}"]
    if row.unknown_count:
        notes.append(f"{row.unknown_count} unknown history ids ignored")
    if row.cold_start:
        notes.append("cold start: popularity ranking, nothing to explain")
    print("(" + "; ".join(notes) + ")")
    if args.plot:
        from sasrec.explain import plot_attention

        plot_attention(result.attention[0], result.window_item_ids[0], args.plot,
                       title=f"attention of the last position over the history (model v{rec.version})")
        print(f"attention heat map: {args.plot}")
    return 0


def _table_format(path: str, what: str) -> str:
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if suffix not in SCORE_FORMATS:
        raise InputError(f"{what} {path}: unknown extension {suffix or '(none)'!r}; use .parquet or .csv")
    return suffix


def read_score_input(path: str, *, id_cols=(), list_cols=(), list_sep: str = " "):
    """Read ``--input``: ids as strings in CSV (``007`` stays ``007``), list cells split on ``list_sep``."""
    import os

    import pandas as pd

    fmt = _table_format(path, "--input")
    if not os.path.isfile(path):
        raise InputError(f"--input {path}: file not found")
    try:
        if fmt == ".parquet":
            return pd.read_parquet(path)
        header = pd.read_csv(path, nrows=0).columns
        dtypes = {c: str for c in (*id_cols, *list_cols) if c and c in header}
        frame = pd.read_csv(path, dtype=dtypes or None)
    except (OSError, ValueError) as exc:
        raise InputError(f"--input {path}: cannot read it as {fmt[1:]}: {exc}") from None
    return split_list_cells(frame, list_cols, list_sep)


def split_list_cells(frame, list_cols, list_sep: str):
    """CSV list cells (``"a b c"``) as lists of ids; an empty cell is an empty list."""
    import pandas as pd

    return frame.assign(**{
        col: [[] if pd.isna(v) else [x for x in str(v).split(list_sep) if x] for v in frame[col].to_numpy(dtype=object)]
        for col in list_cols if col and col in frame.columns
    })


def write_score_output(frame, path: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipelines.atomic import atomic_file

    fmt = _table_format(path, "--output")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_file(path, "wb") as handle:
        if fmt == ".parquet":
            pq.write_table(table, handle)
        else:
            pacsv.write_csv(table, handle)


def cmd_score(args: argparse.Namespace) -> int:
    import time

    from sasrec.recommender import DEFAULT_CHUNK_SIZE, Recommender

    check_dask_arguments(args)
    options = dict(
        k=args.k, user_col=args.user_col, item_col=args.item_col,
        time_col=args.time_col if args.time_col is not None else "timestamp",
        history_col=args.history_col, exclude_col=args.exclude_col, exclude_item_ids=split_ids(args.exclude),
        exclude_seen=not args.include_seen, chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
    )
    if args.engine == "dask":
        return score_on_dask(args, options)
    _table_format(args.output, "--output")  # fail before the (slow) load
    frame = read_score_input(args.input, id_cols=(args.user_col, args.item_col),
                             list_cols=(args.history_col, args.exclude_col), list_sep=args.list_sep)
    rec = Recommender.load(args.model)
    start = time.perf_counter()
    recs = rec.score_frame(frame, progress=None if args.progress else False, **options)
    seconds = time.perf_counter() - start
    write_score_output(recs, args.output)
    users = recs["user_id"].nunique()
    print(f"scored {users:,} users ({int(recs.drop_duplicates('user_id')['cold_start'].sum()):,} cold start) "
          f"with {rec.path} in {seconds:.1f} s -> {args.output} ({len(recs):,} rows)")
    return 0


def score_on_dask(args: argparse.Namespace, options: dict) -> int:
    """``sasrec score --engine dask``: read lazily, check columns and k on this machine, then shuffle,
    score and write the Parquet parts on the cluster."""
    import time

    import pandas as pd

    from pipelines.dask_cluster import dask_client
    from sasrec import dask_scoring

    if Path(args.output).suffix.lower() == ".csv":
        raise InputError(f"--output {args.output}: --engine dask writes a folder of Parquet parts, not CSV")
    csv = args.input.lower().endswith(".csv")  # a file or a glob; anything else is Parquet
    frame = dask_scoring.read_table(args.input, csv=csv,
                                    text_cols=(args.user_col, args.item_col, args.history_col, args.exclude_col))
    list_cols = [c for c in (args.history_col, args.exclude_col) if c and c in frame.columns]
    if csv and list_cols:
        frame = frame.map_partitions(split_list_cells, list_cols, args.list_sep,
                                     meta=frame._meta.assign(**{c: pd.Series(dtype=object) for c in list_cols}))
    recs = dask_scoring.score_dask(args.model, frame, **options)
    with dask_client(args.scheduler, workers=args.workers, memory_limit=args.memory_limit) as client:
        start = time.perf_counter()
        rows = dask_scoring.write_parquet(recs, args.output)
        seconds = time.perf_counter() - start
        workers = len(client.scheduler_info()["workers"])
    print(f"scored {args.input} with {args.model} on {workers} Dask worker(s) in {seconds:.1f} s -> "
          f"{args.output}/ ({rows:,} rows, {recs.npartitions} parts)")
    return 0

"""CLI commands ``export``, ``serve``, ``recommend`` and ``score`` (TensorFlow and gRPC load inside the functions)."""

from __future__ import annotations

import argparse

from pipelines.errors import InputError


def register(subparsers) -> None:
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
                   help="XLA-compile the scoring part (default off: on 2 CPU cores it served no faster than the "
                   "plain graph, and it compiles one program per batch size and sequence width, ~20 s of warm-up "
                   "for an ML-1M-sized model; serve XLA exports with --inter-op-threads 2)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "serve",
        help="serve a model base over gRPC (health, reflection, metrics, hot reload)",
        description="gRPC recommendation server with micro-batching, hot reload of new versions, "
        "Prometheus metrics, optional TLS and bearer-token auth. SIGTERM drains and exits 0.",
    )
    from serving.server import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "recommend",
        help="ask a running server for recommendations and print a table",
        description="Call Recommend on a running server (sasrec serve) and print the items.",
    )
    p.add_argument("--target", default="localhost:8500", help="HOST:PORT of the server (default localhost:8500)")
    p.add_argument("--history", default="", help="comma-separated item ids, oldest first")
    p.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    p.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    p.add_argument("--exclude", default="", help="comma-separated item ids to leave out")
    p.add_argument("--user-id", default="", help="user id for the server's logs")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds (default 5)")
    p.add_argument("--tls-ca", help="CA certificate (PEM): connect with TLS")
    p.add_argument("--auth-token", help="bearer token (or SASREC_AUTH_TOKEN)")
    p.add_argument("--auth-token-file", help="file holding the bearer token")
    p.add_argument("--info", action="store_true", help="print the model info instead of recommending")
    p.set_defaults(func=cmd_recommend)

    p = subparsers.add_parser(
        "score",
        help="batch-score users from a parquet/CSV file with an exported model (no server needed)",
        description="Recommend k items for every user of an events file (one row per event: user, item, "
        "optional timestamp) or a history file (one row per user, a list-valued history column), with the "
        "same history rules as the gRPC service. Writes a long table user_id, rank, item_id, score, "
        "cold_start, unknown_count atomically. In CSV, list cells (--history-col, --exclude-col) hold ids "
        "separated by --list-sep.",
    )
    p.add_argument("--model", required=True, help="model base (newest version) or a version folder")
    p.add_argument("--input", required=True, help="events or histories: .parquet or .csv")
    p.add_argument("--output", required=True, help="recommendations: .parquet or .csv (written atomically)")
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
    p.set_defaults(func=cmd_score)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_export(args: argparse.Namespace) -> int:
    from sasrec.export import export_run

    target = export_run(args.run, args.model_base, version=args.version, jit_compile=args.xla)
    print(f"exported {args.run} -> {target}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from serving.server import config_from_args, serve

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(config_from_args(args))


def cmd_recommend(args: argparse.Namespace) -> int:
    import grpc

    from serving.client import RecommenderClient, format_table
    from serving.security import read_token

    token = read_token(args.auth_token, args.auth_token_file)
    with RecommenderClient(args.target, token=token, tls_ca=args.tls_ca, timeout=args.timeout) as client:
        try:
            if args.info:
                info = client.model_info()
                print(f"model {info.model_name} v{info.model_version}: {info.num_items} items, "
                      f"maxlen {info.maxlen}, max_k {info.max_k}, exported {info.exported_at} from {info.source_run}")
                return 0
            response = client.recommend(
                _split(args.history), k=args.k, exclude_seen=not args.include_seen,
                exclude_item_ids=_split(args.exclude), user_id=args.user_id,
            )
        except grpc.RpcError as exc:
            raise InputError(f"{args.target}: {exc.code().name}: {exc.details()}") from None
    print(format_table(response))
    return 0


SCORE_FORMATS = (".parquet", ".csv")


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
    for col in list_cols:
        if col and col in frame.columns:
            frame[col] = [[] if isinstance(v, float) or v is None else [x for x in str(v).split(list_sep) if x]
                          for v in frame[col].to_numpy(dtype=object)]
    return frame


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

    _table_format(args.output, "--output")  # fail before the (slow) load
    frame = read_score_input(args.input, id_cols=(args.user_col, args.item_col),
                             list_cols=(args.history_col, args.exclude_col), list_sep=args.list_sep)
    rec = Recommender.load(args.model)
    start = time.perf_counter()
    recs = rec.score_frame(
        frame, k=args.k, user_col=args.user_col, item_col=args.item_col,
        time_col=args.time_col if args.time_col is not None else "timestamp",
        history_col=args.history_col, exclude_col=args.exclude_col, exclude_item_ids=_split(args.exclude),
        exclude_seen=not args.include_seen, chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
        progress=None if args.progress else False,
    )
    seconds = time.perf_counter() - start
    write_score_output(recs, args.output)
    users = recs["user_id"].nunique()
    print(f"scored {users:,} users ({int(recs.drop_duplicates('user_id')['cold_start'].sum()):,} cold start) "
          f"with {rec.path} in {seconds:.1f} s -> {args.output} ({len(recs):,} rows)")
    return 0

"""CLI commands ``serve`` and ``recommend``: the gRPC service and its client (gRPC and TensorFlow load inside
the functions)."""

from __future__ import annotations

import argparse

from pipelines.errors import InputError


def register(subparsers) -> None:
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
        description="Call Recommend on a running server (sasrec serve) and print the items; with --user, "
        "RecommendForUser on the history the server keeps (appending --append first).",
    )
    p.add_argument("--target", default="localhost:8500", help="HOST:PORT of the server (default localhost:8500)")
    p.add_argument("--history", default="", help="comma-separated item ids, oldest first")
    p.add_argument("--user", help="recommend from the history the server keeps for this user (RecommendForUser; "
                   "the server needs --history-store) instead of --history")
    p.add_argument("--append", default="", help="with --user: comma-separated item ids to append first, oldest first")
    p.add_argument("--idempotency-key", default="", help="with --append: a retry with the same key appends nothing twice")
    p.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    p.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    p.add_argument("--exclude", default="", help="comma-separated item ids to leave out")
    p.add_argument("--user-id", default="", help="user id for the server's logs")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds (default 5)")
    p.add_argument("--tls-ca", help="CA certificate (PEM): connect with TLS")
    p.add_argument("--auth-token", help="bearer token (or SASREC_AUTH_TOKEN)")
    p.add_argument("--auth-token-file", help="file holding the bearer token")
    p.add_argument("--info", action="store_true", help="print the model info instead of recommending")
    p.add_argument("--explain", action="store_true",
                   help="also print, for each item, the history items that drove it (README: Explanations)")
    p.set_defaults(func=cmd_recommend)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from serving.processes import serve
    from serving.server import config_from_args

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(config_from_args(args))


def cmd_recommend(args: argparse.Namespace) -> int:
    import grpc

    from sasrec.commands import split_ids
    from serving.client import RecommenderClient, format_table
    from serving.security import read_token

    if args.user is not None and args.history:
        raise InputError("--history and --user: give one (--user recommends from the stored history)")
    if (args.append or args.idempotency_key) and args.user is None:
        raise InputError("--append and --idempotency-key need --user")
    token = read_token(args.auth_token, args.auth_token_file)
    with RecommenderClient(args.target, token=token, tls_ca=args.tls_ca, timeout=args.timeout) as client:
        try:
            if args.info:
                info = client.model_info()
                print(f"model {info.model_name} v{info.model_version}: {info.num_items} items, "
                      f"maxlen {info.maxlen}, max_k {info.max_k}, exported {info.exported_at} from {info.source_run}")
                return 0
            if args.user is None:
                response = client.recommend(
                    split_ids(args.history), k=args.k, exclude_seen=not args.include_seen,
                    exclude_item_ids=split_ids(args.exclude), user_id=args.user_id, explain=args.explain,
                )
            else:
                answer = client.recommend_for_user(
                    args.user, k=args.k, exclude_seen=not args.include_seen, exclude_item_ids=split_ids(args.exclude),
                    item_ids=split_ids(args.append), idempotency_key=args.idempotency_key, explain=args.explain,
                )
                response = answer.recommendation
        except grpc.RpcError as exc:
            raise InputError(f"{args.target}: {exc.code().name}: {exc.details()}") from None
    print(format_table(response))
    if args.user is not None:
        appended = answer.append
        print(f"user {args.user}: {answer.history_length} stored events, {appended.appended} appended"
              + (" (a retry: nothing appended twice)" if appended.duplicate else "")
              + (f", {appended.dropped} oldest dropped" if appended.dropped else ""))
    return 0

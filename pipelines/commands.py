"""The data commands of `sasrec`: ``synth``, ``download`` and ``prepare``.

Each command function takes the argparse namespace; errors in the input raise ``InputError``.
Progress bars go to stderr (only on a terminal); results and the summary table to stdout.
"""

from __future__ import annotations

import argparse

from pipelines.clean import KCORE_MODES
from pipelines.dask_cluster import add_dask_arguments, check_dask_arguments
from pipelines.dataset import DEFAULT_USERS_PER_PART
from pipelines.errors import InputError
from pipelines.readers import BAD_LINE_POLICIES, FORMATS
from pipelines.split import DEFAULT_VALIDATION, SPLIT_PROTOCOLS


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_synth(subparsers)
    _register_download(subparsers)
    _register_prepare(subparsers)


# ----------------------------------------------------------------------------- synth


def _register_synth(subparsers) -> None:
    from pipelines.synthetic import DEFAULTS

    p = subparsers.add_parser(
        "synth",
        help="write a seeded synthetic interaction log (CSV user_id,item_id,timestamp)",
        description=(
            "Write a synthetic log where users walk latent item chains: the next item is the chain successor "
            "of the last one with probability 1-noise, else a uniformly random item. Popularity is flat, so a "
            "sequence model beats popularity by far. Read it back with: "
            "sasrec prepare --format csv --user-col user_id --item-col item_id --time-col timestamp"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="CSV file to write (with --parts: a folder)")
    p.add_argument("--parts", type=int, default=1,
                   help="write a folder of this many files of consecutive users, each generated alone (logs larger than memory)")
    p.add_argument("--file-format", choices=("csv", "parquet"), default="csv", help="file format of the parts (with --parts)")
    p.add_argument("--users", type=int, default=DEFAULTS["users"], help="number of users")
    p.add_argument("--items", type=int, default=DEFAULTS["items"], help="number of items")
    p.add_argument("--min-length", type=int, default=DEFAULTS["min_length"], help="shortest user sequence")
    p.add_argument("--max-length", type=int, default=DEFAULTS["max_length"], help="longest user sequence")
    p.add_argument("--chains", type=int, default=DEFAULTS["chains"], help="number of latent item cycles")
    p.add_argument("--noise", type=float, default=DEFAULTS["noise"], help="probability of a random next item")
    p.add_argument("--popularity", type=float, default=DEFAULTS["popularity"],
                   help="power-law exponent of item popularity (start and random items): 0 flat, ~1 a long tail as in shops")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed")
    p.set_defaults(func=synth_command)


def synth_command(args: argparse.Namespace) -> int:
    from pipelines.synthetic import generate, write_log, write_log_parts

    options = dict(items=args.items, min_length=args.min_length, max_length=args.max_length, chains=args.chains,
                   noise=args.noise, seed=args.seed, popularity=args.popularity)
    if args.parts > 1 or args.file_format != "csv":
        folder, events = write_log_parts(args.out, parts=args.parts, file_format=args.file_format, users=args.users, **options)
        print(f"wrote {folder}: {args.parts:,} {args.file_format} files, {args.users:,} users, {events:,} events")
        return 0
    frame = generate(users=args.users, **options)
    path = write_log(frame, args.out)
    print(f"wrote {path}: {frame['user_id'].nunique():,} users, {frame['item_id'].nunique():,} items, {len(frame):,} events")
    return 0


# ----------------------------------------------------------------------------- download


def _register_download(subparsers) -> None:
    from pipelines.download import BASE_URL, BASE_URL_ENV, CHECKSUMS_MD5

    p = subparsers.add_parser(
        "download",
        help="download a MovieLens data set from GroupLens (checksum-verified, cached)",
        description=(
            "Download NAME.zip from GroupLens into DIR, verify its published MD5 checksum, and extract it to "
            "DIR/NAME/. A verified DIR/NAME.zip is reused without downloading. Files appear only complete."
        ),
    )
    p.add_argument("name", choices=sorted(CHECKSUMS_MD5), metavar="NAME", help=f"one of {', '.join(CHECKSUMS_MD5)}")
    p.add_argument("--dir", required=True, help="folder for the archive and the extracted files")
    p.add_argument("--base-url", help=f"server to download from (default ${BASE_URL_ENV} or {BASE_URL})")
    p.add_argument("--sha256", help="expected sha256 of the archive, replacing the published MD5")
    p.add_argument("--force", action="store_true", help="download and extract again even when cached")
    p.set_defaults(func=download_command)


def download_command(args: argparse.Namespace) -> int:
    from pipelines.download import download

    target = download(args.name, args.dir, base_url=args.base_url, sha256=args.sha256, force=args.force, progress=None)
    print(f"{args.name}: {target}")
    return 0


# ----------------------------------------------------------------------------- prepare


def _register_prepare(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="raw interaction log -> dataset folder (clean, k-core, vocabulary, split)",
        description=(
            "Read a raw log, filter it, build the vocabulary and split, and write OUT/sequences.parquet (or "
            "OUT/sequences/part-NNNNN.parquet above --users-per-part users), OUT/items.parquet and OUT/manifest.json "
            "(atomically: a failed run leaves nothing). --engine dask runs it on a Dask cluster with identical output. "
            "Formats: movielens (ratings.dat '::', u.data, ratings.csv; a file, folder or the official zip), "
            "csv (CSV/TSV with --user-col/--item-col[/--time-col/--rating-col]), parquet (same columns), "
            "amazon-json (review JSON lines 2014/2018/2023, plain, .gz or .zip), pairs ('user item' per line, "
            "line order = time order, SASRec paper), sequences ('user i1 i2 ...' per line, S3-Rec). "
            "Formats without time use the file position as timestamp."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # No argparse `choices`: an unknown format is reported as one clean error line by the reader.
    p.add_argument("--format", required=True, metavar="{" + ",".join(FORMATS) + "}", help="input format")
    p.add_argument("--input", required=True,
                   help="input: a file, a folder (every file in it; a MovieLens folder/zip for movielens), a glob "
                   "(quote it) or an fsspec URL (s3://..., gs://...: install s3fs/gcsfs); many files are read in sorted "
                   "name order, then line order")
    p.add_argument("--out", required=True, help="dataset folder to write (replaced if it exists)")
    p.add_argument("--users-per-part", type=int, default=DEFAULT_USERS_PER_PART,
                   help="store the sequences as parts of this many users when there are more (0: always one file)")
    cols = p.add_argument_group("columns (csv, parquet)")
    cols.add_argument("--user-col", help="user id column")
    cols.add_argument("--item-col", help="item id column")
    cols.add_argument("--time-col", help="timestamp column (epoch numbers or ISO-8601); default: file order")
    cols.add_argument("--rating-col", help="rating column (needed by --min-rating)")
    cols.add_argument("--delimiter", help="field separator (default: tab for .tsv, else comma)")
    cols.add_argument("--encoding", default="utf-8", help="text encoding of the input")
    p.add_argument("--on-bad-lines", choices=BAD_LINE_POLICIES, default="error",
                   help="unparsable lines: stop with an error, or skip them and count them in the manifest")
    filters = p.add_argument_group("filters")
    filters.add_argument("--min-rating", type=float, help="drop events rated below this")
    filters.add_argument("--dedupe-consecutive", action="store_true", help="drop an event repeating the user's previous item")
    filters.add_argument("--kcore", choices=KCORE_MODES, default="iterative",
                         help="k-core filtering: repeat until a fixed point, one pass as in the SASRec paper, or none")
    filters.add_argument("--user-core", type=int, default=5, help="minimum events per user")
    filters.add_argument("--item-core", type=int, default=5, help="minimum events per item")
    split = p.add_argument_group(
        "split",
        "leave-one-out: last event test, second-to-last validation, users with < 3 events train only. "
        "temporal: one global cut for test (--cutoff-time or --cutoff-quantile of all event times: events at "
        "or after it are test) and one for validation (--valid-time or --valid-quantile; without either, the validation window holds "
        f"{DEFAULT_VALIDATION}). Users keep all their events, even with no training history.",
    )
    split.add_argument("--split", choices=SPLIT_PROTOCOLS, default="leave-one-out", help="split protocol")
    split.add_argument("--cutoff-time", type=int, help="temporal: test cut (timestamp)")
    split.add_argument("--cutoff-quantile", type=float, help="temporal: test cut as a quantile of event times, e.g. 0.9")
    split.add_argument("--valid-time", type=int, help="temporal: validation cut (timestamp)")
    split.add_argument("--valid-quantile", type=float, help="temporal: validation cut as a quantile, e.g. 0.8")
    add_dask_arguments(p)
    p.set_defaults(func=prepare_command)


def prepare_command(args: argparse.Namespace) -> int:
    check_dask_arguments(args)
    if args.split == "leave-one-out" and any(
        v is not None for v in (args.cutoff_time, args.cutoff_quantile, args.valid_time, args.valid_quantile)
    ):
        raise InputError("--cutoff-*/--valid-* options need --split temporal")
    reader_options = dict(
        user_col=args.user_col, item_col=args.item_col, time_col=args.time_col, rating_col=args.rating_col,
        delimiter=args.delimiter, encoding=None if args.encoding.lower() in ("utf-8", "utf8") else args.encoding,
        on_bad_lines=args.on_bad_lines,
    )
    options = dict(
        reader_options=reader_options, users_per_part=args.users_per_part, min_rating=args.min_rating,
        dedupe_consecutive=args.dedupe_consecutive, kcore=args.kcore, user_core=args.user_core, item_core=args.item_core,
        split=args.split, cutoff_time=args.cutoff_time, cutoff_quantile=args.cutoff_quantile, valid_time=args.valid_time,
        valid_quantile=args.valid_quantile,
    )
    if args.engine == "dask":
        from pipelines.dask_cluster import dask_client
        from pipelines.dask_engine import prepare_on_dask

        with dask_client(args.scheduler, workers=args.workers, memory_limit=args.memory_limit) as client:
            manifest = prepare_on_dask(client, args.format, args.input, args.out, **options)
    else:
        from pipelines.prepare import prepare_file

        manifest = prepare_file(args.format, args.input, args.out, progress=None, **options).manifest
    print(summary_table(manifest))
    print(f"wrote {args.out}")
    return 0


def summary_table(manifest: dict) -> str:
    """Users, items, events, split sizes and dropped rows by reason, as aligned text."""
    stats, dropped = manifest["statistics"], manifest["dropped"]
    rows = [(key, stats[key]) for key in ("users", "items", "events", "train_events", "valid_events", "test_events", "mean_length")]
    rows += [(f"dropped: {reason}", count) for reason, count in dropped.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>12,}" for name, value in rows)

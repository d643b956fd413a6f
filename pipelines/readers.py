"""Readers: raw interaction logs of every supported format -> one interactions DataFrame.

Every reader returns the same frame, rows in file order:

``user_id``, ``item_id``: categorical with string categories (external ids kept as written);
``timestamp``: int64 (seconds as in the file; for formats without time, the event's position in
the file, 0, 1, 2, ...); ``rating``: float32, only when the source has one.

``frame.attrs`` records how it was read: ``format``, ``timestamp`` (``"column"`` or ``"file-order"``),
``bad_lines`` (lines skipped with ``on_bad_lines="skip"``), ``files`` (what was read) and ``rows``
(data rows in the files, bad ones included).

An input is one file or many (:func:`input_files`: a folder, a glob, an fsspec URL): their rows are
read in sorted file-name order, then line order, and for formats without time the file-order
timestamp continues from one file to the next. Each file is read alone (:func:`read_input_file`), so
the Dask engine reads files on its workers with exactly this code.

Parsing runs in pyarrow (CSV and JSON readers, dictionary-encoded ids), never a Python loop over
rows, except to find the line number of a bad line for the error message.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipelines.errors import InputError

FORMATS = ("movielens", "csv", "parquet", "amazon-json", "pairs", "sequences")
BAD_LINE_POLICIES = ("error", "skip")
MOVIELENS_FILES = ("ratings.dat", "u.data", "ratings.csv")
# Amazon review field names by edition: (user, item, time, rating).
AMAZON_FIELDS = (
    ("reviewerID", "asin", "unixReviewTime", "overall"),  # 2014 and 2018
    ("user_id", "parent_asin", "timestamp", "rating"),  # 2023 (timestamps in milliseconds)
    ("user_id", "asin", "timestamp", "rating"),  # 2023, per-variant item ids
)
_ID_TYPE = pa.dictionary(pa.int32(), pa.string())
_GLOB_CHARS = re.compile(r"[*?\[]")
_INTEGER = re.compile(r"^\s*-?\d+\s*$")


@dataclass
class SourceFile:
    """The bytes of one input file (decompressed) plus what identifies the file on disk."""

    path: Path | str  # a local path, or an fsspec URL
    raw_sha256: str
    raw_bytes: int
    data: bytes
    member: str | None = None  # the file inside a zip archive
    entry: str | None = None  # the name the manifest records (default: the file name)

    @property
    def name(self) -> str:
        """The file as named in messages (the path as given, plus the zip member)."""
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    @property
    def manifest_entry(self) -> dict:
        """File name (not the folder, so manifests match across checkouts), sha256 and size on disk."""
        base = self.entry or _base_name(str(self.path))
        name = f"{base}:{self.member}" if self.member else base
        return {"path": name, "sha256": self.raw_sha256, "bytes": self.raw_bytes}


@dataclass
class ReadContext:
    on_bad_lines: str = "error"
    bad_lines: int = 0
    files: list[SourceFile] = field(default_factory=list)


@dataclass(frozen=True)
class InputFile:
    """One file of an input: where to read it (local path or fsspec URL) and its name in the manifest."""

    location: str
    entry: str


def _is_url(path: str) -> bool:
    return "://" in path


def _base_name(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def _hidden(relative: str) -> bool:
    """Files Spark, Hive and Hadoop write beside the data (_SUCCESS, _metadata, .crc files, _temporary/)."""
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def input_files(format: str, path: str | Path) -> list[InputFile]:
    """The files ``path`` names, in the order their rows are read.

    A file; a folder (every file below it, by sorted relative path, without the hidden files Spark and
    Hive write: names starting with ``.`` or ``_``; hive-partitioned folders ``col=value/`` included);
    a glob pattern (``logs/2026-*.csv.gz``, ``**`` recurses; sorted matches); or an fsspec URL of any of
    these (``s3://``, ``gs://``, ...: needs that file system's package, e.g. s3fs). A MovieLens folder
    or zip is one input (its ratings file). Many files are named in the manifest by their path
    relative to the folder (or the glob's folder)."""
    path = str(path)
    if _is_url(path):
        return _url_files(path)
    if os.path.isfile(path) or format == "movielens" and os.path.isdir(path):
        return [InputFile(path, _base_name(path))]
    if os.path.isdir(path):
        root = Path(path)
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        files = [InputFile(str(root / rel), rel) for rel in found if not _hidden(rel)]
        if not files:
            raise InputError(f"{path}: folder holds no input files")
        return files
    if _GLOB_CHARS.search(path):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise InputError(f"{path}: no file matches this pattern")
        return _named(matches, os.sep)
    raise InputError(f"{path}: no such file or folder")


def _named(locations: list[str], separator: str) -> list[InputFile]:
    """Files named by their path below the folder all of them share."""
    if len(locations) == 1:
        return [InputFile(locations[0], _base_name(locations[0]))]
    prefix = os.path.commonprefix(locations)
    root = prefix[: prefix.rfind(separator) + 1]
    return [InputFile(loc, loc[len(root):].replace(os.sep, "/")) for loc in locations]


def _url_files(url: str) -> list[InputFile]:
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        if _GLOB_CHARS.search(root):
            found = sorted(p for p in fs.glob(root) if fs.isfile(p))
        elif fs.isdir(root):
            found = sorted(p for p in fs.find(root) if not _hidden(p[len(root.rstrip("/")) + 1:]))
        else:
            found = [root] if fs.exists(root) else []
    except ImportError as exc:  # e.g. s3:// without s3fs: fsspec names the package to install
        raise InputError(f"{url}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{url}: cannot list ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not found:
        raise InputError(f"{url}: no such file, folder or matching file")
    return _named([fs.unstrip_protocol(p) for p in found], "/")


@dataclass(frozen=True)
class ReaderOptions:
    """How to read the files of an input (the reader flags of ``sasrec prepare``)."""

    user_col: str | None = None  # csv, parquet: the user id column (required)
    item_col: str | None = None  # csv, parquet: the item id column (required)
    time_col: str | None = None  # csv, parquet: timestamps (epoch numbers or ISO-8601); default: file order
    rating_col: str | None = None  # csv, parquet: ratings (needed by a minimum rating)
    delimiter: str | None = None  # csv: default tab for .tsv/.tab files, else comma
    encoding: str = "utf-8"  # text formats
    on_bad_lines: str = "error"  # or skip (counted in the manifest)

    def check(self, format: str) -> None:
        """The errors in the options alone, raised before any file is read."""
        if format not in FORMATS:
            raise InputError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        if self.on_bad_lines not in BAD_LINE_POLICIES:
            raise InputError(f"--on-bad-lines must be one of {', '.join(BAD_LINE_POLICIES)}, not {self.on_bad_lines!r}")
        if format in ("csv", "parquet") and (not self.user_col or not self.item_col):
            raise InputError(f"--format {format} needs --user-col and --item-col")


def read_interactions(format: str, path: str | Path, **options) -> pd.DataFrame:
    """Read ``path`` in ``format`` (one of :data:`FORMATS`) into the interactions frame, with the
    :class:`ReaderOptions` given as keywords.

    ``path`` is a file, a folder, a glob or a URL (:func:`input_files`); many files are read in order
    and concatenated. Text may be gzipped (``.gz``) or a zip archive.
    """
    opts = ReaderOptions(**options)
    opts.check(format)
    return concat_interactions([read_input_file(format, source, opts) for source in input_files(format, path)])


def read_input_file(format: str, source: InputFile, options: ReaderOptions) -> pd.DataFrame:
    """One file of an input as the interactions frame."""
    options.check(format)
    user_col, item_col, time_col, rating_col = options.user_col, options.item_col, options.time_col, options.rating_col
    encoding = options.encoding
    path = source.location if _is_url(source.location) else Path(source.location)
    ctx = ReadContext(on_bad_lines=options.on_bad_lines)
    if format == "movielens":
        frame = _read_movielens(path, ctx, source.entry)
    elif format == "csv":
        src = _load(path, ctx, encoding=encoding, entry=source.entry)
        sep = options.delimiter or ("\t" if re.search(r"\.(tsv|tab)(\.gz|\.zip)?$", _base_name(str(path))) else ",")
        frame = _read_delimited(src, ctx, sep, header=True, cols=(user_col, item_col, time_col, rating_col))
    elif format == "parquet":
        frame = _read_parquet(_load(path, ctx, entry=source.entry), ctx, (user_col, item_col, time_col, rating_col))
    elif format == "amazon-json":
        frame = _read_amazon(_load(path, ctx, entry=source.entry), ctx)
    elif format == "pairs":
        src = _load(path, ctx, encoding=encoding, entry=source.entry)
        src.data = src.data.replace(b"\t", b" ")
        frame = _read_delimited(src, ctx, " ", header=False, cols=(0, 1, None, None))
    else:
        frame = _read_sequences(_load(path, ctx, encoding=encoding, entry=source.entry), ctx)
    frame.attrs.update(
        format=format,
        bad_lines=ctx.bad_lines,
        files=[f.manifest_entry for f in ctx.files],
    )
    return frame


def concat_interactions(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Frames of consecutive files as one: ids as categoricals over all files' ids, file-order
    timestamps shifted by the rows of the files before (the position in the whole input)."""
    if len(frames) == 1:
        return frames[0]
    shifts = file_order_shifts(frames[0].attrs["timestamp"], [f.attrs["rows"] for f in frames])
    frame = pd.DataFrame({
        "user_id": pd.api.types.union_categoricals([f["user_id"] for f in frames]),
        "item_id": pd.api.types.union_categoricals([f["item_id"] for f in frames]),
        "timestamp": np.concatenate([f["timestamp"].to_numpy() + shift for f, shift in zip(frames, shifts)]),
        **({"rating": np.concatenate([f["rating"].to_numpy() for f in frames])} if all("rating" in f for f in frames) else {}),
    })
    frame.attrs.update(
        format=frames[0].attrs["format"],
        timestamp=frames[0].attrs["timestamp"],
        bad_lines=sum(f.attrs["bad_lines"] for f in frames),
        files=[entry for f in frames for entry in f.attrs["files"]],
        rows=int(sum(f.attrs["rows"] for f in frames)),
    )
    return frame


def file_order_shifts(timestamp: str, rows: list[int]) -> np.ndarray:
    """What to add to each file's timestamps: for file-order time, the rows of the files before it."""
    if timestamp != "file-order":
        return np.zeros(len(rows), dtype=np.int64)
    return np.concatenate(([0], np.cumsum(rows[:-1], dtype=np.int64)))


# ----------------------------------------------------------------------------- file loading


def _load(path: Path | str, ctx: ReadContext, *, encoding: str = "utf-8", member: str | None = None,
          entry: str | None = None) -> SourceFile:
    """Read ``path`` fully, hash the bytes on disk, decompress gzip/zip and return UTF-8 text bytes."""
    raw = _read_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    size = len(raw)
    chosen = None
    if raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: corrupt gzip file ({exc})") from None
    elif raw[:4] == b"PK\x03\x04":
        data, chosen = _unzip_member(path, raw, member)
    else:
        data = raw
    del raw
    if data[:3] == b"\xef\xbb\xbf":
        data = data[3:]
    source = SourceFile(path, digest, size, data, chosen, entry)
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        try:
            source.data = data.decode(encoding).encode("utf-8")
        except (UnicodeDecodeError, LookupError) as exc:
            raise InputError(f"{source.name}: cannot decode as {encoding}: {exc}") from None
    ctx.files.append(source)
    return source


def _read_bytes(path: Path | str) -> bytes:
    """The file's bytes: local paths directly, URLs through fsspec."""
    if isinstance(path, Path):
        if path.is_dir():
            raise InputError(f"{path}: is a folder, expected a file")
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        return path.read_bytes()
    import fsspec

    try:
        with fsspec.open(path, "rb") as handle:
            return handle.read()
    except ImportError as exc:
        raise InputError(f"{path}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({type(exc).__name__}: {str(exc)[:200]})") from None


# What a damaged or unusual zip archive raises (encrypted members raise RuntimeError).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, NotImplementedError, RuntimeError, ValueError)


def _unzip_member(path: Path | str, raw: bytes, member: str | None) -> tuple[bytes, str]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        names = [n for n in archive.namelist() if not n.endswith("/")]
        if member is None:
            if len(names) != 1:
                raise InputError(
                    f"{path}: zip holds {len(names)} files ({', '.join(names[:10])}); extract the one to read"
                )
            member = names[0]
        return archive.read(member), member
    except _ZIP_ERRORS as exc:
        raise InputError(f"{path}: corrupt zip file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _first_line(data: bytes) -> bytes:
    """The first non-blank line (pyarrow skips blank lines too), without its line end."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        line = data[start:end].rstrip(b"\r")
        if line.strip():
            return line
        start = end + 1
    return b""


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _check_utf8(src: SourceFile) -> None:
    try:
        src.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, text = _line_at_byte(src.data, exc.start)
        raise InputError(
            f"{src.name}: line {line}: not valid UTF-8 (byte 0x{src.data[exc.start]:02x}): {text!r}; "
            "pass --encoding (e.g. latin-1) if the file uses another encoding"
        ) from None


def _line_at_byte(data: bytes, pos: int) -> tuple[int, str]:
    start = data.rfind(b"\n", 0, pos) + 1
    end = data.find(b"\n", pos)
    text = data[start : end if end >= 0 else len(data)].decode("utf-8", "replace").rstrip("\r")
    return data.count(b"\n", 0, pos) + 1, text[:200]


def _row_line(src: SourceFile, row: int, header: bool) -> tuple[str, str]:
    """1-based line number and text of data row ``row`` (0-based, empty lines not counted)."""
    buf = np.frombuffer(src.data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends, [len(buf)]))
    nonempty = np.flatnonzero(stops - starts > (buf[np.maximum(stops - 1, 0)] == 13))
    k = row + (1 if header else 0)
    if k >= len(nonempty):
        return f"data row {row + 1}", ""
    line = int(nonempty[k])
    text = src.data[starts[line] : stops[line]].decode("utf-8", "replace").rstrip("\r")
    return f"line {line + 1}", text[:200]


# ----------------------------------------------------------------------------- delimited text


def _read_delimited(
    src: SourceFile, ctx: ReadContext, sep: str, *, header: bool, cols: tuple, names: list[str] | None = None,
    original_sep: str | None = None,
) -> pd.DataFrame:
    """Parse delimited text with pyarrow. ``cols`` = (user, item, time, rating): names or positions.

    ``original_sep`` is the separator the file had before it was replaced by ``sep`` (for messages)."""
    _check_utf8(src)
    invalid: list = []

    def on_invalid(row) -> str:
        if ctx.on_bad_lines == "skip":
            ctx.bad_lines += 1
            return "skip"
        invalid.append(row)
        return "error"

    if header:
        end = src.data.find(b"\n")
        first = src.data[: end if end >= 0 else len(src.data)].decode("utf-8").rstrip("\r")
        found = [c.strip().strip('"') for c in first.split(sep)]
        missing = [c for c in cols if c is not None and c not in found]
        if missing:
            shown = ", ".join(repr(_short(c, 60)) for c in found[:30]) + (", ..." if len(found) > 30 else "")
            raise InputError(
                f"{src.name}: line 1: missing column(s) {', '.join(map(repr, missing))}; columns found: {shown or 'none'}"
            )
        read_opts = pacsv.ReadOptions(block_size=1 << 24)
    else:
        first = _first_line(src.data).decode("utf-8")
        if not first:
            raise InputError(f"{src.name}: no interactions found (empty file)")
        n_cols = len(names) if names else len(first.split(sep))
        needed = max((c for c in cols if isinstance(c, int)), default=-1) + 1
        if n_cols < needed:
            line, _ = _line_at_byte(src.data, src.data.find(first.encode("utf-8")))
            raise InputError(
                f"{src.name}: line {line}: expected at least {needed} fields separated by {(original_sep or sep)!r}, "
                f"got {n_cols}: {_short(first)!r}"
            )
        names = names or [f"f{i}" for i in range(n_cols)]
        read_opts = pacsv.ReadOptions(column_names=names, block_size=1 << 24)
        cols = tuple(names[c] if isinstance(c, int) else c for c in cols)
        found = names
    user, item, time, rating = cols
    convert = pacsv.ConvertOptions(
        include_columns=[c for c in cols if c is not None],
        column_types={user: _ID_TYPE, item: _ID_TYPE, **({time: pa.string()} if time else {}), **({rating: pa.string()} if rating else {})},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    parse = pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid, quote_char='"' if header else False)
    try:
        table = pacsv.read_csv(io.BytesIO(src.data), read_options=read_opts, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        if invalid:
            bad = invalid[0]
            pos = src.data.find(bad.text.encode("utf-8")) if bad.text else -1
            line, text = _line_at_byte(src.data, pos) if pos >= 0 else (bad.number or -1, bad.text)
            shown_sep = original_sep or sep
            raise InputError(
                f"{src.name}: line {line}: expected {bad.expected_columns} fields separated by {shown_sep!r}, "
                f"got {bad.actual_columns}: {_short(text.replace(sep, shown_sep))!r} "
                "(use --on-bad-lines skip to drop such lines)"
            ) from None
        raise InputError(f"{src.name}: cannot parse: {_short(str(exc).splitlines()[0] if str(exc) else repr(exc), 300)}") from None
    if table.num_rows == 0:
        raise InputError(f"{src.name}: no interactions found (empty file)")
    return _frame(src, ctx, table, cols, header)


def _frame(src: SourceFile, ctx: ReadContext, table: pa.Table, cols: tuple, header: bool | None) -> pd.DataFrame:
    """Turn a table with (user, item[, time][, rating]) columns into the interactions frame.

    ``header`` says whether the text had a header line; None: not text (Parquet), errors name rows."""
    user, item, time, rating = cols
    keep = np.ones(table.num_rows, dtype=bool)
    values = {}
    for role, col, parse in (("timestamp", time, _parse_times), ("rating", rating, _parse_numbers)):
        if col is None:
            continue
        parsed, ok = parse(table.column(col))
        if not ok.all():
            bad_row = int(np.flatnonzero(~ok)[0])
            if ctx.on_bad_lines == "error":
                where, text = (f"row {bad_row + 1}", "") if header is None else _row_line(src, bad_row, header)
                value = table.column(col)[bad_row].as_py()
                raise InputError(
                    f"{src.name}: {where}: column {col!r}: cannot parse {role} {value!r}"
                    + (f": {text!r}" if text else "") + " (use --on-bad-lines skip to drop such lines)"
                )
            keep &= ok
        values[role] = parsed
    if "timestamp" not in values:
        values["timestamp"] = np.arange(table.num_rows, dtype=np.int64)
    frame = pd.DataFrame(
        {
            "user_id": _categorical(table.column(user)),
            "item_id": _categorical(table.column(item)),
            "timestamp": values["timestamp"],
            **({"rating": values["rating"].astype(np.float32)} if "rating" in values else {}),
        }
    )
    if not keep.all():
        ctx.bad_lines += int((~keep).sum())
        frame = frame[keep].reset_index(drop=True)
    frame.attrs.update(timestamp="column" if time else "file-order", rows=table.num_rows)
    return frame


def _categorical(column: pa.ChunkedArray) -> pd.Categorical:
    if not pa.types.is_dictionary(column.type):
        column = pc.cast(column, pa.string()).dictionary_encode()
    column = column.unify_dictionaries() if isinstance(column, pa.ChunkedArray) else column
    series = column.to_pandas()
    return pd.Categorical.from_codes(series.cat.codes, categories=pd.Index(series.cat.categories.astype(object)))


def _parse_numbers(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        return values, ~np.isnan(values)
    stripped = pc.utf8_trim_whitespace(column)
    ok = pc.match_substring_regex(stripped, r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$").to_numpy(zero_copy_only=False)
    values = np.full(len(column), np.nan)
    if ok.any():
        values[ok] = pc.cast(pc.filter(stripped, pa.array(ok)), pa.float64()).to_numpy(zero_copy_only=False)
    return values, ok


def _parse_times(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Integer or decimal epoch numbers, else ISO-8601 date-times (converted to epoch seconds)."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        seconds = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64()).to_numpy(zero_copy_only=False)
        return seconds, ~pc.is_null(column).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(column.type):
        return column.to_numpy(zero_copy_only=False).astype(np.int64), np.ones(len(column), dtype=bool)
    values, ok = _parse_numbers(column)
    if ok.all() or ok.sum() >= len(column) // 2:
        return np.nan_to_num(values).astype(np.int64), ok
    stamps = pd.to_datetime(pd.Series(column.to_numpy(zero_copy_only=False)), errors="coerce", format="ISO8601", utc=True)
    seconds = (stamps - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    ok = seconds.notna().to_numpy()
    return np.nan_to_num(seconds.to_numpy(dtype=np.float64)).astype(np.int64), ok


# ----------------------------------------------------------------------------- per format


def _read_movielens(path: Path | str, ctx: ReadContext, entry: str | None = None) -> pd.DataFrame:
    """``ratings.dat`` (``::``, ML-1M/10M), ``u.data`` (tabs, ML-100K) or ``ratings.csv`` (ML-20M and later).

    ``path`` may be the ratings file (gzipped or not), the extracted folder or the official zip.
    """
    member, given = None, path
    if isinstance(path, str):  # a URL: the ratings file itself
        pass
    elif path.is_dir():
        found = [path / n for n in MOVIELENS_FILES if (path / n).is_file()]
        if not found:
            raise InputError(f"{path}: no MovieLens ratings file ({', '.join(MOVIELENS_FILES)}) in this folder")
        path = found[0]
    elif path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if Path(n).name in MOVIELENS_FILES]
        except _ZIP_ERRORS as exc:
            raise InputError(f"{path}: corrupt zip file ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not members:
            raise InputError(f"{path}: no MovieLens ratings file ({', '.join(MOVIELENS_FILES)}) in this zip")
        member = sorted(members, key=lambda n: MOVIELENS_FILES.index(Path(n).name))[0]
    src = _load(path, ctx, member=member, entry=entry if path == given else None)  # a folder: the file's name
    first = _first_line(src.data)
    if b"::" in first:
        # ML-1M/10M: '::' separated, no header. One byte replace lets the C parser do the rest.
        src.data = src.data.replace(b"::", b"\x1f")
        n = first.count(b"::") + 1
        names = ["user", "item", "rating", "timestamp"][:n] if n <= 4 else None
        if names is None or n < 2:
            raise InputError(f"{src.name}: line 1: expected UserID::MovieID[::Rating[::Timestamp]], got {first[:200]!r}")
        cols = ("user", "item", "timestamp" if n == 4 else None, "rating" if n >= 3 else None)
        return _read_delimited(src, ctx, "\x1f", header=False, cols=cols, names=names, original_sep="::")
    if b"\t" in first:  # ML-100K u.data: user item rating timestamp
        return _read_delimited(
            src, ctx, "\t", header=False, cols=("user", "item", "timestamp", "rating"), names=["user", "item", "rating", "timestamp"]
        )
    if first.startswith(b"userId,"):
        return _read_delimited(src, ctx, ",", header=True, cols=("userId", "movieId", "timestamp", "rating"))
    raise InputError(f"{src.name}: line 1: not a MovieLens ratings file ('::', tab or userId,movieId,... CSV): {first[:200]!r}")


def _read_parquet(src: SourceFile, ctx: ReadContext, cols: tuple) -> pd.DataFrame:
    try:
        table = pq.read_table(pa.BufferReader(src.data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{src.name}: not a Parquet file ({exc})") from None
    missing = [c for c in cols if c is not None and c not in table.column_names]
    if missing:
        raise InputError(
            f"{src.name}: missing column(s) {', '.join(map(repr, missing))}; columns found: {', '.join(map(repr, table.column_names))}"
        )
    if table.num_rows == 0:
        raise InputError(f"{src.name}: no interactions found (empty table)")
    return _frame(src, ctx, table, cols, header=None)


def _read_amazon(src: SourceFile, ctx: ReadContext) -> pd.DataFrame:
    """Amazon review JSON lines (2014/2018: reviewerID, asin, unixReviewTime, overall; 2023: user_id,
    parent_asin, timestamp in ms, rating), plain, gzipped or in a zip with one file."""
    _check_utf8(src)
    first_line = _first_line(src.data)
    line_no = src.data.count(b"\n", 0, src.data.find(first_line)) + 1 if first_line else 1
    try:
        record = json.loads(first_line)
    except (ValueError, RecursionError):  # JSONDecodeError, a 10 MB number, deep nesting
        record = None
    if not isinstance(record, dict):
        raise InputError(
            f"{src.name}: line {line_no}: not a JSON object: {_short(first_line[:400].decode('utf-8', 'replace'))!r}"
        )
    keys = set(record)
    fields = next((f for f in AMAZON_FIELDS if {f[0], f[1], f[2]} <= keys), None)
    if fields is None:
        raise InputError(
            f"{src.name}: missing Amazon review fields (reviewerID/asin/unixReviewTime or user_id/parent_asin/timestamp); "
            f"fields found: {_short(', '.join(sorted(keys)), 300)}"
        )
    user, item, time, rating = fields
    schema = pa.schema([(user, pa.string()), (item, pa.string()), (time, pa.int64())] + ([(rating, pa.float64())] if rating in keys else []))
    cols = (user, item, time, rating if rating in keys else None)
    try:
        table = pajson.read_json(
            io.BytesIO(src.data),
            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
            read_options=pajson.ReadOptions(block_size=1 << 24),
        )
        complete = pc.and_(pc.is_valid(table.column(user)), pc.and_(pc.is_valid(table.column(item)), pc.is_valid(table.column(time))))
        if not pc.all(complete).as_py():
            raise pa.ArrowInvalid("record without a required field")
    except pa.ArrowInvalid:
        table = _read_json_lines_slowly(src, ctx, schema, cols)  # finds the bad line, or skips bad lines
    return _frame(src, ctx, table, cols, header=False)


def _read_json_lines_slowly(src: SourceFile, ctx: ReadContext, schema: pa.Schema, cols: tuple) -> pa.Table:
    """Line-by-line JSON parsing, only used when the fast reader fails: names or skips the bad lines."""
    user, item, time, rating = cols
    rows = {name: [] for name in schema.names}
    for number, line in enumerate(src.data.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            values = (str(record[user]), str(record[item]), int(record[time]))
            score = float(record[rating]) if rating and record.get(rating) is not None else None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
            if ctx.on_bad_lines == "skip":
                ctx.bad_lines += 1
                continue
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else type(exc).__name__
            raise InputError(f"{src.name}: line {number}: bad review record ({reason}): {_short(line)!r}") from None
        for name, value in zip((user, item, time), values):
            rows[name].append(value)
        if rating:
            rows[rating].append(score)
    return pa.table({name: pa.array(rows[name], schema.field(name).type) for name in schema.names})


def _read_sequences(src: SourceFile, ctx: ReadContext) -> pd.DataFrame:
    """S3-Rec format: one line per user, ``user item1 item2 ...`` in time order.

    Timestamps are the events' positions in the file (0, 1, 2, ...)."""
    _check_utf8(src)
    lines = pc.split_pattern(pa.array([src.data.decode("utf-8")], pa.large_string()), "\n")
    fields = pc.utf8_split_whitespace(pc.list_flatten(lines))
    fields = pc.filter(fields, pc.greater(pc.list_value_length(fields), 0))
    lengths = pc.list_value_length(fields).to_numpy(zero_copy_only=False).astype(np.int64) - 1
    flat = pc.list_flatten(fields)
    starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    is_user = np.zeros(len(flat), dtype=bool)
    is_user[starts] = True
    users = pc.take(flat, pa.array(starts))
    items = pc.filter(flat, pa.array(~is_user))
    table = pa.table({"user": pc.take(users, pa.array(np.repeat(np.arange(len(users)), lengths))), "item": items})
    if table.num_rows == 0:
        raise InputError(f"{src.name}: no interactions found")
    return _frame(src, ctx, table, ("user", "item", None, None), header=False)

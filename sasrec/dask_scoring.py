"""Batch scoring on a Dask cluster: :meth:`Recommender.score_frame` run on every partition of a Dask
DataFrame, after a shuffle that puts all of a user's rows in one partition.

    recs = score_dask("models/NAME", events_ddf, k=10)   # lazy: user_id, rank, item_id, score, ...
    write_parquet(recs, "recs/")                         # a folder of part files, written atomically

Every row comes from ``score_frame`` on the worker, so the answers, the history rules and the output
columns are those of the pandas path (and of the gRPC service). The model version is resolved once on
the client, so every worker scores with the same version even if a new one is exported mid-job; each
worker process loads it once and keeps it for all its partitions (and later jobs on that version).

The only ``sasrec`` module that imports Dask (tests/test_layering.py); the pandas engine never loads it.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Sequence

import dask.dataframe as dd
import numpy as np
import pandas as pd

from pipelines.atomic import atomic_directory
from pipelines.errors import InputError
from sasrec.model_base import read_card, resolve_version, version_fingerprint
from sasrec.recommender import DEFAULT_CHUNK_SIZE, Recommender, _require

# Position of each row in the input (partition number << 32 | row in partition). A shuffle does not keep
# row order, and score_frame breaks timestamp ties (and picks a user's exclusion list) by row order.
_ORDER = "_sasrec_input_order"

_cache_lock = threading.Lock()
_cached: tuple[tuple, Recommender] | None = None
LOADS = 0  # SavedModel loads in this process (a worker's count: tests check it is one per worker)


def worker_recommender(version_dir: str, fingerprint: tuple) -> Recommender:
    """The model of ``version_dir``, loaded once per process and kept while the key stays the same.

    The fingerprint is part of the key, so a version folder rewritten in place is loaded again; only the
    latest model is kept (a long-lived worker does not pile up every model it ever scored with)."""
    global _cached, LOADS
    key = (version_dir, fingerprint)
    with _cache_lock:  # a worker with several threads must not load the model twice
        if _cached is None or _cached[0] != key:
            _cached = None  # free the old model before loading the new one
            _cached = (key, Recommender.load(version_dir))
            LOADS += 1
        return _cached[1]


def output_meta(user_dtype) -> pd.DataFrame:
    """An empty frame with ``score_frame``'s output columns and dtypes (tests hold the two together)."""
    return pd.DataFrame({
        "user_id": pd.Series(dtype=user_dtype),
        "rank": pd.Series(dtype=np.int32),
        "item_id": pd.Series(dtype=pd.StringDtype("pyarrow", na_value=np.nan)),
        "score": pd.Series(dtype=np.float32),
        "cold_start": pd.Series(dtype=bool),
        "unknown_count": pd.Series(dtype=np.int32),
    })


def _tag_rows(part: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
    number = 0 if partition_info is None else int(partition_info["number"])
    return part.assign(**{_ORDER: (np.int64(number) << 32) + np.arange(len(part), dtype=np.int64)})


def _score_partition(part: pd.DataFrame, version_dir: str, fingerprint: tuple, k: int, user_col: str,
                     options: dict) -> pd.DataFrame:
    if len(part) == 0:  # more partitions than users, or a partition no user hashed to
        return output_meta(part[user_col].dtype)
    order = np.argsort(part[_ORDER].to_numpy(), kind="stable")
    rec = worker_recommender(version_dir, fingerprint)
    return rec.score_frame(part.iloc[order], k, user_col=user_col, progress=False, **options)


def _check_columns(ddf: dd.DataFrame, *, user_col: str, item_col: str, time_col: str | None,
                   history_col: str | None, exclude_col: str | None) -> None:
    """The column rules of ``frame_histories``, on the client before anything is computed."""
    _require(ddf, user_col, "user ids")
    if exclude_col is not None:
        _require(ddf, exclude_col, "per-user exclusion lists")
    if history_col is not None:
        _require(ddf, history_col, "list-valued histories, oldest first")
    else:
        _require(ddf, item_col, "events frame: one row per event with user, item[, timestamp]; for one row "
                                "per user with a list of item ids, name that column with history_col / --history-col")
        if time_col is not None and time_col not in ddf.columns and time_col != "timestamp":
            _require(ddf, time_col, "event times")
    for column in (history_col, exclude_col):
        if column is not None and isinstance(ddf[column].dtype, pd.StringDtype):
            raise InputError(
                f"column {column!r} holds strings, not lists of item ids (dask.dataframe.from_pandas turns "
                "object columns into strings unless dask.config 'dataframe.convert-string' is False; Parquet "
                "keeps lists)")


def score_dask(
    model_path: str | os.PathLike,
    ddf: dd.DataFrame,
    k: int = 10,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    history_col: str | None = None,
    exclude_col: str | None = None,
    exclude_item_ids: Sequence[str] = (),
    exclude_seen: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    npartitions: int | None = None,
) -> dd.DataFrame:
    """Top-k for every user of ``ddf`` (events or list-valued histories, as for
    :meth:`Recommender.score_frame`, with the same arguments), as a lazy Dask DataFrame with
    ``score_frame``'s columns and dtypes: ``user_id, rank, item_id, score, cold_start, unknown_count``.

    ``ddf`` is shuffled on ``user_col`` into ``npartitions`` partitions (default: as many as ``ddf``
    has), so each partition holds whole users and is scored by ``score_frame`` on a worker. Rows are
    those ``score_frame`` gives for the whole frame, in another order (per partition, users in order of
    first appearance). Missing columns and a ``k`` outside the model's range raise :class:`InputError`
    here, before anything is computed; errors in the values (missing ids, bad timestamps) are raised by
    ``score_frame`` on the worker and re-raised by ``compute``. An empty input gives an empty result.
    """
    if not isinstance(ddf, dd.DataFrame):
        raise InputError(f"score_dask needs a Dask DataFrame, got {type(ddf).__name__}")
    version_dir, _ = resolve_version(model_path)
    card = read_card(version_dir)
    max_k = int(card.get("max_k", card.get("num_items", 0)))  # as Recommender reads the card
    if not 1 <= int(k) <= max_k:
        raise InputError(f"k must be in 1..{max_k}, got {k}")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    if user_col not in ddf.columns and ddf.index.name == user_col:
        ddf = ddf.reset_index()
    if history_col is None and item_col not in ddf.columns and "history" in ddf.columns:
        history_col = "history"
    _check_columns(ddf, user_col=user_col, item_col=item_col, time_col=time_col, history_col=history_col,
                   exclude_col=exclude_col)

    tagged = ddf.map_partitions(_tag_rows, meta=ddf._meta.assign(**{_ORDER: pd.Series(dtype=np.int64)}))
    shuffled = tagged.shuffle(on=user_col, npartitions=npartitions or ddf.npartitions)
    options = dict(item_col=item_col, time_col=time_col, history_col=history_col, exclude_col=exclude_col,
                   exclude_item_ids=list(exclude_item_ids), exclude_seen=exclude_seen, chunk_size=chunk_size)
    return shuffled.map_partitions(
        _score_partition, str(version_dir), version_fingerprint(version_dir), int(k), user_col, options,
        meta=output_meta(shuffled._meta[user_col].dtype), align_dataframes=False,
    )


def write_parquet(recs: dd.DataFrame, folder: str | os.PathLike) -> int:
    """Write ``recs`` as a folder of Parquet part files, atomically (a temporary folder beside ``folder``,
    renamed when every part is written: a failure leaves nothing and an existing ``folder`` untouched).
    The folder must be one the client and every worker see. Returns the number of rows written."""
    import pyarrow.parquet as pq

    with atomic_directory(folder) as tmp:
        recs.to_parquet(str(tmp), write_index=False)
        return sum(pq.read_metadata(path).num_rows for path in sorted(tmp.glob("*.parquet")))


def read_table(path: str, *, csv: bool, text_cols: Sequence[str | None] = ()) -> dd.DataFrame:
    """A Parquet file, folder of Parquet files or glob (``csv=False``), or CSV file(s) with the
    ``text_cols`` read as strings (``007`` stays ``007``), as a Dask DataFrame (lazy: values are read by
    the workers)."""
    matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path] if os.path.exists(path) else []
    if not matches:
        raise InputError(f"{path}: file not found")
    try:
        if not csv:
            return dd.read_parquet(path)
        header = pd.read_csv(matches[0], nrows=0).columns
        dtypes = {c: str for c in text_cols if c and c in header}
        return dd.read_csv(path, dtype=dtypes or None)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read it as {'csv' if csv else 'parquet'}: {exc}") from None

"""The Dask engine of ``prepare``: the pandas engine's dataset folder, built on a Dask cluster.

Every rule is the pandas engine's own code, run on partitions; what changes is where counts are taken:

1. **read**: one task per input file (:func:`pipelines.readers.read_input_file`), the minimum rating
   applied there; the client receives counts and file names, never events.
2. **codes**: each column's distinct ids are merged on the workers (a tree of unions: the same item is in
   most files) and ranked on the client (:func:`pipelines.vocab.rank_codes`, on arrow strings: memory in
   distinct ids); each worker builds one lookup per vocabulary and turns ids into codes, a code being
   the id's rank.
3. **order**: a shuffle by user code into ranges (``set_index``; Dask picks the divisions): each
   partition holds whole users, consecutive, sorted by (user, time, file order); repeated
   consecutive events are dropped there.
4. **k-core**: item counts summed over partitions, user counts within them, until nothing changes
   (or one pass for ``single-pass``), the rule of :func:`pipelines.clean.kcore_mask`.
5. **vocabulary and split**: the survivors ranked as the pandas engine ranks them, splits per user,
   temporal cuts from order statistics the workers answer (:class:`DistributedTimes`); each sequences
   file is built on a worker as Parquet bytes (:func:`pipelines.dataset.parquet_bytes`) and written by
   the client into the folder, which appears atomically.

The same input and options give byte-identical files to the pandas engine's (tests check it).
Workers need the input paths (a shared file system or an fsspec URL); the output is written by the
client only.
"""

from __future__ import annotations

import math
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.atomic import atomic_directory
from pipelines.clean import consecutive_duplicate_mask, min_rating_mask
from pipelines.dataset import (
    DEFAULT_USERS_PER_PART,
    SEQUENCES_PARTS,
    parquet_bytes,
    sequence_parts,
    sequences_table,
    write_items_and_manifest,
)
from pipelines.errors import InputError
from pipelines.prepare import PrepareOptions, dataset_manifest, describe_dropped
from pipelines.readers import InputFile, ReaderOptions, file_order_shifts, input_files, read_input_file
from pipelines.split import leave_one_out_split, temporal_cutoffs, temporal_split
from pipelines.vocab import item_vocabulary, rank_codes

# Events per partition after the shuffle: small enough for a worker of a few GB, large enough that
# per-task overhead stays small.
EVENTS_PER_PARTITION = 2_000_000
_ROW_BITS = 40  # a row's file-order key: file index << 40 | line; 2**40 rows per file, 2**23 files


def prepare_on_dask(
    client,
    format: str,
    path: str | Path,
    out_dir: str | Path,
    *,
    reader_options: dict | None = None,
    users_per_part: int = DEFAULT_USERS_PER_PART,
    events_per_partition: int = EVENTS_PER_PARTITION,
    **options,
) -> dict:
    """Read ``path`` on the cluster of ``client``, prepare it as :func:`pipelines.prepare.prepare` does (the
    :class:`pipelines.prepare.PrepareOptions` given as keywords) and write the dataset folder ``out_dir``;
    returns its manifest. ``reader_options`` and ``users_per_part`` as :func:`pipelines.prepare.prepare_file`."""
    opts = PrepareOptions(**options)
    sequence_parts(0, users_per_part)  # checks the option before any work
    reader_options = {k: v for k, v in (reader_options or {}).items() if v is not None}
    reading = ReaderOptions(**reader_options)
    reading.check(format)
    sources = input_files(format, path)

    # 1. read
    read = client.map(_read_file, sources, range(len(sources)), format=format, options=reading,
                      min_rating=opts.min_rating, pure=False)
    summaries = client.gather(client.map(_summary, read))
    attrs = {
        "format": format, "timestamp": summaries[0]["timestamp"], "options": reader_options,
        "files": [entry for s in summaries for entry in s["files"]],
    }
    dropped = {"bad_lines": sum(s["bad_lines"] for s in summaries), "min_rating": sum(s["min_rating"] for s in summaries),
               "dedupe": 0, "kcore": 0}
    events = sum(s["events"] for s in summaries)

    # 2. codes: distinct ids merged on the workers (the same item is in most files), ranked on the client
    job = uuid.uuid4().hex
    user_names, user_lookup = _vocabulary(client, read, "user_id", f"{job}-users")
    item_names, item_lookup = _vocabulary(client, read, "item_id", f"{job}-items")
    shifts = file_order_shifts(attrs["timestamp"], [s["rows"] for s in summaries])
    parts = client.map(_encode, read, shifts, users=user_lookup, items=item_lookup)
    del read

    # 3. order
    partitions = max(1, math.ceil(events / events_per_partition))
    parts = _by_user(client, parts, partitions, opts.dedupe_consecutive)
    if opts.dedupe_consecutive:
        kept = _count(client, parts)
        dropped["dedupe"], events = events - kept, kept

    # 4. k-core
    if opts.kcore != "none":
        while True:
            counts = _tree(client, _sum_counts, client.map(_bincount, parts, column="item", size=len(item_names)))
            parts = client.map(_kcore_round, parts, item_counts=counts, user_core=opts.user_core, item_core=opts.item_core)
            left = _count(client, parts)
            dropped["kcore"] += events - left
            fixed_point = left == events
            events = left
            if fixed_point or opts.kcore == "single-pass" or left == 0:
                break
    if events == 0:
        raise InputError(f"no events left after filtering (dropped: {describe_dropped(dropped)}); relax the filters")

    # 5. vocabulary
    used = np.zeros(len(user_names), dtype=bool)
    used[np.concatenate(client.gather(client.map(_users_of, parts)))] = True
    user_index, user_ids = rank_codes(user_names, used=used)
    if np.any(np.diff(user_index[used]) < 0):  # the survivors sort differently than all users (e.g. now all numeric)
        parts = client.map(_recode_users, parts, user_index=client.scatter(user_index, broadcast=True))
        parts = _by_user(client, parts, len(parts), dedupe=False)
        user_index = np.arange(len(user_ids))
    item_counts = client.gather(_tree(client, _sum_counts, client.map(_bincount, parts, column="item", size=len(item_names))))
    item_index, item_sorted = rank_codes(item_names, used=item_counts > 0, first=2)
    item_ids = item_vocabulary(item_sorted)

    # split
    split_info = opts.split_description()
    cuts = None
    if opts.split == "temporal":
        cuts = temporal_cutoffs(DistributedTimes(client, parts), **opts.cuts)
        split_info.update(valid_cut=cuts[0], test_cut=cuts[1])
    user_map = client.scatter(user_index, broadcast=True)
    item_map = client.scatter(item_index.astype(np.int32), broadcast=True)
    finished = client.map(_finish, parts, user_index=user_map, item_index=item_map, vocab_size=len(item_ids), cuts=cuts)
    del parts
    ends = client.gather(client.map(_split_ends, finished))
    order = [i for i in np.argsort([e["first_user"] for e in ends]) if ends[i]["lengths"].size]  # empty partitions left out
    finished = [finished[i] for i in order]
    ends = [ends[i] for i in order]
    lengths, train_end, valid_end = (np.concatenate([e[key] for e in ends]) for key in ("lengths", "train_end", "valid_end"))
    firsts = np.array([e["first_user"] for e in ends] + [len(user_ids)])
    counts, train_counts = client.gather(_tree(client, _sum_count_pairs, client.map(_counts_of, finished)))
    time_range = (min(e["first_time"] for e in ends), max(e["last_time"] for e in ends))
    manifest = dataset_manifest(
        attrs, opts.filters(), split_info, lengths,
        train_end, valid_end, num_items=len(item_ids) - 2, time_range=time_range, dropped=dropped,
    )

    # write
    files = sequence_parts(len(user_ids), users_per_part)
    blobs = {}
    for name, start, end in files:
        overlapping = [finished[i] for i in range(len(finished)) if firsts[i] < end and firsts[i + 1] > start]
        # A copy: a pickled arrow slice carries its whole parent buffer (all user ids) to every task.
        names = pa.concat_arrays([user_ids.slice(start, end - start)])
        blobs[client.submit(_sequences_file, start, end, names, overlapping)] = name
    with atomic_directory(Path(out_dir)) as tmp:
        if len(files) > 1:
            (tmp / SEQUENCES_PARTS).mkdir()
        from distributed import as_completed

        for future in as_completed(list(blobs)):
            (tmp / blobs[future]).write_bytes(future.result())
            future.release()
        write_items_and_manifest(tmp, item_ids, counts, train_counts, manifest)
    return manifest


class DistributedTimes:
    """:class:`pipelines.split.EventTimes` over the events of partitions on the cluster: each worker
    sorts its partition's times once; the k-th time is found by bisection on the value, counting below it."""

    def __init__(self, client, parts):
        self.client = client
        self.sorted = client.map(_sorted_times, parts)
        sizes_and_ranges = client.gather(client.map(_time_range, self.sorted))
        self.n = sum(n for n, _, _ in sizes_and_ranges)
        self.low = min(lo for n, lo, _ in sizes_and_ranges if n)
        self.high = max(hi for n, _, hi in sizes_and_ranges if n)

    def count_before(self, time: int) -> int:
        return int(sum(self.client.gather(self.client.map(_count_before, self.sorted, time=int(time)))))

    def kth(self, k: int) -> int:
        low, high = self.low, self.high  # the answer is in [low, high]: the smallest t with k + 1 times <= t
        while low < high:
            middle = (low + high) // 2
            if self.count_before(middle + 1) >= k + 1:
                high = middle
            else:
                low = middle + 1
        return int(low)


# ----------------------------------------------------------------------------- the client's side


def _vocabulary(client, frames, column: str, key: str):
    """All distinct ids of ``column`` (merged on the workers), sorted by rank, and a broadcast future of
    them that :func:`_encode` turns into a lookup once per worker: a code is the rank of its id."""
    distinct = client.gather(_tree(client, _distinct, client.map(_ids_of, frames, column=column)))
    _, names = rank_codes(distinct)
    return names, (key, client.scatter(names, broadcast=True))


def _tree(client, combine, futures: list, fan_in: int = 8):
    """Combine the results of ``futures`` pairwise-up on the workers (``combine(list) -> same kind``), so
    no task receives more than ``fan_in`` partial results; a future of the total."""
    while len(futures) > 1:
        futures = [client.submit(combine, futures[i : i + fan_in]) for i in range(0, len(futures), fan_in)]
    return futures[0]


def _by_user(client, parts, partitions: int, dedupe: bool):
    """Shuffle to ``partitions`` partitions of consecutive whole users (divisions from Dask's quantiles of
    the user code), each sorted by (user, time, file order)."""
    import dask.dataframe as dd

    meta = pd.DataFrame({"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int32),
                         "timestamp": np.zeros(0, np.int64), "row": np.zeros(0, np.int64)})
    frame = dd.from_delayed(parts, meta=meta, verify_meta=False)
    # The task-based shuffle: faster than p2p at these partition counts on the 20M-event benchmark.
    shuffled = frame.set_index("user", npartitions=partitions, drop=False, shuffle_method="tasks")
    return client.compute(shuffled.map_partitions(_ordered, dedupe, meta=meta).to_delayed())


def _count(client, parts) -> int:
    return int(sum(client.gather(client.map(len, parts))))


# ----------------------------------------------------------------------------- tasks (on workers)


def _read_file(source: InputFile, index: int, *, format: str, options: ReaderOptions, min_rating: float | None) -> pd.DataFrame:
    """One input file as ``user_id``/``item_id`` (categorical), ``timestamp`` and ``row`` (the file-order
    key: file index << 40 | line), after the minimum rating; how it was read in ``attrs``."""
    frame = read_input_file(format, source, options)
    keep = min_rating_mask(frame["rating"].to_numpy() if "rating" in frame else None, min_rating)
    rows = np.arange(len(frame), dtype=np.int64) | (np.int64(index) << _ROW_BITS)
    attrs = dict(frame.attrs, min_rating=0 if keep is None else int(len(keep) - keep.sum()))
    if keep is not None:
        frame, rows = frame[keep], rows[keep]
    out = pd.DataFrame({"user_id": frame["user_id"].cat.remove_unused_categories(),
                        "item_id": frame["item_id"].cat.remove_unused_categories(),
                        "timestamp": frame["timestamp"].to_numpy().astype(np.int64), "row": rows})
    out.attrs = attrs
    return out


def _summary(frame: pd.DataFrame) -> dict:
    a = frame.attrs
    return {"rows": a["rows"], "bad_lines": a["bad_lines"], "files": a["files"], "timestamp": a["timestamp"],
            "min_rating": a["min_rating"], "events": len(frame)}


def _ids_of(frame: pd.DataFrame, column: str) -> pa.Array:
    return pa.array(np.asarray(frame[column].cat.categories, dtype=object), pa.string())


def _distinct(arrays: list[pa.Array]) -> pa.Array:
    return pc.unique(pa.concat_arrays(arrays))


_LOOKUPS: dict[str, pd.Index] = {}  # per worker process: the id -> code lookups of the running jobs
_LOOKUPS_LOCK = threading.Lock()


def _lookup(vocabulary: tuple[str, pa.Array]) -> pd.Index:
    """The hash index of a vocabulary ``(key, names)``, built once per worker (not once per file); the
    last 4 are kept."""
    key, names = vocabulary
    with _LOOKUPS_LOCK:
        index = _LOOKUPS.get(key)
        if index is None:
            while len(_LOOKUPS) >= 4:
                _LOOKUPS.pop(next(iter(_LOOKUPS)))
            index = _LOOKUPS[key] = pd.Index(names.to_numpy(zero_copy_only=False))
        return index


def _encode(frame: pd.DataFrame, shift: int, users: tuple, items: tuple) -> pd.DataFrame:
    """Ids as codes (ranks among all ids), file-order time shifted to the position in the whole input."""
    user_codes = _lookup(users).get_indexer(frame["user_id"].cat.categories)
    item_codes = _lookup(items).get_indexer(frame["item_id"].cat.categories)
    return pd.DataFrame({"user": user_codes[frame["user_id"].cat.codes.to_numpy()].astype(np.int64),
                         "item": item_codes[frame["item_id"].cat.codes.to_numpy()].astype(np.int32),
                         "timestamp": frame["timestamp"].to_numpy() + np.int64(shift), "row": frame["row"].to_numpy()})


def _ordered(frame: pd.DataFrame, dedupe: bool) -> pd.DataFrame:
    """Sorted by (user, time, file order): the pandas engine's stable sort, ties kept in file order."""
    order = np.lexsort((frame["row"].to_numpy(), frame["timestamp"].to_numpy(), frame["user"].to_numpy()))
    frame = frame.iloc[order].reset_index(drop=True)
    if dedupe:
        keep = consecutive_duplicate_mask(frame["user"].to_numpy(), frame["item"].to_numpy())
        frame = frame[keep].reset_index(drop=True)
    return frame


def _bincount(frame: pd.DataFrame, column: str, size: int) -> np.ndarray:
    return np.bincount(frame[column].to_numpy(), minlength=size)


def _sum_counts(counts: list[np.ndarray]) -> np.ndarray:
    return np.sum(counts, axis=0)


def _kcore_round(frame: pd.DataFrame, item_counts: np.ndarray, user_core: int, item_core: int) -> pd.DataFrame:
    users = frame["user"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])  # users are contiguous in a partition
    per_user = np.diff(np.r_[starts, len(users)])
    ok = (np.repeat(per_user, per_user) >= user_core) & (item_counts[frame["item"].to_numpy()] >= item_core)
    return frame if ok.all() else frame[ok].reset_index(drop=True)


def _users_of(frame: pd.DataFrame) -> np.ndarray:
    return np.unique(frame["user"].to_numpy())


def _recode_users(frame: pd.DataFrame, user_index: np.ndarray) -> pd.DataFrame:
    return frame.assign(user=user_index[frame["user"].to_numpy()])


def _finish(frame: pd.DataFrame, user_index: np.ndarray, item_index: np.ndarray, vocab_size: int, cuts) -> dict:
    """A partition as CSR sequences with final ids, split ends and item counts."""
    users = user_index[frame["user"].to_numpy()]
    items = item_index[frame["item"].to_numpy()]
    times = frame["timestamp"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
    offsets = np.r_[starts, len(users)].astype(np.int64)
    lengths = np.diff(offsets)
    if cuts is None:
        train_end, valid_end = leave_one_out_split(lengths)
    else:
        train_end, valid_end = temporal_split(times, offsets, *cuts)
    position = np.arange(len(items)) - np.repeat(offsets[:-1], lengths)
    in_train = position < np.repeat(train_end, lengths)
    return {
        "first_user": int(users[0]) if len(users) else -1, "items": items, "timestamps": times, "offsets": offsets,
        "train_end": train_end, "valid_end": valid_end,
        "counts": np.bincount(items, minlength=vocab_size).astype(np.int64),
        "train_counts": np.bincount(items[in_train], minlength=vocab_size).astype(np.int64),
    }


def _split_ends(part: dict) -> dict:
    times = part["timestamps"]
    return {"first_user": part["first_user"], "lengths": np.diff(part["offsets"]), "train_end": part["train_end"],
            "valid_end": part["valid_end"], "first_time": int(times.min()) if len(times) else 0,
            "last_time": int(times.max()) if len(times) else 0}


def _counts_of(part: dict) -> tuple[np.ndarray, np.ndarray]:
    return part["counts"], part["train_counts"]


def _sum_count_pairs(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.sum([p[0] for p in pairs], axis=0), np.sum([p[1] for p in pairs], axis=0)


def _sequences_file(start: int, end: int, user_ids: np.ndarray, parts: list[dict]) -> bytes:
    """The bytes of the sequences file for users ``start..end`` from the partitions that hold them."""
    items, times, lengths, train_end, valid_end = [], [], [], [], []
    for part in parts:
        first, offsets = part["first_user"], part["offsets"]
        a, b = max(start - first, 0), min(end - first, len(offsets) - 1)
        items.append(part["items"][offsets[a] : offsets[b]])
        times.append(part["timestamps"][offsets[a] : offsets[b]])
        lengths.append(np.diff(offsets[a : b + 1]))
        train_end.append(part["train_end"][a:b])
        valid_end.append(part["valid_end"][a:b])
    offsets = np.r_[0, np.cumsum(np.concatenate(lengths))]
    return parquet_bytes(sequences_table(user_ids, start, np.concatenate(items), np.concatenate(times), offsets,
                                         np.concatenate(train_end), np.concatenate(valid_end)))


def _sorted_times(frame: pd.DataFrame) -> np.ndarray:
    return np.sort(frame["timestamp"].to_numpy())


def _time_range(ordered: np.ndarray) -> tuple[int, int, int]:
    return (len(ordered), int(ordered[0]), int(ordered[-1])) if len(ordered) else (0, 0, 0)


def _count_before(ordered: np.ndarray, time: int) -> int:
    return int(np.searchsorted(ordered, time, side="left"))

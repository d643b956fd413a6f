"""The dataset folder: the contract between the pipeline and training.

A dataset folder holds three files, written together and atomically:

``sequences.parquet`` (or, for large outputs, ``sequences/part-00000.parquet``, ``part-00001.parquet``,
... : the same table cut into parts of consecutive users, which concatenated in file-name order give
it back; a folder holds one layout or the other, and every reader accepts both), one row per user,
users in ``user_index`` order:
    ``user_id`` (string, external id), ``user_index`` (int32, 0..U-1),
    ``items`` (list<int32>, internal item ids in time order, ties in file order),
    ``timestamps`` (list<int64>, same length as ``items``),
    ``train_end`` and ``valid_end`` (int32): ``items[:train_end]`` is training history,
    ``items[train_end:valid_end]`` the validation targets, ``items[valid_end:]`` the test targets.
    Leave-one-out gives ``train_end = n - 2`` and ``valid_end = n - 1`` (users with fewer than
    three events keep everything for training: ``train_end = valid_end = n``).

``items.parquet``, one row per real item, in ``item_index`` order:
    ``item_index`` (int32, from ``FIRST_ITEM_ID``), ``item_id`` (string, external id),
    ``count`` (int64, events in the clean data), ``train_count`` (int64, events in training histories).

``manifest.json``: sources with sha256, reader, filters, split protocol, vocabulary layout,
statistics, dropped rows by reason and the pipeline version. No wall-clock time, so the same
input gives byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.atomic import atomic_directory
from pipelines.errors import InputError

PADDING_ID = 0
OOV_ID = 1
FIRST_ITEM_ID = 2
SEQUENCES_FILE = "sequences.parquet"
SEQUENCES_PARTS = "sequences"  # folder of part-NNNNN.parquet files, the multi-part layout
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "manifest.json"


@dataclass
class SequenceDataset:
    """All user sequences in CSR form (flat ``items`` plus ``offsets``), ready for training.

    ``item_ids[i]`` is the external id of internal item ``i``; entries 0 and 1 are the padding and
    out-of-vocabulary placeholders ``""`` and ``"<oov>"``, which never name a real item.
    """

    user_ids: np.ndarray  # (U,) object: external user ids
    items: np.ndarray  # (E,) int32: internal item ids, users concatenated
    timestamps: np.ndarray  # (E,) int64
    offsets: np.ndarray  # (U + 1,) int64: user u owns items[offsets[u]:offsets[u + 1]]
    train_end: np.ndarray  # (U,) int32, relative to the user's start
    valid_end: np.ndarray  # (U,) int32, relative to the user's start
    item_ids: np.ndarray  # (V,) object: external item ids by internal id
    item_counts: np.ndarray  # (V,) int64: events per item in the clean data
    train_counts: np.ndarray  # (V,) int64: events per item in training histories
    manifest: dict = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def vocab_size(self) -> int:
        """Size of the item id space including padding and OOV (the embedding table size)."""
        return len(self.item_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - FIRST_ITEM_ID

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def user_items(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]


DEFAULT_USERS_PER_PART = 100_000
# Fixed writer settings keep the bytes identical for identical input, whichever engine wrote them.
_PARQUET_OPTIONS = dict(compression="zstd", use_dictionary=True, write_statistics=True, store_schema=True)


def sequences_table(user_ids: np.ndarray, first_user: int, items: np.ndarray, timestamps: np.ndarray,
                    offsets: np.ndarray, train_end: np.ndarray, valid_end: np.ndarray) -> pa.Table:
    """Rows of the sequences table for consecutive users from ``first_user`` (CSR ``items``/``offsets``)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    offsets32 = pa.array((offsets - offsets[0]).astype(np.int32), pa.int32())
    flat = slice(int(offsets[0]), int(offsets[-1]))
    return pa.table(
        {
            "user_id": pa.array(np.asarray(user_ids).astype(str), pa.string()),
            "user_index": pa.array(np.arange(first_user, first_user + len(user_ids), dtype=np.int32)),
            "items": pa.ListArray.from_arrays(offsets32, pa.array(np.asarray(items[flat], dtype=np.int32))),
            "timestamps": pa.ListArray.from_arrays(offsets32, pa.array(np.asarray(timestamps[flat], dtype=np.int64))),
            "train_end": pa.array(np.asarray(train_end, dtype=np.int32)),
            "valid_end": pa.array(np.asarray(valid_end, dtype=np.int32)),
        }
    )


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of a dataset-folder Parquet file (so a Dask worker can write them elsewhere)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.combine_chunks(), sink, **_PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


def sequence_parts(num_users: int, users_per_part: int = DEFAULT_USERS_PER_PART) -> list[tuple[str, int, int]]:
    """``(file, first_user, end_user)`` of each sequences file: one ``sequences.parquet``, or parts of
    ``users_per_part`` users when there are more users than that (``users_per_part`` 0: always one file)."""
    if users_per_part < 0:
        raise InputError(f"--users-per-part must be >= 0, got {users_per_part}")
    if not users_per_part or num_users <= users_per_part:
        return [(SEQUENCES_FILE, 0, num_users)]
    return [(f"{SEQUENCES_PARTS}/part-{part:05d}.parquet", start, min(start + users_per_part, num_users))
            for part, start in enumerate(range(0, num_users, users_per_part))]


def write_items_and_manifest(folder: Path, item_ids: np.ndarray, item_counts: np.ndarray, train_counts: np.ndarray,
                             manifest: dict) -> None:
    """``items.parquet`` and ``manifest.json`` (with the vocabulary layout) into a folder being written."""
    items = pa.table(
        {
            "item_index": pa.array(np.arange(FIRST_ITEM_ID, len(item_ids), dtype=np.int32)),
            "item_id": pa.array(np.asarray(item_ids[FIRST_ITEM_ID:]).astype(str), pa.string()),
            "count": pa.array(np.asarray(item_counts[FIRST_ITEM_ID:], dtype=np.int64)),
            "train_count": pa.array(np.asarray(train_counts[FIRST_ITEM_ID:], dtype=np.int64)),
        }
    )
    (folder / ITEMS_FILE).write_bytes(parquet_bytes(items))
    manifest = dict(manifest)
    manifest["vocabulary"] = {
        "padding_id": PADDING_ID,
        "oov_id": OOV_ID,
        "first_item_id": FIRST_ITEM_ID,
        "vocab_size": len(item_ids),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_dataset(out_dir: str | Path, ds: SequenceDataset, *, users_per_part: int = DEFAULT_USERS_PER_PART) -> Path:
    """Write ``ds`` to ``out_dir`` atomically (temporary folder, then rename), the sequences in the
    files of :func:`sequence_parts`."""
    out_dir = Path(out_dir)
    parts = sequence_parts(ds.num_users, users_per_part)
    with atomic_directory(out_dir) as tmp:
        if len(parts) > 1:
            (tmp / SEQUENCES_PARTS).mkdir()
        for name, start, end in parts:
            table = sequences_table(ds.user_ids[start:end], start, ds.items, ds.timestamps, ds.offsets[start : end + 1],
                                    ds.train_end[start:end], ds.valid_end[start:end])
            (tmp / name).write_bytes(parquet_bytes(table))
        write_items_and_manifest(tmp, ds.item_ids, ds.item_counts, ds.train_counts, ds.manifest)
    return out_dir


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"{data_dir}: not a dataset folder (no {MANIFEST_FILE}); create one with `sasrec prepare`")
    return json.loads(path.read_text())


def read_items(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(item_ids, counts, train_counts)`` indexed by internal id, placeholders included."""
    table = pq.read_table(Path(data_dir) / ITEMS_FILE)
    n = table.num_rows + FIRST_ITEM_ID
    item_ids = np.empty(n, dtype=object)
    item_ids[PADDING_ID] = ""
    item_ids[OOV_ID] = "<oov>"
    item_ids[FIRST_ITEM_ID:] = np.asarray(table.column("item_id").to_pylist(), dtype=object)
    counts = np.zeros(n, dtype=np.int64)
    counts[FIRST_ITEM_ID:] = table.column("count").to_numpy()
    train_counts = np.zeros(n, dtype=np.int64)
    train_counts[FIRST_ITEM_ID:] = table.column("train_count").to_numpy()
    return item_ids, counts, train_counts


def read_sequences(data_dir: str | Path) -> pa.Table:
    """The sequences table of a dataset folder, from one file or from its parts in file-name order."""
    data_dir = Path(data_dir)
    single, parts_dir = data_dir / SEQUENCES_FILE, data_dir / SEQUENCES_PARTS
    if single.is_file() and parts_dir.is_dir():
        raise InputError(f"{data_dir}: holds both {SEQUENCES_FILE} and {SEQUENCES_PARTS}/; keep one layout")
    if single.is_file():
        return pq.read_table(single)
    parts = sorted(parts_dir.glob("part-*.parquet")) if parts_dir.is_dir() else []
    if not parts:
        raise InputError(f"{data_dir}: no {SEQUENCES_FILE} and no {SEQUENCES_PARTS}/part-*.parquet")
    tables, expected = [], 0
    for path in parts:
        table = pq.read_table(path)
        index = table.column("user_index").to_numpy()
        if len(index) and (index[0] != expected or np.any(np.diff(index) != 1)):
            raise InputError(f"{path}: user_index must continue from {expected} in steps of 1 (parts hold "
                             "consecutive users in file-name order)")
        expected += len(index)
        tables.append(table)
    return pa.concat_tables(tables)


def read_dataset(data_dir: str | Path) -> SequenceDataset:
    """Read a dataset folder written by :func:`write_dataset`."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    table = read_sequences(data_dir)
    items_col = table.column("items").combine_chunks()
    ts_col = table.column("timestamps").combine_chunks()
    offsets = items_col.offsets.to_numpy().astype(np.int64)
    base = offsets[0]
    item_ids, counts, train_counts = read_items(data_dir)
    return SequenceDataset(
        user_ids=np.asarray(table.column("user_id").to_pylist(), dtype=object),
        items=items_col.values.to_numpy().astype(np.int32)[base : offsets[-1]],
        timestamps=ts_col.values.to_numpy().astype(np.int64)[base : offsets[-1]],
        offsets=offsets - base,
        train_end=table.column("train_end").to_numpy().astype(np.int32),
        valid_end=table.column("valid_end").to_numpy().astype(np.int32),
        item_ids=item_ids,
        item_counts=counts,
        train_counts=train_counts,
        manifest=manifest,
    )

"""Prepare: interactions frame -> clean, sorted, split :class:`SequenceDataset` (and its folder).

Order of steps: minimum rating, sort by user then time (stable: ties keep file order), removal of
repeated consecutive events, k-core, vocabulary, split. Everything runs on integer codes in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipelines import PIPELINE_VERSION
from pipelines.clean import KCORE_MODES, consecutive_duplicate_mask, kcore_mask, min_rating_mask
from pipelines.dataset import DEFAULT_USERS_PER_PART, SequenceDataset, sequence_parts, write_dataset
from pipelines.errors import InputError
from pipelines.readers import read_interactions
from pipelines.split import DEFAULT_VALIDATION, SPLIT_PROTOCOLS, SortedTimes, leave_one_out_split, temporal_cutoffs, temporal_split
from pipelines.vocab import item_vocabulary, rank_codes

STEPS = ("filter", "sort", "k-core", "vocabulary", "split")


@dataclass(frozen=True)
class PrepareOptions:
    """How ``prepare`` cleans, orders and splits, the same on both engines (the flags of ``sasrec prepare``)."""

    min_rating: float | None = None  # drop events rated below this
    dedupe_consecutive: bool = False  # drop an event that repeats the user's previous item
    kcore: str = "iterative"  # iterative (to the fixed point), single-pass (the SASRec paper's) or none
    user_core: int = 5  # minimum events per user
    item_core: int = 5  # minimum events per item
    split: str = "leave-one-out"  # or temporal (see pipelines.split.temporal_cutoffs for the cuts)
    cutoff_time: int | None = None  # temporal: the test cut
    cutoff_quantile: float | None = None  # temporal: the test cut as a quantile of event times
    valid_time: int | None = None  # temporal: the validation cut
    valid_quantile: float | None = None  # temporal: the validation cut as a quantile

    def __post_init__(self):
        if self.kcore not in KCORE_MODES:
            raise InputError(f"--kcore must be one of {', '.join(KCORE_MODES)}, not {self.kcore!r}")
        if self.split not in SPLIT_PROTOCOLS:
            raise InputError(f"--split must be one of {', '.join(SPLIT_PROTOCOLS)}, not {self.split!r}")

    @property
    def cuts(self) -> dict:
        return dict(cutoff_time=self.cutoff_time, cutoff_quantile=self.cutoff_quantile, valid_time=self.valid_time,
                    valid_quantile=self.valid_quantile)

    def filters(self) -> dict:
        """The cleaning options as the manifest records them."""
        core = self.kcore != "none"
        return {"min_rating": self.min_rating, "dedupe_consecutive": self.dedupe_consecutive, "kcore": self.kcore,
                "user_core": self.user_core if core else None, "item_core": self.item_core if core else None}

    def split_description(self) -> dict:
        """The split protocol as the manifest records it (the resolved cuts are added once known)."""
        if self.split == "leave-one-out":
            return {"protocol": self.split, "min_length_for_evaluation": 3}
        info = {"protocol": self.split, **self.cuts}
        if self.valid_time is None and self.valid_quantile is None:
            info["valid_window"] = DEFAULT_VALIDATION
        return info


def prepare(interactions: pd.DataFrame, *, progress: bool | None = False, **options) -> SequenceDataset:
    """Clean, order and split ``interactions`` (a frame from :func:`pipelines.readers.read_interactions`)
    with the :class:`PrepareOptions` given as keywords. ``progress=None`` shows a bar only on a terminal.
    """
    opts = PrepareOptions(**options)
    bar = tqdm(total=len(STEPS), desc="prepare", unit="step", disable=None if progress is None else not progress, leave=False)
    attrs = interactions.attrs
    dropped = {"bad_lines": int(attrs.get("bad_lines", 0)), "min_rating": 0, "dedupe": 0, "kcore": 0}
    users = interactions["user_id"].cat.codes.to_numpy().astype(np.int64)
    items = interactions["item_id"].cat.codes.to_numpy().astype(np.int64)
    times = interactions["timestamp"].to_numpy().astype(np.int64)
    user_names = np.asarray(interactions["user_id"].cat.categories, dtype=object)
    item_names = np.asarray(interactions["item_id"].cat.categories, dtype=object)

    def keep_rows(mask, reason):
        nonlocal users, items, times
        if mask is not None and not mask.all():
            dropped[reason] += int(len(mask) - mask.sum())
            users, items, times = users[mask], items[mask], times[mask]

    bar.set_postfix_str("filter")
    keep_rows(min_rating_mask(interactions["rating"].to_numpy() if "rating" in interactions else None, opts.min_rating), "min_rating")
    bar.update()

    bar.set_postfix_str("sort")
    user_rank, _ = rank_codes(user_names)
    order = np.lexsort((times, user_rank[users]))  # stable: equal times keep file order
    users, items, times = users[order], items[order], times[order]
    del order
    if opts.dedupe_consecutive:
        keep_rows(consecutive_duplicate_mask(users, items), "dedupe")
    bar.update()

    bar.set_postfix_str("k-core")
    if opts.kcore != "none":
        keep_rows(kcore_mask(users, items, opts.user_core, opts.item_core, iterative=opts.kcore == "iterative"), "kcore")
    bar.update()
    if len(users) == 0:
        raise InputError(f"no events left after filtering (dropped: {describe_dropped(dropped)}); relax the filters")

    bar.set_postfix_str("vocabulary")
    user_index, user_ids = rank_codes(user_names, used=np.bincount(users, minlength=len(user_names)) > 0)
    users = user_index[users]
    if np.any(users[1:] < users[:-1]):  # the survivors sort differently than all users (e.g. now all numeric)
        order = np.argsort(users, kind="stable")
        users, items, times = users[order], items[order], times[order]
    item_index, item_sorted = rank_codes(item_names, used=np.bincount(items, minlength=len(item_names)) > 0, first=2)
    items = item_index[items].astype(np.int32)
    item_ids = item_vocabulary(item_sorted)
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=len(user_ids)), out=offsets[1:])
    bar.update()

    bar.set_postfix_str("split")
    split_info = opts.split_description()
    if opts.split == "leave-one-out":
        train_end, valid_end = leave_one_out_split(np.diff(offsets))
    else:
        valid_cut, test_cut = temporal_cutoffs(SortedTimes(times), **opts.cuts)
        train_end, valid_end = temporal_split(times, offsets, valid_cut, test_cut)
        split_info.update(valid_cut=valid_cut, test_cut=test_cut)
    position = np.arange(len(items)) - np.repeat(offsets[:-1], np.diff(offsets))
    in_train = position < np.repeat(train_end, np.diff(offsets))
    item_counts = np.bincount(items, minlength=len(item_ids)).astype(np.int64)
    train_counts = np.bincount(items[in_train], minlength=len(item_ids)).astype(np.int64)
    bar.update()
    bar.close()

    manifest = dataset_manifest(
        attrs, opts.filters(), split_info, np.diff(offsets),
        train_end, valid_end, num_items=len(item_ids) - 2, time_range=(int(times.min()), int(times.max())), dropped=dropped,
    )
    return SequenceDataset(
        user_ids=user_ids,
        items=items,
        timestamps=times,
        offsets=offsets,
        train_end=train_end,
        valid_end=valid_end,
        item_ids=item_ids,
        item_counts=item_counts,
        train_counts=train_counts,
        manifest=manifest,
    )


def dataset_manifest(attrs: dict, filters: dict, split: dict, lengths: np.ndarray, train_end: np.ndarray,
                     valid_end: np.ndarray, *, num_items: int, time_range: tuple[int, int], dropped: dict) -> dict:
    """The manifest of a prepared dataset, from per-user lengths and split ends (every engine builds it here)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    events, users = int(lengths.sum()), len(lengths)
    return {
        "pipeline_version": PIPELINE_VERSION,
        "source": list(attrs.get("files", [])),
        "reader": {"format": attrs.get("format", "dataframe"), "timestamp": attrs.get("timestamp", "column"), **attrs.get("options", {})},
        "filters": filters,
        "split": split,
        "statistics": {
            "users": users,
            "items": int(num_items),
            "events": events,
            "train_events": int(train_end.sum()),
            "valid_events": int((valid_end - train_end).sum()),
            "test_events": int((lengths - valid_end).sum()),
            "valid_users": int((valid_end > train_end).sum()),
            "test_users": int((lengths > valid_end).sum()),
            "mean_length": round(float(lengths.mean()), 4),
            "median_length": float(np.median(lengths)),
            "min_length": int(lengths.min()),
            "max_length": int(lengths.max()),
            "density": round(float(events / (users * num_items)), 8),
            "first_timestamp": time_range[0],
            "last_timestamp": time_range[1],
        },
        "dropped": dropped,
    }


def prepare_file(
    format: str, path: str | Path, out_dir: str | Path, *, reader_options: dict | None = None, progress: bool | None = False,
    users_per_part: int = DEFAULT_USERS_PER_PART, **options
) -> SequenceDataset:
    """Read ``path`` (a file, folder, glob or URL) with :func:`read_interactions`, :func:`prepare` it and
    write the dataset folder (sequences in parts of ``users_per_part`` users when there are more).

    The folder appears only complete (written beside it, then renamed); on any error nothing is left."""
    sequence_parts(0, users_per_part)  # checks the options before the (slow) read
    PrepareOptions(**options)
    reader_options = {k: v for k, v in (reader_options or {}).items() if v is not None}
    frame = read_interactions(format, path, **reader_options)
    frame.attrs["options"] = {k: v for k, v in reader_options.items()}
    dataset = prepare(frame, progress=progress, **options)
    write_dataset(out_dir, dataset, users_per_part=users_per_part)
    return dataset


def describe_dropped(dropped: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "nothing"

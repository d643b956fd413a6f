"""Seeded synthetic interaction logs with a known, learnable next item.

Items are split into ``chains`` latent cycles (a random permutation of the items cut into equal
parts, each closed into a cycle). A user starts on a random item; each next event is the cycle
successor of the previous item with probability ``1 - noise``, else a random item. A model that
learns "successor of the last item" reaches HR@10 of about ``1 - noise``.

Popularity: with ``popularity`` 0 (the default) start and random items are uniform, every item is
visited about equally often and popularity HR@10 is ~ 10 / items. With ``popularity`` s > 0 they are
drawn by a power law, the item of rank r (in the permutation's order) with probability ~ r^-s, as in
real shops' long tails; a chain holds items of neighbouring ranks, so it inherits their share, and
the sequential structure stays the same.

Item ids are ``1..items``, user ids ``1..users``; timestamps are seconds, increasing per user.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.atomic import atomic_file
from pipelines.errors import InputError

DEFAULTS = dict(users=2000, items=500, min_length=20, max_length=60, chains=10, noise=0.1, seed=0, popularity=0.0)
START_TIME = 1_600_000_000  # 2020-09-13: an arbitrary, fixed epoch for the first events


def item_ranks(items: int, seed: int = 0) -> np.ndarray:
    """Item ids by latent rank: chains are cut from this order, and with a power law rank 1 is the most
    popular item."""
    return np.random.default_rng([seed, 0]).permutation(items) + 1


def chain_successors(items: int = 500, chains: int = 10, seed: int = 0) -> np.ndarray:
    """``successor[k]`` is the chain successor of item ``k`` (1-based; entry 0 unused)."""
    if items < 2 or not 1 <= chains <= items // 2:
        raise InputError(f"need at least 2 items per chain (items={items}, chains={chains})")
    successor = np.zeros(items + 1, dtype=np.int64)
    for cycle in np.array_split(item_ranks(items, seed), chains):
        successor[cycle] = np.roll(cycle, -1)
    return successor


def generate(
    users: int = 2000,
    items: int = 500,
    min_length: int = 20,
    max_length: int = 60,
    chains: int = 10,
    noise: float = 0.1,
    seed: int = 0,
    popularity: float = 0.0,
    first_user: int = 1,
    stream: int = 0,
) -> pd.DataFrame:
    """The interaction log as a frame of integer columns ``user_id``, ``item_id``, ``timestamp``, rows
    grouped by user in time order. Same arguments, same frame.

    Users are numbered from ``first_user``; ``stream`` > 0 draws them from another random stream of the
    same ``seed`` (the chains stay the same), which is how the parts of :func:`write_log_parts` differ."""
    if users < 1 or not 1 <= min_length <= max_length:
        raise InputError(f"need users >= 1 and 1 <= min_length <= max_length (got {users}, {min_length}, {max_length})")
    if not 0.0 <= noise <= 1.0:
        raise InputError(f"noise must be between 0 and 1, got {noise}")
    if not 0.0 <= popularity <= 5.0:
        raise InputError(f"popularity (the power law's exponent) must be between 0 and 5, got {popularity}")
    successor = chain_successors(items, chains, seed)
    rng = np.random.default_rng([seed, 1, stream] if stream else [seed, 1])
    if popularity:
        ranks, cumulative = item_ranks(items, seed), np.cumsum(np.arange(1, items + 1, dtype=np.float64) ** -popularity)

        def random_items(n):
            return ranks[np.minimum(np.searchsorted(cumulative, rng.random(n) * cumulative[-1], side="right"), items - 1)]
    else:
        def random_items(n):
            return rng.integers(1, items + 1, size=n)
    lengths = rng.integers(min_length, max_length + 1, size=users)
    walk = np.empty((max_length, users), dtype=np.int32)  # step-major: one vector op per step
    walk[0] = random_items(users)
    for step in range(1, max_length):
        jump = rng.random(users) < noise
        walk[step] = np.where(jump, random_items(users), successor[walk[step - 1]])
    gaps = rng.integers(60, 86_400, size=(max_length, users), dtype=np.int64)
    gaps[0] = rng.integers(0, 365 * 86_400, size=users)
    times = START_TIME + np.cumsum(gaps, axis=0)
    valid = np.arange(max_length)[:, None] < lengths[None, :]
    # Transpose to user-major order, then drop the steps past each user's length.
    valid_t = valid.T
    return pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(first_user, first_user + users, dtype=np.int64), lengths),
            "item_id": walk.T[valid_t].astype(np.int64),
            "timestamp": times.T[valid_t],
        }
    )


def write_log(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the log as CSV ``user_id,item_id,timestamp`` (``--format csv`` reads it back) atomically."""
    path = Path(path)
    with atomic_file(path, "wb") as handle:
        pacsv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), handle)
    return path


LOG_FORMATS = ("csv", "parquet")


def write_log_parts(folder: str | Path, *, parts: int, file_format: str = "csv", users: int = 2000, **options) -> tuple[Path, int]:
    """The log as ``parts`` files of consecutive users (``part-NNNNN.csv`` or ``.parquet``), each drawn
    alone from its own stream, so memory stays that of one part: logs larger than memory. Written
    into a temporary folder, then renamed. Returns the folder and the number of events."""
    from pipelines.atomic import atomic_directory

    if file_format not in LOG_FORMATS:
        raise InputError(f"--file-format must be one of {', '.join(LOG_FORMATS)}, not {file_format!r}")
    if not 1 <= parts <= users:
        raise InputError(f"--parts must be between 1 and --users ({users}), got {parts}")
    events = 0
    with atomic_directory(folder) as tmp:
        for part, chunk in enumerate(np.array_split(np.arange(users), parts)):
            frame = generate(users=len(chunk), first_user=int(chunk[0]) + 1, stream=part + 1, **options)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if file_format == "csv":
                pacsv.write_csv(table, tmp / f"part-{part:05d}.csv")
            else:
                pq.write_table(table, tmp / f"part-{part:05d}.parquet")
            events += len(frame)
    return Path(folder), events

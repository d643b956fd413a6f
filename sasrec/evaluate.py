"""Evaluation protocols as data: which split, which candidates, which items are filtered, which k.

``full``: the held-out item is ranked against every item, the user's already seen items removed
(the held-out item itself always stays a candidate). ``sampled-100``: against 100 items drawn
uniformly (seeded) from those the user never interacted with (the SASRec paper's protocol).
Every result carries its protocol dict, and a popularity baseline is computed on the same protocol.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from pipelines.dataset import FIRST_ITEM_ID, SequenceDataset
from sasrec.config import PROTOCOLS
from sasrec.feed import left_pad
from sasrec.metrics import DEFAULT_KS, metrics_from_ranks, rank_of_target

SPLITS = ("valid", "test")


@dataclass(frozen=True)
class Protocol:
    split: str = "test"
    protocol: str = "full"
    exclude_seen: bool = True
    ks: tuple[int, ...] = DEFAULT_KS
    num_negatives: int = 100
    seed: int = 0
    max_users: int = 0  # 0 = all users with a held-out item

    def describe(self, users_evaluated: int, maxlen: int) -> dict:
        d = asdict(self)
        d["ks"] = list(self.ks)
        d["candidates"] = (
            "all items" if self.protocol == "full" else f"{self.num_negatives} uniform items the user never interacted with"
        )
        if self.protocol != "full":
            d.pop("exclude_seen")
        else:
            d.pop("num_negatives")
        d["users_evaluated"] = int(users_evaluated)
        d["history_maxlen"] = int(maxlen)
        d["target"] = "first held-out item of the split; history = every event before it"
        return d


@dataclass
class EvaluationSet:
    """Users with a held-out item: their history (CSR span of ``ds.items``) and the target."""

    users: np.ndarray
    history_starts: np.ndarray
    history_ends: np.ndarray
    targets: np.ndarray


def evaluation_set(ds: SequenceDataset, split: str, max_users: int = 0, seed: int = 0) -> EvaluationSet:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    starts = ds.offsets[:-1]
    lengths = ds.lengths
    cut = ds.train_end if split == "valid" else ds.valid_end
    end_of_split = ds.valid_end if split == "valid" else lengths
    users = np.flatnonzero((end_of_split > cut) & (cut > 0))
    if max_users and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    history_ends = starts[users] + cut[users]
    return EvaluationSet(users, starts[users], history_ends, ds.items[history_ends])


def rank_targets(
    score_fn: Callable[[np.ndarray], np.ndarray],
    ds: SequenceDataset,
    evalset: EvaluationSet,
    protocol: Protocol,
    maxlen: int,
    batch_size: int = 256,
) -> np.ndarray:
    """Rank of every target under ``score_fn`` (ids (B, maxlen) -> scores (B, V)), batch by batch."""
    rng = np.random.default_rng(protocol.seed)
    ranks = np.empty(len(evalset.users), dtype=np.float64)
    vocab = ds.vocab_size
    for lo in range(0, len(evalset.users), batch_size):
        hi = min(lo + batch_size, len(evalset.users))
        ids = left_pad(ds.items, evalset.history_starts[lo:hi], evalset.history_ends[lo:hi], maxlen)
        n = hi - lo
        if n < batch_size:  # a fixed batch shape avoids recompiling for the last batch
            ids = np.concatenate([ids, np.zeros((batch_size - n, maxlen), ids.dtype)])
        scores = np.asarray(score_fn(ids), dtype=np.float32)[:n].copy()
        targets = evalset.targets[lo:hi]
        rows = np.arange(n)
        target_scores = scores[rows, targets].copy()
        scores[:, :FIRST_ITEM_ID] = -np.inf
        if protocol.protocol == "full":
            if protocol.exclude_seen:
                seen_rows, seen_items = _history_entries(ds, evalset, lo, hi)
                scores[seen_rows, seen_items] = -np.inf
            scores[rows, targets] = target_scores
            ranks[lo:hi] = rank_of_target(scores, target_scores)
        else:
            candidates = _sampled_candidates(ds, evalset, lo, hi, protocol.num_negatives, rng)
            ranks[lo:hi] = rank_of_target(np.take_along_axis(scores, candidates, axis=1), target_scores)
    return ranks


def _history_entries(ds, evalset, lo, hi):
    """(row, item) pairs of every item in the histories of rows lo..hi."""
    starts = evalset.history_starts[lo:hi]
    lengths = evalset.history_ends[lo:hi] - starts
    rows = np.repeat(np.arange(hi - lo), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, ds.items[np.repeat(starts, lengths) + within]


def _sampled_candidates(ds, evalset, lo, hi, num_negatives, rng) -> np.ndarray:
    """Target first, then ``num_negatives`` distinct uniform items the user never interacted with.

    When the catalog holds fewer such items, all of them are used and the rest of the row is padding
    (id 0, which scores -inf and so ranks last)."""
    out = np.zeros((hi - lo, num_negatives + 1), dtype=np.int64)
    for row, user in enumerate(evalset.users[lo:hi]):
        blocked = set(ds.user_items(user).tolist())
        wanted = min(num_negatives, ds.num_items - len(blocked))
        chosen: set[int] = set()
        while len(chosen) < wanted:
            for item in rng.integers(FIRST_ITEM_ID, ds.vocab_size, size=2 * num_negatives).tolist():
                if item not in blocked and item not in chosen:
                    chosen.add(item)
                    if len(chosen) == wanted:
                        break
        out[row, 0] = evalset.targets[lo + row]
        out[row, 1 : 1 + wanted] = sorted(chosen)
    return out


def popularity_scores(ds: SequenceDataset) -> Callable[[np.ndarray], np.ndarray]:
    """Score function of the popularity baseline: training-event counts, the same for every user."""
    counts = ds.train_counts.astype(np.float32)

    def score(ids: np.ndarray) -> np.ndarray:
        return np.broadcast_to(counts, (len(ids), len(counts)))

    return score


def evaluate_scores(
    score_fn: Callable[[np.ndarray], np.ndarray],
    ds: SequenceDataset,
    protocol: Protocol,
    maxlen: int,
    batch_size: int = 256,
    with_popularity: bool = True,
) -> dict:
    """Metrics of ``score_fn`` (and of the popularity baseline) with the protocol that produced them."""
    evalset = evaluation_set(ds, protocol.split, protocol.max_users, protocol.seed)
    if len(evalset.users) == 0:
        raise ValueError(f"no user has a held-out item in the {protocol.split} split")
    result = {
        "protocol": protocol.describe(len(evalset.users), maxlen),
        "metrics": metrics_from_ranks(rank_targets(score_fn, ds, evalset, protocol, maxlen, batch_size), protocol.ks),
    }
    if with_popularity:
        pop_ranks = rank_targets(popularity_scores(ds), ds, evalset, protocol, maxlen, batch_size)
        result["popularity"] = metrics_from_ranks(pop_ranks, protocol.ks)
    return result

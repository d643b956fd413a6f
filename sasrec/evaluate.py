"""Evaluation protocols as data: which split, which candidates, which items are filtered, which k.

``full``: the held-out item is ranked against every item, the user's already seen items removed
(the held-out item itself always stays a candidate). ``sampled-100``: against 100 items drawn
uniformly (seeded) from those the user never interacted with (the SASRec paper's protocol).
Every result carries its protocol dict, and a popularity baseline is computed on the same protocol.

Next to every result: how many targets repeat an item of the user's history (``repeat_targets``) and
``deliverable_metrics``, the metrics with those users counted as misses: what a service with
``exclude_seen`` (its default) can deliver, since it never returns an item of the history. A target
whose own score is NaN or infinite ranks last (``non_finite_targets`` counts them), so a diverged model
scores zero, never a perfect hit.

``evaluate_run`` is ``sasrec evaluate``: a run folder's best model on its dataset.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from pipelines.dataset import FIRST_ITEM_ID, SequenceDataset, read_dataset
from sasrec.catalog import bounded_rows
from sasrec.feed import left_pad, rebase_times
from sasrec.metrics import DEFAULT_KS, metrics_from_ranks, rank_of_target

SPLITS = ("valid", "test")


@dataclass(frozen=True)
class Protocol:
    split: str = "test"
    protocol: str = "full"
    exclude_seen: bool = True
    ks: tuple[int, ...] = DEFAULT_KS
    num_negatives: int = 100
    seed: int = 0  # the evaluation's own seed (sampled negatives, max_users), never the training seed
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
        d["ties"] = "count half; a NaN or infinite target score ranks last, NaN candidates rank above the target"
        d["deliverable_metrics"] = ("targets that repeat an item of the history counted as misses (a service "
                                    "with exclude_seen never returns them)")
        return d


@dataclass
class EvaluationSet:
    """Users with a held-out item: their history (CSR span of ``ds.items``), the target, and whether
    the target repeats an item of that history."""

    users: np.ndarray
    history_starts: np.ndarray
    history_ends: np.ndarray
    targets: np.ndarray
    repeats: np.ndarray


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
    history_starts, history_ends = starts[users], starts[users] + cut[users]
    targets = ds.items[history_ends]
    rows, seen = _history_entries(ds, history_starts, history_ends)
    repeats = np.zeros(len(users), dtype=bool)
    repeats[rows[seen == targets[rows]]] = True
    return EvaluationSet(users, history_starts, history_ends, targets, repeats)


def rank_targets(
    score_fn: Callable[[np.ndarray], np.ndarray],
    ds: SequenceDataset,
    evalset: EvaluationSet,
    protocol: Protocol,
    maxlen: int,
    batch_size: int = 256,
    timestamps: bool = False,
) -> tuple[np.ndarray, int]:
    """Rank of every target under ``score_fn`` (ids (B, maxlen) -> scores (B, V)), batch by batch
    (``batch_size`` users, fewer on large catalogs: :func:`bounded_rows`), and how many targets scored NaN
    or infinite (those rank last). With ``timestamps``, ``score_fn`` gets ``{"ids", "timestamps"}``: the
    history events' times (:func:`sasrec.feed.rebase_times`), never the target's."""
    batch_size = bounded_rows(batch_size, ds.vocab_size)
    rng = np.random.default_rng(protocol.seed)
    ranks = np.empty(len(evalset.users), dtype=np.float64)
    non_finite = 0
    for lo in range(0, len(evalset.users), batch_size):
        hi = min(lo + batch_size, len(evalset.users))
        ids = left_pad(ds.items, evalset.history_starts[lo:hi], evalset.history_ends[lo:hi], maxlen)
        n = hi - lo
        if n < batch_size:  # a fixed batch shape avoids recompiling for the last batch
            ids = np.concatenate([ids, np.zeros((batch_size - n, maxlen), ids.dtype)])
        inputs = ids
        if timestamps:
            times = left_pad(ds.timestamps, evalset.history_starts[lo:hi], evalset.history_ends[lo:hi], maxlen,
                             dtype=np.int64)
            times = np.concatenate([times, np.zeros((len(ids) - n, maxlen), times.dtype)])
            inputs = {"ids": ids, "timestamps": rebase_times(times, ids)}
        scores = np.asarray(score_fn(inputs), dtype=np.float32)[:n].copy()
        targets = evalset.targets[lo:hi]
        rows = np.arange(n)
        target_scores = scores[rows, targets].copy()
        non_finite += int((~np.isfinite(target_scores)).sum())
        scores[:, :FIRST_ITEM_ID] = -np.inf
        if protocol.protocol == "full":
            if protocol.exclude_seen:
                seen_rows, seen_items = _history_entries(ds, evalset.history_starts[lo:hi], evalset.history_ends[lo:hi])
                scores[seen_rows, seen_items] = -np.inf
            scores[rows, targets] = target_scores
            ranks[lo:hi] = rank_of_target(scores, target_scores)
        else:
            candidates = _sampled_candidates(ds, evalset, lo, hi, protocol.num_negatives, rng)
            ranks[lo:hi] = rank_of_target(np.take_along_axis(scores, candidates, axis=1), target_scores)
    return ranks, non_finite


def _history_entries(ds, starts, ends):
    """(row, item) pairs of every item in the histories ``ds.items[starts[r]:ends[r]]``."""
    lengths = ends - starts
    rows = np.repeat(np.arange(len(starts)), lengths)
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
    timestamps: bool = False,
) -> dict:
    """Metrics of ``score_fn`` (and of the popularity baseline) with the protocol that produced them;
    ``timestamps``: ``score_fn`` also reads the histories' times (see :func:`rank_targets`)."""
    evalset = evaluation_set(ds, protocol.split, protocol.max_users, protocol.seed)
    if len(evalset.users) == 0:
        raise ValueError(f"no user has a held-out item in the {protocol.split} split")
    ranks, non_finite = rank_targets(score_fn, ds, evalset, protocol, maxlen, batch_size, timestamps)
    result = {
        "protocol": protocol.describe(len(evalset.users), maxlen),
        "repeat_targets": int(evalset.repeats.sum()),
        "non_finite_targets": non_finite,
        **_metrics(ranks, evalset.repeats, protocol.ks),
    }
    if with_popularity:
        pop_ranks, _ = rank_targets(popularity_scores(ds), ds, evalset, protocol, maxlen, batch_size)
        popularity = _metrics(pop_ranks, evalset.repeats, protocol.ks)
        result["popularity"] = popularity["metrics"]
        result["popularity_deliverable_metrics"] = popularity["deliverable_metrics"]
    return result


def _metrics(ranks: np.ndarray, repeats: np.ndarray, ks) -> dict:
    return {
        "metrics": metrics_from_ranks(ranks, ks),
        "deliverable_metrics": metrics_from_ranks(np.where(repeats, np.inf, ranks), ks),
    }


def model_scorer(model):
    """``inputs -> scores`` of a SASRec model (ids, or ids and timestamps) through the backend's compiled
    predict function."""
    import keras

    from sasrec.distributed import xla_supported
    from sasrec.model import LastPositionScorer

    scorer = LastPositionScorer(model)
    scorer.compile(jit_compile=xla_supported())
    return lambda inputs: keras.ops.convert_to_numpy(scorer.predict_on_batch(inputs))


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    splits=("test",),
    protocols=("full", "sampled-100"),
    ds: SequenceDataset | None = None,
    write: bool = True,
    max_users: int | None = None,
) -> dict:
    """``sasrec evaluate``: the run's best model on the given splits and protocols.

    The dataset is ``data_dir`` or the run's own, and must be the one the run was trained on (its
    manifest and vocabulary equal the run's copy); ``ds`` skips that when training passes its data.
    With ``write``, the results replace those of the same split and protocol in ``RUN/metrics.json``
    (others are kept), next to the training summary of the newest checkpoint. ``max_users``: a seeded
    sample of this many users (0: all; default: the config's ``eval_max_users``)."""
    from sasrec.run import BEST_MODEL, RunFolder

    run = RunFolder(run_dir)
    run.require(BEST_MODEL)
    config = run.config()
    if ds is None:
        ds = read_dataset(run.dataset_dir(data_dir))
    score = model_scorer(run.load_best())
    started = time.perf_counter()
    results = []
    for split in splits:
        for name in protocols:
            protocol = Protocol(split=split, protocol=name, seed=config.eval_seed,
                                max_users=config.eval_max_users if max_users is None else max_users)
            results.append(evaluate_scores(score, ds, protocol, config.maxlen, config.eval_batch_size,
                                           timestamps=config.time_bias))
    out = {"results": results, "evaluation_seconds": time.perf_counter() - started}
    training = run.training_summary()
    if training is not None:
        out["training"] = training
    if write:
        fresh = {(r["protocol"]["split"], r["protocol"]["protocol"]) for r in results}
        kept = [r for r in (run.read_metrics() or {}).get("results", [])
                if (r["protocol"]["split"], r["protocol"]["protocol"]) not in fresh]
        run.write_metrics({**out, "results": kept + results})
    return out

"""A catalog above full softmax's limit (59.5k items): every path that changes with catalog size.

The `auto` loss (sampled softmax), its seen-negative mask without a (batch, items) matrix, evaluation
batches bounded by the catalog, and export + score_frame agreeing with evaluation. The 10^6-item
figures are measured by ``python -m benchmarks.catalog`` (BENCHMARKS.md, section catalog).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import sasrec.catalog as catalog_sizes
from pipelines.dataset import read_dataset
from sasrec.cli import main
from sasrec.config import FULL_SOFTMAX_MAX_ITEMS, SASRecConfig
from sasrec.evaluate import Protocol, evaluation_set, rank_targets
from sasrec.feed import TrainingFeed
from sasrec.metrics import evaluate_recommendations
from tests.conftest import make_synthetic_dataset

TRAIN = ["--set", "loss=auto", "--set", "maxlen=16", "--set", "hidden_units=32", "--set", "num_blocks=1",
         "--set", "dropout=0.1", "--set", "batch_size=256", "--set", "learning_rate=0.005", "--set", "exclude_seen_negatives=true",
         "--set", "negative_sampling=popularity", "--set", "tensorboard=false", "--set", "jit_compile=false", "--set", "eval_every=3",
         "--set", "eval_max_users=5000"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """20,000 users walking 600 chains of a 60,000-item catalog with a mild long tail: ~59.5k items in the data."""
    data = make_synthetic_dataset(tmp_path_factory.mktemp("catalog"), users=20_000, items=60_000, chains=600,
                                  min_length=15, max_length=30, noise=0.2, seed=5, popularity=0.5)
    ds = read_dataset(data)
    assert ds.num_items > FULL_SOFTMAX_MAX_ITEMS
    return data


def test_auto_picks_sampled_softmax_and_no_batch_holds_a_catalog_sized_array(catalog):
    ds = read_dataset(catalog)
    loss = SASRecConfig().resolved_loss(ds.num_items)
    assert loss == "sampled-softmax"
    feed = TrainingFeed(ds, maxlen=16, batch_size=256, loss=loss, num_negatives=256,
                        negative_sampling="popularity", logq_correction=True, exclude_seen_negatives=True, seed=2)
    for index in (0, 7, len(feed) - 1):
        ids, y = feed[index]
        assert all(ds.vocab_size not in a.shape for a in (ids, *y.values()))
        assert y["neg_seen"].shape == (len(ids), 256)
        assert sum(a.nbytes for a in (ids, *y.values())) < len(ids) * ds.vocab_size // 10


def test_evaluation_batches_shrink_with_the_catalog_and_ranks_do_not_change(catalog, monkeypatch):
    ds = read_dataset(catalog)
    evalset = evaluation_set(ds, "test", max_users=500)
    table = np.random.default_rng(0).normal(size=(ds.vocab_size, 8)).astype(np.float32)
    shapes = []

    def score(ids):  # a fixed bilinear "model": mean of the history's rows, dotted with every item
        shapes.append(ids.shape[0])
        return (table[ids].mean(axis=1) @ table.T).astype(np.float32)

    for protocol in ("full", "sampled-100"):
        unbounded, _ = rank_targets(score, ds, evalset, Protocol(protocol=protocol), maxlen=16, batch_size=256)
        assert set(shapes) == {256}
        shapes.clear()
        monkeypatch.setattr(catalog_sizes, "SCORES_BYTES", 40 * 4 * ds.vocab_size)
        bounded, _ = rank_targets(score, ds, evalset, Protocol(protocol=protocol), maxlen=16, batch_size=256)
        monkeypatch.undo()
        assert set(shapes) == {40}
        shapes.clear()
        np.testing.assert_array_equal(bounded, unbounded)
    assert catalog_sizes.bounded_rows(256, 1_000_002) == 67  # 256 MiB of float32 scores at a million items


@pytest.mark.slow
def test_learns_the_chains_then_export_and_score_frame_agree_with_evaluation(catalog, tmp_path, monkeypatch):
    run, base = tmp_path / "run", tmp_path / "models"
    assert main(["train", "--data", str(catalog), "--out", str(run), "--epochs", "3", "--quiet", *TRAIN]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    full = next(r for r in metrics["results"] if r["protocol"]["protocol"] == "full")
    model_hr, pop_hr = full["metrics"]["hr@10"], full["popularity"]["hr@10"]
    print(f"HR@10 {model_hr:.4f} vs popularity {pop_hr:.4f}")
    assert model_hr >= 3 * pop_hr

    assert main(["export", "--run", str(run), "--model-base", str(base)]) == 0
    from sasrec.recommender import Recommender

    ds = read_dataset(catalog)
    rec = Recommender.load(base)
    assert rec.num_items == ds.num_items
    ev = evaluation_set(ds, "test", max_users=5000)  # the users evaluation sampled (eval_seed 0)
    assert full["protocol"]["users_evaluated"] == len(ev.users) == 5000
    histories = pd.DataFrame({"user_id": ev.users,
                              "history": [ds.item_ids[ds.items[s:e]].tolist()
                                          for s, e in zip(ev.history_starts, ev.history_ends)]})
    calls = []
    call_rows = rec._call_rows
    monkeypatch.setattr(rec, "_call_rows", lambda hist, *a, **kw: calls.append(len(hist)) or call_rows(hist, *a, **kw))
    monkeypatch.setattr(catalog_sizes, "SCORES_BYTES", 1000 * 4 * rec.card["vocab_size"])
    recs = rec.score_frame(histories, k=10, progress=False)  # chunk_size 1024, cut to 1,000 users by the catalog
    assert calls == [1000] * 5
    assert (recs.groupby("user_id").size() == 10).all()
    heldout = pd.DataFrame({"user_id": ev.users, "item_id": ds.item_ids[ev.targets]})
    served = evaluate_recommendations(recs, heldout, k=(10,))
    # The service never returns a history item: its HR@10 is evaluation's with repeat targets as misses.
    assert served["hr@10"] == pytest.approx(full["deliverable_metrics"]["hr@10"], abs=3 / len(ev.users))


"""Training windows and batches."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.dataset import read_dataset
from sasrec.config import SASRecConfig
from sasrec.feed import TrainingFeed, bucket_width, left_pad, pad_histories, training_windows
from sasrec.losses import SequenceLoss
from sasrec.model import build_model
from tests.conftest import make_synthetic_dataset


def test_left_pad_keeps_most_recent_items_right_aligned():
    items = np.arange(1, 11, dtype=np.int32)
    out = left_pad(items, [0, 2, 5], [2, 9, 5], maxlen=4)
    assert out.tolist() == [[0, 0, 1, 2], [6, 7, 8, 9], [0, 0, 0, 0]]
    assert pad_histories([[5, 6], [], [1, 2, 3, 4, 5]], 3).tolist() == [[0, 5, 6], [0, 0, 0], [3, 4, 5]]


def test_one_window_per_user_ends_at_the_last_training_item(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    windows, users = training_windows(ds, maxlen=10)
    assert len(windows) == ds.num_users
    for w, u in zip(windows[:20], users[:20]):
        train = ds.user_items(u)[: ds.train_end[u]]
        assert w.tolist() == train[-11:].tolist()  # maxlen + 1 items


def test_sliding_windows_cover_long_histories(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    single, _ = training_windows(ds, maxlen=5)
    sliding, users = training_windows(ds, maxlen=5, step=5)
    assert len(sliding) > len(single)
    u = users[-1]
    train = ds.user_items(u)[: ds.train_end[u]].tolist()
    assert sliding[-1].tolist() in [train[e - 6 : e] for e in range(6, len(train) + 1)]


def test_batches_are_reproducible_by_epoch_and_cut_to_their_width(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    make = lambda: TrainingFeed(ds, maxlen=40, batch_size=32, loss="bce", seed=7)  # noqa: E731
    a, b = make(), make()
    b.set_epoch(3)
    b[0]
    b.set_epoch(0)
    for i in (0, 5, len(a) - 1):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert np.array_equal(xa, xb) and np.array_equal(ya["neg"], yb["neg"])
    widths = {a[i][0].shape[1] for i in range(len(a))}
    assert max(widths) <= 40 and all(w in (4, 8, 16, 32, 40) for w in widths)
    for i in range(len(a)):
        ids = a[i][0]
        assert ids.shape[1] == bucket_width(int(np.count_nonzero(ids, axis=1).max()), 40)
    a.set_epoch(1)
    assert not np.array_equal(a[0][0][:, -1], b[0][0][:, -1])  # another epoch, another order


def test_bucket_widths_are_powers_of_two_then_multiples_of_sixteen():
    assert [bucket_width(n, 200) for n in (1, 4, 5, 8, 9, 16, 17, 32, 33, 190, 199)] == [
        4, 4, 8, 8, 16, 16, 32, 32, 48, 192, 200]
    assert bucket_width(30, 20) == 20 and bucket_width(3, 2) == 2


def test_short_histories_get_narrow_batches_with_the_same_loss(tmp_path):
    ds = read_dataset(make_synthetic_dataset(tmp_path, users=300, items=40, chains=4, min_length=4, max_length=12,
                                             noise=0.1, seed=5))
    feed = TrainingFeed(ds, maxlen=50, batch_size=32, loss="ce", seed=2)
    widths = [feed[i][0].shape[1] for i in range(len(feed))]
    assert widths == [width for _, width in feed.batch_shapes()]
    assert min(widths) < 16 and set(widths) <= {4, 8, 16}
    # Narrower than the old floor of 16: the loss on the batch is the same as on it padded to 16.
    model = build_model(SASRecConfig(maxlen=50, hidden_units=16, num_blocks=2, dropout=0.0), ds.vocab_size)
    loss = SequenceLoss("ce", ds.vocab_size - 2)
    ids, y = feed[widths.index(min(widths))]
    pad = lambda a: np.pad(a, [(0, 0), (16 - a.shape[1], 0)])  # noqa: E731
    narrow = loss(model, model(ids), y)
    padded = loss(model, model(pad(ids)), {"pos": pad(y["pos"])})
    assert float(narrow) > 0 and float(narrow) == pytest.approx(float(padded), rel=1e-5)


def test_targets_per_batch_is_the_epoch_mean(tiny_dataset):
    feed = TrainingFeed(read_dataset(tiny_dataset), maxlen=40, batch_size=32, loss="ce", seed=3)
    counted = sum(int(np.count_nonzero(feed[i][1]["pos"])) for i in range(len(feed)))
    assert feed.targets_per_batch == pytest.approx(counted / len(feed))


def test_targets_are_next_items_and_bce_negatives_are_unseen(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    feed = TrainingFeed(ds, maxlen=40, batch_size=64, loss="bce", seed=1)
    ids, y = feed[2]
    assert ids.shape == y["pos"].shape == y["neg"].shape
    has_input = ids[:, :-1] != 0
    assert np.array_equal(y["pos"][:, :-1][has_input], ids[:, 1:][has_input])
    assert ((y["pos"] == 0) == (ids == 0)).all()
    users = feed.window_users[feed._epoch_batches()[2]]
    for row, user in enumerate(users):
        seen = set(ds.user_items(user)[: ds.train_end[user]].tolist())
        assert not seen & set(y["neg"][row].tolist())


def test_shared_negatives_for_sampled_losses(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    feed = TrainingFeed(ds, maxlen=40, batch_size=64, loss="sampled-softmax", num_negatives=17,
                        negative_sampling="popularity", logq_correction=True, seed=1)
    ids, y = feed[0]
    # The same 17 on every row, so that a batch split over devices carries them to each.
    assert y["neg"].shape == y["neg_logq"].shape == (len(ids), 17) and (y["neg"] >= 2).all()
    assert (y["neg"] == y["neg"][0]).all() and (y["neg_logq"] == y["neg_logq"][0]).all()
    assert y["pos_logq"].shape == ids.shape


def test_seen_matrix_holds_each_users_training_items(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    feed = TrainingFeed(ds, maxlen=5, batch_size=16, loss="ce", exclude_seen_negatives=True, seed=1)
    ids, y = feed[1]
    assert y["seen"].shape == (len(ids), ds.vocab_size) and y["seen"].dtype == bool
    for row, user in enumerate(feed.window_users[feed._epoch_batches()[1]]):
        train_items = set(ds.user_items(user)[: ds.train_end[user]].tolist())
        assert set(np.flatnonzero(y["seen"][row]).tolist()) == train_items  # whole history, not just the window
        assert set(y["pos"][row][y["pos"][row] != 0].tolist()) <= train_items
    assert "seen" not in TrainingFeed(ds, maxlen=5, batch_size=16, loss="ce", seed=1)[0][1]


def test_sampled_softmax_marks_seen_negatives_per_row_without_a_catalog_matrix(tiny_dataset):
    ds = read_dataset(tiny_dataset)
    feed = TrainingFeed(ds, maxlen=5, batch_size=16, loss="sampled-softmax", num_negatives=300,
                        exclude_seen_negatives=True, seed=1)
    ids, y = feed[1]
    assert "seen" not in y and y["neg_seen"].shape == (len(ids), 300) and y["neg_seen"].dtype == bool
    for row, user in enumerate(feed.window_users[feed._epoch_batches()[1]]):
        train_items = set(ds.user_items(user)[: ds.train_end[user]].tolist())
        assert y["neg_seen"][row].tolist() == [int(n) in train_items for n in y["neg"][0]]
    assert y["neg_seen"].any() and not y["neg_seen"].all()
    gbce = TrainingFeed(ds, maxlen=5, batch_size=16, loss="gbce", num_negatives=30, exclude_seen_negatives=True)
    assert "neg_seen" not in gbce[0][1]  # gbce ignores the setting, as documented in the config


def test_popularity_negatives_are_the_draws_of_generator_choice(tiny_dataset):
    # The feed keeps the cumulative distribution instead of rebuilding it per batch: same items.
    ds = read_dataset(tiny_dataset)
    feed = TrainingFeed(ds, maxlen=40, batch_size=64, loss="sampled-softmax", num_negatives=50,
                        negative_sampling="popularity", seed=4)
    counts = ds.train_counts.astype(np.float64)
    counts[:2] = 0
    rng = np.random.default_rng([4, 0, 3])
    assert np.array_equal(feed[2][1]["neg"][0], rng.choice(ds.vocab_size, size=50, p=counts / counts.sum()))

"""Model input from a dataset: left-padded histories and training batches, numpy only.

``left_pad`` is the one rule that turns histories into model input (most recent ``maxlen`` items,
right-aligned, 0 = padding); evaluation and the training windows use it, and the exported
SavedModel implements the same rule in its graph (tested to agree).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from pipelines.dataset import FIRST_ITEM_ID, SequenceDataset
from sasrec.layers import UNKNOWN_TIME

BUCKET = 16  # wider batches are rounded up to a multiple of this, bounding the number of compiled shapes
MIN_WIDTH = 4  # narrower ones to a power of two from this: short (sparse) histories pay little padding


def left_pad(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, maxlen: int, dtype=np.int32) -> np.ndarray:
    """Rows ``items[starts[i]:ends[i]]`` cut to their last ``maxlen`` items and right-aligned in an
    ``(n, maxlen)`` matrix of ``dtype`` (int64 for timestamps) padded with 0 on the left."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    lengths = np.minimum(ends - starts, maxlen).clip(min=0)
    out = np.zeros((len(starts), maxlen), dtype=dtype)
    total = int(lengths.sum())
    if total == 0:
        return out
    rows = np.repeat(np.arange(len(starts)), lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = maxlen - lengths[rows] + within
    out[rows, cols] = items[ends[rows] - lengths[rows] + within]
    return out


def pad_histories(histories: list, maxlen: int) -> np.ndarray:
    """``left_pad`` for a list of integer id sequences."""
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    flat = np.concatenate([np.asarray(h, dtype=np.int32) for h in histories]) if lengths.sum() else np.zeros(0, np.int32)
    ends = np.cumsum(lengths)
    return left_pad(flat, ends - lengths, ends, maxlen)


def rebase_times(timestamps: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Model-level timestamps (see :class:`sasrec.model.SASRec`) of left-padded windows: ``timestamps``
    (n, W) seconds minus each row's earliest real one, as int32 (only gaps matter, and int64 does not
    survive every backend), :data:`UNKNOWN_TIME` where ``ids`` (n, W) is padding."""
    real = ids != 0
    origin = np.where(real, timestamps, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
    gaps = np.clip(np.asarray(timestamps, np.int64) - origin, 0, np.iinfo(np.int32).max)
    return np.where(real, gaps, UNKNOWN_TIME).astype(np.int32)


def bucket_width(longest: int, maxlen: int) -> int:
    """Padded width of a batch whose longest input has ``longest`` items: the next power of two from
    :data:`MIN_WIDTH` up to :data:`BUCKET`, the next multiple of :data:`BUCKET` above, at most ``maxlen``.
    Every position of the width costs the full softmax a row of logits, so the small widths matter on
    sparse data, where most histories are a few items long."""
    width = MIN_WIDTH
    while width < min(longest, BUCKET):
        width *= 2
    if longest > BUCKET:
        width = -(-longest // BUCKET) * BUCKET
    return min(maxlen, width)


def training_windows(ds: SequenceDataset, maxlen: int, step: int = 0, timestamps: bool = False) -> tuple:
    """Windows of ``maxlen + 1`` training items: the last one of every user (the paper) and, with
    ``step > 0``, earlier windows every ``step`` items for longer histories.

    Returns ``(windows (n, maxlen + 1) int32, user index per window)``, and with ``timestamps`` the
    windows' event times (n, maxlen + 1) int64 third.
    """
    starts = ds.offsets[:-1]
    ends = starts + ds.train_end
    users = np.arange(ds.num_users)
    keep = ds.train_end >= 2  # a window needs an input and a target
    win_ends, win_users = [ends[keep]], [users[keep]]
    if step > 0:
        extra = np.maximum((ds.train_end - 1 - maxlen) // step, 0)
        extra[~keep] = 0
        if extra.sum():
            owner = np.repeat(users, extra)
            k = np.arange(extra.sum()) - np.repeat(np.cumsum(extra) - extra, extra) + 1
            win_ends.append(ends[owner] - k * step)
            win_users.append(owner)
    win_ends = np.concatenate(win_ends)
    win_users = np.concatenate(win_users)
    windows = left_pad(ds.items, starts[win_users], win_ends, maxlen + 1)
    if timestamps:
        times = left_pad(ds.timestamps, starts[win_users], win_ends, maxlen + 1, dtype=np.int64)
        return windows, win_users.astype(np.int32), times
    return windows, win_users.astype(np.int32)


class TrainingFeed(keras.utils.PyDataset):
    """Shuffled training batches ``(ids, {"pos", "neg", ...})`` for ``model.fit``; with ``timestamps``
    (a ``time_bias`` model) the input is ``{"ids", "timestamps"}`` (:func:`rebase_times` of the inputs' events).

    Batch order and negatives depend only on ``(seed, epoch, batch)``, so an interrupted run that
    resumes at epoch e sees exactly the batches an uninterrupted one would.
    """

    def __init__(
        self,
        ds: SequenceDataset,
        *,
        maxlen: int,
        batch_size: int,
        loss: str,
        num_negatives: int = 0,
        negative_sampling: str = "uniform",
        logq_correction: bool = False,
        sliding_window_step: int = 0,
        length_bucketing: bool = True,
        exclude_seen_negatives: bool = False,
        timestamps: bool = False,
        seed: int = 0,
    ):
        # Two worker threads: Keras then prefetches batches itself and turns tf.data's autotuned
        # prefetching off, under which whole epochs ran on one core (10 s and 20 s epochs alternating).
        super().__init__(workers=2)
        self.maxlen = maxlen
        self.batch_size = batch_size
        self.loss = loss
        self.num_negatives = num_negatives
        self.length_bucketing = length_bucketing
        self.seed = seed
        self.epoch = 0
        self.vocab_size = ds.vocab_size
        self.exclude_seen_negatives = exclude_seen_negatives and loss in ("ce", "sampled-softmax")
        self._train_starts = ds.offsets[:-1]
        self._train_end = ds.train_end
        self._items = ds.items
        self.windows, self.window_users, *times = training_windows(ds, maxlen, sliding_window_step, timestamps)
        self.window_times = times[0] if timestamps else None
        if len(self.windows) == 0:
            raise ValueError("no user has two or more training events: nothing to train on")
        self.window_lengths = np.count_nonzero(self.windows, axis=1)
        self._order_epoch = None
        self._batches: list[np.ndarray] = []
        if loss == "bce" or (self.exclude_seen_negatives and loss == "sampled-softmax"):
            # Sorted (user, item) keys of training histories: bce draws negatives among items the user
            # has not interacted with (the paper); sampled-softmax looks its shared negatives up here,
            # which costs B x N look-ups instead of a (B, vocab_size) matrix per batch.
            lengths = ds.lengths
            owner = np.repeat(np.arange(ds.num_users, dtype=np.int64), lengths)
            in_train = np.arange(len(ds.items)) - ds.offsets[owner] < ds.train_end[owner]
            self._seen_keys = np.unique(owner[in_train] * ds.vocab_size + ds.items[in_train].astype(np.int64))
        self._sampling_cdf = None
        self._logq = None
        if loss in ("sampled-softmax", "gbce") and negative_sampling == "popularity":
            counts = ds.train_counts.astype(np.float64).copy()
            counts[:FIRST_ITEM_ID] = 0
            sampling_p = counts / counts.sum()
            # Generator.choice(p=...) rebuilds this cumulative sum (O(vocab_size)) on every call; drawing
            # from it directly gives the same items.
            self._sampling_cdf = sampling_p.cumsum()
            self._sampling_cdf /= self._sampling_cdf[-1]
            if logq_correction and loss == "sampled-softmax":
                with np.errstate(divide="ignore"):
                    self._logq = np.log(sampling_p * num_negatives).astype(np.float32)

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    @property
    def targets_per_batch(self) -> float:
        """Mean number of counted target positions per batch over an epoch."""
        targets = np.maximum(self.window_lengths.astype(np.int64) - 1, 0).sum()
        return float(targets) / len(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_batches(self) -> list[np.ndarray]:
        if self._order_epoch == self.epoch:
            return self._batches
        rng = np.random.default_rng([self.seed, self.epoch, 0])
        order = rng.permutation(len(self.windows))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.length_bucketing and len(batches) > 1:
            # Group windows of similar length (within chunks of 32 batches, to keep batches random)
            # so each batch can be cut to its own width.
            chunk = 32 * self.batch_size
            regrouped = []
            for i in range(0, len(order), chunk):
                part = order[i : i + chunk]
                part = part[np.argsort(self.window_lengths[part], kind="stable")]
                regrouped += [part[j : j + self.batch_size] for j in range(0, len(part), self.batch_size)]
            rng.shuffle(regrouped)
            # TensorFlow's PyDataset adapter infers the input signature from the first two batches:
            # make them the longest and the shortest so the width is seen as variable.
            widths = [self._width(b) for b in regrouped]
            first, second = int(np.argmax(widths)), int(np.argmin(widths))
            if first != second:
                rest = [b for i, b in enumerate(regrouped) if i not in (first, second)]
                regrouped = [regrouped[first], regrouped[second]] + rest
            batches = regrouped
        self._order_epoch, self._batches = self.epoch, batches
        return batches

    def _width(self, batch: np.ndarray) -> int:
        if not self.length_bucketing:
            return self.maxlen
        longest = int(self.window_lengths[batch].max()) - 1  # inputs are one shorter than the window
        return bucket_width(longest, self.maxlen)

    def batch_shapes(self) -> list[tuple[int, int]]:
        """(rows, width) of each of this epoch's batches, in order: the positions the model computes."""
        return [(len(batch), self._width(batch)) for batch in self._epoch_batches()]

    def __getitem__(self, index: int):
        batch = self._epoch_batches()[index]
        width = self._width(batch)
        window = self.windows[batch][:, -(width + 1) :]
        ids = window[:, :-1]
        x = ids
        if self.window_times is not None:  # the inputs' times only: a target's time would leak it
            x = {"ids": ids, "timestamps": rebase_times(self.window_times[batch][:, -(width + 1) : -1], ids)}
        pos = np.where(ids != 0, window[:, 1:], 0).astype(np.int32)
        rng = np.random.default_rng([self.seed, self.epoch, index + 1])
        y = {"pos": pos}
        if self.loss == "bce":
            y["neg"] = self._unseen_negatives(rng, self.window_users[batch], pos.shape)
        elif self.loss in ("sampled-softmax", "gbce"):
            if self._sampling_cdf is not None:
                neg = self._sampling_cdf.searchsorted(rng.random(self.num_negatives), side="right")
            else:
                neg = rng.integers(FIRST_ITEM_ID, self.vocab_size, size=self.num_negatives)
            # Repeated on every row: a batch split over devices (--devices N) then carries them to each.
            rows = len(batch)
            y["neg"] = np.repeat(neg.astype(np.int32)[None], rows, axis=0)
            if self._logq is not None:
                y["neg_logq"] = np.repeat(self._logq[neg][None], rows, axis=0)
                y["pos_logq"] = np.where(pos != 0, self._logq[pos], 0).astype(np.float32)
        if self.exclude_seen_negatives and self.loss == "ce":
            y["seen"] = self._seen_matrix(self.window_users[batch])
        elif self.exclude_seen_negatives:
            users = self.window_users[batch]
            y["neg_seen"] = self._seen(users, y["neg"])
        return x, y

    def _seen_matrix(self, users: np.ndarray) -> np.ndarray:
        """``(B, vocab_size)`` bool: the items of each row's user's training history (``ce`` only)."""
        starts = self._train_starts[users]
        histories = left_pad(self._items, starts, starts + self._train_end[users], int(self._train_end[users].max()))
        seen = np.zeros((len(users), self.vocab_size), dtype=bool)
        seen[np.arange(len(users))[:, None], histories] = True
        seen[:, 0] = False  # padding
        return seen

    def _seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``items`` (B, M) bool: which are in the training history of the row's user ``users`` (B,)."""
        keys = users.astype(np.int64)[:, None] * self.vocab_size + items
        idx = np.searchsorted(self._seen_keys, keys).clip(max=len(self._seen_keys) - 1)
        return self._seen_keys[idx] == keys

    def _unseen_negatives(self, rng, users: np.ndarray, shape) -> np.ndarray:
        """One uniform negative per position, redrawn while it is in the user's training history."""
        neg = rng.integers(FIRST_ITEM_ID, self.vocab_size, size=shape)
        for _ in range(10):
            seen = self._seen(users, neg)
            if not seen.any():
                break
            neg[seen] = rng.integers(FIRST_ITEM_ID, self.vocab_size, size=int(seen.sum()))
        return neg.astype(np.int32)

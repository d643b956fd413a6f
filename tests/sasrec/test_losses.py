"""Each loss against a plain numpy reference on a tiny case."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from sasrec.losses import SequenceLoss, bce_loss, ce_loss, gbce_beta, gbce_loss, sampled_softmax_loss

rng = np.random.default_rng(0)
B, W, D, V = 2, 4, 3, 9
H = rng.normal(size=(B, W, D)).astype("float32")
E = rng.normal(size=(V, D)).astype("float32")
POS = np.array([[0, 3, 4, 5], [2, 6, 0, 8]], dtype="int32")  # 0 = no target at that position
NEG = np.array([[7, 2, 2, 3], [4, 4, 5, 6]], dtype="int32")
SHARED = np.array([3, 5, 7], dtype="int32")  # includes accidental hits of some positives
MASK = POS != 0


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def logit(b, w, item):
    return float(H[b, w] @ E[item])


def reference(per_position):
    values = [per_position(b, w) for b in range(B) for w in range(W) if MASK[b, w]]
    return np.mean(values)


def value(x):
    return float(ops.convert_to_numpy(x))


def test_bce():
    expected = reference(lambda b, w: softplus(-logit(b, w, POS[b, w])) + softplus(logit(b, w, NEG[b, w])))
    assert value(bce_loss(H, E, POS, NEG)) == pytest.approx(expected, rel=1e-5)


def test_normaliser_replaces_the_batch_target_count():
    # Length-bucketed batches: every position weighs 1/normaliser whatever its batch's target count.
    per_batch_mean = value(ce_loss(H, E, POS))
    assert value(ce_loss(H, E, POS, normaliser=10.0)) == pytest.approx(per_batch_mean * MASK.sum() / 10.0, rel=1e-5)
    assert value(bce_loss(H, E, POS, NEG, normaliser=3.0)) == pytest.approx(
        value(bce_loss(H, E, POS, NEG)) * MASK.sum() / 3.0, rel=1e-5
    )


def test_full_softmax_ce_ignores_padding_and_oov_columns():
    def per_position(b, w):
        logits = H[b, w] @ E[2:].T  # real items only
        return np.log(np.exp(logits).sum()) - logit(b, w, POS[b, w])

    assert value(ce_loss(H, E, POS)) == pytest.approx(reference(per_position), rel=1e-5)


@pytest.mark.parametrize("logq", [False, True])
def test_sampled_softmax_masks_accidental_hits(logq):
    log_q = np.log(np.linspace(0.05, 0.2, V)).astype("float32")

    def per_position(b, w):
        p = POS[b, w]
        correct = (lambda i: log_q[i]) if logq else (lambda i: 0.0)
        pos = logit(b, w, p) - correct(p)
        negs = [logit(b, w, n) - correct(n) for n in SHARED if n != p]
        return np.log(np.exp(pos) + np.exp(negs).sum()) - pos

    kwargs = dict(pos_logq=np.where(MASK, log_q[POS], 0).astype("float32"), neg_logq=log_q[SHARED]) if logq else {}
    assert value(sampled_softmax_loss(H, E, POS, SHARED, **kwargs)) == pytest.approx(reference(per_position), rel=1e-5)


def test_gbce():
    beta = gbce_beta(num_negatives=3, num_items=V - 2, t=0.75)
    alpha = 3 / (V - 3)
    assert beta == pytest.approx(alpha * (0.75 * (1 - 1 / alpha) + 1 / alpha))

    def per_position(b, w):
        p = POS[b, w]
        return beta * softplus(-logit(b, w, p)) + sum(softplus(logit(b, w, n)) for n in SHARED if n != p)

    assert value(gbce_loss(H, E, POS, SHARED, beta)) == pytest.approx(reference(per_position), rel=1e-5)


def test_gbce_with_t_zero_is_bce_with_weighted_positive():
    # t = 0 gives beta = 1: plain BCE over the positive and every negative.
    assert gbce_beta(256, 3417, 0.0) == pytest.approx(1.0)


SEEN = np.zeros((B, V), dtype=bool)
SEEN[0, [3, 4, 7]] = True  # row 0's other items: 7 is never a target of row 0
SEEN[1, [2, 8]] = True


def test_ce_leaves_the_users_other_items_out_of_the_softmax():
    def per_position(b, w):
        items = [i for i in range(2, V) if not SEEN[b, i] or i == POS[b, w]]  # own target always stays
        logits = np.array([logit(b, w, i) for i in items])
        return np.log(np.exp(logits).sum()) - logit(b, w, POS[b, w])

    assert value(ce_loss(H, E, POS, seen=SEEN)) == pytest.approx(reference(per_position), rel=1e-5)
    assert value(ce_loss(H, E, POS, seen=SEEN)) < value(ce_loss(H, E, POS))


def test_sampled_softmax_drops_negatives_the_user_has_seen():
    def per_position(b, w):
        p = POS[b, w]
        negs = [logit(b, w, n) for n in SHARED if n != p and not SEEN[b, n]]
        return np.log(np.exp(logit(b, w, p)) + np.exp(negs).sum()) - logit(b, w, p)

    neg_seen = SEEN[:, SHARED]  # (B, N): what the feed computes from sorted keys, never a (B, V) matrix
    assert value(sampled_softmax_loss(H, E, POS, SHARED, neg_seen=neg_seen)) == pytest.approx(
        reference(per_position), rel=1e-5)


class _Table:
    """Stands in for the model in ``SequenceLoss(model, h, y)``: only its item table is read."""

    class item_embedding:
        embeddings = E


@pytest.mark.parametrize("name", ["sampled-softmax", "gbce"])
def test_sequence_loss_takes_the_shared_negatives_back_from_every_row(name):
    # The feed repeats the batch's negatives on every row, so a batch split over devices carries them to each;
    # rows padded for a worker (ProcessShare: zeros) must not change them or their log q.
    log_q = np.log(np.linspace(0.05, 0.2, V)).astype("float32")  # all negative: zeros would win a plain max
    y = {"pos": POS, "neg": np.repeat(SHARED[None], B, axis=0)}
    if name == "sampled-softmax":
        y.update(pos_logq=np.where(MASK, log_q[POS], 0).astype("float32"), neg_logq=np.repeat(log_q[SHARED][None], B, 0))
        expected = sampled_softmax_loss(H, E, POS, SHARED, y["pos_logq"], log_q[SHARED], normaliser=5.0)
    else:
        expected = gbce_loss(H, E, POS, SHARED, gbce_beta(3, V - 2, 0.75), normaliser=5.0)
    loss = SequenceLoss(name, num_items=V - 2, num_negatives=3, targets_per_batch=5.0)
    assert value(loss(_Table, H, y)) == pytest.approx(value(expected), rel=1e-6)
    padded = {key: np.concatenate([a, np.zeros((1, *a.shape[1:]), a.dtype)]) for key, a in y.items()}
    h_padded = np.concatenate([H, np.zeros((1, W, D), "float32")])
    assert value(loss(_Table, h_padded, padded)) == pytest.approx(value(expected), rel=1e-6)
    # A device that a split batch left with no rows adds nothing.
    empty = {key: a[:0] for key, a in y.items()}
    assert value(loss(_Table, H[:0], empty)) == 0.0

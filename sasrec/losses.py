"""Training losses of SASRec over hidden states and the shared item embedding table.

Each loss takes hidden states ``h`` (B, W, d), the item table ``E`` (V, d) and the targets from the
training feed: ``pos`` (B, W) next item per position (0 where there is no target) and ``neg``
(negatives: (B, W) one per position for ``bce``, (N,) shared by the batch for ``sampled-softmax`` and
``gbce``, which the feed repeats on every row as (B, N) so that a batch split over devices carries them
to each, and :class:`SequenceLoss` takes back). With ``exclude_seen_negatives`` the feed also gives
``seen`` (B, V) bool for ``ce``, whose logits are (B, W, V) anyway, and ``neg_seen`` (B, N) bool for
``sampled-softmax``, which never builds anything the size of the catalog per row. Positions without a
target do not count. The loss is the mean over counted positions, or, with ``normaliser``, their sum
divided by it: training passes the epoch's mean number of targets per batch, so that every position
weighs the same whether its batch holds long or short (length-bucketed) histories, as in the paper's
randomly mixed batches. All functions use ``keras.ops`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from keras import ops

from pipelines.dataset import FIRST_ITEM_ID

# Finite stand-in for -inf in logits that go through logsumexp (keeps gradients NaN-free).
MASKED_LOGIT = -1e9


def _masked_mean(per_position, pos, normaliser=None):
    weights = ops.cast(ops.not_equal(pos, 0), "float32")
    total = ops.sum(per_position * weights)
    if normaliser:
        return total / normaliser
    return total / ops.maximum(ops.sum(weights), 1.0)


def _dot(h, E, ids):
    """Logit of item ``ids`` (B, W) for each position: (B, W)."""
    return ops.sum(h * ops.take(E, ids, axis=0), axis=-1)


def bce_loss(h, E, pos, neg, normaliser=None):
    """The paper's loss: binary cross-entropy of the next item against one sampled negative."""
    pos_logit = _dot(h, E, pos)
    neg_logit = _dot(h, E, neg)
    return _masked_mean(ops.softplus(-pos_logit) + ops.softplus(neg_logit), pos, normaliser)


def _not_target(seen, pos):
    """``seen`` (B, V) spread over positions, without each position's own target: (B, W, V) bool."""
    vocab = ops.shape(seen)[-1]
    target = ops.equal(ops.expand_dims(pos, -1), ops.reshape(ops.arange(vocab, dtype=pos.dtype), (1, 1, -1)))
    return ops.logical_and(ops.expand_dims(seen, 1), ops.logical_not(target))


def _position_logits(h, table):
    """``h`` (B, W, d) against every row of ``table`` (N, d): (B, W, N), as one 2-D matmul over all B*W
    positions. Written as a batched (B, W, d) matmul, its gradient for the table made XLA on CPU copy the
    whole (B*W, N) gradient into a transposed layout first (JAX, BENCHMARKS.md section train-speed)."""
    shape = ops.shape(h)
    flat = ops.matmul(ops.reshape(h, (-1, shape[-1])), ops.transpose(table))
    return ops.reshape(flat, (shape[0], shape[1], ops.shape(table)[0]))  # not -1: a batch can have no rows


def ce_loss(h, E, pos, normaliser=None, seen=None):
    """Full softmax cross-entropy over the whole catalog ("SASRec+"); padding/OOV excluded.

    ``seen`` (B, V) bool: items left out of each row's softmax (the user's other items; each
    position's own target always stays in).
    """
    logits = _position_logits(h, E)
    vocab = ops.shape(E)[0]
    reserved = ops.arange(vocab) < FIRST_ITEM_ID
    logits = ops.where(reserved, MASKED_LOGIT, logits)
    if seen is not None:
        logits = ops.where(_not_target(seen, pos), MASKED_LOGIT, logits)
    target = ops.take_along_axis(logits, ops.expand_dims(pos, -1), axis=-1)[..., 0]
    return _masked_mean(ops.logsumexp(logits, axis=-1) - target, pos, normaliser)


def _shared_negative_logits(h, E, pos, neg):
    """Positive logit (B, W) and logits of the shared negatives (B, W, N), accidental hits masked."""
    pos_logit = _dot(h, E, pos)
    neg_logits = _position_logits(h, ops.take(E, neg, axis=0))
    hit = ops.equal(ops.expand_dims(pos, -1), ops.reshape(neg, (1, 1, -1)))
    return pos_logit, neg_logits, hit


def sampled_softmax_loss(h, E, pos, neg, pos_logq=None, neg_logq=None, normaliser=None, neg_seen=None):
    """Softmax over the positive and N negatives shared by the batch.

    With ``pos_logq``/``neg_logq`` (log sampling probabilities) logits are corrected by -log q, which
    makes popularity-sampled softmax an unbiased estimate of the full softmax. ``neg_seen`` (B, N) bool:
    negative j is among row b's user's items, so it is dropped from that row's softmax.
    """
    pos_logit, neg_logits, hit = _shared_negative_logits(h, E, pos, neg)
    if neg_seen is not None:
        hit = ops.logical_or(hit, ops.expand_dims(ops.cast(neg_seen, "bool"), 1))
    if neg_logq is not None:
        pos_logit = pos_logit - pos_logq
        neg_logits = neg_logits - ops.reshape(neg_logq, (1, 1, -1))
    neg_logits = ops.where(hit, MASKED_LOGIT, neg_logits)
    all_logits = ops.concatenate([ops.expand_dims(pos_logit, -1), neg_logits], axis=-1)
    return _masked_mean(ops.logsumexp(all_logits, axis=-1) - pos_logit, pos, normaliser)


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's power on the positive probability: beta = alpha * (t * (1 - 1/alpha) + 1/alpha)."""
    alpha = num_negatives / (num_items - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_loss(h, E, pos, neg, beta: float, normaliser=None):
    """Generalised BCE (Petrov & Macdonald, RecSys 2023): -beta*log s(pos) - sum log(1 - s(neg))."""
    pos_logit, neg_logits, hit = _shared_negative_logits(h, E, pos, neg)
    neg_term = ops.sum(ops.where(hit, 0.0, ops.softplus(neg_logits)), axis=-1)
    return _masked_mean(beta * ops.softplus(-pos_logit) + neg_term, pos, normaliser)


def _shared(neg, neg_logq=None):
    """The batch's shared negatives (N,) and their log q (N,) back from the feed's copies on every row (B, N).
    Rows padded for a worker (ProcessShare) hold id 0 and are skipped; a device that a split batch left with
    no rows gets id 0 (padding), harmless since it has no position to count."""
    neg = ops.pad(neg, [[0, 1], [0, 0]])  # one padding row more: never a max over no rows
    shared = ops.max(neg, axis=0)
    if neg_logq is None:
        return shared, None
    real = ops.greater(neg[:, :1], 0)
    return shared, ops.max(ops.where(real, ops.pad(neg_logq, [[0, 1], [0, 0]]), MASKED_LOGIT), axis=0)


@dataclass(frozen=True)
class SequenceLoss:
    """The configured training loss, called by ``SASRec.compute_loss`` as ``loss(model, h, y)``."""

    name: str
    num_items: int = 0
    num_negatives: int = 0
    gbce_t: float = 0.75
    targets_per_batch: float = 0.0
    """Divide the summed loss by this (the feed's mean) instead of each batch's own target count."""

    def __call__(self, model, hidden, y):
        h = ops.cast(hidden, "float32")
        E = ops.cast(model.item_embedding.embeddings, "float32")
        pos = ops.cast(y["pos"], "int32")
        norm = self.targets_per_batch or None
        if self.name == "bce":
            return bce_loss(h, E, pos, ops.cast(y["neg"], "int32"), normaliser=norm)
        if self.name == "ce":
            return ce_loss(h, E, pos, normaliser=norm, seen=y.get("seen"))
        neg, neg_logq = _shared(ops.cast(y["neg"], "int32"), y.get("neg_logq"))
        if self.name == "sampled-softmax":
            return sampled_softmax_loss(h, E, pos, neg, y.get("pos_logq"), neg_logq, normaliser=norm,
                                        neg_seen=y.get("neg_seen"))
        if self.name == "gbce":
            beta = gbce_beta(self.num_negatives, self.num_items, self.gbce_t)
            return gbce_loss(h, E, pos, neg, beta, normaliser=norm)
        raise ValueError(f"unknown loss {self.name!r}")

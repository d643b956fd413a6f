"""Explanations: which history items drove a recommendation, and where the model's attention went.

Everything here reads a trained :class:`~sasrec.model.SASRec` through its stable parts (``_embed``,
``_positions``, ``blocks``, ``final_norm``, ``item_logits``, the embedding tables, and each block's
call, ``key_values``, ``_query_input`` and ``attention.query_dense``/``output_dense``), never the
attention internals. The export's ``explain`` signature (:mod:`sasrec.export`) calls
:func:`block_inputs`, :func:`attributions` and :func:`last_position_attention` on the same window
``serving_default`` scores, so lookups, exclusions, unknown ids and cold starts follow the same rules;
:func:`plot_attention` draws what ``sasrec explain --plot`` shows.

Attribution methods (``METHODS``): a weight per (recommended item, history position), larger = the
position pushed that item's score up more.

``rollout_occlusion`` (the default)
    the ``max(explain_items, OCCLUSION_CANDIDATES)`` positions with the largest attention rollout
    weight are deleted from the history one at a time and the shortened windows re-scored in one
    batch; a weight is the exact drop of the item's score (a logit) when that item is deleted (for a
    history longer than the window, the window is padded where the next older item would slide in),
    and positions that were not deleted get ``-inf``. One forward pass over ``B * candidates`` windows.
``grad_occlusion``
    ``grad_input_last_block`` for the earlier positions, and the exact score drop when the most recent
    item is deleted for the last one (gradient x input cannot see it: the last position reaches the
    last block through a layer norm, which is blind to scaling its input).
``grad_input``
    gradient x input: the gradient of the item's score with respect to each position's item embedding
    (the block input minus its position embedding), dotted with it. The window is repeated once per
    recommended item, one backward pass (TensorFlow, inside the export).
``grad_input_last_block``
    the same at the input of the last block, so only the last block is repeated and differentiated.
``integrated_gradients``
    the gradient averaged along the path from the position embeddings alone to the real input
    (``IG_STEPS`` midpoints): steps x the cost of ``grad_input``.
``attention``
    the last position's attention over the window in the last block, mean over heads.
``rollout``
    attention rollout: each block's attention, mean over heads, mixed half and half with the identity
    for the residual, multiplied across blocks; the last position's row.
``attention_value``
    the last block's attention weight times the norm of the attended value after the output
    projection, summed over heads.

The three attention methods give every recommended item the same weights. The default was chosen by
measurement (README, "Explanations"; BENCHMARKS.md, section explain: deleting the top-attributed
history item must lower the item's score more than deleting a random one in >= 80% of cases, at most
3x the cost of a plain request). On ML-1M three methods passed: ``rollout_occlusion`` (the most
faithful, and its weights mean something a user can check: the score drop when the item is
deleted), ``grad_occlusion`` and ``grad_input_last_block`` (the latter cannot credit the most recent
item, so it misses "B always follows A"); gradient x input at the embeddings, integrated gradients
and the attention weights fell short.
"""

from __future__ import annotations


import numpy as np
from keras import ops

GRADIENT_METHODS = ("grad_occlusion", "grad_input", "grad_input_last_block", "integrated_gradients")
METHODS = ("rollout_occlusion",) + GRADIENT_METHODS + ("attention", "rollout", "attention_value")
OCCLUSION_CANDIDATES = 4  # rollout_occlusion deletes at least this many candidate items, exactly
DEFAULT_METHOD = "rollout_occlusion"
IG_STEPS = 4


def block_inputs(model, ids):
    """The input of every block for left-padded ``ids`` ``(B, W)``: a list of ``(B, W, d)`` (the first is
    the item + position embeddings, zero at padding), and the validity mask ``(B, W)``. One forward
    pass through every block but the last, shared by the scores, the attributions and the attention."""
    ids = ops.cast(ids, "int32")
    x, valid = model._embed(ids, model._positions(ids), False)
    inputs = [x]
    for block in model.blocks[:-1]:
        inputs.append(block(inputs[-1], valid, training=False))
    return inputs, valid


def last_hidden(model, x, valid, start=0):
    """The state ``(B, d)`` after the last position that the model scores items with, from the input ``x``
    of block ``start``."""
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks[start:], start):
        x = block(x, valid, training=False, last_only=i == last)
    return model.final_norm(x)[:, -1, :]


def last_position_attention(model, inputs, valid):
    """The last position's attention over the window in every block and head: ``(B, blocks, H, W)``,
    from the blocks' ``inputs`` (:func:`block_inputs`)."""
    rows = [block.attention_map(x, valid, last_only=True)[0][:, :, 0, :] for block, x in zip(model.blocks, inputs)]
    return ops.stack(rows, axis=1)


def _attention_weights(model, inputs, valid, method):
    """``(B, W)`` weights of the attention methods (the same for every recommended item)."""
    width = ops.shape(valid)[1]
    eye = ops.eye(width, dtype="float32")
    rollout = None
    for block, x in zip(model.blocks[:-1], inputs[:-1]):
        if method == "rollout":
            weights, _ = block.attention_map(x, valid)
            mixed = 0.5 * ops.mean(weights, axis=1) + 0.5 * eye[None]
            rollout = mixed if rollout is None else ops.matmul(mixed, rollout)
    block = model.blocks[-1]
    weights, values = block.attention_map(inputs[-1], valid, last_only=True)
    row = weights[:, :, 0, :]  # (B, H, W)
    if method == "attention":
        return ops.mean(row, axis=1)
    if method == "attention_value":
        kernel = ops.cast(block.attention.output_dense.kernel, "float32")  # (H, d/H, d)
        moved = ops.einsum("bmhd,hde->bmhe", ops.cast(values, "float32"), kernel)
        return ops.sum(row * ops.transpose(ops.norm(moved, axis=-1), (0, 2, 1)), axis=1)
    mixed = 0.5 * ops.mean(row, axis=1) + 0.5 * eye[-1][None, :]  # (B, W)
    return mixed if rollout is None else ops.einsum("bm,bmn->bn", mixed, rollout)


def _gradient_weights(model, ids, inputs, valid, targets, steps, start=0):
    """``(B, k, W)`` gradient x input (``steps`` 0) or integrated gradients (``steps`` midpoints) of each
    target item's score. ``start`` 0: the input is each position's item embedding (the block input minus
    its position embedding: what deleting the item removes) and the path of integrated gradients runs
    from the position embeddings alone to the real input. ``start`` > 0: the input of that block.
    TensorFlow: the blocks from ``start`` on run on the window repeated once per target (and step), with
    one backward pass."""
    import tensorflow as tf

    x = inputs[start]
    if start == 0:
        positions = model.position_embedding(model._positions(ops.cast(ids, "int32")))
        fixed = positions * ops.cast(ops.expand_dims(valid, -1), x.dtype)
    else:
        fixed = tf.zeros_like(x)
    moved = x - fixed  # what the attribution is about (its weight is gradient . moved)
    batch, width, k = tf.shape(x)[0], tf.shape(x)[1], tf.shape(targets)[1]
    copies = k * max(steps, 1)
    rows = tf.repeat(moved, copies, axis=0)  # row b*copies + j*steps + s: history b, target j, step s
    if steps:
        alphas = (tf.range(steps, dtype=rows.dtype) + 0.5) / steps
        rows = rows * tf.tile(alphas, [batch * k])[:, None, None]
    row_fixed = tf.repeat(fixed, copies, axis=0)
    row_valid = tf.repeat(valid, copies, axis=0)
    row_targets = tf.repeat(tf.reshape(targets, [-1]), max(steps, 1))
    with tf.GradientTape() as tape:
        tape.watch(rows)
        hidden = tf.cast(last_hidden(model, row_fixed + rows, row_valid, start), tf.float32)
        table = tf.cast(model.item_embedding.embeddings, tf.float32)
        score = tf.reduce_sum(hidden * tf.gather(table, row_targets))
    grads = tf.cast(tape.gradient(score, rows), tf.float32)
    grads = tf.reduce_mean(tf.reshape(grads, [batch * k, max(steps, 1), width, -1]), axis=1)
    contribution = tf.reduce_sum(grads * tf.cast(tf.repeat(moved, k, axis=0), tf.float32), axis=-1)
    return tf.reshape(contribution, [batch, k, width])


def _last_item_drop(model, ids, inputs, valid, targets):
    """``(B, k)``: how much each target's score drops when the most recent item is deleted from the window
    (re-scored exactly: the window shifted right by one, left-padded). With positions counted from the
    start, the earlier positions' inputs to the last block do not change (causal attention), so only the
    last block runs again; otherwise every block does."""
    import tensorflow as tf

    last = len(model.blocks) - 1
    shift = lambda t: tf.pad(t[:, :-1], [[0, 0], [1, 0]] + [[0, 0]] * (len(t.shape) - 2))  # noqa: E731
    if model.positions == "from_start":
        short_input, short_valid = shift(inputs[-1]), shift(valid)
    else:
        short_inputs, short_valid = block_inputs(model, shift(ids))
        short_input = short_inputs[-1]
    full = tf.cast(last_hidden(model, inputs[-1], valid, last), tf.float32)
    short = tf.cast(last_hidden(model, short_input, short_valid, last), tf.float32)
    table = tf.cast(model.item_embedding.embeddings, tf.float32)
    return tf.einsum("bd,bkd->bk", full - short, tf.gather(table, targets))


def delete_positions(ids, positions):
    """``ids`` ``(B, W)`` (left-padded) with the item at ``positions`` ``(B, m)`` deleted, one row per
    (history, position): ``(B * m, W)``, the earlier items shifted right by one and a padding column in
    front, so the window reads as the shorter history would."""
    import tensorflow as tf

    width = tf.shape(ids)[1]
    m = tf.shape(positions)[1]
    rows = tf.repeat(ids, m, axis=0)
    cut = tf.reshape(positions, [-1, 1])
    column = tf.range(width)[None, :]
    source = tf.where(column <= cut, column - 1, column)
    return tf.where(source >= 0, tf.gather(rows, tf.maximum(source, 0), batch_dims=1), 0)


def _occlusion_weights(model, ids, inputs, valid, targets, candidates):
    """``(B, k, W)``: each target's exact score drop when one of ``candidates`` history items is deleted
    (the window re-scored through the model), at the ``candidates`` positions chosen by attention rollout
    (the largest rollout weights); ``-inf`` at positions that were not deleted. One forward pass over
    ``B * candidates`` shortened windows."""
    import tensorflow as tf

    last = len(model.blocks) - 1
    rollout = tf.where(valid, tf.cast(_attention_weights(model, inputs, valid, "rollout"), tf.float32), -np.inf)
    m = tf.minimum(candidates, tf.shape(ids)[1])
    cand_weight, cand = tf.math.top_k(rollout, k=m)
    short_inputs, short_valid = block_inputs(model, delete_positions(tf.cast(ids, tf.int32), cand))
    table = tf.cast(model.item_embedding.embeddings, tf.float32)
    target_table = tf.gather(table, targets)  # (B, k, d)
    full = tf.einsum("bd,bkd->bk", tf.cast(last_hidden(model, inputs[-1], valid, last), tf.float32), target_table)
    short = tf.cast(last_hidden(model, short_inputs[-1], short_valid, last), tf.float32)
    short = tf.einsum("bmd,bkd->bmk", tf.reshape(short, [tf.shape(ids)[0], m, -1]), target_table)
    drops = full[:, None, :] - short  # (B, m, k)
    chosen = tf.one_hot(cand, tf.shape(ids)[1]) * tf.cast(cand_weight > -np.inf, tf.float32)[:, :, None]
    weights = tf.einsum("bmw,bmk->bkw", chosen, drops)
    return tf.where(tf.reduce_max(chosen, axis=1)[:, None, :] > 0, weights, -np.inf)


def attributions(model, ids, inputs, valid, targets, method=DEFAULT_METHOD, candidates=OCCLUSION_CANDIDATES):
    """Weight of every window position ``(B, k, W)`` for each of the ``targets`` ``(B, k)`` (internal item
    ids), for the window ``ids`` and its blocks' ``inputs`` and ``valid`` (:func:`block_inputs`); padding
    positions are ``-inf``."""
    if method not in METHODS:
        raise ValueError(f"explain method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "rollout_occlusion":
        weights = _occlusion_weights(model, ids, inputs, valid, targets, candidates)
    elif method in GRADIENT_METHODS:
        start = len(model.blocks) - 1 if method in ("grad_input_last_block", "grad_occlusion") else 0
        weights = _gradient_weights(model, ids, inputs, valid, targets,
                                    IG_STEPS if method == "integrated_gradients" else 0, start)
        if method == "grad_occlusion":
            drop = _last_item_drop(model, ids, inputs, valid, targets)
            weights = ops.concatenate([weights[:, :, :-1], ops.expand_dims(drop, -1)], axis=2)
    else:
        per_row = _attention_weights(model, inputs, valid, method)
        weights = ops.repeat(ops.expand_dims(per_row, 1), ops.shape(targets)[1], axis=1)
    return ops.where(valid[:, None, :], ops.cast(weights, "float32"), float("-inf"))


def top_positions(weights, top_n):
    """The ``top_n`` positions with the largest ``weights`` ``(B, k, W)`` for each target: ``(positions
    (B, k, n) int32, weights (B, k, n) float32)``, largest first, n = min(top_n, W); weight ``-inf``
    marks no position (a shorter history). TensorFlow (``tf.math.top_k``), inside the export."""
    import tensorflow as tf

    n = tf.minimum(tf.maximum(top_n, 0), tf.shape(weights)[2])
    top_weights, top_index = tf.math.top_k(weights, k=n, sorted=True)
    return top_index, top_weights


# ---------------------------------------------------------------------------------------------------
# The heat map of `sasrec explain --plot`


def plot_attention(attention, item_ids, path, title: str = "") -> None:
    """A PNG heat map of the last position's attention (``(blocks, H, W)``) over the history window
    (``item_ids``, W external ids, ``""`` for padding, which is left out): one row per block and head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attention = np.asarray(attention, dtype=np.float32)
    keep = np.array([bool(i) for i in item_ids])
    names = [str(i) for i, k in zip(item_ids, keep) if k]
    blocks, heads = attention.shape[:2]
    grid = attention[:, :, keep].reshape(blocks * heads, len(names))
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * len(names), 24), 1.5 + 0.45 * blocks * heads))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(blocks * heads), [f"block {b} head {h}" for b in range(blocks) for h in range(heads)])
    step = max(1, len(names) // 40)
    ax.set_xticks(range(0, len(names), step), names[::step], rotation=90, fontsize=7)
    ax.set_xlabel("history (oldest to most recent)")
    ax.set_title(title or "attention of the last position")
    fig.colorbar(image, ax=ax, label="attention weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

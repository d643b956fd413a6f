"""What scales with the catalog: a batch scored against every item is a (rows, items) float32 matrix.

Evaluation (``sasrec.evaluate``) and batch scoring (``Recommender.score_frame``) take their rows per
batch from :func:`bounded_rows`, so their memory stays bounded on catalogs of millions of items.
Import-light: the recommender module imports it without TensorFlow or Keras.
"""

from __future__ import annotations

# One batch's (rows, vocab_size) float32 scores stay under this (ranking or masking them takes about
# 3x as much again): 256 rows up to 262k items, 73 rows at 914k.
SCORES_BYTES = 256 * 2**20


def bounded_rows(rows: int, vocab_size: int) -> int:
    """Users per batch scored against every item: ``rows``, or fewer where their scores would exceed
    ``SCORES_BYTES``."""
    return max(1, min(rows, SCORES_BYTES // (4 * vocab_size)))


# Items per block of the two-pass top-k; the first pass reads every score once (a max per block), the
# second sorts only the k best blocks.
TOP_K_BLOCK = 1024


def exact_top_k(scores, k):
    """``tf.math.top_k(scores, k, sorted=True)`` for (B, V) float scores, the same values and indices
    (ties: lower index first), in two passes on large catalogs: the k blocks of ``TOP_K_BLOCK`` items
    with the highest maxima hold every item of the top k, so only they are sorted. TensorFlow graph code
    (the exported signature's ranking)."""
    import tensorflow as tf

    num = tf.shape(scores)[1]
    blocks = (num + TOP_K_BLOCK - 1) // TOP_K_BLOCK

    def by_blocks():
        padded = tf.pad(scores, [[0, 0], [0, blocks * TOP_K_BLOCK - num]], constant_values=float("-inf"))
        grid = tf.reshape(padded, [tf.shape(scores)[0], blocks, TOP_K_BLOCK])
        _, best = tf.math.top_k(tf.reduce_max(grid, axis=2), k=k)
        best = tf.sort(best, axis=1)  # candidates in item order, so equal scores keep the lower index first
        candidates = tf.reshape(tf.gather(grid, best, batch_dims=1), [tf.shape(scores)[0], k * TOP_K_BLOCK])
        values, where = tf.math.top_k(candidates, k=k, sorted=True)
        return values, tf.gather(best, where // TOP_K_BLOCK, batch_dims=1) * TOP_K_BLOCK + where % TOP_K_BLOCK

    # Two passes pay off while the k best blocks are a small part of the catalog.
    return tf.cond(k * TOP_K_BLOCK * 4 <= num, by_blocks, lambda: tuple(tf.math.top_k(scores, k=k, sorted=True)))

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


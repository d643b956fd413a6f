"""Vocabulary: a deterministic order of external ids.

Ids sort numerically when every id is an integer (ties such as "7" and "07" by their text), else
lexicographically by their UTF-8 text. Internal item ids start at ``FIRST_ITEM_ID`` (0 is padding,
1 out-of-vocabulary), so in a file whose items are 1..N item "k" gets internal id k + 1.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.dataset import FIRST_ITEM_ID, OOV_ID, PADDING_ID


def id_order(ids: np.ndarray | pa.Array) -> np.ndarray:
    """Permutation that sorts the external id strings ``ids`` (see the module docstring)."""
    texts = ids if isinstance(ids, pa.Array) else pa.array(np.asarray(ids, dtype=object), pa.string())
    if len(texts) == 0:
        return np.zeros(0, dtype=np.int64)
    if pc.all(pc.match_substring_regex(texts, r"^-?[0-9]{1,18}$")).as_py():
        numbers = pc.cast(texts, pa.int64())
        table = pa.table({"n": numbers, "s": texts})
        return pc.sort_indices(table, sort_keys=[("n", "ascending"), ("s", "ascending")]).to_numpy()
    return pc.sort_indices(texts).to_numpy()


def rank_codes(ids: np.ndarray | pa.Array, used: np.ndarray | None = None, first: int = 0) -> tuple[np.ndarray, np.ndarray | pa.Array]:
    """Dense ranks for codes into ``ids``: returns ``(code_to_index, sorted_ids)``.

    Only codes with ``used[code]`` get an index (``first``, ``first + 1``, ...); the others map to -1.
    ``ids`` may be an object array or a pyarrow string array (compact for millions of ids); the
    sorted ids come back as the same kind.
    """
    arrow = isinstance(ids, pa.Array)
    ids = ids if arrow else np.asarray(ids, dtype=object)
    used = np.ones(len(ids), dtype=bool) if used is None else np.asarray(used, dtype=bool)
    kept = np.flatnonzero(used)
    order = kept[id_order(ids.take(pa.array(kept)) if arrow else ids[kept])]
    code_to_index = np.full(len(ids), -1, dtype=np.int64)
    code_to_index[order] = np.arange(first, first + len(order))
    return code_to_index, ids.take(pa.array(order)) if arrow else ids[order]


def item_vocabulary(sorted_item_ids: np.ndarray) -> np.ndarray:
    """External ids by internal id, with the padding and OOV placeholders in front."""
    vocab = np.empty(len(sorted_item_ids) + FIRST_ITEM_ID, dtype=object)
    vocab[PADDING_ID] = ""
    vocab[OOV_ID] = "<oov>"
    vocab[FIRST_ITEM_ID:] = sorted_item_ids
    return vocab

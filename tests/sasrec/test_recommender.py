"""The Python API: `from sasrec import Recommender` (lazy, no TensorFlow at import), load a model base
or a version folder, `recommend` returns a list of (item id, score)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_from_sasrec_import_recommender_is_lazy():
    code = ("import sys, sasrec; before = 'sasrec.recommender' in sys.modules; "
            "from sasrec import Recommender; "
            "print(before, Recommender.__module__, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False sasrec.recommender False"


def test_recommend_returns_a_list_of_item_score_pairs(model_base, recommender, keras_model, vocab):
    from sasrec import Recommender
    from tests.serving.helpers import item_names, reference_topk

    names = item_names(len(vocab) - 2)
    history = names[3:9] + ["not-an-item"]
    got = recommender.recommend(history, k=5)
    assert isinstance(got, list) and len(got) == 5
    assert all(isinstance(i, str) and isinstance(s, float) for i, s in got)
    ids, scores = reference_topk(keras_model, vocab, history, 5)
    assert [i for i, _ in got] == ids == got.item_ids
    np.testing.assert_allclose([s for _, s in got], scores, atol=1e-4, rtol=0)
    assert got.unknown_count == 1 and not got.cold_start and got.items == list(got)

    by_version = Recommender.load(model_base / "1")
    assert by_version.version == 1 and by_version.recommend(history, k=5) == got
    cold = recommender.recommend([], k=3)
    assert cold.cold_start and len(cold) == 3

"""Exports shared by the cached-state tests: one per norm and position scheme, loaded both ways."""

from __future__ import annotations

import numpy as np
import pytest

from tests.sasrec.test_attention_state import ITEMS, SETTINGS, VOCAB, small_model

# Items from i10 on share one training count: cold starts rank them by id.
TRAIN_COUNTS = np.minimum(np.arange(VOCAB), 10)


def both_paths(model, folder):
    """The export of ``model`` loaded twice: attention states in numpy, and through the signatures."""
    from sasrec.export import export_model
    from sasrec.recommender import Recommender

    version = export_model(model, folder, item_ids=ITEMS, train_counts=TRAIN_COUNTS)
    host, signature = Recommender.load(version), Recommender.load(version, host=False)
    assert host.host is not None and host.host_reason == ""
    assert signature.host is None
    return host, signature


@pytest.fixture(scope="session", params=SETTINGS, ids=lambda p: "-".join(p))
def state_paths(request, tmp_path_factory):
    """``((norm, positions), (numpy path, signature path))`` of a small model's export."""
    return request.param, both_paths(small_model(*request.param), tmp_path_factory.mktemp("models"))

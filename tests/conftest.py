"""Shared fixtures: a small synthetic dataset folder made by the real pipeline."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from pipelines.prepare import prepare_file  # noqa: E402
from pipelines.synthetic import generate, write_log  # noqa: E402


def make_synthetic_dataset(folder, **options):
    """Synthetic log -> CSV -> `prepare` (leave-one-out, no k-core): a dataset folder."""
    log = write_log(generate(**options), folder / "log.csv")
    columns = dict(user_col="user_id", item_col="item_id", time_col="timestamp")
    prepare_file("csv", log, folder / "dataset", reader_options=columns, kcore="none")
    return folder / "dataset"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """600 users, 60 items in 6 chains, histories of 15-30 events, 10% noise."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("tiny"), users=600, items=60, chains=6, min_length=15, max_length=30, noise=0.1, seed=3
    )


# The tiny trained run, its export and a gRPC server over it (defined in tests/serving/conftest.py),
# shared with tests/sasrec/ (batch scoring must match the service). Re-exported here so every test
# folder reuses the same fixtures; tests/serving/conftest.py still defines them for its own folder.
from tests.serving.conftest import (  # noqa: F401
    client,
    keras_model,
    model_base,
    recommender,
    run_dir,
    server,
    vocab,
)

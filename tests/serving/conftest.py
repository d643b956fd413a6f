from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.serving.helpers import make_run  # noqa: E402


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="session")
def model_base(run_dir, tmp_path_factory) -> Path:
    """A model base with version 1 exported from ``run_dir`` (XLA off; ``wide`` in
    tests/sasrec/test_export.py and the warm-up test cover XLA exports)."""
    from sasrec.export import export_run

    base = tmp_path_factory.mktemp("models") / "tiny"
    export_run(run_dir, base)
    return base


@pytest.fixture(scope="session")
def recommender(model_base):
    from sasrec.recommender import Recommender

    return Recommender.load(model_base)


@pytest.fixture(scope="session")
def keras_model(run_dir):
    from sasrec.run import RunFolder

    return RunFolder(run_dir).load_best()


@pytest.fixture(scope="session")
def vocab(run_dir):
    from pipelines.dataset import read_items

    return read_items(run_dir / "dataset")[0]


@pytest.fixture
def fresh_base(model_base, tmp_path) -> Path:
    """A private copy of the model base (for tests that add or break versions)."""
    base = tmp_path / "tiny"
    shutil.copytree(model_base, base)
    return base


def start_server(base: Path, **overrides):
    from serving.server import RecommenderServer, ServerConfig

    # Leave the test process's TensorFlow thread pools (already started by the model fixtures) and
    # scheduling policy as they are.
    config = ServerConfig(model_base=str(base), port=0, metrics_port=0, poll_interval_s=0.2, grace_period_s=5.0,
                          intra_op_threads=0, inter_op_threads=0, cpu_scheduling="default")
    for key, value in overrides.items():
        setattr(config, key, value)
    return RecommenderServer(config).start()


@pytest.fixture(scope="module")
def server(model_base):
    srv = start_server(model_base)
    assert srv.wait_ready(60)
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def client(server):
    from serving.client import RecommenderClient

    with RecommenderClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        yield c

"""DESIGN.md's import rules, checked on the source: data flows pipelines -> sasrec -> serving."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package (or module) -> top-level modules it must never import, not even inside a function
FORBIDDEN = {
    "pipelines": {"sasrec", "serving", "tensorflow", "keras", "jax", "torch", "dask", "distributed"},
    "sasrec": {"serving", "dask", "distributed"},
    "serving": {"dask", "distributed"},
    "serving/server.py": {"serving.processes"},
    "serving/client.py": {"tensorflow", "keras", "numpy", "pandas", "pipelines", "serving.server"},
}

# The Dask engine lives in these modules only: the pandas engine (the default) never imports Dask.
DASK_MODULES = {"pipelines/dask_cluster.py", "pipelines/dask_engine.py", "sasrec/dask_scoring.py"}


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_no_import_runs_against_the_data_flow(where):
    target = ROOT / where
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    for path in files:
        allowed = {"dask", "distributed"} if str(path.relative_to(ROOT)) in DASK_MODULES else set()
        for name in imported_names(path):
            for banned in FORBIDDEN[where] - allowed:
                assert not (name == banned or name.startswith(banned + ".")), \
                    f"{path.relative_to(ROOT)} imports {name} ({where} must not import {banned})"

"""Nothing in the project unpickles data, and model paths cannot escape the model base.

Unpickling runs arbitrary code from the file: a model or dataset from an untrusted source must
never reach ``pickle``. The project's formats are Parquet, JSON, TOML, ``.keras`` (loaded with Keras'
safe mode) and SavedModel. This test scans the sources so a new ``pickle.load`` fails CI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sasrec", "pipelines", "serving", "benchmarks")
GENERATED = ("sasrec/v1/",)  # protoc output
FORBIDDEN = [
    (re.compile(r"\bimport\s+(c?pickle|dill|joblib|shelve|marshal|cloudpickle)\b"), "imports a pickle-like module"),
    (re.compile(r"\bfrom\s+(c?pickle|dill|joblib|shelve|marshal|cloudpickle)\b"), "imports a pickle-like module"),
    (re.compile(r"\b(pickle|dill|joblib|cloudpickle)\.loads?\("), "unpickles"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load with allow_pickle=True"),
    (re.compile(r"\btorch\.load\("), "torch.load unpickles"),
    (re.compile(r"\bread_pickle\("), "pandas read_pickle unpickles"),
    (re.compile(r"safe_mode\s*=\s*False"), "Keras loading with safe_mode=False runs lambdas from the file"),
    (re.compile(r"\byaml\.load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"\byaml\.unsafe_load\("), "yaml.unsafe_load"),
]
NP_LOAD = re.compile(r"\bnp\.load\(([^)]*)\)")


def sources() -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(GENERATED):
                files.append(path)
    return files


def test_sources_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in sources()}
    assert {"sasrec/export.py", "serving/model_store.py", "pipelines/readers.py"} <= names


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_unpickling(path):
    text = path.read_text()
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        for pattern, why in FORBIDDEN:
            if pattern.search(code):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {why}: {line.strip()}")
        for match in NP_LOAD.finditer(code):
            if "allow_pickle=False" not in match.group(1).replace(" ", ""):
                problems.append(f"{path.relative_to(ROOT)}:{number}: np.load without allow_pickle=False: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_scanner_catches_what_it_should(tmp_path):
    bad = ["import pickle", "x = pickle.loads(b)", "np.load(f, allow_pickle=True)", "np.load(f)",
           "torch.load(p)", "pd.read_pickle(p)", "keras.saving.load_model(p, safe_mode=False)", "yaml.load(s)",
           "from joblib import load"]
    for line in bad:
        hits = [why for pattern, why in FORBIDDEN if pattern.search(line)]
        hits += ["np.load"] if any("allow_pickle=False" not in m.group(1) for m in NP_LOAD.finditer(line)) else []
        assert hits, line
    assert not [why for pattern, why in FORBIDDEN if pattern.search("np.load(f, allow_pickle=False)")]
    assert not [why for pattern, why in FORBIDDEN if pattern.search("yaml.safe_load(s)")]


def test_version_names_are_canonical_integers(tmp_path):
    from sasrec.model_base import list_versions

    for name in ("1", "2", "10", "0", "2.tmp", ".3.tmp-x", "04", "5\n", " 6", "7 ", "+8", "-9", "1e3", "٣", "x", "..",
                 "11.old"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "12").write_text("a file")
    assert list_versions(tmp_path) == [0, 1, 2, 10]
    assert list_versions(tmp_path / "missing") == []

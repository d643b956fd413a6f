"""Malformed input files through `sasrec prepare`, for every --format.

Truncated gzip, corrupt zip, binary junk, wrong delimiters, a 10 MB line, invalid UTF-8, an empty file:
exit code 2, one error line naming the file (and the line when a line is at fault), no traceback,
no output folder and no hidden temporary folder left. Then hypothesis throws random bytes at the
text formats: the only outcomes are a complete dataset folder or such a clean error.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sasrec.cli import main

COLUMNS = {
    "csv": ["--user-col", "u", "--item-col", "i", "--time-col", "t"],
    "parquet": ["--user-col", "u", "--item-col", "i"],
}
GOOD = {  # a valid small file per format (content before any damage)
    "movielens": b"".join(b"%d::%d::4::%d\n" % (u, i, 100 + i) for u in range(3) for i in range(6)),
    "csv": b"u,i,t\n" + b"".join(b"u%d,i%d,%d\n" % (u, i, i) for u in range(3) for i in range(6)),
    "amazon-json": b"".join(
        b'{"reviewerID": "u%d", "asin": "i%d", "unixReviewTime": %d, "overall": 5}\n' % (u, i, i)
        for u in range(3) for i in range(6)
    ),
    "pairs": b"".join(b"%d %d\n" % (u, i) for u in range(3) for i in range(6)),
    "sequences": b"".join(b"u%d 1 2 3 4 5 6\n" % u for u in range(3)),
}
TEXT_FORMATS = tuple(GOOD)
LINE_10MB = b"9" * (10 << 20)


def run_prepare(fmt: str, path: Path, out: Path) -> tuple[int, str]:
    """`sasrec prepare` in-process; returns (exit code, stderr). Any exception is a failure."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["prepare", "--format", fmt, "--input", str(path), "--out", str(out), "--kcore", "none",
                     *COLUMNS.get(fmt, [])])
    return code, err.getvalue()


def assert_clean_failure(code: int, err: str, path: Path, out: Path, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("sasrec prepare: error: "), err[:2000]
    assert "Traceback" not in err
    assert str(path) in lines[0], f"the error names the file: {lines[0][:300]}"
    assert len(lines[0]) < 2000, "the message stays readable"
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0][:500])
    assert not out.exists(), "no output folder"
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out.parent.exists() else []
    assert not leftovers, "no hidden temporary folder"


def _gzip_truncated(data: bytes) -> bytes:
    blob = gzip.compress(data)
    return blob[: len(blob) // 2]


def _gzip_corrupt(data: bytes) -> bytes:
    blob = bytearray(gzip.compress(data * 50))
    for i in range(20, len(blob) - 8, 7):  # flip bits inside the deflate stream
        blob[i] ^= 0x5A
    return bytes(blob)


def _zip_corrupt(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ratings.dat", data * 50)
    blob = bytearray(buf.getvalue())
    for i in range(40, len(blob) // 2, 5):
        blob[i] ^= 0xFF
    return bytes(blob)


# (name, file suffix, bytes from the good content, fragments the message must hold or None)
DAMAGE = [
    ("empty", "", lambda d: b"", []),
    ("whitespace-only", "", lambda d: b"\n \n\t\n", []),
    ("truncated-gzip", ".gz", _gzip_truncated, ["gzip"]),
    ("corrupt-gzip", ".gz", _gzip_corrupt, ["gzip"]),
    ("corrupt-zip", ".zip", _zip_corrupt, ["zip"]),
    ("binary-junk", "", lambda d: bytes(range(256)) * 64, []),
    ("invalid-utf8", "", lambda d: d[:40] + b"\xff\xfe\xc3\x28" + d[40:], ["line"]),
    ("semicolons", "", lambda d: d.replace(b",", b";").replace(b"::", b";").replace(b" ", b";"), []),
    ("ten-mb-line", "", lambda d: d + LINE_10MB + b"\n" + d, []),
    ("ten-mb-first-line", "", lambda d: LINE_10MB + b"\n" + d, []),
    ("json-array-line", "", lambda d: b"[1, 2]\n" + d, ["line 1"]),
    ("nul-bytes", "", lambda d: d.replace(b"\n", b"\x00\n", 3), []),
]


@pytest.mark.parametrize("fmt", [*TEXT_FORMATS, "parquet"])
@pytest.mark.parametrize("damage", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_malformed_file_is_one_clean_error(tmp_path, fmt, damage):
    name, suffix, make, fragments = damage
    good = GOOD.get(fmt, GOOD["csv"])
    data = make(good)
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    out = tmp_path / "out" / "dataset"
    code, err = run_prepare(fmt, path, out)
    if code == 0:
        # Some damage is harmless to some formats (e.g. NUL bytes inside ids, semicolons in a
        # whitespace format): then the dataset folder must be complete.
        assert name in {"nul-bytes", "semicolons", "ten-mb-line", "whitespace-only", "json-array-line",
                        "invalid-utf8", "ten-mb-first-line"}, (name, fmt)
        assert {p.name for p in out.iterdir()} >= {"manifest.json", "items.parquet", "sequences.parquet"}
        return
    if fmt == "parquet" and name != "corrupt-zip":  # a binary format: no lines, and not a compressed text
        fragments = []
    assert_clean_failure(code, err, path, out, *fragments)


def test_huge_line_error_names_the_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(GOOD["pairs"] + b"7 " + LINE_10MB + b" 3\n")
    out = tmp_path / "ds"
    code, err = run_prepare("pairs", path, out)
    assert_clean_failure(code, err, path, out, "line 19")


def test_movielens_zip_that_is_not_a_zip(tmp_path):
    path = tmp_path / "ml-1m.zip"
    path.write_bytes(b"PK\x03\x04" + os.urandom(500))
    out = tmp_path / "ds"
    assert_clean_failure(*run_prepare("movielens", path, out), path, out, "zip")


LINE_BYTES = st.lists(
    st.one_of(
        st.binary(max_size=30),
        st.sampled_from([b"1 2", b"u1 i1 3", b"a,b,1", b"1::2::3::4", b'{"reviewerID": "a"', b'"', b"\t", b"\r",
                         b"\xff", b"\xc3\xa9", b"::", b",,", b"[1]", b"{}", b"null"]),
        st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
    ),
    max_size=30,
).map(lambda parts: b"\n".join(parts))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(TEXT_FORMATS), data=LINE_BYTES)
def test_random_bytes_give_a_dataset_or_a_clean_error(fmt, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input"
        path.write_bytes(data)
        out = Path(tmp) / "out" / "dataset"
        code, err = run_prepare(fmt, path, out)
        if code == 0:
            assert (out / "manifest.json").is_file()
            shutil.rmtree(out)
        else:
            assert_clean_failure(code, err, path, out)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=2000), compress=st.sampled_from(["gzip", "zip", "raw"]))
def test_random_archives_give_a_clean_error(data, compress):
    if compress == "gzip":
        blob = gzip.compress(data)
        blob = blob[: len(blob) - (len(data) % 5)]
    elif compress == "zip":
        blob = b"PK\x03\x04" + data
    else:
        blob = data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input"
        path.write_bytes(blob)
        out = Path(tmp) / "out" / "dataset"
        for fmt in ("pairs", "amazon-json"):
            code, err = run_prepare(fmt, path, out)
            if code == 0:
                shutil.rmtree(out)
            else:
                assert_clean_failure(code, err, path, out)

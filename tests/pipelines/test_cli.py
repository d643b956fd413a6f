"""Every bad input gives a one-line error, exit code 2, no traceback and no output folder."""

from __future__ import annotations

import json

import pytest

from pipelines.synthetic import generate, write_log


def assert_clean_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sasrec prepare: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_prepare_synthetic_end_to_end(cli, tmp_path):
    code, out, _ = cli("synth", "--out", tmp_path / "log.csv", "--users", "50", "--items", "40", "--chains", "2")
    assert code == 0 and "50 users" in out
    code, out, err = cli("prepare", "--format", "csv", "--input", tmp_path / "log.csv", "--out", tmp_path / "ds",
                         "--user-col", "user_id", "--item-col", "item_id", "--time-col", "timestamp",
                         "--split", "temporal", "--cutoff-quantile", "0.9", "--valid-quantile", "0.8")
    assert code == 0, err
    assert "users" in out and "dropped: kcore" in out
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["split"]["protocol"] == "temporal" and manifest["split"]["valid_quantile"] == 0.8


@pytest.mark.parametrize(
    "setup, args, fragments",
    [
        (None, ["--format", "pairs", "--input", "{tmp}/missing.txt"], ["missing.txt", "no such file"]),
        ("pairs", ["--format", "pairs", "--input", "{tmp}/in.txt", "--kcore", "none"], ["in.txt", "line 3", "'1 12 x'"]),
        ("csv", ["--format", "csv", "--input", "{tmp}/in.csv", "--user-col", "user", "--item-col", "item"],
         ["in.csv", "missing column(s) 'user'", "columns found: 'u', 'i', 't'"]),
        ("csv", ["--format", "csv", "--input", "{tmp}/in.csv", "--user-col", "u", "--item-col", "i", "--time-col", "t"],
         ["in.csv", "line 3", "column 't'", "'yesterday'"]),
        ("latin1", ["--format", "csv", "--input", "{tmp}/in.csv", "--user-col", "u", "--item-col", "i"],
         ["in.csv", "line 2", "UTF-8"]),
        ("pairs", ["--format", "pairs", "--input", "{tmp}/in.txt", "--on-bad-lines", "skip"],
         ["no events left after filtering", "bad_lines 1"]),
        ("json", ["--format", "amazon-json", "--input", "{tmp}/in.json"], ["in.json", "line 2", "bad review record"]),
        ("json", ["--format", "movielens", "--input", "{tmp}/in.json"], ["in.json", "line 1", "not a MovieLens ratings file"]),
    ],
)
def test_bad_input_is_one_clean_line(cli, tmp_path, setup, args, fragments):
    if setup == "pairs":
        (tmp_path / "in.txt").write_text("1 10\n1 11\n1 12 x\n")
    elif setup == "csv":
        (tmp_path / "in.csv").write_text("u,i,t\na,b,1\na,c,yesterday\n")
    elif setup == "latin1":
        (tmp_path / "in.csv").write_bytes("u,i\n\xe9,b\n".encode("latin-1"))
    elif setup == "json":
        (tmp_path / "in.json").write_text('{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n{"reviewerID": \n')
    code, _, err = cli("prepare", *[a.format(tmp=tmp_path) for a in args], "--out", tmp_path / "out")
    assert_clean_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_unknown_format_is_one_clean_line(cli, tmp_path):
    (tmp_path / "a.xml").write_text("<x/>")
    code, _, err = cli("prepare", "--format", "xml", "--input", tmp_path / "a.xml", "--out", tmp_path / "out")
    assert_clean_error(code, err, "unknown format 'xml'", "movielens, csv, parquet, amazon-json, pairs, sequences")
    assert not (tmp_path / "out").exists()


def test_on_bad_lines_skip_is_counted_in_the_manifest(cli, tmp_path):
    lines = [f"{u} {i}" for u in range(1, 4) for i in range(1, 6)]
    lines.insert(4, "2 broken line")
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    code, out, err = cli("prepare", "--format", "pairs", "--input", tmp_path / "in.txt", "--out", tmp_path / "out",
                         "--on-bad-lines", "skip", "--user-core", "3", "--item-core", "3")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dropped"]["bad_lines"] == 1 and manifest["statistics"]["events"] == 15
    assert manifest["reader"]["on_bad_lines"] == "skip"


def test_failed_prepare_leaves_an_existing_dataset_untouched(cli, tmp_path):
    write_log(generate(users=30, items=20, chains=2), tmp_path / "log.csv")
    common = ["--format", "csv", "--user-col", "user_id", "--item-col", "item_id", "--out", tmp_path / "ds"]
    assert cli("prepare", "--input", tmp_path / "log.csv", *common)[0] == 0
    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    code, _, err = cli("prepare", "--input", tmp_path / "log.csv", *common, "--min-rating", "3")
    assert_clean_error(code, err, "--min-rating", "no rating column")
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before


def test_help_everywhere(cli):
    for command in ("synth", "download", "prepare"):
        with pytest.raises(SystemExit) as exc:
            cli(command, "--help")
        assert exc.value.code == 0

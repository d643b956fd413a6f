from __future__ import annotations

import gzip
import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from pipelines.errors import InputError
from pipelines.readers import read_interactions


def rows(frame: pd.DataFrame) -> list[tuple]:
    return list(zip(frame["user_id"].astype(str), frame["item_id"].astype(str), frame["timestamp"].tolist()))


def test_movielens_double_colon_plain_and_gzip(tmp_path):
    text = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300000\n"
    (tmp_path / "ratings.dat").write_text(text)
    (tmp_path / "r.dat.gz").write_bytes(gzip.compress(text.encode()))
    for path in (tmp_path / "ratings.dat", tmp_path / "r.dat.gz", tmp_path):
        frame = read_interactions("movielens", path)
        assert rows(frame) == [("1", "1193", 978300760), ("1", "661", 978302109), ("2", "1193", 978300000)]
        assert frame["rating"].tolist() == [5.0, 3.0, 4.0]
        assert frame.attrs["timestamp"] == "column"


def test_movielens_udata_tabs_and_official_zip(tmp_path):
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    frame = read_interactions("movielens", tmp_path / "u.data")
    assert rows(frame) == [("196", "242", 881250949), ("186", "302", 891717742)]
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as zf:
        zf.write(tmp_path / "u.data", "ml-100k/u.data")
        zf.writestr("ml-100k/u.item", "1|Toy Story (1995)|\xe9".encode("latin-1"))
    assert rows(read_interactions("movielens", tmp_path / "ml-100k.zip")) == rows(frame)


def test_movielens_ratings_csv(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n")
    frame = read_interactions("movielens", tmp_path / "ratings.csv")
    assert rows(frame) == [("1", "296", 1147880044), ("1", "306", 1147868817)]
    assert frame["rating"].tolist() == [5.0, 3.5]


def test_generic_csv_tsv_and_parquet_with_column_mapping(tmp_path):
    frame = pd.DataFrame({"u": ["a", "b", "a"], "i": ["007", "x", "7"], "t": [3, 1, 2], "r": [1.0, 2.0, 3.0], "extra": 0})
    frame.to_csv(tmp_path / "log.csv", index=False)
    frame.to_csv(tmp_path / "log.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "log.parquet")
    opts = dict(user_col="u", item_col="i", time_col="t", rating_col="r")
    for fmt, name in (("csv", "log.csv"), ("csv", "log.tsv"), ("parquet", "log.parquet")):
        got = read_interactions(fmt, tmp_path / name, **opts)
        assert rows(got) == [("a", "007", 3), ("b", "x", 1), ("a", "7", 2)], name  # ids stay strings: "007" != "7"
        assert got["rating"].tolist() == [1.0, 2.0, 3.0]


def test_csv_without_time_column_uses_file_order_and_iso_times(tmp_path):
    (tmp_path / "a.csv").write_text("user,item\nu1,i1\nu2,i2\n")
    frame = read_interactions("csv", tmp_path / "a.csv", user_col="user", item_col="item")
    assert frame["timestamp"].tolist() == [0, 1] and frame.attrs["timestamp"] == "file-order"
    (tmp_path / "b.csv").write_text("user,item,when\nu1,i1,1970-01-01T00:01:00Z\nu2,i2,1970-01-02\n")
    frame = read_interactions("csv", tmp_path / "b.csv", user_col="user", item_col="item", time_col="when")
    assert frame["timestamp"].tolist() == [60, 86400]


@pytest.mark.parametrize("edition", ["2014", "2023"])
@pytest.mark.parametrize("packing", ["plain", "gz", "zip"])
def test_amazon_json_lines(tmp_path, edition, packing):
    if edition == "2014":
        records = [{"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 100, "helpful": [0, 1]},
                   {"reviewerID": "A2", "asin": "B2", "overall": 3.0, "unixReviewTime": 50, "reviewText": "ok"}]
    else:
        records = [{"user_id": "A1", "parent_asin": "B1", "asin": "V1", "rating": 5.0, "timestamp": 100},
                   {"user_id": "A2", "parent_asin": "B2", "asin": "V2", "rating": 3.0, "timestamp": 50, "images": []}]
    data = "\n".join(json.dumps(r) for r in records).encode() + b"\n"
    path = tmp_path / f"reviews.json{'.gz' if packing == 'gz' else ''}"
    if packing == "zip":
        path = tmp_path / "reviews.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("Reviews.json", data)
    else:
        path.write_bytes(gzip.compress(data) if packing == "gz" else data)
    frame = read_interactions("amazon-json", path)
    assert rows(frame) == [("A1", "B1", 100), ("A2", "B2", 50)]
    assert frame["rating"].tolist() == [5.0, 3.0]


def test_pairs_and_sequences_use_file_order_as_time(tmp_path):
    (tmp_path / "pairs.txt").write_text("1 10\n1 11\n2 10\n1 12\n")
    frame = read_interactions("pairs", tmp_path / "pairs.txt")
    assert rows(frame) == [("1", "10", 0), ("1", "11", 1), ("2", "10", 2), ("1", "12", 3)]
    assert frame.attrs["timestamp"] == "file-order"
    (tmp_path / "seq.txt").write_text("1 10 11 12\n2  10\t13\n\n3\n")
    frame = read_interactions("sequences", tmp_path / "seq.txt")
    assert rows(frame) == [("1", "10", 0), ("1", "11", 1), ("1", "12", 2), ("2", "10", 3), ("2", "13", 4)]


def test_bad_lines_error_names_file_line_and_content(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::2::5::10\n1::3::5\n1::4::5::12\n")
    with pytest.raises(InputError, match=r"ratings.dat: line 2: .*'1::3::5'"):
        read_interactions("movielens", tmp_path / "ratings.dat")
    (tmp_path / "a.csv").write_text("u,i,t\na,b,1\na,c,notatime\n")
    with pytest.raises(InputError, match=r"a.csv: line 3: column 't'.*'notatime'"):
        read_interactions("csv", tmp_path / "a.csv", user_col="u", item_col="i", time_col="t")
    (tmp_path / "r.json").write_text('{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n{"reviewerID": "A", "asin"\n')
    with pytest.raises(InputError, match=r"r.json: line 2: bad review record"):
        read_interactions("amazon-json", tmp_path / "r.json")


def test_bad_lines_skip_counts_them(tmp_path):
    (tmp_path / "pairs.txt").write_text("1 10\n1 11 extra\n2 10\n")
    frame = read_interactions("pairs", tmp_path / "pairs.txt", on_bad_lines="skip")
    assert rows(frame) == [("1", "10", 0), ("2", "10", 1)] and frame.attrs["bad_lines"] == 1
    (tmp_path / "a.csv").write_text("u,i,t\na,b,1\na,c,x\nb,c,3\n")
    frame = read_interactions("csv", tmp_path / "a.csv", user_col="u", item_col="i", time_col="t", on_bad_lines="skip")
    assert frame["timestamp"].tolist() == [1, 3] and frame.attrs["bad_lines"] == 1
    (tmp_path / "r.json").write_text('{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\nnot json\n')
    assert read_interactions("amazon-json", tmp_path / "r.json", on_bad_lines="skip").attrs["bad_lines"] == 1


def test_wrong_encoding_and_latin1_option(tmp_path):
    (tmp_path / "a.csv").write_bytes("u,i\nJos\xe9,b\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"a.csv: line 2: not valid UTF-8.*--encoding"):
        read_interactions("csv", tmp_path / "a.csv", user_col="u", item_col="i")
    frame = read_interactions("csv", tmp_path / "a.csv", user_col="u", item_col="i", encoding="latin-1")
    assert frame["user_id"].astype(str).tolist() == ["José"]


def test_manifest_source_entry_is_file_name_and_sha256(tmp_path):
    (tmp_path / "p.txt").write_text("1 2\n")
    entry = read_interactions("pairs", tmp_path / "p.txt").attrs["files"][0]
    assert entry["path"] == "p.txt" and entry["bytes"] == 4 and len(entry["sha256"]) == 64
    assert np.array_equal(read_interactions("pairs", tmp_path / "p.txt")["timestamp"], [0])


def test_parquet_bad_value_names_the_row(tmp_path):
    pd.DataFrame({"u": ["a", "b"], "i": ["x", "y"], "t": ["1", "soon"]}).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(InputError, match=r"a.parquet: row 2: column 't': cannot parse timestamp 'soon'"):
        read_interactions("parquet", tmp_path / "a.parquet", user_col="u", item_col="i", time_col="t")
    with pytest.raises(InputError, match=r"missing column\(s\) 'user'; columns found: 'u', 'i', 't'"):
        read_interactions("parquet", tmp_path / "a.parquet", user_col="user", item_col="i")

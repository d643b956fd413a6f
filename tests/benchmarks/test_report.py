from benchmarks import report


def test_a_section_is_replaced_in_place_and_a_quick_run_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "REPORT", tmp_path / "BENCHMARKS.md")
    report.write_section("speed", "Speed", [{"case": "a", "s": 1.0}], command="python -m x")
    report.write_section("speed-quick", "Speed", [{"case": "a", "s": 2.0}], command="python -m x --quick")
    report.write_section("speed", "Speed", [{"case": "a", "s": 3.0}], command="python -m x")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.count("<!-- section:speed -->") == 1 and text.count("<!-- section:speed-quick -->") == 1
    assert "## Speed\n" in text and "## Speed (quick run)\n" in text
    assert text.index("<!-- section:speed -->") < text.index("<!-- section:speed-quick -->")  # kept in place
    assert "| a | 3 |" in text and "| a | 1 |" not in text and "| a | 2 |" in text


def test_rows_written_while_a_long_run_went_on_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "REPORT", tmp_path / "BENCHMARKS.md")
    report.write_section("runs", "Runs", [{"variant": "a", "ndcg": 0.1}], command="python -m x")
    # A long run of "c" started here; meanwhile another run wrote "b" and re-measured "a".
    report.write_section_keeping("runs", "Runs", [{"variant": "b", "ndcg": 0.2}, {"variant": "a", "ndcg": 0.3}],
                                 key="variant")
    report.write_section_keeping("runs", "Runs", [{"variant": "c", "ndcg": 0.4}], key="variant", measured=True,
                                 order=lambda row: row["variant"])
    rows, date = report.section_rows("runs")
    assert [(row["variant"], row["ndcg"]) for row in rows] == [("a", "0.3"), ("b", "0.2"), ("c", "0.4")]
    assert rows[0]["measured"] == date and rows[2]["measured"] == ""  # kept rows say when they were measured

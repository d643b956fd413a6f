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

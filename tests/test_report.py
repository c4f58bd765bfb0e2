"""The report writer writes the table, the CSV and one chart per family, and never overwrites a report."""
from __future__ import annotations

import csv

import pytest

from benchmarks.report import format_table, write_report

ROWS = [
    {"method": "clip", "run": "runs/clip/a", "syn_relation": 0.5, "syn_attribution": 0.96, "syn_retrieval/i2t_R@1": 0.41},
    {"method": "negclip", "run": "runs/negclip/b", "syn_relation": 0.8123, "syn_attribution": 0.97},
    {"method": "clip", "run": "runs/clip/c", "syn_relation": 0.52, "syn_attribution": 0.95, "syn_retrieval/i2t_R@1": 0.4},
]
FAMILIES = {"syn_choice": ["syn_relation", "syn_attribution"], "syn_retrieval": ["syn_retrieval/i2t_R@1"]}


def test_writes_table_csv_and_one_chart_per_family(tmp_path):
    paths = write_report(ROWS, tmp_path / "out", families=FAMILIES, notes=["tie counts as wrong"])
    md = paths["md"].read_text()
    assert "| clip | runs/clip/a | 0.500 | 0.960 | 0.410 |" in md
    assert "| negclip | runs/negclip/b | 0.812 | 0.970 | – |" in md  # missing metric shown as a dash
    assert "- tie counts as wrong" in md
    with open(paths["csv"]) as f:
        back = list(csv.DictReader(f))
    assert [float(r["syn_relation"]) for r in back] == [0.5, 0.8123, 0.52]
    for family in FAMILIES:
        assert paths[family].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_never_overwrites(tmp_path):
    write_report(ROWS, tmp_path, families=FAMILIES)
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_report(ROWS, tmp_path, families=FAMILIES)


def test_format_table_columns_in_order():
    table = format_table(ROWS[:1], ["syn_attribution", "method"])
    assert table.splitlines()[0] == "| syn_attribution | method |" and "| 0.960 | clip |" in table

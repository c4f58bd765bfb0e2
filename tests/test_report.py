"""The report writer writes the table, the CSV and one chart per family, and never overwrites a report."""
from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest

from benchmarks.report import format_table, write_report
from tests_support import ROOT

ROWS = [
    {"method": "clip", "run": "runs/clip/a", "seed": 0, "syn_relation": 0.5, "syn_attribution": 0.96,
     "syn_retrieval/i2t_R@1": 0.41},
    {"method": "negclip", "run": "runs/negclip/b", "seed": 0, "syn_relation": 0.8123, "syn_attribution": 0.97},
    {"method": "clip", "run": "runs/clip/c", "seed": 1, "syn_relation": 0.52, "syn_attribution": 0.95,
     "syn_retrieval/i2t_R@1": 0.4},
]
FAMILIES = {"syn_choice": ["syn_relation", "syn_attribution"], "syn_retrieval": ["syn_retrieval/i2t_R@1"]}
PNG = b"\x89PNG\r\n\x1a\n"


def test_writes_table_csv_and_one_chart_per_family(tmp_path):
    paths = write_report(ROWS, tmp_path / "out", families=FAMILIES, title="t", notes=["tie counts as wrong"])
    assert set(paths) == {"md", "csv", "syn_choice", "syn_retrieval"}
    md = paths["md"].read_text()
    assert md.startswith("# t\n")
    assert "| method | run | seed | syn_relation | syn_attribution | syn_retrieval/i2t_R@1 |" in md
    assert "| clip | runs/clip/a | 0 | 0.500 | 0.960 | 0.410 |" in md
    assert "| negclip | runs/negclip/b | 0 | 0.812 | 0.970 | – |" in md  # missing metric shown as a dash
    assert "| clip | runs/clip/c | 1 | 0.520 | 0.950 | 0.400 |" in md
    assert "- tie counts as wrong" in md
    with open(paths["csv"]) as f:
        back = list(csv.DictReader(f))
    assert [r["method"] for r in back] == ["clip", "negclip", "clip"]
    assert [float(r["syn_relation"]) for r in back] == [0.5, 0.8123, 0.52]  # full precision
    assert [r["syn_retrieval/i2t_R@1"] for r in back] == ["0.41", "", "0.4"]
    for family in FAMILIES:
        assert paths[family] == tmp_path / "out" / f"{family}.png"
        assert paths[family].read_bytes()[:8] == PNG


def test_never_overwrites(tmp_path):
    write_report(ROWS, tmp_path, families=FAMILIES)
    with pytest.raises(FileExistsError, match="results.md"):
        write_report(ROWS, tmp_path, families=FAMILIES)
    other = tmp_path / "other"
    other.mkdir()
    (other / "syn_choice.png").write_bytes(b"old")  # an old chart counts too
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_report(ROWS, other, families=FAMILIES)
    assert (other / "syn_choice.png").read_bytes() == b"old" and not (other / "results.md").exists()


def test_missing_values_and_metrics_outside_families(tmp_path):
    rows = [{"method": "a|b", "run": "r", "x": math.nan, "extra": 0.25}]
    paths = write_report(rows, tmp_path, families={"f": ["x"]})
    assert "| method | run | x | extra |" in paths["md"].read_text()
    assert r"| a\|b | r | – | 0.250 |" in paths["md"].read_text()  # NaN as a dash, '|' escaped
    assert paths["f"].read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no rows"):
        write_report([], tmp_path / "empty", families=FAMILIES)
    with pytest.raises(ValueError, match="family name"):
        write_report(rows, tmp_path / "bad", families={"a/b": ["x"]})


def test_format_table_columns_in_order():
    table = format_table(ROWS[:1], ["syn_attribution", "method", "missing"])
    assert table.splitlines() == ["| syn_attribution | method | missing |", "|---|---|---|", "| 0.960 | clip | – |"]


def test_the_module_does_not_import_matplotlib():
    """matplotlib loads only when a chart is drawn (the module alone, as the package imports the benchmarks)."""
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('report', 'benchmarks/report.py')\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_chart_range_reaches_a_negative_value(tmp_path):
    from benchmarks.report import y_limits

    assert y_limits([0.5, 1.0]) == (0.0, 1.05)
    assert y_limits([0.2, -0.3]) == pytest.approx((-0.35, 1.05))  # a negative score margin stays in view
    rows = [{"method": "clip", "run": "r", "syn_swaps/relation_margin": -0.3, "syn_swaps/relation_text_cos": 0.99}]
    paths = write_report(rows, tmp_path, families={"syn_swaps": ["syn_swaps/relation_margin", "syn_swaps/relation_text_cos"]})
    assert paths["syn_swaps"].read_bytes()[:8] == PNG


def test_sweep_rows_one_seed_has_no_spread_and_variants_meet_their_own_baseline():
    """A metric with one value has an unknown spread (n/a, no '~' verdict), not 0; a metric measured in fewer
    seeds than its row says so; a variant row (structureclip/plain) is compared with the baseline point's row of
    the same variant."""
    from benchmarks.sweep import aggregate, table_rows

    def result(method_rows):
        return {"rows": [{"method": m, "run": "r", **vals} for m, vals in method_rows]}

    base_point = {"method": "structureclip", "method.negative_kinds": "[relation,attribute]"}
    other_point = {"method": "structureclip", "method.negative_kinds": "[relation]"}
    results = [
        (base_point | {"seed": 0}, result([("structureclip", {"a": 0.50, "b": 0.1}),
                                           ("structureclip/plain", {"a": 0.60})])),
        (base_point | {"seed": 1}, result([("structureclip", {"a": 0.52}), ("structureclip/plain", {"a": 0.62})])),
        (other_point | {"seed": 0}, result([("structureclip", {"a": 0.55}), ("structureclip/plain", {"a": 0.61})])),
    ]
    groups = aggregate(results, ["a", "b"])
    rows = {r["method"]: r for r in table_rows(groups, ["a", "b"])}
    base = rows["structureclip (method.negative_kinds=[relation,attribute])"]
    assert base["b"] == "0.100 ± n/a (n=1)" and base["a"] == "0.510 ± 0.014"
    one = rows["structureclip (method.negative_kinds=[relation])"]
    assert one["a"] == "0.550 ± n/a (+0.040)"  # one seed: no '~' verdict either way
    plain = rows["structureclip/plain (method.negative_kinds=[relation])"]
    assert plain["a"] == "0.610 ± n/a (+0.000)"  # against the baseline point's plain row (0.610), not 0.510
    # the baseline point's plain row is the plain rows' baseline, as the first row is the others'
    assert rows["structureclip/plain (method.negative_kinds=[relation,attribute])"]["a"] == "0.610 ± 0.014"


def test_latex_escapes_what_latex_reads_as_markup():
    from benchmarks.report import latex_table

    tex = latex_table([{"m": "a & b_c", "v": "0.5 (+0.01~)"}], ["m", "v"], caption="100% #1 {x} ^ $ \\")
    assert r"a \& b\_c" in tex and r"(+0.01$\sim$)" in tex
    assert r"100\% \#1 \{x\} \textasciicircum{} \$ \textbackslash{}" in tex


def test_chance_levels_reach_the_charts_and_stay_out_of_the_tables(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.hlines
    monkeypatch.setattr(Axes, "hlines", lambda self, y, *a, **k: (drawn.append(y), real(self, y, *a, **k))[1])
    rows = [{"method": "clip", "run": "r1", "a": 0.7, "b": 0.3, "chance": {"a": 0.5, "b": 0.2}},
            {"method": "negclip", "run": "r2", "a": 0.8, "b": 0.4, "chance": {"a": 0.5, "b": 0.2}}]
    paths = write_report(rows, tmp_path, families={"fam": ["a", "b"]})
    assert drawn == [0.5, 0.2]  # one dashed line per metric, at its chance level
    assert "chance" not in paths["csv"].read_text().splitlines()[0] and "chance" not in paths["md"].read_text()


def test_notes_of_several_runs_are_shown_once_and_a_runs_own_names_it():
    from benchmarks.report import labelled_notes

    notes = labelled_notes([("run-a", ["chance 0.5", "margin 0.1", "shared caveat"]),
                            ("run-b", ["chance 0.5", "margin 0.3", "shared caveat", "shared caveat"]),
                            ("run-c", ["chance 0.5", "margin 0.1"])])
    assert notes == ["chance 0.5", "margin 0.1 [run-a; run-c]", "shared caveat [run-a; run-b]", "margin 0.3 [run-b]"]
    assert labelled_notes([("only", ["a", "b"])]) == ["a", "b"]


def test_detail_files_of_runs_sharing_a_folder_name_are_told_apart(tmp_path):
    """Every sweep cell's run is `<cell>/run`: their detail CSVs are named by the path below the shared folder;
    a run named twice is refused."""
    from omegaconf import OmegaConf

    from benchmarks.run import file_labels, find_runs

    a, b, c = tmp_path / "s" / "cellA" / "run", tmp_path / "s" / "cellB" / "run", tmp_path / "other"
    for r in (a, b, c):
        r.mkdir(parents=True)
        (r / "config.yaml").write_text("{}")
    assert file_labels([a, c]) == ["run", "other"]
    assert file_labels([a, b]) == ["cellA-run", "cellB-run"]
    assert file_labels([a, b, c]) == ["s-cellA-run", "s-cellB-run", "other"]
    with pytest.raises(ValueError, match=f"names {a} more than once"):
        find_runs(OmegaConf.create({"runs": [str(a), str(b), str(a)]}))

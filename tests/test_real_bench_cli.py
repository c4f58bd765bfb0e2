"""`make bench BENCH=aro DATA_ROOT=<fixture>` end to end, on a bare tiny model (no training run)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks.aro
from benchmarks.run import main as bench_main
from fixtures.make_benchmark_data import RELATIONS, corrupt, make

ARO = ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order")
from tests_support import ROOT as REPO


@pytest.fixture
def fixture_tagger(monkeypatch):
    """The Order benchmarks' tagger reads the fixture's known tags (this branch has no datamodules.parse)."""
    def use(fx):
        monkeypatch.setattr(benchmarks.aro, "default_tagger", lambda ctx: lambda texts: [fx.tags[t] for t in texts])
    return use


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def check_aro_output(printed: str, out: Path) -> None:
    assert all(name in printed for name in ARO) and "| clip/zero-shot | clipcomp-tiny (random init) |" in printed
    (folder,) = out.iterdir()
    rows = read_csv(folder / "vg_relation-clip-bare-model.csv")
    assert {r["relation"] for r in rows} == set(RELATIONS)
    assert {r["relation"]: int(r["count"]) for r in rows} == RELATIONS
    assert {r["attributes"] for r in read_csv(folder / "vg_attribution-clip-bare-model.csv")} >= {"white_black"}
    (result,) = read_csv(folder / "results.csv")
    assert all(0.0 <= float(result[name]) <= 1.0 for name in ARO)
    assert "images/s" in (folder / "results.md").read_text()


def test_bench_aro_on_a_bare_tiny_model(tmp_path, capsys, fixture_tagger):
    fixture_tagger(make(tmp_path / "data"))
    out = tmp_path / "results"
    argv = ["bench=aro", "model=tiny", f"bench.data_root={tmp_path / 'data'}", "bench.num_workers=0", f"out_dir={out}"]
    assert bench_main(argv) == 0
    check_aro_output(capsys.readouterr().out, out)


def test_bench_real_with_workers_skips_and_reports_bad_records(tmp_path, capsys, fixture_tagger):
    fixture_tagger(make(tmp_path / "data"))
    path, record = corrupt(tmp_path / "data", "corrupt_image", "coco")
    argv = ["bench=real", "model=tiny", f"bench.data_root={tmp_path / 'data'}", "bench.num_workers=2",
            f"out_dir={tmp_path / 'r'}"]
    assert bench_main(argv) == 2  # a corrupt image read in a worker process: its own clean message
    assert f"error: {path}:{record}: cannot read image" in capsys.readouterr().err
    assert bench_main(argv + ["bench.skip_bad=true"]) == 0
    printed = capsys.readouterr().out
    assert all(n in printed for n in ("sugarcrepe/overall", "coco_retrieval/i2t_R@1", "flickr30k_retrieval/t2i_R@10"))
    (report,) = (tmp_path / "r").glob("*/results.md")  # the failed call wrote no report
    # one chart per retrieval dataset: their metrics share the tick labels (i2t_R@1, ...)
    assert {"retrieval_coco.png", "retrieval_flickr30k.png"} <= {p.name for p in report.parent.iterdir()}
    text = report.read_text()
    assert "1 bad record(s) skipped in COCO-Order" in text and "1 bad record(s) skipped in COCO retrieval" in text


def test_bench_says_what_is_missing(tmp_path, capsys):
    assert bench_main(["bench=aro", "model=tiny", f"out_dir={tmp_path / 'r'}"]) == 2
    assert "bench.data_root is not set" in capsys.readouterr().err
    assert bench_main(["bench=aro", "model=tiny", f"runs=[{tmp_path}]", f"out_dir={tmp_path / 'r'}"]) == 2
    assert "not both" in capsys.readouterr().err
    assert bench_main(["bench=aro", "model=nosuch"]) == 2
    assert "available: tiny, vitb32_quickgelu" in capsys.readouterr().err


def test_make_bench_command_line_with_the_lab_parser(tmp_path):
    """The real command line, tagging with datamodules.parse from the fixture's CoNLL-U (no Stanza model)."""
    pytest.importorskip("datamodules.parse")
    make(tmp_path / "data")
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "bench=aro", "model=tiny",
                           f"bench.data_root={tmp_path / 'data'}", f"out_dir={out}",
                           f"bench.parser.cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    check_aro_output(done.stdout, out)

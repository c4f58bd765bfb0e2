"""Sweeps: each cell an ordinary run, an interrupted sweep skips finished cells, tables show mean and std;
`compare` puts every registered method side by side with the baseline first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

import configs
from benchmarks.sweep import cell_run_args, cells as sweep_cells, load_spec, main as sweep_main
from methods.train import compose_train, portable_cpu_env
from methods import METHODS
from tests_support import TINY_ARGS

from tests_support import ROOT


def write_sweep(path, **spec):
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_killed_sweep_skips_finished_cells(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "s.yaml", name="lr", base=TINY_ARGS + [f"cache_dir={tmp_path / 'c'}"],
                        grid={"optim.lr": [1e-3, 5e-4]}, seeds=[0, 1], bench="syn", out_dir=str(tmp_path / "sw"))
    # a real kill: SIGKILL as soon as the first cell has its result
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.sweep", sweep], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((tmp_path / "sw" / "lr" / "cells").glob("*/result.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = list((tmp_path / "sw" / "lr" / "cells").glob("*/result.json"))
    assert len(done) == 1, "the first cell never finished"
    cells = [done[0].parent]
    first = (cells[0] / "result.json").stat().st_mtime_ns
    trained = (cells[0] / "run" / "done.json").stat().st_mtime_ns
    # an unfinished cell whose run was written with another runs_dir and worker count (a sweep folder moved, or a
    # default of these changed) is the same run: continued, not refused
    root = tmp_path / "sw" / "lr" / "cells"
    name, _, overrides = next(c for c in sweep_cells(load_spec(sweep, []))
                              if not (root / c[0] / "result.json").exists())
    moved = compose_train(overrides + cell_run_args(root / name))
    moved.runs_dir, moved.data.num_workers = "/somewhere/else/runs", 3
    (root / name / "run").mkdir(parents=True, exist_ok=True)
    configs.save(moved, root / name / "run" / "config.yaml")
    capsys.readouterr()

    assert sweep_main([sweep]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.count("done before, skipped") == 1 and out.count(": running") == 3  # a half-done cell is continued
    assert "continued with data.num_workers: 3 -> " in captured.err and "other-config" not in captured.err
    assert (root / name / "result.json").is_file()
    assert (cells[0] / "result.json").stat().st_mtime_ns == first
    assert (cells[0] / "run" / "done.json").stat().st_mtime_ns == trained  # its run was not trained again
    (report,) = (tmp_path / "sw" / "lr").glob("report-*")
    md = (report / "results.md").read_text()
    assert "clip (optim.lr=0.001)" in md and "clip (optim.lr=0.0005)" in md and " ± " in md
    for name in ("results.csv", "results.tex", "syn_choice.png", "syn_retrieval.png", "training_curves.png"):
        assert (report / name).is_file(), name
    header = (report / "results.csv").read_text().splitlines()[0]
    assert "syn_relation,syn_relation std" in header

    # a cell benchmarked under another bench config (its name holds only the training overrides): its run is
    # benchmarked again, not trained again, and the old result stays beside the new one, never reported
    result = json.loads((cells[0] / "result.json").read_text())
    assert result["bench"]["bench"]["name"] == "syn" and result["bench"]["ckpt"] == "best"
    result["bench"]["bench"]["benchmarks"] = ["syn_relation"]
    (cells[0] / "result.json").write_text(json.dumps(result))
    assert sweep_main([sweep]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 3 and "came from another bench config" in out
    assert (cells[0] / "result.other-bench-1.json").is_file()
    assert json.loads((cells[0] / "result.json").read_text())["bench"]["bench"]["benchmarks"] != ["syn_relation"]
    assert (cells[0] / "run" / "done.json").stat().st_mtime_ns == trained

    # a cell whose run was made with another config than its overrides give today (a default changed since): the
    # cell is set aside whole, never reused or reported, and trained again
    saved = yaml.safe_load((cells[0] / "run" / "config.yaml").read_text())
    moved = saved | {"runs_dir": "/somewhere/else/runs", "data": saved["data"] | {"num_workers": 7}}
    (cells[0] / "run" / "config.yaml").write_text(yaml.safe_dump(moved))  # written elsewhere: the same run
    assert sweep_main([sweep, "--print-commands"]) == 0 and capsys.readouterr().out == ""
    saved["optim"]["weight_decay"] = 0.5
    (cells[0] / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert sweep_main([sweep, "--print-commands"]) == 0  # its job is printed, the old run set aside
    captured = capsys.readouterr()
    assert "was made with another config (optim.weight_decay: 0.5 -> 0.1)" in captured.err
    assert captured.out.count(f"{sys.executable} -m methods.train") == 1 and f"run_dir={cells[0] / 'run'}" in captured.out
    aside = cells[0].with_name(cells[0].name + ".other-config-1")
    aside.rename(cells[0])  # back, for the sweep itself to find it
    assert sweep_main([sweep]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "was made with another config (optim.weight_decay: 0.5 -> 0.1)" in captured.err
    assert out.count(": running") == 1
    aside = cells[0].with_name(cells[0].name + ".other-config-1")
    assert yaml.safe_load((aside / "run" / "config.yaml").read_text())["optim"]["weight_decay"] == 0.5
    assert (cells[0] / "run" / "done.json").stat().st_mtime_ns != trained


def test_compare_has_a_row_per_method_baseline_first(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "c.yaml", name="compare", base=TINY_ARGS + [f"cache_dir={tmp_path / 'c'}"],
                        grid={"method": "all"}, seeds=[0], bench="syn", out_dir=str(tmp_path / "sw"))
    assert sweep_main([sweep, "method.kee_layers=1"]) == 2  # a key only one method has cannot be a base override
    assert f"error: {sweep}, cell method=clip_seed=0-" in capsys.readouterr().err  # the file and the cell named
    assert sweep_main([sweep, "--max-cells=1"]) == 0 and len(list((tmp_path / "sw").glob("compare/cells/*"))) == 1
    assert sweep_main([sweep]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method | seeds | syn_relation | syn_relation_converse | syn_attribution | syn_order "
                               "| syn_retrieval/i2t_R@1")
    rows = [line.split("|")[1].strip() for line in table[1:]]
    assert rows[0] == "clip" and set(METHODS.names()) <= set(rows)
    assert "(+" in table[2] or "(-" in table[2]  # differences to the baseline
    results = sorted((tmp_path / "sw" / "compare" / "cells").glob("*/result.json"))
    assert {json.loads(p.read_text())["rows"][0]["method"] for p in results} == set(METHODS.names())
    (report,) = (tmp_path / "sw" / "compare").glob("report-*")
    assert r"\begin{tabular}" in (report / "results.tex").read_text()
    # a note of one cell's own (its Syn-Swaps figures) names that cell; one every cell has is shown once, bare
    notes = [line for line in (report / "results.md").read_text().splitlines() if line.startswith("- ")]
    swaps = [n for n in notes if n.startswith("- Syn-Swaps:")]
    assert len(swaps) >= len(METHODS.names()) and all(n.endswith("]") and "method=" in n for n in swaps)  # (variants)
    assert {n.rsplit("[", 1)[1] for n in swaps} == {f"method={m} seed=0]" for m in METHODS.names()}
    assert sum(n.startswith("- Syn-Relation: tie counts as wrong") for n in notes) == 1


def test_print_commands_lists_one_job_per_unfinished_cell(tmp_path, capsys, monkeypatch):
    portable = portable_cpu_env()
    for key in portable:
        monkeypatch.delenv(key, raising=False)
    sweep = write_sweep(tmp_path / "p.yaml", name="p", base=["method=structureclip"],
                        grid={"method.negative_kinds": ["[relation]", "[]"]}, seeds=[0, 1], out_dir=str(tmp_path))
    assert sweep_main([sweep, "--print-command"]) == 2  # a mistyped option is refused, never run as a sweep
    assert "unknown option --print-command; the options are --print-commands and" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert sweep_main([sweep, "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    job = f"{sys.executable} -m methods.train method=structureclip"
    assert len(lines) == 4 and all(line.startswith(job) for line in lines)
    assert "'method.negative_kinds=[relation]'" in lines[0]
    for key, value in portable.items():  # a sweep run with CPU_KERNELS=portable prints jobs that set them too
        monkeypatch.setenv(key, value)
    assert sweep_main([sweep, "--print-commands"]) == 0
    settings = " ".join(f"{k}={v}" for k, v in portable.items())
    assert all(line.startswith(f"env {settings} {job}") for line in capsys.readouterr().out.strip().splitlines())


def test_every_shipped_sweep_file_composes_into_valid_cells(tmp_path, capsys):
    # the README's `make sweep SWEEP=configs/sweep/<name>.yaml` commands: a renamed config key or a mistyped value
    # in a shipped sweep fails here, not an hour into a sweep (--print-commands validates every cell first)
    files = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        assert sweep_main([str(path), f"out_dir={tmp_path}", "--print-commands"]) == 0, path.name
        assert capsys.readouterr().out.count(" -m methods.train") >= 1, path.name


def test_a_ddp_sweep_and_a_ddp_run_leave_one_folder_and_one_report(tmp_path):
    """Lightning's DDP launcher starts rank 1 by running the same command again: rank 1 trains with rank 0 but
    makes no run folder of its own, and benchmarks and reports nothing (both ranks did, before)."""
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.precision=32-true",
           "trainer.max_epochs=1", "data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=8",
           "data.options.train_size=32", "data.options.val_size=8", "data.options.test_size=16",
           "trainer.enable_progress_bar=false", f"cache_dir={tmp_path / 'c'}"]
    env = dict(os.environ, TMPDIR=str(tmp_path))  # rank 1's scratch folder, removed when it ends
    sweep = write_sweep(tmp_path / "s.yaml", name="ddp", base=ddp, grid={"method": ["clip"]}, seeds=[0], bench="syn",
                        out_dir=str(tmp_path / "sw"))
    done = subprocess.run([sys.executable, "-m", "benchmarks.sweep", sweep], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout  # two processes did train
    assert len(list((tmp_path / "sw" / "ddp").glob("report-*"))) == 1
    done = subprocess.run([sys.executable, "-m", "methods.train", *ddp, f"runs_dir={tmp_path / 'runs'}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "clip").iterdir()
    assert (run / "done.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.glob("clipcomp-rank*"))


def test_a_seed_without_a_figure_is_left_out_of_the_mean():
    """A seed whose metric is NaN (e.g. no VG-Attribution pair with 25 cases) is left out, and `n` says so."""
    import math

    from benchmarks.sweep import aggregate

    results = [({"method": "clip", "seed": s}, {"rows": [{"method": "clip", "run": f"r{s}", "a": v}]})
               for s, v in enumerate([0.5, math.nan, 0.7])]
    (row,) = aggregate(results, ["a"])
    assert math.isclose(row["a"], 0.6) and row["a n"] == 2 and row["n_seeds"] == 3

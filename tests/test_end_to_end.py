"""Train a few steps, then bench: the run folder, the checkpoints, the table and the report files."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import torch

from benchmarks.run import main as bench_main
from methods.train import cpu_model, portable_cpu_env, train
from tests_support import TINY_ARGS

from tests_support import ROOT
SYN = ("syn_relation", "syn_attribution", "syn_order", "syn_retrieval/i2t_R@1")


def test_train_then_bench(make_cfg, tmp_path, capsys):
    cfg = make_cfg()
    run = train(cfg)
    assert run.parent.name == "clip" and (run / "config.yaml").is_file()
    for name in ("last", "best"):
        ckpt = torch.load(run / "checkpoints" / f"{name}.ckpt", map_location="cpu", weights_only=True)
        assert "state_dict" in ckpt and ckpt["hyper_parameters"]["cfg"]["method"]["name"] == "clip"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    speed = json.loads((run / "throughput.json").read_text())
    assert speed["global_batch"] == cfg.data.batch_size
    (env,) = json.loads((run / "environment.json").read_text())  # one start
    assert env["torch"] == torch.__version__ and env["cpu_count"] > 0 and "open_clip" in env and "commit" in env
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"] == cpu_model()

    # a second run of the same config never reuses the first one's folder
    assert train(cfg) != run

    out = tmp_path / "results"
    assert bench_main([f"runs=[{run}]", f"out_dir={out}", "ckpt=last"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in SYN) and "| clip |" in printed
    (folder,) = out.iterdir()
    assert {"results.md", "results.csv", "syn_choice.png", "syn_retrieval.png"} <= {p.name for p in folder.iterdir()}
    cpu = f"CPU ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()})"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    assert f"trained with torch {torch.__version__}, open_clip {open_clip.__version__}, on {device}" in (
        folder / "results.md").read_text()
    with open(folder / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    # the table holds what the benchmark gives on the checkpoint it names (last, not best), each in its own column
    import configs
    from benchmarks.base import BENCHMARKS, BenchContext
    from benchmarks.run import load_run

    module, run_cfg = load_run(run, "last", torch.device("cpu"))
    bench = configs.compose("bench", [])
    ctx = BenchContext(module, module.preprocess_val, run_cfg, bench.bench)
    for name in ("syn_relation", "syn_attribution"):
        direct = BENCHMARKS.get(name)(ctx).metrics[name]
        assert abs(float(row[name]) - direct) < 1e-6, (name, row[name], direct)
        assert abs(direct * 40 - round(direct * 40)) < 1e-6  # a share of the 40 test scenes (TINY_ARGS)
    # benching again writes a new folder, the first report stays
    assert bench_main([f"runs=[{run}]", f"out_dir={out}", "ckpt=last"]) == 0
    assert len(list(out.iterdir())) == 2


def test_bench_finds_the_latest_run_of_each_method(make_cfg, tmp_path, capsys):
    cfg = make_cfg("trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    train(cfg)
    latest = train(cfg)
    # a run stopped (or still training) whose folder name sorts last, and a run_dir of another name that finished
    # earlier: neither is picked, the run that finished last is
    stopped, custom = latest.parent / "99991231-235959", latest.parent / "zz-my-experiment"
    shutil.copytree(latest, stopped)
    (stopped / "done.json").unlink()
    shutil.copytree(latest, custom)
    done = json.loads((custom / "done.json").read_text())
    (custom / "done.json").write_text(json.dumps(done | {"finished": "2000-01-01 00:00:00"}))
    assert bench_main([f"runs_dir={cfg.runs_dir}", f"out_dir={tmp_path / 'r'}", "bench.benchmarks=[syn_relation]"]) == 0
    out = capsys.readouterr().out
    assert str(latest) in out and out.count("| clip |") == 1
    # a run_dir straight under runs_dir (make train ARGS="run_dir=runs/exp1"), finished last: it is the one
    top = Path(cfg.runs_dir) / "exp1"
    shutil.copytree(latest, top)
    (top / "done.json").write_text(json.dumps(done | {"finished": "9999-01-01 00:00:00"}))
    assert bench_main([f"runs_dir={cfg.runs_dir}", f"out_dir={tmp_path / 'r3'}", "bench.benchmarks=[syn_relation]"]) == 0
    out = capsys.readouterr().out
    assert str(top) in out and out.count("| clip |") == 1
    # named, an unfinished run is evaluated, and the report says it had not finished
    assert bench_main([f"runs=[{stopped}]", f"out_dir={tmp_path / 'r2'}", "bench.benchmarks=[syn_relation]"]) == 0
    (report,) = (tmp_path / "r2").iterdir()
    assert f"{stopped}: not finished (no done.json)" in (report / "results.md").read_text()


def test_bench_without_runs_says_what_to_do(tmp_path, capsys):
    assert bench_main([f"runs_dir={tmp_path / 'none'}", f"out_dir={tmp_path / 'r'}"]) == 2
    assert "make train" in capsys.readouterr().err


def test_last_checkpoint_is_the_final_epoch_even_after_the_best(make_cfg, monkeypatch):
    """last.ckpt holds the final weights and best.ckpt those of the lowest validation loss. Here the validation loss
    is made to rise every epoch, so the best is epoch 0 (Lightning 2.6's `save_last=True` would leave last.ckpt a
    copy of it)."""
    import lightning as L

    from methods import train as train_mod

    class RisingValLoss(L.Callback):
        def on_validation_end(self, trainer, module):  # before the checkpoint callbacks, which run last
            trainer.callback_metrics["val/loss"] = torch.tensor(float(trainer.current_epoch))

    real = L.Trainer
    monkeypatch.setattr(train_mod.L, "Trainer",
                        lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, RisingValLoss()], **k))
    run = train(make_cfg("trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                         "trainer.num_sanity_val_steps=0"))
    last, best = (torch.load(run / "checkpoints" / f"{n}.ckpt", map_location="cpu", weights_only=True)
                  for n in ("last", "best"))
    assert (last["epoch"], last["global_step"]) == (2, 6) and (best["epoch"], best["global_step"]) == (0, 2)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]  # no last-v1


def test_a_run_with_the_portable_cpu_kernels_records_them_and_its_report_says_so(tmp_path):
    env = os.environ | portable_cpu_env()
    run, out = tmp_path / "run", tmp_path / "results"
    for cmd in (["methods.train", *TINY_ARGS, "trainer.limit_train_batches=2", f"run_dir={run}"],
                ["benchmarks.run", f"runs=[{run}]", f"out_dir={out}", "bench.benchmarks=[syn_relation]", "device=cpu"]):
        subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, capture_output=True, timeout=300, check=True)
    (start,) = json.loads((run / "environment.json").read_text())
    assert start["cpu_kernels"] == "portable" and start["cpu_capability"] == "DEFAULT"  # torch's plain kernels
    (folder,) = out.iterdir()
    report = (folder / "results.md").read_text()
    assert f"on CPU ({cpu_model()}, DEFAULT, portable kernels)" in report
    assert "evaluated on CPU with portable kernels" in report

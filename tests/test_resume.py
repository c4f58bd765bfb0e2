"""A run stopped by a preemption signal leaves a checkpoint, and `resume=<run>` finishes it in its own folder."""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from methods.train import main as train_main
from tests_support import TINY_ARGS

ROOT = Path(__file__).resolve().parents[1]
ARGS = TINY_ARGS + ["trainer.max_epochs=3", "trainer.limit_train_batches=1.0", "data.options.train_size=320",
                    "trainer.enable_progress_bar=false"]  # 40 steps an epoch


def steps_in(path: Path) -> list[int]:
    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_sigterm_then_resume_finishes_the_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "methods.train", f"runs_dir={runs}", *ARGS], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    best = None
    while time.time() < deadline and proc.poll() is None:  # wait for the end of epoch 1 (best.ckpt appears)
        found = list(runs.glob("clip/*/checkpoints/best.ckpt"))
        if found:
            best = found[0]
            break
        time.sleep(0.05)
    assert best is not None, "no checkpoint after the first epoch"
    time.sleep(1.0)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    run = best.parent.parent
    assert not (run / "done.json").exists(), "the run finished before it could be stopped; make it longer"
    stopped = torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert 40 <= stopped["global_step"] < 120  # written when the signal came, mid-way

    assert train_main([f"resume={run}", "optim.lr=1"]) == 2  # a resume uses the run's own config only
    assert train_main([f"resume={run}"]) == 0
    assert (run / "done.json").is_file() and (run / "metrics.part1.csv").is_file()
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 120 and final["epoch"] >= 2
    before, after = steps_in(run / "metrics.part1.csv"), steps_in(run / "metrics.csv")
    assert before and after and min(after) >= stopped["global_step"] - 1  # continued, not restarted
    assert len(list(runs.glob("clip/*"))) == 1  # no second run folder
    assert train_main([f"resume={run}"]) == 2 and "finished" in capsys.readouterr().err

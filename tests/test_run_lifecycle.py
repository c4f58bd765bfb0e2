"""A run's life across attempts: its folder moved between them keeps best.ckpt the best one; a failure before the
first optimizer step leaves no checkpoint and the folder is set aside; data_report.json counts the images replaced
in every attempt and on every rank."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from methods import train as train_mod
from methods.callbacks import DataReport, FolderCheckpoint, Throughput
from methods.checkpoints import read_checkpoint, resume_checkpoint
from tests_support import ROOT, TINY_ARGS


def ckpt_epochs(run: Path) -> dict[str, int]:
    return {p.name: read_checkpoint(p)["epoch"] for p in sorted((run / "checkpoints").glob("*.ckpt"))}


def logged(run: Path, key: str) -> dict[int, float]:
    """epoch -> a value logged per epoch, over every metrics file of a run (a continued run's part files first)."""
    out = {}
    for path in sorted(run.glob("metrics.part*.csv")) + [run / "metrics.csv"]:
        with open(path) as f:
            out |= {int(r["epoch"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}
    return out


@pytest.fixture
def add_callback(monkeypatch):
    """Adds callbacks (holder["cb"], a list) to the Trainer that methods.train builds."""
    holder: dict[str, list] = {"cb": []}
    real = L.Trainer
    monkeypatch.setattr(train_mod.L, "Trainer",
                        lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, *holder["cb"]], **k))
    return holder


class FailAt(L.Callback):
    """An error at the start of the training batch of global step `step`, after the batch was loaded."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"fails at step {self.step} (injected)")


# -- 1. a moved run keeps best.ckpt the best one --------------------------------------------------------------------

class Scheduled(L.LightningModule):
    """A toy whose val/loss is given per epoch."""

    def __init__(self, val: list[float]) -> None:
        super().__init__()
        self.val, self.w = val, torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch["image"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(self.val[self.current_epoch]), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader([{"image": torch.full((2,), float(i))} for i in range(4)], batch_size=2)

    def val_dataloader(self):
        return DataLoader([{"image": torch.zeros(2)}], batch_size=1)


@pytest.mark.parametrize("val, best_epoch", [([3.0, 2.0, 1.5, 1.0], 3),  # falling: the last epoch is the best
                                             ([3.0, 1.0, 2.0, 1.5], 1)])  # the best from before the move stays
def test_a_moved_run_continued_keeps_best_ckpt_the_best_epoch(tmp_path, val, best_epoch):
    """The lab's own Trainer (methods.train.run_trainer): 2 epochs in mvA, the folder moved to mvB, continued to 4.
    Lightning drops the record of the best checkpoint when the folder changed: best.ckpt then stayed the epoch-1 one
    beside a best-v1.ckpt, or (without the version counter) took the first epoch after the move, a worse one."""
    def fit(run: Path, epochs: int, ckpt: Path | None) -> None:
        cfg = train_mod.compose_train(["trainer=debug", f"trainer.max_epochs={epochs}", "trainer.limit_train_batches=2",
                                       "trainer.checkpoint_every_n_steps=0"])
        train_mod.run_trainer(cfg, run, Throughput(run)).fit(Scheduled(val), ckpt_path=ckpt)

    fit(tmp_path / "mvA", 2, None)
    shutil.move(tmp_path / "mvA", tmp_path / "mvB")
    run = tmp_path / "mvB"
    fit(run, 4, resume_checkpoint(run))
    assert ckpt_epochs(run) == {"best.ckpt": best_epoch, "last.ckpt": 3}
    (state,) = [s for k, s in read_checkpoint(run / "checkpoints" / "last.ckpt")["callbacks"].items()
                if "'val/loss'" in k]
    assert float(state["best_model_score"]) == min(val)
    assert state["best_model_path"] == os.path.realpath(run / "checkpoints" / "best.ckpt")


def test_the_checkpoint_record_keeps_lightnings_key():
    """A checkpoint written before FolderCheckpoint (by Lightning's ModelCheckpoint) restores into it."""
    kwargs = dict(dirpath="x", filename="best", monitor="val/loss", mode="min")
    assert FolderCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key
    assert FolderCheckpoint(dirpath="x", monitor=None).state_key == ModelCheckpoint(dirpath="x", monitor=None).state_key


def test_a_moved_run_dir_continued_on_the_tiny_config_keeps_one_best_ckpt(tmp_path, add_callback, capsys):
    """The real path: a run_dir stopped by an error after two epochs, moved (a sweep folder moved), and continued with
    the same command at its new place; best.ckpt is the epoch of the lowest val/loss over all three."""
    args = [*TINY_ARGS, "trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=0"]
    first, moved = tmp_path / "sweepA" / "cell", tmp_path / "sweepB" / "cell"
    add_callback["cb"] = [FailAt(8)]  # the first step of epoch 2 (4 steps an epoch)
    with pytest.raises(RuntimeError, match="fails at step 8"):
        train_mod.train(train_mod.compose_train([f"run_dir={first}", f"runs_dir={tmp_path / 'A'}", *args]))
    add_callback["cb"] = []
    shutil.move(first.parent, moved.parent)
    assert train_mod.main([f"run_dir={moved}", f"runs_dir={tmp_path / 'B'}", *args]) == 0
    val = logged(moved, "val/loss")
    assert sorted(val) == [0, 1, 2]
    assert ckpt_epochs(moved) == {"best.ckpt": min(val, key=val.get), "last.ckpt": 2}  # no best-v1.ckpt
    assert "record of its best checkpoint (val/loss) is carried over" in capsys.readouterr().err


# -- 2. a failure before the first optimizer step ---------------------------------------------------------------------

@pytest.mark.parametrize("where", ["setup", "first batch"])
def test_a_real_failure_before_the_first_step_leaves_no_checkpoint_and_the_folder_is_set_aside(
        tmp_path, add_callback, where, capsys):
    """A bad record read while the data are set up (the corrupt image of the first record), or an error in the first
    training batch: inside Lightning's fit, before any optimizer step. An interrupted.ckpt of step 0 (the initial
    weights, no optimizer state) kept the folder from being set aside and left it listed for resuming."""
    from datamodules.images import BadInput
    from test_negclip_tsv import write_fixture

    path = write_fixture(tmp_path)
    argv = ["data=negclip_coco", f"data.options.train_file={path}", f"data.options.val_file={path}",
            f"data.options.image_root={tmp_path / 'coco'}", "data.batch_size=4", "data.eval_batch_size=4",
            "data.num_workers=0", f"runs_dir={tmp_path / 'runs'}", "trainer=debug"]
    if where == "setup":
        image = tmp_path / "coco" / "val2014" / "COCO_val2014_000000000000.jpg"
        image.write_bytes(image.read_bytes()[:60])  # a truncated JPEG
        error = pytest.raises(BadInput, match=r"train.csv:2: cannot read image")
    else:
        add_callback["cb"] = [FailAt(0)]
        error = pytest.raises(RuntimeError, match="fails at step 0")
    with error:
        train_mod.train(train_mod.compose_train(argv))
    (aside,) = (tmp_path / "runs" / "clip").iterdir()
    assert aside.name.endswith(".failed-1") and (aside / "config.yaml").is_file()
    assert not list(aside.rglob("*.ckpt"))
    assert "failed before its first checkpoint" in capsys.readouterr().err


def test_a_failure_after_a_step_still_writes_interrupted_ckpt(make_cfg, add_callback):
    add_callback["cb"] = [FailAt(2)]
    cfg = make_cfg()
    with pytest.raises(RuntimeError, match="fails at step 2"):
        train_mod.train(cfg)
    (run,) = (Path(cfg.runs_dir) / "clip").iterdir()
    assert not run.name.endswith(".failed-1")
    assert read_checkpoint(run / "checkpoints" / "interrupted.ckpt")["global_step"] == 2
    assert resume_checkpoint(run) == run / "checkpoints" / "interrupted.ckpt"


# -- 3. data_report.json: every attempt, every rank ------------------------------------------------------------------

def test_data_report_counts_the_images_replaced_in_every_attempt(tmp_path, add_callback):
    """COCO files with a corrupt train image and skip_bad: a run stopped by an error at the start of epoch 1 and
    continued reports the images replaced in both attempts, as the uninterrupted run does. The counter restarts in
    each process, and the report of the stopped attempt was overwritten."""
    from fixtures.make_train_data import make_coco

    make_coco(tmp_path / "coco", counts={"train": 10, "restval": 6, "val": 4, "test": 2}, bad=True)
    argv = [f"cache_dir={tmp_path / 'cache'}", "data=coco", f"data.options.root={tmp_path / 'coco'}",
            "data.options.skip_bad=true", "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0",
            "trainer=debug", "trainer.max_epochs=2", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1",
            "trainer.checkpoint_every_n_steps=0", "optim.warmup_steps=1"]
    ref = train_mod.train(train_mod.compose_train([f"run_dir={tmp_path / 'ref'}", *argv]))
    whole = json.loads((ref / "data_report.json").read_text())["train"]
    assert whole["substituted_images"] == 2  # the corrupt image, once an epoch

    run = tmp_path / "run"
    add_callback["cb"] = [FailAt(7)]  # 14 images, batches of 2: the first step of epoch 1
    with pytest.raises(RuntimeError, match="fails at step 7"):
        train_mod.train(train_mod.compose_train([f"run_dir={run}", *argv]))
    stopped = json.loads((run / "data_report.json").read_text())["train"]["substituted_images"]
    add_callback["cb"] = []
    train_mod.train(train_mod.compose_train([f"run_dir={run}", *argv]))
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["substituted_images"] == whole["substituted_images"] == 2
    assert stopped == 1  # written when the attempt stopped
    assert report["train"]["substituted_per_attempt"] == [1, 1] and whole["substituted_per_attempt"] == [2]
    assert report["train"]["skipped_records"] == whole["skipped_records"] == 3
    assert report["val"]["substituted_images"] == 0


def test_a_damaged_data_report_is_kept_aside(tmp_path, capsys):
    report = DataReport(tmp_path)
    (tmp_path / "data_report.json").write_text('{"train": {"substituted_ima')
    assert report.read_earlier() == {}
    assert (tmp_path / "data_report.damaged-1.json").read_text() == '{"train": {"substituted_ima'
    assert "data_report.json: damaged (JSONDecodeError" in capsys.readouterr().err
    (tmp_path / "data_report.json").write_text('{"train": {"substituted_images": 3}}')  # before per-attempt counts
    assert report.read_earlier() == {"train": [3]}


DDP_SCRIPT = """
import json, sys
import lightning as L, torch
from torch.utils.data import DataLoader
from methods.callbacks import DataReport


class Toy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.trainer.datamodule.replaced += 1 + self.global_rank  # rank 0 replaces one image a step, rank 1 two
        return self.w(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.replaced = 0

    def train_dataloader(self):
        return DataLoader(torch.randn(8, 2), batch_size=2)

    def data_report(self):
        return {"train": {"skipped_records": 0, "substituted_images": self.replaced}}


if __name__ == "__main__":
    L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[DataReport(sys.argv[1])]).fit(Toy(), datamodule=Data())
"""


def test_data_report_sums_the_ranks_counts(tmp_path):
    """Two processes (ddp_spawn, as trainer=ddp_cpu2): each rank counts the images its own loader replaced; the
    report holds the sum (2 epochs of 2 steps a rank: 4 on rank 0, 8 on rank 1), not rank 0's count alone."""
    script = tmp_path / "ddp_report.py"
    script.write_text(DDP_SCRIPT)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"]["substituted_images"] == 12 and report["train"]["substituted_per_attempt"] == [12]


# -- 4. an error on one rank of a DDP run ends the run, with its message ------------------------------------------

DDP_FAIL_SCRIPT = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import lightning as L
from methods import train as T
from tests_support import TINY_ARGS


class FailOnRank1(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            raise RuntimeError("rank 1 fails at step 2 (injected)")


if __name__ == "__main__":
    real = L.Trainer
    T.L.Trainer = lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, FailOnRank1()], **k)
    T.train(T.compose_train(TINY_ARGS + ["trainer=ddp_cpu2", "trainer.strategy=ddp", "trainer.max_epochs=1",
                                         "trainer.limit_train_batches=4", "trainer.checkpoint_every_n_steps=1",
                                         "trainer.enable_progress_bar=false", "runs_dir=" + sys.argv[1]]))
"""


def test_an_error_on_one_ddp_rank_ends_the_run_with_its_message(tmp_path):
    """strategy=ddp (trainer=ddp's launcher: each rank its own process, as under torchrun or SLURM), two CPU
    processes: rank 1 raises while rank 0 is in the step's collectives. Rank 1's interrupted-checkpoint save ended in
    a barrier rank 0 never reached, so rank 1 sat there, its error unprinted, until the process group timed out
    (30 minutes); now it ends at once, and Lightning's launcher ends the rest."""
    import signal
    import time

    script = tmp_path / "ddp_fail.py"
    script.write_text(DDP_FAIL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    start = time.time()
    try:
        _, err = proc.communicate(timeout=75)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's rank processes with it
        _, err = proc.communicate()
        pytest.fail(f"the run hung for {time.time() - start:.0f} s after rank 1's error:\n{err[-2000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0 and "rank 1 fails at step 2 (injected)" in err
    (run,) = (tmp_path / "runs" / "clip").iterdir()
    steps = {p.name: read_checkpoint(p)["global_step"] for p in (run / "checkpoints").glob("*.ckpt")}
    assert steps.get("step.ckpt") == 2 and all(step == 2 for step in steps.values()), steps
    assert not (run / "done.json").exists()


@pytest.mark.parametrize("logger_class", ["RunLogger", "CSVLogger"])
def test_a_kill_while_a_new_metric_rewrites_metrics_csv_loses_no_row(tmp_path, monkeypatch, logger_class):
    """A metric name that first appears mid-run (samples/s five steps into an attempt) makes the logger rewrite
    metrics.csv under a new header. A run killed during that rewrite (here: its writing fails half-way) must still
    have every row written before it; Lightning's own CSVLogger, which truncates the file first, has none."""
    from lightning.pytorch.loggers import CSVLogger
    from methods.callbacks import RunLogger

    logger = {"RunLogger": RunLogger, "CSVLogger": CSVLogger}[logger_class](tmp_path, name="", version="",
                                                                            flush_logs_every_n_steps=1)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 + step}, step=step)
    path = tmp_path / "metrics.csv"
    assert [r["step"] for r in csv.DictReader(path.open())] == ["0", "1", "2"]

    def killed(self, rows):
        raise KeyboardInterrupt("killed mid-rewrite")

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.log_metrics({"train/loss": 4.0, "train/samples_per_sec": 9.0}, step=3)
    monkeypatch.undo()
    rows = list(csv.DictReader(path.open()))
    if logger_class == "CSVLogger":  # the failure this guards against, shown on Lightning's writer
        assert rows == []
        return
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "1.0"), ("1", "2.0"), ("2", "3.0")]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left
    logger.log_metrics({"train/loss": 5.0, "train/samples_per_sec": 8.0}, step=4)  # goes on under the new header
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"] and rows[-1]["train/samples_per_sec"] == "8.0"


def test_the_run_logger_writes_the_bytes_lightnings_csv_logger_writes(tmp_path):
    """The same rows, new columns appearing in between (each a rewrite), give the same metrics.csv, byte for byte."""
    from lightning.pytorch.loggers import CSVLogger
    from methods.callbacks import RunLogger

    files = []
    for cls in (RunLogger, CSVLogger):
        folder = tmp_path / cls.__name__
        logger = cls(folder, name="", version="", flush_logs_every_n_steps=2)
        for step in range(7):
            row = {"train/loss": 1.0 / (step + 1), "lr": 0.5}
            if step >= 3:
                row["train/samples_per_sec"] = 100.0 + step
            if step == 5:
                row["val/loss"] = torch.tensor(0.25)
                row["note/ü"] = 1.5
            logger.log_metrics(row, step=step)
        logger.save()
        files.append((folder / "metrics.csv").read_bytes())
    assert files[0] == files[1] and files[0].count(b"\r\n") == 8


def test_a_failed_append_is_cut_back_off_and_written_once_by_the_next_save(tmp_path, monkeypatch):
    from methods.callbacks import RunLogger

    logger = RunLogger(tmp_path, name="", version="", flush_logs_every_n_steps=1)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    path = tmp_path / "metrics.csv"
    before = path.read_bytes()
    real = csv.DictWriter.writerows

    def half(self, rows):
        self.writer.writerow(["1", "2.0"][:1])  # part of a row reaches the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", half)
    with pytest.raises(OSError):
        logger.log_metrics({"train/loss": 2.0}, step=1)
    assert path.read_bytes() == before
    monkeypatch.setattr(csv.DictWriter, "writerows", real)
    logger.log_metrics({"train/loss": 3.0}, step=2)
    assert [r["step"] for r in csv.DictReader(path.open())] == ["0", "1", "2"]

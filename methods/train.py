"""Train one method: `python -m methods.train method=clip data=shapes optim.lr=1e-3 ...`;
continue a stopped run: `python -m methods.train resume=runs/clip/<time>`.

Every run gets a folder of its own, runs/<method>/<timestamp>[-<run_name>], holding the resolved
config, checkpoints (last and best on the validation split), metrics.csv and throughput.json.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

import configs
from configs.files import new_folder, write_atomic
from datamodules import CaptionDataModule, data_schema
from methods import METHODS, method_schema
from methods.callbacks import DataReport, Throughput

SCHEMAS = {"method": method_schema, "data": data_schema}


def compose_train(argv: list[str]) -> DictConfig:
    """The resolved, validated training config."""
    return configs.compose("train", argv, SCHEMAS)


def new_run_dir(cfg: DictConfig) -> Path:
    """A fresh folder for this run; never an existing one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return new_folder(Path(cfg.runs_dir) / cfg.method.name / (stamp + (f"-{cfg.run_name}" if cfg.run_name else "")))


def build(cfg: DictConfig) -> tuple[L.LightningModule, CaptionDataModule]:
    """The method module and its DataModule for a config."""
    module = METHODS.get(cfg.method.name)(configs.to_plain(cfg))
    dm = CaptionDataModule(cfg.data, preprocess_train=module.preprocess_train, preprocess_val=module.preprocess_val,
                           tokenizer=module.tokenizer, extra_fields=module.fields(),
                           field_options=module.field_options())
    module.prepare_fields(dm)
    return module, dm


def trainer_args(cfg: DictConfig) -> dict[str, Any]:
    """Lightning Trainer arguments from cfg.trainer, with the GPU defaults filled in: bf16 mixed precision where the
    GPU has bf16 (`precision: null`), cuDNN autotuning, and TF32 float32 matmuls (open_clip's trainer sets both)."""
    args = dict(cfg.trainer)
    on_gpu = args["accelerator"] in ("gpu", "cuda") or (args["accelerator"] == "auto" and torch.cuda.is_available())
    if args["precision"] is None:
        args["precision"] = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    if args["benchmark"] is None:
        args["benchmark"] = True if on_gpu else None
    if on_gpu:
        torch.set_float32_matmul_precision("high")
    return args


def progress_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The progress bar, refreshed every `log_every_n_steps` on a GPU: it shows the loss, and reading a logged
    tensor makes the host wait for the device, so refreshing every step would sync every step."""
    if not cfg.trainer.enable_progress_bar:
        return []
    on_cpu = cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not torch.cuda.is_available())
    return [TQDMProgressBar(refresh_rate=1 if on_cpu else max(1, cfg.trainer.log_every_n_steps))]


def make_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """The Trainer of a run (or of a measurement: benchmarks/perf_rows.py), with `callbacks` after the progress bar."""
    return L.Trainer(**trainer_args(cfg), default_root_dir=run_dir, callbacks=[*progress_callbacks(cfg), *callbacks],
                     **kwargs)


def mark_done(run_dir: Path, trainer: L.Trainer) -> None:
    """`done.json`, written last and atomically: a run without it did not finish."""
    write_atomic(run_dir / "done.json", json.dumps({"global_step": trainer.global_step, "epochs": trainer.current_epoch,
                                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))


def train(cfg: DictConfig, run_dir: Path | None = None, ckpt_path: Path | None = None) -> Path:
    """Fit the configured method in a new run folder (or continue `run_dir` from `ckpt_path`); returns the folder."""
    if run_dir is None:
        run_dir = new_run_dir(cfg)
        configs.save(cfg, run_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # the CSV logger shares the run folder with config.yaml; it only ever replaces its own metrics.csv
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    module, dm = build(cfg)
    throughput = Throughput(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    trainer = make_trainer(
        cfg, run_dir,
        [
            ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min",
                            save_last=True, auto_insert_metric_name=False),
            # an exception or a preemption signal (SIGTERM) writes interrupted.ckpt before the process ends
            OnExceptionCheckpoint(dirpath=ckpt_dir, filename="interrupted"),
            LearningRateMonitor(logging_interval="step"),
            throughput,
            DataReport(run_dir),
        ],
        logger=CSVLogger(run_dir, name="", version=""),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    if trainer.is_global_zero:
        mark_done(run_dir, trainer)
        s = throughput.summary()
        rate = s["samples_per_sec_median"]
        print(f"run: {run_dir}\ntraining throughput: {rate:.0f} samples/s (median over {s['measured_steps']} steps)"
              if rate else f"run: {run_dir}")
    return run_dir


def latest_checkpoint(run_dir: Path) -> Path:
    """The furthest of last.ckpt (end of an epoch) and interrupted.ckpt (written on a signal or an error)."""
    found = [p for p in (run_dir / "checkpoints" / n for n in ("last.ckpt", "interrupted.ckpt")) if p.is_file()]
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from; start a new run instead")
    step = lambda p: torch.load(p, map_location="cpu", weights_only=True)["global_step"]  # noqa: E731
    return max(found, key=step)


def resume(run_dir: str | Path) -> Path:
    """Continue a run from its last checkpoint, in its own folder, with its own config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    ckpt = latest_checkpoint(run_dir)
    if (run_dir / "done.json").is_file():
        raise FileExistsError(f"{run_dir}: the run finished (done.json); start a new run instead")
    saved = OmegaConf.load(run_dir / "config.yaml")
    cfg = configs._merge(compose_train([f"method={saved.method.name}"]), saved, str(run_dir / "config.yaml"))
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():  # the CSV logger starts a new file: keep the old one beside it
        k = 1
        while (run_dir / f"metrics.part{k}.csv").exists():
            k += 1
        metrics.rename(run_dir / f"metrics.part{k}.csv")
    return train(cfg, run_dir=run_dir, ckpt_path=ckpt)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    resume_from = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    try:
        if resume_from:
            if len(argv) > 1:
                raise configs.ConfigError("resume=<run> takes no other arguments: the run's own config.yaml is used")
            resume(resume_from[0])
            return 0
        cfg = compose_train(argv)
    except (configs.ConfigError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

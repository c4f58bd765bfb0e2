"""Train one method: `python -m methods.train method=clip data=shapes optim.lr=1e-3 ...`.

Every run gets a folder of its own, runs/<method>/<timestamp>[-<run_name>], holding the resolved
config, checkpoints (last and best on the validation split), metrics.csv and throughput.json.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

import configs
from datamodules import CaptionDataModule, data_schema
from methods import METHODS, method_schema
from methods.callbacks import Throughput

SCHEMAS = {"method": method_schema, "data": data_schema}


def compose_train(argv: list[str]) -> DictConfig:
    """The resolved, validated training config."""
    return configs.compose("train", argv, SCHEMAS)


def new_run_dir(cfg: DictConfig) -> Path:
    """A fresh folder for this run; never an existing one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.runs_dir) / cfg.method.name / (stamp + (f"-{cfg.run_name}" if cfg.run_name else ""))
    for k in range(1000):
        path = base if k == 0 else base.with_name(f"{base.name}.{k}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder next to {base}")


def build(cfg: DictConfig) -> tuple[L.LightningModule, CaptionDataModule]:
    """The method module and its DataModule for a config."""
    module = METHODS.get(cfg.method.name)(configs.to_plain(cfg))
    dm = CaptionDataModule(cfg.data, preprocess_train=module.preprocess_train, preprocess_val=module.preprocess_val,
                           tokenizer=module.tokenizer, extra_fields=module.fields(),
                           field_options=module.field_options())
    module.prepare_fields(dm)
    return module, dm


def mark_done(run_dir: Path, trainer: L.Trainer) -> None:
    """`done.json`, written last and atomically: a run without it did not finish."""
    tmp = run_dir / "done.json.tmp"
    tmp.write_text(json.dumps({"global_step": trainer.global_step, "epochs": trainer.current_epoch,
                               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
    tmp.replace(run_dir / "done.json")


def train(cfg: DictConfig) -> Path:
    """Fit the configured method; returns the run folder."""
    run_dir = new_run_dir(cfg)
    configs.save(cfg, run_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # the CSV logger shares the run folder with config.yaml; it only ever replaces its own metrics.csv
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    module, dm = build(cfg)
    throughput = Throughput(run_dir)
    trainer = L.Trainer(
        **cfg.trainer,
        default_root_dir=run_dir,
        logger=CSVLogger(run_dir, name="", version=""),
        callbacks=[
            ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss", mode="min",
                            save_last=True, auto_insert_metric_name=False),
            LearningRateMonitor(logging_interval="step"),
            throughput,
        ],
    )
    trainer.fit(module, datamodule=dm)
    if trainer.is_global_zero:
        mark_done(run_dir, trainer)
        s = throughput.summary()
        rate = s["samples_per_sec_median"]
        print(f"run: {run_dir}\ntraining throughput: {rate:.0f} samples/s (median over {s['measured_steps']} steps)"
              if rate else f"run: {run_dir}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = compose_train(sys.argv[1:] if argv is None else argv)
    except (configs.ConfigError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

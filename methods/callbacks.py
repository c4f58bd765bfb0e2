"""Training callbacks: measured throughput (samples/s) and the data report, written into the run folder."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from configs.files import write_atomic


class Throughput(L.Callback):
    """Samples per second over training steps (data loading included), after `warmup` steps; median and mean.

    On a GPU each step is timed on the device's own clock (a CUDA event at each step's end, read once when
    training ends), so measuring makes the host wait for nothing; the time a step waits for data shows up
    as the device idling between steps. Elsewhere the host clock times the steps. The per-step value logged
    as `train/samples_per_sec` is always the host clock's (on a GPU, the host runs ahead and the value is
    rough; throughput.json has the device's)."""

    def __init__(self, run_dir: str | Path | None, warmup: int = 5) -> None:
        self.path = Path(run_dir) / "throughput.json" if run_dir is not None else None
        self.warmup = warmup
        self.host_times: list[float] = []
        self.events: list[list[Any]] = []  # per stretch of consecutive training steps: CUDA events at their ends
        self.last: float | None = None
        self.samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.last = None  # the gap across validation and epoch ends is not a training step
        self.events.append([])

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        self.samples = batch["image"].shape[0] * trainer.world_size
        if trainer.global_step <= self.warmup:  # a measured step starts after the warm-up's last one ended
            return
        if module.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events[-1].append(event)
        if self.last is not None:
            self.host_times.append(now - self.last)
            module.log("train/samples_per_sec", self.samples / self.host_times[-1], batch_size=1)
        self.last = now

    @property
    def step_times(self) -> list[float]:
        """Seconds per measured step: the device's clock on a GPU, else the host's."""
        if not any(len(stretch) > 1 for stretch in self.events):
            return self.host_times
        self.events[-1][-1].synchronize()
        return [a.elapsed_time(b) / 1000 for stretch in self.events for a, b in zip(stretch, stretch[1:])]

    def summary(self) -> dict[str, Any]:
        t = self.step_times
        return {
            "samples_per_sec_median": self.samples / statistics.median(t) if t else None,
            "samples_per_sec_mean": self.samples * len(t) / sum(t) if t else None,
            "step_time_median_s": statistics.median(t) if t else None,
            "global_batch": self.samples,
            "measured_steps": len(t),
            "clock": "device" if t is not self.host_times else "host",
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.path is not None:
            info = self.summary() | {"accelerator": type(trainer.accelerator).__name__, "world_size": trainer.world_size,
                                     "precision": str(trainer.precision)}
            write_atomic(self.path, json.dumps(info, indent=2))


class DataReport(L.Callback):
    """`data_report.json` in the run folder: per split, what the data source left out (bad records skipped,
    images replaced while training, excluded image ids), written at the start and updated at the end; a log
    line says so when anything was skipped."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "data_report.json"

    def write(self, trainer: L.Trainer) -> None:
        report = getattr(trainer.datamodule, "data_report", None)
        info = report() if report is not None and trainer.is_global_zero else None
        if not info:
            return
        write_atomic(self.path, json.dumps(info, indent=2))
        left_out = {s: r["skipped_records"] + r["substituted_images"] for s, r in info.items()}
        if any(left_out.values()):
            print(f"data: bad records skipped or images replaced per split {left_out} (skip_bad); see {self.path}")

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(trainer)

"""Training callbacks: measured throughput (samples/s) and the data report, written into the run folder; what an
exact resume needs (per-step seeds, the logging step); the checkpoints an interruption and a step count write."""
from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from configs.files import atomic_open, keep_aside, write_atomic
from datamodules.sampling import derive_seed


class LossBar(TQDMProgressBar):
    """The progress bar with the training loss, read from the logged tensor only when the bar refreshes (every
    `log_every_n_steps` on a GPU): a value logged with `prog_bar=True` would be read every step."""

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and trainer.training:
            items["loss"] = f"{float(loss):.4g}"
        return items


class _AtomicRewriteWriter(ExperimentWriter):
    def save(self) -> None:
        if not self.metrics:
            return
        keys = sorted(set(self.metrics_keys).union(*self.metrics))
        path = self.metrics_file_path
        if os.path.isfile(path) and keys == self.metrics_keys:
            with open(path, "a", newline="", encoding="utf-8") as f:
                end = f.tell()
                try:
                    csv.DictWriter(f, fieldnames=keys).writerows(self.metrics)
                    f.flush()
                except BaseException:  # a full disk mid-append: no torn line, and no row twice after the next save
                    f.truncate(end)
                    raise
        else:  # a new file, or a new header: the rows so far and the new ones, written whole and renamed over it
            rows = []
            if os.path.isfile(path):
                with open(path, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            with atomic_open(path) as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows + self.metrics)
        # only once they are on disk: a failed write (a full disk) leaves the rows and the header to the next save
        self.metrics_keys, self.metrics = keys, []


class RunLogger(CSVLogger):
    """Lightning's CSVLogger, with metrics.csv never half-written. When a metric name first appears (val/loss at
    the first epoch end, samples/s a few steps into an attempt), Lightning rewrites the whole file under the new
    header in place: it truncates the file, then refills it, so a kill in between (SIGKILL, the out-of-memory
    killer, a node lost) loses every row of the attempt so far. Here the new file is written beside it and renamed
    over it. Rows under a known header are appended, as Lightning does (an append that fails is cut back off).
    Local folders only (a run folder always is), not fsspec URLs."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AtomicRewriteWriter(log_dir=self.log_dir)
        return self._experiment


class ExactResume(L.Callback):
    """What a resumed run needs, besides the checkpoint, to repeat an uninterrupted one step for step.

    Before each training step: torch's generators (CPU and every GPU) are seeded from (seed, global step,
    rank), so the model's own randomness (dropout) is a function of the step, without saving generator
    states per rank; and the step Lightning logs under is set to the global step. (Lightning adds one to
    its logging step when it restarts from a checkpoint written mid-step, by an error or a signal, so the
    rows after such a resume would be shifted by one; the lab takes one optimizer step per batch, so the
    two counters are the same number in an uninterrupted run.) Before every checkpoint, the metrics logged
    so far are written out, so a kill right after it loses no row of a step the checkpoint holds."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(derive_seed("step", self.seed, trainer.global_step, trainer.global_rank))
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()


class FolderCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose record of what it saved (the best score, the best and k-th best files)
    survives a move of the run folder (a sweep folder moved, a run copied elsewhere and continued there).

    Lightning keeps that record only when the folder it saved in (a realpath) is the folder it saves in now; else
    it drops the best score and the best files, and a continued run then takes its first validation for the best
    one: it writes best-v1.ckpt beside best.ckpt (version counter on), or replaces a better best.ckpt (counter off),
    and `make bench`, which reads best.ckpt, evaluates the wrong weights. Here the saved paths under the old
    folder are read as the same files under the new one. The state is filed under ModelCheckpoint's own key, so
    checkpoints written before this class existed restore into it."""

    @property
    def state_key(self) -> str:
        key = super().state_key
        return ModelCheckpoint.__qualname__ + key[len(type(self).__qualname__):]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if isinstance(old, str) and isinstance(self.dirpath, str) and old and old != self.dirpath:
            def moved(path: Any) -> Any:
                if isinstance(path, str) and (path == old or path.startswith(old.rstrip(os.sep) + os.sep)):
                    return self.dirpath + path[len(old):]
                return path

            state_dict = dict(state_dict, dirpath=self.dirpath,
                              best_k_models={moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
                              **{k: moved(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path",
                                                                      "last_model_path") if k in state_dict})
            if self.monitor is not None and rank_zero_only.rank == 0:
                print(f"{self.dirpath}: the run's checkpoints were written in {old}; the record of its best "
                      f"checkpoint ({self.monitor}) is carried over", file=sys.stderr)
        super().load_state_dict(state_dict)


class StepCheckpoint(L.Callback):
    """`path` (step.ckpt) every `every` optimizer steps, replaced atomically: a kill loses at most that many
    steps. Written before a step rather than after one (as ModelCheckpoint(every_n_train_steps) does), so the
    previous step's metrics are logged by then and a resumed run's metrics have no gap."""

    def __init__(self, path: str | Path, every: int) -> None:
        self.path, self.every = Path(path), every
        self.saved_at = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.saved_at = trainer.global_step  # a resumed run does not write its starting point again

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0 and trainer.global_step != self.saved_at:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable
            self.saved_at = trainer.global_step


class Throughput(L.Callback):
    """Samples per second over training steps (data loading included), after `warmup` steps; median and mean.

    On a GPU each step is timed on the device's own clock (a CUDA event at each step's end, read once when
    training ends), so measuring makes the host wait for nothing; the time a step waits for data shows up
    as the device idling between steps. Elsewhere the host clock times the steps. The per-step value logged
    as `train/samples_per_sec` is always the host clock's (on a GPU, the host runs ahead and the value is
    rough; throughput.json has the device's). The warm-up is counted from each start of the process, so a continued
    run leaves out its own first steps (start-up, workers) too, and throughput.json keeps each earlier attempt's
    figures under "earlier_attempts"."""

    def __init__(self, run_dir: str | Path | None, warmup: int = 5, log: bool = True) -> None:
        self.path = Path(run_dir) / "throughput.json" if run_dir is not None else None
        self.warmup, self.log = warmup, log
        self.host_times: list[float] = []
        self.events: list[list[Any]] = []  # per stretch of consecutive training steps: CUDA events at their ends
        self.last: float | None = None
        self.samples = 0
        self.seen = 0  # training steps since this process started

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.last = None  # the gap across validation and epoch ends is not a training step
        self.events.append([])

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        self.samples = batch["image"].shape[0] * trainer.world_size
        self.seen += 1
        if self.seen <= self.warmup:  # a measured step starts after the warm-up's last one ended
            return
        if module.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events[-1].append(event)
        if self.last is not None:
            self.host_times.append(now - self.last)
            if self.log and trainer.global_step % trainer.log_every_n_steps == 0:
                # a host tensor: a Python number would be copied to the GPU from pageable memory, a sync
                module.log("train/samples_per_sec", torch.tensor(self.samples / self.host_times[-1]), batch_size=1)
        self.last = now

    @property
    def step_times(self) -> list[float]:
        """Seconds per measured step: the device's clock on a GPU, else the host's."""
        if not any(len(stretch) > 1 for stretch in self.events):
            return self.host_times
        next(stretch for stretch in reversed(self.events) if stretch)[-1].synchronize()  # the last event recorded
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

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if trainer.training or trainer.validating:  # a stopped attempt's figures, kept when the run continues
            self.on_train_end(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.path is not None:
            info = self.summary() | {"accelerator": type(trainer.accelerator).__name__, "world_size": trainer.world_size,
                                     "precision": str(trainer.precision)}
            try:  # an earlier attempt of this run (stopped, then continued) keeps its figures
                old = json.loads(self.path.read_text())
                earlier = old.pop("earlier_attempts", []) + [old]
            except (OSError, ValueError, AttributeError):
                earlier = []
            write_atomic(self.path, json.dumps(info | ({"earlier_attempts": earlier} if earlier else {}), indent=2))


class DataReport(L.Callback):
    """`data_report.json` in the run folder: per split, what the data source left out (bad records skipped,
    images replaced while training, excluded image ids), written at the start, at each training epoch's end and
    at the end; a log line says so when anything was skipped.

    `substituted_images` counts the images replaced over the whole run: every process (summed over the ranks at
    an epoch's end and at the end, where they meet anyway; never in a step) and every attempt of a run that was
    stopped and continued (`substituted_per_attempt`, one count per attempt; the steps a continued run repeats
    after its checkpoint count again). An attempt that ends with an error counts to the error on one process,
    to its last epoch end under DDP (a rank-local error leaves no point where all ranks meet)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "data_report.json"
        self.earlier: dict[str, list[int]] | None = None  # per split, the earlier attempts' counts (read once)

    def read_earlier(self) -> dict[str, list[int]]:
        """Per split, the replaced-image counts of the attempts before this one, from the report they left; a
        damaged report is named and kept aside (data_report.damaged-<k>.json)."""
        if not self.path.is_file():
            return {}
        try:
            old = json.loads(self.path.read_text())
            # a report from before the per-attempt counts holds one attempt's count
            return {split: [int(n) for n in r.get("substituted_per_attempt", [r.get("substituted_images", 0)])]
                    for split, r in old.items()}
        except (OSError, ValueError, TypeError, AttributeError) as e:
            aside = keep_aside(self.path)
            print(f"{self.path}: damaged ({type(e).__name__}: {e}); kept as {aside.name}", file=sys.stderr)
            return {}

    def write(self, trainer: L.Trainer, collective: bool, say: bool = False) -> None:
        """The report, with this attempt's replaced images summed over the ranks (`collective`: every rank is here,
        and takes part) or this process's own."""
        report = getattr(trainer.datamodule, "data_report", None)
        info = report() if report is not None else None
        if not info:
            return
        splits = sorted(info)
        counts = [int(info[s]["substituted_images"]) for s in splits]
        if trainer.world_size > 1:
            if not (collective and dist.is_available() and dist.is_initialized()):
                return  # one rank's count would under-report (and the ddp_spawn launcher counted nothing)
            total = torch.tensor(counts, dtype=torch.int64, device=trainer.strategy.root_device)
            dist.all_reduce(total)
            counts = [int(n) for n in total.tolist()]
        if not trainer.is_global_zero:
            return
        if self.earlier is None:  # before this attempt's first write
            self.earlier = self.read_earlier()
        for split, n in zip(splits, counts):
            per_attempt = self.earlier.get(split, []) + [n]
            info[split] |= {"substituted_images": sum(per_attempt), "substituted_per_attempt": per_attempt}
        write_atomic(self.path, json.dumps(info, indent=2))
        left_out = {s: r["skipped_records"] + r["substituted_images"] for s, r in info.items()}
        if say and any(left_out.values()):
            print(f"data: bad records skipped or images replaced per split {left_out} (skip_bad); see {self.path}")

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(trainer, collective=True, say=True)  # every rank is here (Lightning's own setup ends together)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(trainer, collective=True)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(trainer, collective=True, say=True)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.write(trainer, collective=False)


class FinishValidationOnSigterm(L.Callback):
    """A preemption signal (SIGTERM) that arrives while a fit validates lets that validation finish first; the
    stop then comes at the next point Lightning checks for it (the end of the epoch, or the next training batch).

    Lightning stops a validation at the end of the batch in flight, and its checkpoint then reads, on restart,
    as a validation that ran: the resumed run goes on without it, logs no val/loss for that epoch, and best.ckpt
    misses it. The validation split is small next to a training epoch, so finishing it costs little of the
    grace time a scheduler gives. (Lightning's flag has no public setter: `_signal_connector` is read here.)"""

    def __init__(self) -> None:
        self.pending = False

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        connector = trainer._signal_connector
        if trainer.state.fn == "fit" and connector.received_sigterm:
            self.pending, connector.received_sigterm = True, False

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.pending:
            self.pending, trainer._signal_connector.received_sigterm = False, True


class InterruptCheckpoint(L.Callback):
    """`path` (interrupted.ckpt) when an error or a preemption signal (SIGTERM) ends training, written by the
    processes that hold the trained state; removed when the run ends normally. Not written before the first
    optimizer step (an error in setup, in the sanity check, in the first batch): such a checkpoint holds only the
    initial weights, a fresh start gives the same run, and a new run's folder with nothing to continue from is to
    be set aside as <run>.failed-1 (methods.train), not listed as a run to resume.

    Not Lightning's OnExceptionCheckpoint, for two reasons: with one, Lightning reads fit(ckpt_path=None) as
    "continue from the last checkpoint in the folder" (a new run must never pick up files it finds), and under
    ddp_spawn the launching process, which holds only the untrained model it started from, saves that model
    (step 0) over the checkpoint of the ranks that trained."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if trainer.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            return  # the ddp_spawn launcher
        if trainer.global_step == 0:
            return  # no step taken: nothing to continue from
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            # an error may be this rank's alone (a bad record in its loader, its own out-of-memory) while the other
            # ranks wait in a collective of the step: trainer.save_checkpoint ends in a barrier they never reach, and
            # this rank would sit there, its error unprinted, until the process group timed out. (A preemption is
            # raised on every rank at once: Lightning shares the signal at each batch's start.) Rank 0 writes the
            # state it holds, whole on every rank under DDP, without meeting the others; the others write nothing.
            if trainer.is_global_zero and type(trainer.strategy) is DDPStrategy:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.save_checkpoint(checkpoint, self.path)
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.path.unlink(missing_ok=True)

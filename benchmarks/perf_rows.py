"""One measurement of `make perf`, in a process of its own so that each row has its own peak memory and compile
caches, and a row that fails leaves the others standing: `python -m benchmarks.perf_rows ROW.json RESULT.json`.

- `lab`: a method trained through `methods.train`'s own machinery (its LightningModule, its DataModule, the
  Trainer `make_trainer` builds) for `steps` steps, timed by `methods.callbacks.Throughput` after `warmup`
  steps. `inputs: data` reads through the DataModule's loaders (images made and transformed in workers,
  pinned memory); `inputs: resident` replays one batch made by that DataModule and kept on the device, so
  the step's own cost is measured without the data path. A `data` row then iterates its training loader alone
  (no training; the batches the workers made ahead left out) and reports the smaller of the two rates, since
  the workers' queue can hide a loader slower than the step for as many steps as it holds (`loader_alone`).
- `bare`: the ceiling: open_clip's model with its ClipLoss and fused AdamW, nothing else, on the batch vanilla
  CLIP's `resident` row replays (the same images and caption tokens, cut as the lab's loader cuts them), kept on
  the device; timed the same way (the device's clock on a GPU). The two rows do the same work, so their ratio is
  the lab's own cost.
"""
from __future__ import annotations

import json
import math
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from configs.files import write_atomic
from configs.registry import Registry
from methods.callbacks import Throughput
from methods.train import build, compose_train, make_trainer


def device_of(cfg: Any) -> torch.device:
    """The device the config's trainer runs on."""
    gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The peak of this process: GPU memory allocated by tensors on a GPU, else the host's resident set."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "memory_kind": "GPU allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "memory_kind": "host RSS"}


def summarise(step_times: list[float], batch: int, window: int) -> dict[str, Any]:
    """samples/s as open_clip's row is measured: the median over windows of `window` consecutive measured steps
    (the log interval) of each window's samples over its time, so a wait for data or a periodic stall inside a
    window counts, as it does between open_clip's log lines; `step_time_s` is the step time that rate gives, and
    `step_time_median_s` the median single step (which a loader's bursts can hide behind)."""
    if not step_times:
        raise RuntimeError("no step was measured after the warm-up; raise perf.steps")
    window = max(1, min(window, len(step_times)))
    spans = [sum(step_times[k:k + window]) for k in range(0, len(step_times) - window + 1, window)]
    rate = statistics.median(batch * window / s for s in spans)
    return {"samples_per_sec": rate, "step_time_s": batch / rate, "step_time_median_s": statistics.median(step_times),
            "measured_steps": len(spans) * window, "windows": len(spans)}


class SyncCount(L.Callback):
    """On a GPU, counts the host-device syncs of the measured steps (`torch.cuda.set_sync_debug_mode`: each
    synchronizing CUDA call warns), from the first step after the warm-up; the work at an epoch's end is not
    counted. `per_step`: syncs per measured step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.count = warmup, 0, 0
        self.sites: list[tuple[str, int]] = []  # (file:line that synchronized, times), most frequent first
        self._catcher: Any = None
        self._caught: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if module.device.type != "cuda" or trainer.global_step < self.warmup:
            return
        if self._catcher is None:
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        self.steps += 1

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            found = [w for w in self._caught if "synchronizing" in str(w.message)]
            self.count = len(found)
            self.sites = Counter(f"{w.filename}:{w.lineno}" for w in found).most_common(6)
            self._catcher.__exit__(None, None, None)
            self._catcher = None

    @property
    def per_step(self) -> float | None:
        return self.count / self.steps if self.steps else None


def resident_batch(dm: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """The first `batch_size` training items of a DataModule, collated as its loader collates them (caption tokens
    cut where the method allows it), on `device`. A training split smaller than the batch is refused: repeating its
    items would make a batch with fewer distinct captions, scenes and neighbours than a real one, which is less
    work for the methods that encode each distinct text once (MSG-CLIP) and so a step time that is too low."""
    random.seed(0)  # the fields draw negatives with `random`
    ds = dm.dataset("train")
    if len(ds) < batch_size:
        raise ValueError(f"resident batch: the training split has {len(ds)} items, fewer than the batch of "
                         f"{batch_size}; give the resident rows a larger split (perf `resident_args`, e.g. "
                         f"data.options.train_size={batch_size})")
    batch = dm.collate_fn()([ds[i] for i in range(batch_size)])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class OpCount(TorchDispatchMode):
    """Counts the operators one step dispatches below autograd (the forward, the backward and the optimizer's):
    on a GPU each is a kernel launch or more, so in an eager step that is bound by launches, as ViT-B/32's is, the
    count is the step's cost in launches. Views and other metadata-only ops launch nothing and are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# composite or metadata-only where func.is_view does not say so, allocations (the DataLoader rebuilds each batch
# tensor from shared memory with `empty` and `set_`), and the profiler's range markers
_NO_KERNEL = {"detach", "lift_fresh", "_reshape_alias", "_unsafe_view", "reshape", "flatten", "unflatten", "split",
              "chunk",
              "split_with_sizes", "unbind", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "set_", "_record_function_enter_new", "_record_function_exit"}


class StepOps(L.Callback):
    """Counts the ops of one warm-up step (`OpCount`), from its start to the next step's, in an eager run: the
    last warm-up step that does not log, so neither the timing nor the count sees the logging."""

    def __init__(self, warmup: int, log_every: int) -> None:
        self.at = warmup - 1 if warmup % log_every else warmup - 2
        self.mode: OpCount | None = None
        self.ops: Counter[str] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.ops, self.mode = self.mode.ops, None
        if trainer.global_step == self.at and self.ops is None:
            self.mode = OpCount()
            self.mode.__enter__()


class _Replay(Dataset):
    """The same batch `n` times (a DataLoader with batch_size=None hands it over as it is)."""

    def __init__(self, batch: dict[str, Any], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batch


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class ResidentBatches(L.LightningDataModule):
    """One batch built by a method's own DataModule (its fields included), moved to the device once and replayed:
    the step runs without any data path."""

    def __init__(self, datamodule: L.LightningDataModule, batch_size: int, steps: int, device: torch.device) -> None:
        super().__init__()
        self.dm, self.batch_size, self.steps, self.device = datamodule, batch_size, steps, device
        self.batch: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        self.dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.batch is None:
            self.batch = resident_batch(self.dm, self.batch_size, self.device)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Replay(self.batch, self.steps), batch_size=None, collate_fn=_as_is)


def lab_row(row: dict[str, Any]) -> dict[str, Any]:
    """A method through the lab's Trainer; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="clipcomp-perf-") as tmp:
        cfg = compose_train([*row["overrides"], f"runs_dir={tmp}"])
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        module, dm = build(cfg)
        device = device_of(cfg)
        data = ResidentBatches(dm, cfg.data.batch_size, row["steps"], device) if row["inputs"] == "resident" else dm
        throughput, syncs = Throughput(None, warmup=row["warmup"], log=False), SyncCount(row["warmup"])
        ops = StepOps(row["warmup"], cfg.trainer.log_every_n_steps) if not row.get("compile") else None
        # the CSV logger of `make train`: every log_every_n_steps it reads the logged values back, as open_clip's
        # trainer reads its loss at each log line
        trainer = make_trainer(cfg, Path(tmp), [throughput, syncs] + ([ops] if ops else []),
                               logger=CSVLogger(tmp, name="", version=""), enable_checkpointing=False,
                               enable_model_summary=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.fit(module, datamodule=data)
        out = summarise(throughput.step_times, throughput.samples, cfg.trainer.log_every_n_steps) | peak_memory(device)
        tokens = data.batch["text"].shape[-1] if isinstance(data, ResidentBatches) else None
        out |= {"clock": throughput.summary()["clock"], "syncs_per_step": syncs.per_step,
                "sync_sites": syncs.sites, "precision": str(trainer.precision), "text_tokens": tokens,
                **op_fields(ops.ops if ops else None)}
        if row["inputs"] == "data":
            out = with_loader(out, loader_alone(dm.train_dataloader(), cfg.data.batch_size,
                                                ahead=cfg.data.num_workers * cfg.data.prefetch_factor,
                                                batches=row.get("loader_batches") or out["measured_steps"],
                                                window=cfg.trainer.log_every_n_steps))
        return out


def loader_alone(loader: Any, batch: int, *, ahead: int, batches: int, window: int) -> dict[str, Any]:
    """The training loader's own rate, no training: a fresh pass over it, the first `ahead` batches (those its
    workers make ahead, num_workers * prefetch_factor, with the workers' start-up) left out, then up to `batches`
    batches timed on the host as they arrive, summarised as the steps are (median over windows of `window`).
    Once the queue of batches made ahead is drained, which a loop that takes each batch at once does at the
    start, each batch arrives when the workers finish it: the rate the data path can sustain, which a training
    run's queue hides for as many steps as it holds."""
    skip = max(1, ahead)
    available = len(loader) - skip
    if available < 1:
        raise ValueError(f"loader alone: the training split gives {len(loader)} batches, not more than the {skip} "
                         f"made ahead; give the data rows a larger split (perf `data_args`, data.options.train_size)")
    times: list[float] = []
    last = None
    iterator = iter(loader)
    try:
        for k, _ in enumerate(iterator):
            now = time.perf_counter()
            if last is not None:
                times.append(now - last)
            if k >= skip - 1:
                last = now
            if len(times) >= min(batches, available):
                break
    finally:
        del iterator  # its workers end
    out = summarise(times, batch, window)
    return {"loader_samples_per_sec": out["samples_per_sec"], "loader_batches": len(times), "loader_skipped": skip,
            "loader_windows": out["windows"]}


def with_loader(trainer: dict[str, Any], loader: dict[str, Any]) -> dict[str, Any]:
    """A `data` row's result: the trainer's rate kept as `trainer_samples_per_sec` (and its step time), the loader's
    beside it, and samples/s (with the step time it gives) the smaller of the two: a loader slower than the step
    bounds what the data path sustains however full its queue was while the steps were measured."""
    rate = min(trainer["samples_per_sec"], loader["loader_samples_per_sec"])
    batch = trainer["samples_per_sec"] * trainer["step_time_s"]
    return trainer | loader | {"trainer_samples_per_sec": trainer["samples_per_sec"],
                               "trainer_step_time_s": trainer["step_time_s"], "samples_per_sec": rate,
                               "step_time_s": batch / rate,
                               "bound_by": "loader" if loader["loader_samples_per_sec"] < trainer["samples_per_sec"]
                               else "trainer"}


def op_fields(ops: Counter[str] | None) -> dict[str, Any]:
    """`ops_per_step` (None when not counted: compiled rows) and the per-operator counts behind it."""
    return {"ops_per_step": None if ops is None else sum(ops.values()), "ops": dict(ops.most_common()) if ops else None}


def bare_row(row: dict[str, Any]) -> dict[str, Any]:
    """open_clip's model, its ClipLoss and fused AdamW on vanilla CLIP's resident batch (`row["overrides"]` are that
    row's), already on the device: the practical ceiling for the lab's step on the same inputs. The text tower runs
    on the batch's cut tokens as the lab runs it (`methods.towers.encode_text_tokens`; open_clip's own `encode_text`
    takes full-context tokens only, and on those the two are the same)."""
    import open_clip
    import torch.nn.functional as F

    from methods.backbone import create_backbone
    from methods.towers import encode_text_tokens

    def step_forward(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        text = F.normalize(encode_text_tokens(model, texts)[0], dim=-1)
        return model.encode_image(images, normalize=True), text, model.logit_scale.exp()

    cfg = compose_train(row["overrides"])
    device = device_of(cfg)
    dm = build(cfg)[1]  # the lab's DataModule for this config (the method module it also builds is dropped)
    dm.prepare_data()
    batch = resident_batch(dm, cfg.data.batch_size, device)
    del dm
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = create_backbone(cfg.model)[0].to(device)
    b, images, texts = cfg.data.batch_size, batch["image"], batch["text"]
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    forward = torch.compile(step_forward) if row["compile"] else step_forward
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks: list[Any] = []
    ops = None
    for k in range(row["steps"]):
        counting = not row["compile"] and k == row["warmup"] - 1  # the last warm-up step, as the lab rows count
        if counting:
            ops = OpCount()
            ops.__enter__()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            image, text, scale = forward(model, images, texts)
        loss = loss_fn(image.float(), text.float(), scale)  # in float32, outside autocast, as the lab's loss terms
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if counting:
            ops.__exit__(None, None, None)
        marks.append(_mark(device))
    times = _elapsed(marks[row["warmup"]:], device)
    return summarise(times, b, cfg.trainer.log_every_n_steps) | peak_memory(device) | {"clock": "device" if device.type == "cuda" else "host",
                                                        "precision": "bf16 autocast" if bf16 else "fp32",
                                                        "text_tokens": texts.shape[-1],
                                                        **op_fields(ops.ops if ops else None)}


def _mark(device: torch.device) -> Any:
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed(marks: list[Any], device: torch.device) -> list[float]:
    """Seconds between consecutive marks (CUDA events on a GPU: read once, at the end)."""
    if device.type != "cuda":
        return [b - a for a, b in zip(marks, marks[1:])]
    marks[-1].synchronize()
    return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]


ROWS: Registry[Callable[[dict[str, Any]], dict[str, Any]]] = Registry("perf row kind")
ROWS.register("lab")(lab_row)
ROWS.register("bare")(bare_row)


def main(argv: list[str] | None = None) -> int:
    row_file, result_file = sys.argv[1:] if argv is None else argv
    row = json.loads(Path(row_file).read_text())
    result = ROWS.get(row["kind"])(row)
    write_atomic(result_file, json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""open_clip's own trainer on its synthetic data, as one row of `make perf`, in a process of its own:

    python -m benchmarks.perf_openclip RESULT.json WARMUP_STEPS [ARCH.json] -- <open_clip_train.main arguments>

The trainer logs a line every `--log-every-n-steps` steps right after reading the loss with `.item()`, so the
device has finished the steps before it. A logging handler notes the time of each line and the number of
samples so far; each window between two lines gives samples/s, and the median window that starts after the
warm-up is the row's figure (the trainer syncs only at those lines, as it does by default every 100 steps).

open_clip_train's data module imports webdataset and braceexpand at the top (open_clip_torch[training]); its
synthetic data uses neither, so where they are not installed they are replaced by stand-ins that raise if
anything calls them, and the result says so.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import resource
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from configs.files import write_atomic

NEEDED = ("braceexpand", "webdataset", "webdataset.filters", "webdataset.tariterators")
PROGRESS = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")


def trainer_arguments(*, model: str, quick_gelu: bool, batch: int, steps: int, workers: int, precision: str,
                      compile: bool, device: str, log_every: int) -> list[str]:
    """open_clip_train.main's arguments for `steps` steps of synthetic data, logging every `log_every` steps,
    saving nothing (`--logs none`), evaluating nothing."""
    args = ["--dataset-type", "synthetic", "--train-num-samples", str(batch * steps), "--batch-size", str(batch),
            "--model", model, "--precision", precision, "--workers", str(workers), "--epochs", "1",
            "--log-every-n-steps", str(log_every), "--logs", "none", "--report-to", "none", "--name", "perf",
            "--warmup", "10", "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", device]
    return args + (["--force-quick-gelu"] if quick_gelu else []) + (["--torchcompile"] if compile else [])


def stand_in(name: str) -> types.ModuleType:
    """A module whose every attribute is a class that raises ImportError when used (classes, so that the
    trainer's module-level subclassing of `webdataset.PipelineStage` still works)."""
    module = types.ModuleType(name)

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ImportError(f"{name} is not installed (pip install 'open_clip_torch[training]')")

    def attribute(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {"__init__": refuse})

    module.__getattr__ = attribute  # type: ignore[method-assign]
    return module


def install_stand_ins() -> list[str]:
    """Stand-ins for the training extras that are not installed; returns their names."""
    missing = [n for n in NEEDED if "." not in n and importlib.util.find_spec(n) is None]
    for name in NEEDED:
        if name.split(".")[0] in missing:
            sys.modules[name] = stand_in(name)
    return missing


class LogTimes(logging.Handler):
    """(time, samples so far) of each progress line the trainer logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[float, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = PROGRESS.match(record.getMessage())
        if found:
            self.marks.append((time.perf_counter(), int(found.group(1))))


def windows(marks: list[tuple[float, int]], skip_samples: int) -> list[float]:
    """samples/s of each window between consecutive progress lines, for windows starting after `skip_samples`."""
    return [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in zip(marks, marks[1:]) if n0 >= skip_samples and n1 > n0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--")
    ours, theirs = argv[:split], argv[split + 1:]
    result_file, warmup = ours[0], int(ours[1])
    batch = int(theirs[theirs.index("--batch-size") + 1])
    missing = install_stand_ins()
    if len(ours) > 2:  # a custom architecture, registered with open_clip under its model name
        from methods.backbone import register_arch

        register_arch(theirs[theirs.index("--model") + 1], json.loads(Path(ours[2]).read_text()))
    times = LogTimes()
    logging.getLogger().addHandler(times)
    import open_clip
    from open_clip_train.main import main as train

    if train(theirs) == -1:
        raise RuntimeError("open_clip_train.main stopped (see its log above)")
    rates = windows(times.marks, warmup * batch)
    if not rates:
        raise RuntimeError(f"no progress line after the warm-up ({len(times.marks)} lines); raise perf.steps")
    cuda = torch.cuda.is_available() and "cuda" in theirs[theirs.index("--device") + 1]
    result = {
        "samples_per_sec": statistics.median(rates), "step_time_s": batch / statistics.median(rates),
        "measured_steps": sum(n1 - n0 for (_, n0), (_, n1) in zip(times.marks, times.marks[1:])
                              if n0 >= warmup * batch and n1 > n0) // batch,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_kind": "GPU allocated" if cuda else "host RSS", "clock": "host, synced at each log line",
        "windows": len(rates), "stand_ins": missing, "precision": theirs[theirs.index("--precision") + 1],
        # its synthetic captions are tokenized to the model's full context, as its trainer's tokenizer pads them
        "text_tokens": open_clip.get_tokenizer(theirs[theirs.index("--model") + 1]).context_length,
    }
    write_atomic(result_file, json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

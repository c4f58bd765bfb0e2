"""Evaluate runs: `python -m benchmarks.run bench=syn [runs=[runs/clip/2026...]] [ckpt=last]`.

Without `runs`, the latest run of every method under runs_dir that has the checkpoint is evaluated.
With `model=<name>` (a configs/model/ file, e.g. `model=vitb32_quickgelu model.pretrained=/path/ViT-B-32.pt`)
that bare model is evaluated as vanilla CLIP instead, with no training run (zero-shot).
Results go into a new folder under out_dir (never over an old one): results.md, results.csv, one chart
per benchmark family and per-benchmark detail CSVs; the table is printed.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import configs
from configs.files import new_folder
from configs.schema import ModelConfig, TrainConfig
from benchmarks.base import BENCHMARKS, BenchContext
from benchmarks.report import format_table, labelled_notes, write_report
from methods import METHODS
from methods.checkpoints import read_checkpoint
from methods.train import cpu_kernels, saved_config

# `model=<name>` in the bench job selects configs/model/<name>.yaml, typed like a training run's model
SCHEMAS = {"model": lambda name, node: OmegaConf.structured(ModelConfig)}


def finished_at(run: Path) -> str | None:
    """When the run finished ("YYYY-mm-dd HH:MM:SS" from done.json, which is written last); None if it has not."""
    try:
        return str(json.loads((run / "done.json").read_text())["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def method_of(run: Path) -> str:
    """The method a run trained (its config.yaml), or its parent folder's name where that cannot be read (the
    run is then named with what is wrong when it is loaded)."""
    try:
        return str(configs.load_yaml(run / "config.yaml").method.name)
    except (configs.ConfigError, OSError, AttributeError, KeyError):  # damaged or foreign: load_run says what
        return run.parent.name


def find_runs(cfg: DictConfig) -> list[Path]:
    """The runs named in cfg.runs, or of each method the run that finished last (done.json; a run still training
    or stopped is never picked for you, and a run_dir of any name competes on its finish time)."""
    if cfg.runs:
        runs = [Path(r) for r in cfg.runs]
        for r in runs:
            if not (r / "config.yaml").is_file():
                raise FileNotFoundError(f"{r}: not a run folder (no config.yaml)")
        twice = sorted({str(r) for r in runs if sum(r.resolve() == o.resolve() for o in runs) > 1})
        if twice:
            raise ValueError(f"runs=[...] names {', '.join(twice)} more than once")
        return runs
    root = Path(cfg.runs_dir)
    # runs/<method>/<time>/ as make train names them, and a run_dir of any name one or two folders down
    folders = sorted({*root.glob("*"), *root.glob("*/*")})
    candidates = [r for r in folders if (r / "checkpoints" / f"{cfg.ckpt}.ckpt").is_file()]
    by_method: dict[str, dict[Path, str | None]] = {}
    for r in candidates:
        by_method.setdefault(method_of(r), {})[r] = finished_at(r)
    found, unfinished = [], []
    for runs in by_method.values():
        done = sorted((at, r.name, r) for r, at in runs.items() if at is not None)
        unfinished += [r for r, at in runs.items() if at is None]
        if done:
            found.append(done[-1][2])
    if not found:
        more = (f" ({len(unfinished)} unfinished, e.g. {sorted(unfinished)[-1]}: continue it with make train "
                f"RESUME=..., or name it with RUNS=... to evaluate its checkpoint as it is)") if unfinished else ""
        names = sorted({c.stem for r in folders for c in (r / "checkpoints").glob("*.ckpt")})
        there = f"; the runs there have the checkpoints {', '.join(names)} (ckpt=...)" if names else ""
        raise FileNotFoundError(f"no finished run with a '{cfg.ckpt}' checkpoint under {root}/{more}{there}; "
                                f"train one first (make train)")
    return found


def load_run(run: Path, ckpt: str, device: torch.device):
    """The run's method module with the checkpoint's weights (loaded with weights_only=True: no unpickling)."""
    run_cfg = saved_config(run)  # named if damaged; keys added since the run take their defaults
    path = run / "checkpoints" / f"{ckpt}.ckpt"
    if not path.is_file():
        names = ", ".join(sorted(c.stem for c in (run / "checkpoints").glob("*.ckpt"))) or "none"
        raise FileNotFoundError(f"{run}: no checkpoint {path.name} (its checkpoints: {names}; ckpt=...)")
    plain = configs.to_plain(run_cfg)
    # the checkpoint has every weight: the starting ones are never read or fetched, but what they shaped (a
    # local-dir folder's architecture and activation, a tag's preprocessing) is built as in training
    plain["model"]["load_weights"] = False
    module = METHODS.get(run_cfg.method.name)(plain)
    module.load_state_dict(read_checkpoint(path)["state_dict"])
    return module.to(device).eval(), run_cfg


def file_labels(runs: list[Path]) -> list[str]:
    """How each run's detail CSVs are named: the folder name, or where two runs share it (every sweep cell's run
    is `<cell>/run`) the path below the folder all runs share, its parts joined by '-'."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    full = [r.resolve() for r in runs]
    common = Path(os.path.commonpath(full))
    return ["-".join(r.relative_to(common).parts) for r in full]


def new_out_dir(cfg: DictConfig) -> Path:
    return new_folder(Path(cfg.out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.bench.name}")


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_run(run: Path, cfg: DictConfig, device: torch.device, details_dir: Path | None = None,
              file_label: str | None = None) -> tuple[list[dict], dict[str, list[str]], list[str]]:
    """Every benchmark of cfg.bench on one run, once per evaluation variant of its method (one row each); the notes
    say which torch and open_clip trained it (a table mixing builds shows each)."""
    module, run_cfg = load_run(run, cfg.ckpt, device)
    rows, families, notes = bench_module(module, run_cfg, cfg, str(run), file_label or run.name, details_dir)
    if finished_at(run) is None:
        step = read_checkpoint(run / "checkpoints" / f"{cfg.ckpt}.ckpt", mmap=True).get("global_step")
        notes.append(f"{run}: not finished (no done.json); its {cfg.ckpt} checkpoint is from step {step}")
    return rows, families, notes + [n for n in trained_with(run) if n not in notes]


def trained_with(run: Path) -> list[str]:
    """'trained with torch X, open_clip Y, on D' for each distinct such triple in the run's environment.json (none
    if the run predates it or the file is unreadable: the benchmark does not depend on it). D is the GPU, or the
    CPU model with the vector instructions torch's kernels used: kernels for another CPU sum in other orders, and a
    run's figures move with that as with another torch build; runs that predate the field give no D."""
    try:
        starts = json.loads((run / "environment.json").read_text())
        on_cpu = saved_config(run).trainer.accelerator == "cpu"
        return sorted({f"trained with torch {s['torch']}, open_clip {s['open_clip']}{trained_on(s, on_cpu)}"
                       for s in starts})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def trained_on(start: dict, on_cpu: bool) -> str:
    if start.get("gpu") and not on_cpu:
        return f", on {start['gpu']}"
    kernels = kernels_label(start.get("cpu_kernels"))
    what = ", ".join([start[k] for k in ("cpu", "cpu_capability") if start.get(k)] + ([kernels] if kernels else []))
    return f", on CPU ({what})" if start.get("cpu_capability") else ""


def kernels_label(kernels: str | None) -> str | None:
    """How a report names a `cpu_kernels` value; None for the native kernels (or a start that predates the field)."""
    if kernels in (None, "native"):
        return None
    return "portable kernels" if kernels == "portable" else kernels


def bare_model(cfg: DictConfig, device: torch.device):
    """Vanilla CLIP built from cfg.model with no training run and no checkpoint (e.g. zero-shot OpenAI
    ViT-B/32 from a local file, the baseline of every ARO table), and the config it was built from."""
    run_cfg = OmegaConf.structured(TrainConfig)
    run_cfg.method = {"name": "clip"}
    run_cfg.model = cfg.model
    module = METHODS.get("clip")(configs.to_plain(run_cfg))
    return module.to(device).eval(), run_cfg


def bench_module(module, run_cfg: DictConfig, cfg: DictConfig, run_label: str, file_label: str,
                 details_dir: Path | None = None) -> tuple[list[dict], dict[str, list[str]], list[str]]:
    """Every benchmark of cfg.bench on a loaded method module, once per evaluation variant (one row each)."""
    rows, families, notes = [], {}, []
    for variant, settings in module.eval_variants().items():
        module.set_eval_variant(**settings)
        method = run_cfg.method.name + (f"/{variant}" if variant else "")
        ctx = BenchContext(module, module.preprocess_val, run_cfg, cfg.bench)
        row = {"method": method, "run": run_label, "seed": run_cfg.seed, "chance": {}}
        for name in cfg.bench.benchmarks:
            counts = getattr(module, "graph_counts", None)  # a method that reads each caption's graph at test time
            if counts is not None:
                counts[:] = [0, 0]
            result = BENCHMARKS.get(name)(ctx)
            if counts is not None and counts[1]:
                result.notes.append(
                    f"{method} on {name}: {counts[1]} of {sum(counts)} captions had no scene graph, so its knowledge "
                    f"encoder added nothing to them" + (" (every caption: this row equals the plain variant's)"
                                                        if not counts[0] else ""))
            row.update(result.metrics)
            row["chance"].update(result.chance)
            families.setdefault(result.family, [])
            families[result.family] += [m for m in result.metrics if m not in families[result.family]]
            notes += [n for n in result.notes if n not in notes]
            if result.details and details_dir is not None:
                write_details(details_dir / f"{name}-{method.replace('/', '-')}-{file_label}.csv", result.details)
        rows.append(row)
    return rows, families, notes


def merge_families(into: dict[str, list[str]], more: dict[str, list[str]]) -> None:
    for family, metrics in more.items():
        into.setdefault(family, [])
        into[family] += [m for m in metrics if m not in into[family]]


def evaluate(cfg: DictConfig) -> tuple[list[dict], dict[str, list[str]], list[str], Path]:
    """Run every benchmark of the bench config on every run (or on the bare `model`); returns rows, families,
    notes and the out folder. A call that fails leaves no empty out folder behind."""
    for name in cfg.bench.benchmarks:
        BENCHMARKS.get(name)  # unknown names fail before any model is loaded
    if cfg.model is not None and cfg.runs:
        raise ValueError("give either runs=[...] (trained runs) or model=<name> (a bare model), not both")
    runs = find_runs(cfg) if cfg.model is None else []
    out = new_out_dir(cfg)
    try:
        rows, families, notes = [], {}, []
        if cfg.model is not None:
            module, run_cfg = bare_model(cfg, device_for(cfg.device))
            label = f"{cfg.model.name} ({cfg.model.pretrained or 'random init'})"
            rows, families, notes = bench_module(module, run_cfg, cfg, label, "bare-model", out)
            for row in rows:
                row.update(method=f"{row['method']}/zero-shot", seed=None)
        per_run = []
        for run, label in zip(runs, file_labels(runs)):
            r, f, n = bench_run(run, cfg, device_for(cfg.device), out, label)
            rows += r
            merge_families(families, f)
            per_run.append((str(run), n))
        notes += labelled_notes(per_run)
        kernels = kernels_label(cpu_kernels())
        if kernels and device_for(cfg.device).type == "cpu":
            notes.append(f"evaluated on CPU with {kernels}")
    except BaseException:
        if not any(out.iterdir()):
            out.rmdir()
        raise
    return rows, families, notes, out


def write_details(path: Path, rows: list[dict]) -> None:
    with open(path, "x", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in configs.HELP for a in argv):
        print(configs.usage("bench", "python -m benchmarks.run", "bench.benchmarks=[syn_relation] bench.batch_size=64"))
        return 0
    try:
        cfg = configs.compose("bench", argv, schemas=SCHEMAS)
        configs.validate(cfg)
        rows, families, notes, out = evaluate(cfg)
    except (configs.ConfigError, LookupError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    paths = write_report(rows, out, families=families, title=f"clipcomp: {cfg.bench.name}", notes=notes)
    columns = ["method", "run", "seed"] + [m for ms in families.values() for m in ms]
    print(format_table(rows, columns))
    print(f"\nwritten: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

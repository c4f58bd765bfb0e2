"""Sweeps and side-by-side comparisons: every cell an ordinary run, benchmarked, then one table with the
mean and spread over seeds and the difference to the baseline.

    python -m benchmarks.sweep configs/sweep/compare.yaml [seeds=[0,1,2]] [key=value ...] [--print-commands]

A sweep file names `base` overrides (applied to every cell), a `grid` (key -> values; the cells are the
product, and `method: all` means every registered method) and `seeds`. Each cell trains into its own folder
<out_dir>/<name>/cells/<cell>/run/ and writes result.json when benchmarked; a sweep started again skips
the cells that finished, benchmarks a cell whose run finished, and continues the rest from their last
checkpoints (a cell job printed by --print-commands and requeued after a kill does the same). The cell folder's
name carries a hash of the cell's overrides, so changed settings never reuse old results; result.json records
the bench config it was made with, and a cell whose result came from another one is benchmarked again (its run
is not trained again; the old result is kept as result.other-bench-<k>.json). A cell whose run was made with
another config than its overrides give today (a default changed since; not where it is written or how often it
logs) is set aside whole as <cell>.other-config-<k> and trained again, so old results are never reported as the
new config's. Under torchrun or SLURM, where every rank runs the sweep from the start, run it once on one process
(or with --print-commands) after such a change, so that the ranks find the cells settled.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import configs
from configs.files import keep_aside, new_folder, write_atomic
from benchmarks.report import curves_chart, format_table, labelled_notes, latex_table, _chart
from benchmarks.run import bench_run, device_for, merge_families
from methods import METHODS
from methods.train import (NOT_THE_RUN, compose_train, config_differences, cpu_kernels, portable_cpu_env,
                           process_rank, saved_config, train)


@dataclass
class SweepSpec:
    """A sweep file's contents."""

    name: str = "sweep"
    base: list[str] = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    bench: str = "syn"
    out_dir: str = "sweeps"


def load_spec(path: str | Path, argv: list[str]) -> SweepSpec:
    """The sweep file merged into its schema, with `seeds=`, `name=`, `bench=` and extra base overrides from argv."""
    path = Path(path)
    if not path.is_file():
        names = ", ".join(p.name for p in sorted((configs.CONFIG_DIR / "sweep").glob("*.yaml")))
        raise configs.ConfigError(f"sweep file {path} not found; shipped: {names}")
    spec = configs._merge(OmegaConf.structured(SweepSpec), configs.load_yaml(path), str(path))
    extra = []
    for token in argv:
        key = token.split("=", 1)[0]
        if key in ("seeds", "name", "bench", "out_dir"):
            spec = configs._merge(spec, OmegaConf.from_dotlist([token]), "command line")
        else:
            extra.append(token)
    spec = OmegaConf.to_object(spec)
    spec.base = list(spec.base) + extra
    return spec


def cells(spec: SweepSpec) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(folder name, grid values with the seed, overrides) for every cell, seeds innermost."""
    grid = {k: (METHODS.names() if k == "method" and v == "all" else list(v)) for k, v in spec.grid.items()}
    if "method" in grid and "clip" in grid["method"]:  # the baseline first
        grid["method"] = ["clip"] + [m for m in grid["method"] if m != "clip"]
    out = []
    for values in itertools.product(*grid.values()) if grid else [()]:
        for seed in spec.seeds:
            point = dict(zip(grid, values)) | {"seed": seed}
            overrides = list(spec.base) + [f"{k}={v}" for k, v in point.items()]
            digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
            label = re.sub(r"[^A-Za-z0-9._=-]+", "_", ",".join(f"{k}={v}" for k, v in point.items())).strip("_")
            out.append((f"{label}-{digest}", point, overrides))
    return out


def cell_run_args(cell_dir: Path) -> list[str]:
    """The cell's run has a fixed folder: a cell killed mid-training continues from its last checkpoint."""
    return [f"runs_dir={cell_dir / 'runs'}", f"run_dir={cell_dir / 'run'}"]


def finished_run(cell_dir: Path) -> Path | None:
    done = sorted(cell_dir.glob("run/done.json")) or sorted(cell_dir.glob("runs/*/*/done.json"))  # (older layout)
    return done[-1].parent if done else None


def config_changes(cell_dir: Path, overrides: list[str]) -> list[str]:
    """What differs between the config the cell's run (finished or not) was made with and the one its overrides
    compose to today (a default changed since, in a method's YAML or a config group); [] without a run. A cell's
    name holds only its overrides, so a sweep run again would otherwise reuse, or continue, a run of another
    config. A run config that cannot be read counts as another config (named)."""
    run = finished_run(cell_dir) or (cell_dir / "run" if (cell_dir / "run" / "config.yaml").is_file() else None)
    if run is None:
        return []
    try:
        saved = saved_config(run)
    except (configs.ConfigError, OSError, ValueError) as e:
        return [f"its config.yaml cannot be read ({e.args[0] if e.args else e})"]
    changed = config_differences(saved, compose_train(overrides + cell_run_args(cell_dir)))
    return [c for c in changed if c.split(":", 1)[0] not in NOT_THE_RUN]


def settle(name: str, cell_dir: Path, overrides: list[str]) -> bool:
    """Set the cell aside if its run was made with another config (rank 0 alone renames); True if it was."""
    changed = config_changes(cell_dir, overrides)
    if changed and process_rank() == 0:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        aside = keep_aside(cell_dir, "other-config")  # the whole folder: <cell>.other-config-<k>
        print(f"[sweep] {name}: its run was made with another config ({shown}); kept as {aside.name}, "
              "training the cell again", file=sys.stderr)
    return bool(changed)


def read_result(cell_dir: Path) -> dict[str, Any] | None:
    """A finished cell's result.json, or None if there is none. A damaged one (cut short, not JSON) is named,
    kept aside as result.damaged-<k>.json, and the cell is benchmarked again."""
    path = cell_dir / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
            raise ValueError("no 'rows' list")
        return result
    except (ValueError, UnicodeDecodeError) as e:
        aside = keep_aside(path)
        print(f"[sweep] {path}: damaged result ({type(e).__name__}: {e}); kept as {aside.name}, "
              "benchmarking the cell again", file=sys.stderr)
        return None


def bench_key(bench_cfg: Any) -> dict[str, Any]:
    """What a cell's result depends on besides its training run: the benchmarks and the checkpoint evaluated."""
    return {"bench": OmegaConf.to_container(bench_cfg.bench, resolve=True), "ckpt": bench_cfg.ckpt}


def run_cell(cell_dir: Path, overrides: list[str], bench_cfg: Any) -> dict[str, Any] | None:
    """Train (unless a finished run is there; continuing an unfinished one) and benchmark one cell;
    result.json marks it done, with the bench config it was made with."""
    run = finished_run(cell_dir)
    if run is None:
        run = train(compose_train(overrides + cell_run_args(cell_dir)))
    if process_rank() > 0:  # a DDP cell's other ranks train with rank 0; rank 0 alone benchmarks and reports
        return None
    rows, families, notes = bench_run(run, bench_cfg, device_for(bench_cfg.device))
    result = {"overrides": overrides, "run": str(run), "rows": rows, "families": families, "notes": notes,
              "bench": bench_key(bench_cfg)}
    write_atomic(cell_dir / "result.json", json.dumps(result, indent=2))
    return result


def aggregate(results: list[tuple[dict[str, Any], dict[str, Any]]], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per grid point and evaluation variant: mean and std over seeds of every metric."""
    groups: dict[str, dict[str, Any]] = {}
    for point, result in results:
        key_point = {k: v for k, v in point.items() if k != "seed"}
        for row in result["rows"]:
            label = ", ".join(f"{k}={v}" for k, v in key_point.items() if k != "method")
            label = row["method"] + (f" ({label})" if label else "")
            g = groups.setdefault(label, {"label": label, "method": row["method"], "point": key_point, "seeds": [],
                                          "values": {}, "runs": [], "chance": {}})
            g["chance"].update(row.get("chance") or {})
            g["seeds"].append(point["seed"])
            g["runs"].append(row["run"])
            for m in metrics:  # a seed without the figure (none, or NaN: e.g. no VG-Attribution pair with 25 cases)
                if row.get(m) is not None and not math.isnan(float(row[m])):  # leaves it out; "n" counts the rest
                    g["values"].setdefault(m, []).append(float(row[m]))
    out = []
    for g in groups.values():
        row = {"label": g["label"], "method": g["method"], "point": g["point"], "n_seeds": len(g["seeds"]),
               "runs": g["runs"], "seeds": g["seeds"], "chance": g["chance"]}
        for m, vs in g["values"].items():
            row[m] = statistics.fmean(vs)
            # the sample std (n - 1); with one value the spread is unknown, not 0
            row[f"{m} std"] = statistics.stdev(vs) if len(vs) > 1 else math.nan
            row[f"{m} n"] = len(vs)
        out.append(row)
    return out


def baseline_of(g: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The row `g` is compared with: the baseline grid point's row (the first) in g's evaluation variant where
    that exists ("structureclip/plain" against the baseline point's "structureclip/plain"), else the first row."""
    base = groups[0]
    if "/" in g["method"]:
        variant = base["method"].split("/")[0] + "/" + g["method"].split("/", 1)[1]
        same = [h for h in groups if h["method"] == variant and h.get("point") == base.get("point")]
        if same:
            return same[0]
    return base


def table_rows(groups: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, str]]:
    """Display rows: mean ± std (difference to the baseline: the first row, in the row's evaluation variant); '~'
    marks a difference no larger than the two rows' spreads added (not judged where a spread is unknown: one
    seed). A metric measured in fewer seeds than the row has says how many ("n=1")."""
    rows = []
    for g in groups:
        base = baseline_of(g, groups)
        row = {"method": g["label"], "seeds": str(g["n_seeds"])}
        for m in metrics:
            if m not in g:
                row[m] = "–"
                continue
            std = g[m + " std"]
            text = f"{g[m]:.3f} ± {'n/a' if math.isnan(std) else f'{std:.3f}'}"
            if g.get(m + " n", g["n_seeds"]) != g["n_seeds"]:
                text += f" (n={g[m + ' n']})"
            if g is not base and m in base:
                diff = g[m] - base[m]
                spread = std + base[m + " std"]
                mark = "" if math.isnan(spread) else ("~" if abs(diff) <= spread else "")
                text += f" ({diff:+.3f}{mark})"
            row[m] = text
        rows.append(row)
    return rows


def report(spec: SweepSpec, results: list[tuple[dict[str, Any], dict[str, Any]]]) -> Path:
    families: dict[str, list[str]] = {}
    for _, r in results:
        merge_families(families, r["families"])
    notes = labelled_notes([(" ".join(f"{k}={v}" for k, v in point.items()), r["notes"]) for point, r in results])
    metrics = [m for ms in families.values() for m in ms]
    groups = aggregate(results, metrics)
    out = new_folder(Path(spec.out_dir) / spec.name / f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = table_rows(groups, metrics)
    columns = ["method", "seeds"] + metrics
    legend = ("mean ± sample std (n - 1) over seeds, n/a with one seed; (difference to the baseline: the first row, "
              "in the row's evaluation variant where it has one); '~': the difference is within the two rows' spreads "
              "(not judged where a spread is n/a)")
    md = format_table(rows, columns)
    (out / "results.md").write_text(f"# {spec.name}\n\n{md}\n\n- {legend}\n" + "".join(f"- {n}\n" for n in notes))
    (out / "results.tex").write_text(latex_table(rows, columns, caption=f"{spec.name}: {legend}"))
    with open(out / "results.csv", "w") as f:
        fields = ["label", "method", "n_seeds"] + [c for m in metrics for c in (m, f"{m} std")]
        f.write(",".join(fields) + "\n")
        for g in groups:
            f.write(",".join(json.dumps(g.get(c, "")) if isinstance(g.get(c), str) else str(g.get(c, ""))
                             for c in fields) + "\n")
    errors = [{m: 0.0 if math.isnan(g.get(f"{m} std", 0.0)) else g.get(f"{m} std", 0.0) for m in metrics}
              for g in groups]
    for family, ms in families.items():
        _chart(groups, ms, family, out / f"{family}.png", errors=errors)
    curves_chart({g["label"] + f" (seed {seed})": Path(run) for g in groups for seed, run in zip(g["seeds"], g["runs"])},
                 out / "training_curves.png")
    print(md + f"\n\n{legend}\nwritten: {out}/results.md, results.csv, results.tex, "
          + ", ".join(f"{f}.png" for f in families) + ", training_curves.png")
    return out


def job_prefix() -> list[str]:
    """How a printed cell job starts: the Python this sweep runs on (its packages), after the kernel settings of
    configs/portable_cpu.env where this sweep runs with them (make CPU_KERNELS=portable), so each job trains as the
    sweep itself would."""
    env = [f"{k}={v}" for k, v in portable_cpu_env().items()] if cpu_kernels() == "portable" else []
    return (["env", *env] if env else []) + [shlex.quote(sys.executable)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = [a for a in argv if a.startswith("--")]
    args = [a for a in argv if not a.startswith("--")]
    unknown = [f for f in flags if f != "--print-commands" and not re.fullmatch(r"--max-cells=\d+", f)]
    if not args or unknown:
        if unknown:
            print(f"error: unknown option {', '.join(unknown)}; the options are --print-commands and --max-cells=N",
                  file=sys.stderr)
        print("usage: python -m benchmarks.sweep SWEEP_FILE [seeds=[0,1]] [key=value ...] [--print-commands] "
              "[--max-cells=N]", file=sys.stderr)
        return 2
    try:
        spec = load_spec(args[0], args[1:])
        bench_cfg = configs.compose("bench", [f"bench={spec.bench}"])
        todo = cells(spec)
        for name, _, overrides in todo:  # every cell's config is valid before anything runs
            try:
                configs.validate(compose_train(overrides))
            except (configs.ConfigError, KeyError) as e:
                message = str(e.args[0] if e.args else e).removeprefix("command line: ")
                raise configs.ConfigError(f"{args[0]}, cell {name} (its base, grid and the command line's "
                                          f"overrides): {message}") from None
    except (configs.ConfigError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    root = Path(spec.out_dir) / spec.name / "cells"
    if "--print-commands" in flags:  # one cluster job per cell; run the sweep again afterwards to report
        for name, _, overrides in todo:
            if settle(name, root / name, overrides) or not (root / name / "result.json").is_file():
                print(" ".join([*job_prefix(), "-m methods.train",
                                *map(shlex.quote, overrides + cell_run_args(root / name))]))
        return 0
    max_cells = next((int(f.split("=", 1)[1]) for f in flags if f.startswith("--max-cells=")), None)
    results, ran = [], 0
    for name, point, overrides in todo:
        cell_dir = root / name
        changed = settle(name, cell_dir, overrides)  # under DDP rank 0 moves it; every rank trains the cell again
        done = None if changed else read_result(cell_dir)
        if done is not None and done.get("bench") != bench_key(bench_cfg):
            # benchmarked with another bench config (the cell's name holds only its training overrides): its run
            # is benchmarked again, the old result kept beside it
            aside = keep_aside(cell_dir / "result.json", "other-bench")
            print(f"[sweep] {name}: its result came from another bench config (kept as {aside.name}); "
                  "benchmarking its run again")
            done = None
        if done is not None:
            print(f"[sweep] {name}: done before, skipped")
            results.append((point, done))
            continue
        if max_cells is not None and ran >= max_cells:
            print(f"[sweep] stopping after {ran} cell(s) (--max-cells)")
            return 0
        print(f"[sweep] {name}: running")
        cell_dir.mkdir(parents=True, exist_ok=True)
        result = run_cell(cell_dir, overrides, bench_cfg)
        ran += 1
        if result is not None:
            results.append((point, result))
    if process_rank() > 0:
        return 0
    report(spec, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

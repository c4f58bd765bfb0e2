"""`make perf`: training throughput beside open_clip's own trainer, every row measured on the same machine in one run.

    python -m benchmarks.perf [perf=auto|gpu|cpu] [key=value ...]      make perf [PERF=cpu] [ARGS="methods=[clip]"]

Rows, each in a process of its own, timed after a warm-up (the median over log-interval windows of each window's rate):
- open_clip trainer: `open_clip_train.main --dataset-type synthetic`, eager and with `--torchcompile`;
- bare step: open_clip's model, its ClipLoss and fused AdamW on vanilla CLIP's `resident` batch, on the device
  (the ceiling for the same work);
- each registered method through the lab's Trainer, with its DataModule's data path (`data`: images made and
  transformed in workers) and with one batch kept on the device (`resident`: the step's own cost); and each
  named variant (`variants`: a method with settings of its own, e.g. NegCLIP without its hard images).
Rows run in order of what the goals need: per mode (eager, then compiled) the references and vanilla CLIP, then
every other method's `resident` rows (eager, then compiled), then their `data` rows. `budget_s` bounds the whole
run: a row is started only with at least `min_row_s` (eager) or `min_compiled_row_s` (compiled) of it left, else
it is listed as not run (budget), and a running row is stopped when it is spent, so perf.md is written in time.
A `data` row also times its loader alone (no training) and reports the smaller of the two rates, so that a loader
slower than the step cannot hide behind the batches its workers queued ahead.
Each row's samples/s is given as a ratio to open_clip's trainer and to the bare step in the same mode (eager or
compiled), each method's step time as a ratio to vanilla CLIP's with the same inputs and mode, with the peak
memory and the host-device syncs per step (GPU). `perf=auto` picks configs/perf/gpu.yaml where CUDA is
available, else configs/perf/cpu.yaml (a small configuration), and says which. perf.json and perf.md go into a
new folder results/perf-<time>/ with each row's log; both are rewritten before and after every row (the rows not
measured yet listed as such), and also into `mirror_dir`/perf-<time>/ when it is set, where each row's log is
written as it runs (benchmarks/perf_node.sh points it at the folder a lent machine returns, so that a call stopped
at its time limit, even by SIGKILL, returns every row measured so far). SIGTERM or SIGINT stops the row running
and writes the files with it marked as stopped. perf.md opens with the code measured: the git commit where there
is a checkout, else `commit=` from the command line.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import configs
from benchmarks.perf_openclip import trainer_arguments
from benchmarks.perf_report import goals, markdown, with_ratios
from benchmarks.perf_rows import device_of
from configs.files import new_folder, write_atomic
from methods import METHODS
from methods.train import compose_train, environment

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PerfSpec:
    """A configs/perf/<name>.yaml file: what to measure and how long."""

    name: str = "cpu"
    note: str = ""  # said at the top of perf.md (e.g. that a CPU run is a small configuration)
    model: str = "tiny"  # model group
    model_args: list[str] = field(default_factory=list)
    trainer: str = "cpu"  # trainer group (its precision is the lab's)
    data: str = "shapes"  # data group of the `data` rows
    data_args: list[str] = field(default_factory=list)  # its options (a train split of at least batch * steps)
    resident_args: list[str] = field(default_factory=list)  # options of the `resident` rows (a train split of at least batch_size)
    batch_size: int = 32
    num_workers: int = 1  # DataLoader workers of the lab's data path and of open_clip's trainer
    steps: int = 16
    # steps of the rows that read data (open_clip's trainer, the lab's `data` rows); 0: `steps`. Their measured
    # steps must outnumber the batches the workers make ahead (num_workers * data.prefetch_factor), or the rate
    # is the buffer's, not the loader's
    data_steps: int = 0
    # batches over which a `data` row also times its loader alone, after those its workers make ahead (0: as many
    # as the row's measured steps); the train split must hold both (data_args)
    loader_batches: int = 0
    warmup: int = 4  # steps left out of the median (compilation happens in them)
    log_every: int = 4  # both trainers log (and so sync) every this many steps
    compile: list[bool] = field(default_factory=lambda: [False])
    inputs: list[str] = field(default_factory=lambda: ["data", "resident"])
    methods: list[str] = field(default_factory=lambda: ["all"])
    data_methods: list[str] = field(default_factory=lambda: ["all"])  # the methods that also get a `data` row
    openclip: bool = True
    openclip_precision: str = "fp32"  # open_clip_train's --precision (amp_bf16 is bf16 autocast)
    bare: bool = True
    # name -> a method's training overrides (`method=<name>` and its settings): rows named like a method's
    variants: dict[str, list[str]] = field(default_factory=dict)
    goals: dict[str, Any] = field(default_factory=dict)  # see configs/perf/gpu.yaml
    out_dir: str = "results"
    timeout_s: int = 1800  # per row
    budget_s: int = 0  # the whole run, in seconds (0: no limit); rows left when it is spent are not run
    # with a budget, a row starts only with this much of it left (else: not run (budget)), so that no row starts
    # only to be stopped seconds later
    min_row_s: int = 45
    min_compiled_row_s: int = 90
    mirror_dir: str = ""  # also write perf.json, perf.md and the row logs under this folder, as the run goes
    commit: str = ""  # the code measured, said at the top of perf.md beside the git commit found here (if any)


VERBATIM = ("commit", "note")  # taken as written: a short hash such as 12e4567 would be read as a number


def load_spec(argv: list[str]) -> PerfSpec:
    """The perf file (perf=auto|gpu|cpu or a path) merged into PerfSpec, then key=value overrides (`commit=` and
    `note=` as written)."""
    choice = next((a.split("=", 1)[1] for a in argv if a.startswith("perf=")), "auto")
    if choice == "auto":
        choice = "gpu" if torch.cuda.is_available() else "cpu"
        print(f"perf: {'CUDA is available' if choice == 'gpu' else 'no GPU'}: configs/perf/{choice}.yaml")
    path = Path(choice) if choice.endswith(".yaml") else configs.CONFIG_DIR / "perf" / f"{choice}.yaml"
    if not path.is_file():
        raise configs.ConfigError(f"perf file {path} not found; shipped: {', '.join(configs.group_names('perf'))}")
    spec = configs._merge(OmegaConf.structured(PerfSpec), OmegaConf.load(path), str(path))
    verbatim = {k: a.split("=", 1)[1] for a in argv for k in VERBATIM if a.startswith(f"{k}=")}
    rest = [a for a in argv if not a.startswith(("perf=", *(f"{k}=" for k in VERBATIM)))]
    spec = configs._merge(spec, OmegaConf.from_dotlist(rest), "command line")
    out: PerfSpec = OmegaConf.to_object(spec)  # type: ignore[assignment]
    for key, value in verbatim.items():
        setattr(out, key, value)
    return out


def mode(compiled: bool) -> str:
    return "compiled" if compiled else "eager"


def steps_of(spec: PerfSpec, reads_data: bool) -> int:
    return spec.data_steps if reads_data and spec.data_steps > 0 else spec.steps


def lab_overrides(spec: PerfSpec, method: str, inputs: str, compiled: bool,
                  cache_dir: Path | None = None) -> list[str]:
    """The training config of one lab row: the method on the spec's model, data, trainer and batch; `cache_dir`
    (absolute) shared by every row, so that work a method caches (NegCLIP's neighbour table) is done once per run,
    not in each row's own working folder."""
    return [f"method={method}", f"model={spec.model}", *spec.model_args, f"data={spec.data}",
            *(spec.data_args if inputs == "data" else spec.resident_args), f"trainer={spec.trainer}",
            f"data.batch_size={spec.batch_size}", f"data.num_workers={spec.num_workers}",
            f"trainer.max_steps={steps_of(spec, inputs == 'data')}", "trainer.max_epochs=1000", "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false", f"trainer.log_every_n_steps={spec.log_every}",
            f"model.compile={str(compiled).lower()}", *([f"cache_dir={cache_dir}"] if cache_dir is not None else [])]


def lab_rows(spec: PerfSpec) -> list[tuple[str, str, list[str]]]:
    """(row label, method, its own overrides) of every lab row: the registered methods asked for, then the variants
    of those methods; an unknown method fails here, listing the registered ones."""
    methods = METHODS.names() if spec.methods == ["all"] else list(spec.methods)
    labs = [(name, name, []) for name in methods]
    for name, overrides in spec.variants.items():
        chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
        if len(chosen) != 1 or name in METHODS.names():
            raise configs.ConfigError(f"perf.variants.{name}: a new name with one 'method=<name>' among its overrides "
                                      f"(got {list(overrides)}); registered methods: {', '.join(METHODS.names())}")
        METHODS.get(chosen[0])
        if chosen[0] in methods:
            labs.append((name, chosen[0], [o for o in overrides if not o.startswith("method=")]))
    for name in methods:
        METHODS.get(name)
    return labs


def plan(spec: PerfSpec, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every row to measure, in the order of what the goals need: per mode, open_clip's trainer, the bare step and
    vanilla CLIP's rows; then per mode every other method's (and variant's) `resident` rows; then their `data` rows.
    `cache_dir`: the lab rows' shared cache folder (see lab_overrides)."""
    labs = lab_rows(spec)
    unknown = set(spec.inputs) - {"data", "resident"}
    if unknown:
        raise configs.ConfigError(f"perf.inputs: unknown {sorted(unknown)}; valid: data, resident")
    common = {"steps": spec.steps, "warmup": spec.warmup, "batch_size": spec.batch_size}

    def lab(label: str, method: str, own: list[str], inputs: str, compiled: bool) -> dict[str, Any]:
        m = mode(compiled)
        loader = {"loader_batches": spec.loader_batches} if inputs == "data" else {}
        return common | loader | {"steps": steps_of(spec, inputs == "data"), "kind": "lab",
                                  "name": f"{label} · {inputs} · {m}", "method": label, "inputs": inputs,
                                  "mode": m, "compile": compiled,
                                  "overrides": lab_overrides(spec, method, inputs, compiled, cache_dir) + own}

    def wanted(label: str, inputs: str) -> bool:
        return inputs in spec.inputs and (inputs == "resident" or spec.data_methods == ["all"]
                                          or label in spec.data_methods)

    rows = []
    for compiled in spec.compile:
        m = mode(compiled)
        if spec.openclip:
            rows.append(common | {"steps": steps_of(spec, True), "kind": "openclip", "name": f"open_clip trainer · {m}",
                                  "mode": m, "compile": compiled})
        if spec.bare:
            rows.append(common | {"kind": "bare", "name": f"bare step · resident · {m}", "mode": m, "compile": compiled,
                                  "overrides": lab_overrides(spec, "clip", "resident", compiled, cache_dir)})
        rows += [lab(*entry, inputs, compiled) for entry in labs if entry[0] == "clip"
                 for inputs in ("data", "resident") if wanted("clip", inputs)]
    for inputs in ("resident", "data"):
        rows += [lab(*entry, inputs, compiled) for compiled in spec.compile for entry in labs
                 if entry[0] != "clip" and wanted(entry[0], inputs)]
    return rows


def command(spec: PerfSpec, row: dict[str, Any], folder: Path) -> list[str]:
    """The child process that measures `row`, writing folder/result.json."""
    result = str(folder / "result.json")
    if row["kind"] != "openclip":
        write_atomic(folder / "row.json", json.dumps(row, indent=2))
        return [sys.executable, "-m", "benchmarks.perf_rows", str(folder / "row.json"), result]
    cfg = compose_train([f"model={spec.model}", *spec.model_args, f"trainer={spec.trainer}"])
    ours = [result, str(spec.warmup)]
    if cfg.model.arch is not None:  # a custom architecture: the child registers it with open_clip
        write_atomic(folder / "arch.json", json.dumps(OmegaConf.to_container(cfg.model.arch, resolve=True)))
        ours.append(str(folder / "arch.json"))
    theirs = trainer_arguments(model=cfg.model.name, quick_gelu=cfg.model.force_quick_gelu, batch=spec.batch_size,
                               steps=row["steps"], workers=spec.num_workers, precision=spec.openclip_precision,
                               compile=row["compile"], device=device_of(cfg).type, log_every=spec.log_every)
    return [sys.executable, "-m", "benchmarks.perf_openclip", *ours, "--", *theirs]


WATCH_PARENT = "CLIPCOMP_PERF_WATCH_PARENT"  # "1": stop when the process that started the run is gone (perf_node.sh)


class Stop:
    """Why the run must stop now, or None: SIGTERM or SIGINT received (it is the signal handler), or, when
    `watch_parent`, the process that started this one gone (perf_node.sh killed by SIGKILL, which it cannot trap:
    the run, in a process group of its own, would otherwise go on measuring for nobody)."""

    def __init__(self, watch_parent: bool = False) -> None:
        self.reason: str | None = None
        self.signal: int | None = None
        self.parent = os.getppid() if watch_parent else None

    def __call__(self, signum: int, frame: Any) -> None:
        self.reason, self.signal = signal.Signals(signum).name, signum

    def check(self) -> str | None:
        if self.reason is None and self.parent is not None and os.getppid() != self.parent:
            self.reason = "the process that started the run is gone"
        return self.reason


def measure(spec: PerfSpec, row: dict[str, Any], folder: Path, left_s: float | None = None, *, log: Path | None = None,
            stop: Stop | None = None) -> dict[str, Any]:
    """Run one row's process in `folder` (its output in `log`, folder/log.txt by default), for at most
    perf.timeout_s or the `left_s` seconds of the run's budget, or until `stop` says why not; the result, or why
    there is none."""
    folder.mkdir(parents=True, exist_ok=True)
    log = log or folder / "log.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop(WATCH_PARENT, None)
    timeout, limit = (spec.timeout_s, "perf.timeout_s") if left_s is None or left_s >= spec.timeout_s \
        else (max(1, int(left_s)), "the rest of perf.budget_s")
    start = time.perf_counter()
    with open(log, "w") as out:
        # the child's working folder is its own: open_clip's trainer writes a log folder where it runs
        child = subprocess.Popen(command(spec, row, folder), cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    code = child.wait(timeout=0.5)
                    failed = None if code == 0 else f"exit status {code}"
                    break
                except subprocess.TimeoutExpired:
                    pass
                why = stop.check() if stop is not None else None
                if why is not None:
                    failed = f"stopped after {time.perf_counter() - start:.0f} s ({why})"
                    break
                if time.perf_counter() - start >= timeout:
                    failed = f"stopped after {timeout} s ({limit})"
                    break
        finally:  # SIGKILL: a Lightning process may ignore SIGTERM ("Bypassing SIGTERM") for as long as it likes
            if child.poll() is None:
                child.kill()
                child.wait()
    wall = time.perf_counter() - start
    result = folder / "result.json"
    if failed is None and result.is_file():
        return json.loads(result.read_text()) | {"wall_s": wall}
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    return {"error": f"{failed or 'no result'}: {error.strip()[:300]}", "wall_s": wall}


def budget_refusal(spec: PerfSpec, row: dict[str, Any], left: float | None) -> str | None:
    """Why `row` is not started with `left` seconds of the budget (None: no budget, or enough of it)."""
    if left is None:
        return None
    key = "min_compiled_row_s" if row.get("compile") else "min_row_s"
    need = getattr(spec, key)
    if left <= 0:
        return f"budget: perf.budget_s ({spec.budget_s} s) spent"
    if left < need:
        return f"budget: {left:.0f} s of perf.budget_s ({spec.budget_s} s) left, under perf.{key} ({need} s)"
    return None


def save(info: dict[str, Any], folders: list[Path]) -> None:
    """perf.json and perf.md, each written whole (a rename), into every folder."""
    info["rows"] = with_ratios(info["rows"])
    info["goals"] = goals(info["rows"], info["spec"]["goals"])
    text, table = json.dumps(info, indent=2, default=str), markdown(info)
    for folder in folders:
        write_atomic(folder / "perf.json", text)
        write_atomic(folder / "perf.md", table)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = load_spec(argv)
        rows = plan(spec)
        accelerator = configs.load_group("trainer", spec.trainer).get("accelerator")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise configs.ConfigError(f"trainer={spec.trainer} (the perf file's) needs a GPU and no CUDA device is "
                                      "visible here; on a CPU: perf=cpu (make perf PERF=cpu)")
    except (configs.ConfigError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    # absolute: each row's process runs in a folder of its own
    out = new_folder(Path(spec.out_dir).resolve() / f"perf-{time.strftime('%Y%m%d-%H%M%S')}")
    mirror = new_folder(Path(spec.mirror_dir).resolve() / out.name) if spec.mirror_dir else None
    rows = plan(spec, cache_dir=out / "cache")  # one cache for every row: NegCLIP's neighbours are found once
    info: dict[str, Any] = {"spec": OmegaConf.to_container(OmegaConf.structured(spec)), "machine": environment(),
                            "rows": []}
    print(f"perf: {len(rows)} rows ({spec.name}: model={spec.model}, batch {spec.batch_size}, {spec.steps} steps, "
          f"warm-up {spec.warmup}); results in {out}" + (f", as they come also in {mirror}" if mirror else ""))
    stop = Stop(watch_parent=os.environ.get(WATCH_PARENT) == "1")
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run(spec, rows, info, out, mirror, stop)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    print(markdown(info))
    print(f"perf: {out / 'perf.json'}, {out / 'perf.md'}" + (f" (and in {mirror})" if mirror else ""))
    if stop.reason is not None:
        print(f"perf: stopped ({stop.reason})", file=sys.stderr)
        return 128 + (stop.signal or signal.SIGTERM)
    return 0


def run(spec: PerfSpec, rows: list[dict[str, Any]], info: dict[str, Any], out: Path, mirror: Path | None,
        stop: Stop) -> None:
    """Measure the rows in order into info["rows"], writing perf.json and perf.md before and after each row (the
    rows to come listed as not reached yet, the running one as running), so that a run stopped anyhow keeps what
    it measured; the row logs are written into `mirror` (when given) as they run."""
    folders = [out] + ([mirror] if mirror else [])
    start = time.perf_counter()
    waiting = {"pending": "not reached yet"}
    save(info | {"rows": [r | waiting for r in rows]}, folders)
    for k, row in enumerate(rows):
        slug = f"{k:02d}-" + "".join(c if c.isalnum() else "_" for c in row["name"])
        left = spec.budget_s - (time.perf_counter() - start) if spec.budget_s > 0 else None
        why = stop.check()
        refused = f"stopped: {why}" if why is not None else budget_refusal(spec, row, left)
        if refused is not None:
            measured = row | {"not_run": refused, "wall_s": 0.0}
        else:
            limit = spec.timeout_s if left is None else min(spec.timeout_s, int(left))
            running = row | {"pending": f"running since {time.strftime('%H:%M:%S')} (for at most {limit} s)"}
            save(info | {"rows": info["rows"] + [running] + [r | waiting for r in rows[k + 1:]]}, folders)
            measured = row | measure(spec, row, out / "rows" / slug, left,
                                     log=(mirror or out) / "rows" / slug / "log.txt", stop=stop)
        info["rows"].append(measured)
        shown = f"{measured['samples_per_sec']:.0f} samples/s" if "samples_per_sec" in measured else \
            measured.get("error") or f"not run ({measured['not_run']})"
        print(f"  {row['name']}: {shown} ({measured['wall_s']:.0f} s)", flush=True)
        save(info | {"rows": info["rows"] + [r | waiting for r in rows[k + 1:]]}, folders)
    save(info, folders)


if __name__ == "__main__":
    sys.exit(main())

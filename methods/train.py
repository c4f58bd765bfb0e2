"""Train one method: `python -m methods.train method=clip data=shapes optim.lr=1e-3 ...`;
continue a stopped run: `python -m methods.train resume=runs/clip/<time>`, or give the run a fixed folder
(`run_dir=runs/exp1`) and run the same command again after a kill: it continues where the run stopped.

Every run gets a folder of its own, runs/<method>/<timestamp>[-<run_name>] (or run_dir), holding the resolved
config, checkpoints (last and best on the validation split, step.ckpt every trainer.checkpoint_every_n_steps,
interrupted.ckpt on a signal or an error), metrics.csv, throughput.json, environment.json (the library versions,
commit and machine of each start of the run) and, once finished, done.json.
A resumed run ends with the weights and metrics of an uninterrupted one: the data order, every per-sample
draw and the model's own randomness are functions of (seed, epoch, index, step), not of the process history.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import configs
from configs.files import keep_aside, new_folder, write_atomic
from configs.schema import TrainerConfig
from datamodules import CaptionDataModule, data_schema
from methods import METHODS, method_schema
from methods.callbacks import (DataReport, ExactResume, FinishValidationOnSigterm, FolderCheckpoint,
                              InterruptCheckpoint, LossBar, RunLogger, StepCheckpoint, Throughput)
from methods.checkpoints import AtomicCheckpointIO, resume_checkpoint

SCHEMAS = {"method": method_schema, "data": data_schema}


def compose_train(argv: list[str]) -> DictConfig:
    """The resolved, typed training config (keys and types checked; values by `configs.validate`)."""
    return configs.compose("train", argv, SCHEMAS)


def process_rank() -> int:
    """This process's global rank as the launcher set it (RANK, LOCAL_RANK or SLURM_PROCID; 0 alone), known
    before the process group exists: Lightning's DDP launcher starts ranks 1.. by running the same command again."""
    return int(rank_zero_only.rank)


def new_run_dir(cfg: DictConfig) -> Path:
    """A fresh folder for this run; never an existing one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return new_folder(Path(cfg.runs_dir) / cfg.method.name / (stamp + (f"-{cfg.run_name}" if cfg.run_name else "")))


def build(cfg: DictConfig) -> tuple[L.LightningModule, CaptionDataModule]:
    """The method module and its DataModule for a config."""
    module = METHODS.get(cfg.method.name)(configs.to_plain(cfg))
    dm = CaptionDataModule(cfg.data, preprocess_train=module.preprocess_train, preprocess_val=module.preprocess_val,
                           tokenizer=module.tokenizer, extra_fields=module.fields(),
                           field_options=module.field_options(), seed=cfg.seed, trim_text=module.trims_text())
    dm.check()  # the data files are there and the source's options hold, before a method's fields do work on them
    module.prepare_fields(dm)
    return module, dm


def check_accelerator(cfg: DictConfig) -> None:
    """trainer.accelerator names a device this machine has (Lightning's `gpu` is CUDA, or Apple's MPS)."""
    wanted = cfg.trainer.accelerator
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if (wanted == "cuda" or (wanted == "gpu" and not mps)) and not torch.cuda.is_available():
        raise configs.ConfigError(f"trainer.accelerator={wanted} but no CUDA device is visible here; train on the "
                                  "CPU with the default trainer (or trainer=cpu)")


def environment() -> dict[str, Any]:
    """What a result depends on besides its config: the library versions (another torch build rounds differently,
    and the difference grows over a run), the code's commit (with `dirty` if tracked files were changed) and the
    machine."""
    import lightning
    import open_clip
    import torchvision

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += " (dirty)"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "lightning": lightning.__version__,
            "open_clip": open_clip.__version__, "python": platform.python_version(), "commit": commit, "gpu": gpu,
            "gpu_count": torch.cuda.device_count(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
            # the vector instructions torch's CPU kernels use: another set sums in another order and rounds differently
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_kernels": cpu_kernels(),
            "platform": platform.platform()}


PORTABLE_CPU_ENV = configs.CONFIG_DIR / "portable_cpu.env"


def portable_cpu_env(path: Path = PORTABLE_CPU_ENV) -> dict[str, str]:
    """The environment variables of configs/portable_cpu.env: KEY=VALUE lines with no spaces (the Makefile reads
    the same lines with grep), blank lines and `#` comment lines."""
    pairs = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", line):
                raise ValueError(f"{path}:{n}: not KEY=VALUE (capitals, no spaces): {line!r}")
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def cpu_kernels(env: Mapping[str, str] = os.environ, portable: Mapping[str, str] | None = None) -> str:
    """'portable' when every variable of configs/portable_cpu.env is set to its value (case aside), 'native' when
    none of them is set, else the ones that are set ('ATEN_CPU_CAPABILITY=avx2 ...'). A 'portable' run's weights
    should not depend on the kind of x86-64 CPU (at one thread count and one set of library versions; checked on
    two kinds, docs/findings.md)."""
    portable = portable_cpu_env() if portable is None else portable
    if all(env.get(k, "").lower() == v.lower() for k, v in portable.items()):
        return "portable"
    given = [f"{k}={env[k]}" for k in portable if k in env]
    return " ".join(given) if given else "native"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name with its vendor, family and model numbers (Linux: /proc/cpuinfo; a hypervisor may show
    only a generic name, and two CPUs of one name and vector ISA can still round differently), else what
    `platform` says, else None."""
    try:
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            ids = [fields.get("vendor_id", "")] + [f"{label} {fields[k]}" for k, label in
                                                   (("cpu family", "family"), ("model", "model")) if k in fields]
            detail = " ".join(x for x in ids if x)
            return f"{fields['model name']} ({detail})" if detail else fields["model name"]
    except OSError:
        pass
    return platform.processor() or None


@rank_zero_only
def record_environment(run_dir: Path) -> None:
    """Add this start's `environment()` to the run's environment.json (a list: a continued run may run elsewhere);
    a damaged file is named and kept aside (environment.damaged-<k>.json), and the record starts again."""
    path = run_dir / "environment.json"
    starts: list[Any] = []
    if path.is_file():
        try:
            starts = json.loads(path.read_text())
            if not isinstance(starts, list):
                raise ValueError("not a list of starts")
        except (ValueError, UnicodeDecodeError) as e:
            aside = keep_aside(path)
            print(f"{path}: damaged ({type(e).__name__}: {e}); kept as {aside.name}", file=sys.stderr)
            starts = []
    starts.append({"started": time.strftime("%Y-%m-%d %H:%M:%S")} | environment())
    write_atomic(path, json.dumps(starts, indent=2))


def mark_done(run_dir: Path, trainer: L.Trainer) -> None:
    """`done.json`, written last and atomically: a run without it did not finish."""
    write_atomic(run_dir / "done.json", json.dumps({"global_step": trainer.global_step, "epochs": trainer.current_epoch,
                                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))


# where a run is written, how its data reach the step and how often it reports, not what it computes: a run
# continued, or a sweep cell judged, with another value of these is the same run (a sweep folder moved, more workers)
NOT_THE_RUN = ("runs_dir", "run_dir", "run_name", "cache_dir", "data.num_workers", "data.pin_memory",
               "data.prefetch_factor", "data.image_cache", "data.options.cache_dir", "data.options.parser.cache_dir",
               "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps")


def config_differences(a: DictConfig, b: DictConfig) -> list[str]:
    """'key: a -> b' for every leaf that differs (run_dir aside), for a refusal that says what changed."""
    def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, sub in node.items() for k, v in leaves(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    la, lb = leaves(configs.to_plain(a)), leaves(configs.to_plain(b))
    return [f"{k}: {la.get(k)!r} -> {lb.get(k)!r}" for k in sorted(set(la) | set(lb))
            if k != "run_dir" and la.get(k) != lb.get(k)]


def open_run(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run folder for `cfg` and the checkpoint to continue from (None: start at step 0).

    Without run_dir, a new timestamped folder. With run_dir: created if it does not exist; an unfinished run
    there with the same config (NOT_THE_RUN aside) is continued from its furthest checkpoint; a finished run, a
    different config or a folder that is not a run is refused, so nothing written before is ever overwritten."""
    configs.validate(cfg)
    if cfg.run_dir is None:
        return new_run_dir(cfg), None
    run_dir = Path(cfg.run_dir)
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, None
    if not (run_dir / "config.yaml").is_file():
        raise FileExistsError(f"{run_dir}: exists and is not a run folder (no config.yaml); choose another run_dir")
    if (run_dir / "done.json").is_file():
        raise FileExistsError(f"{run_dir}: the run finished (done.json); a new run needs a new run_dir")
    changed = config_differences(saved_config(run_dir), cfg)
    if [c for c in changed if c.split(":", 1)[0] not in NOT_THE_RUN]:
        raise configs.ConfigError(f"{run_dir} holds an unfinished run with another config ({'; '.join(changed)}); "
                                  f"continue it with resume={run_dir}, or choose a new run_dir")
    if changed:
        print(f"{run_dir}: continued with {'; '.join(changed)} (where it writes, reads or reports; its config.yaml "
              "keeps the values it started with)", file=sys.stderr)
    return run_dir, resume_checkpoint(run_dir)


def saved_config(run_dir: Path) -> DictConfig:
    """A run's own config.yaml, composed over today's schema (keys added since then take their defaults). A method
    key the run's config lacks takes the method's dataclass default, which keeps the behaviour from before the key
    existed (its YAML may turn the new behaviour on for new runs), so an old run resumes and benchmarks as it was."""
    path = run_dir / "config.yaml"
    saved = configs.load_yaml(path)
    missing = [k for k in ("seed", "method", "model", "data", "trainer", "optim") if k not in saved]
    if missing or "name" not in saved.method:
        raise configs.ConfigError(f"{path}: a run's config without {', '.join(missing) or 'method.name'} (truncated?)")
    base = compose_train([f"method={saved.method.name}"])
    method_cls = METHODS.get(str(saved.method.name))
    for f in dataclasses.fields(method_cls.Config):
        if f.name not in saved.method:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            OmegaConf.update(base, f"method.{f.name}", default, merge=False)
    # the data slot typed for the run's own source (the default group's would refuse another source's options)
    OmegaConf.update(base, "data", data_schema(str(saved.data.get("source")), saved.data), merge=False)
    return configs._merge(base, saved, str(path))


def plan_resume(run_dir: str | Path) -> tuple[DictConfig, Path, Path | None]:
    """`resume=<run>`: the run's own config, its folder and its furthest checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    if (run_dir / "done.json").is_file():
        raise FileExistsError(f"{run_dir}: the run finished (done.json); start a new run instead")
    cfg = saved_config(run_dir)
    configs.validate(cfg)
    return cfg, run_dir, resume_checkpoint(run_dir)


@rank_zero_only  # one process renames it: ranks sharing the folder would race for the same file
def keep_old_metrics(run_dir: Path) -> None:
    """The CSV logger starts a new metrics.csv: a continued run keeps the old one beside it (metrics.partK.csv)."""
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        k = 1
        while (run_dir / f"metrics.part{k}.csv").exists():
            k += 1
        metrics.rename(run_dir / f"metrics.part{k}.csv")


def trainer_args(cfg: DictConfig) -> dict[str, Any]:
    """Lightning Trainer arguments from cfg.trainer (the lab's own keys left out), with the GPU defaults filled in:
    bf16 mixed precision where the GPU has bf16 (`precision: null`), cuDNN autotuning, and TF32 float32 matmuls
    (open_clip's trainer sets both)."""
    args = {k: v for k, v in cfg.trainer.items() if k not in TrainerConfig.LAB_KEYS}
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
    return [LossBar(refresh_rate=1 if on_cpu else max(1, cfg.trainer.log_every_n_steps))]


def make_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """The Trainer of a run (or of a measurement: benchmarks/perf_rows.py), with `callbacks` after the progress bar."""
    return L.Trainer(**trainer_args(cfg), default_root_dir=run_dir, callbacks=[*progress_callbacks(cfg), *callbacks],
                     **kwargs)


def run_trainer(cfg: DictConfig, run_dir: Path, throughput: Throughput) -> L.Trainer:
    """A run's Trainer: the lab's checkpoints (atomic, periodic, on signals and errors), logs and reports."""
    ckpt_dir = run_dir / "checkpoints"
    every = cfg.trainer.checkpoint_every_n_steps
    periodic = [StepCheckpoint(ckpt_dir / "step.ckpt", every)] if every > 0 else []
    return make_trainer(
        cfg, run_dir,
        [
            # best.ckpt, always that name (no best-v1.ckpt beside it); its record of the best score is kept when
            # the run folder moved between attempts (FolderCheckpoint)
            FolderCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min",
                             enable_version_counter=False, auto_insert_metric_name=False),
            # last.ckpt at every epoch end. Not `save_last=True` of the callback above: since Lightning 2.6 that
            # copies a checkpoint only when one is saved, so after the validation loss stops falling last.ckpt
            # stays the best one, and `ckpt=last` would evaluate the best epoch's weights, not the final ones
            FolderCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                             save_on_train_epoch_end=True, enable_version_counter=False, auto_insert_metric_name=False),
            *periodic,
            # an exception or a preemption signal (SIGTERM) writes interrupted.ckpt before the process ends
            InterruptCheckpoint(ckpt_dir / "interrupted.ckpt"),
            FinishValidationOnSigterm(),
            LearningRateMonitor(logging_interval="step"),
            ExactResume(cfg.seed),
            throughput,
            DataReport(run_dir),
        ],
        plugins=[AtomicCheckpointIO()],
        # logged rows reach the disk at once (and before every checkpoint, see ExactResume); a new header replaces
        # the file whole (RunLogger), so a kill never loses the rows already written
        logger=RunLogger(run_dir, name="", version="", flush_logs_every_n_steps=cfg.trainer.log_every_n_steps),
    )


def train(cfg: DictConfig, run_dir: Path | None = None, ckpt_path: Path | None = None) -> Path:
    """Fit the configured method in its run folder (see `open_run`), or continue `run_dir` from `ckpt_path`;
    returns the folder."""
    if run_dir is None:
        configs.validate(cfg)  # before anything is built or written
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_accelerator(cfg)
    module, dm = build(cfg)  # before the folder is made: a config that cannot build leaves nothing behind
    scratch = run_dir is None and cfg.run_dir is None and process_rank() > 0
    if scratch:
        # another rank of a multi-process run: rank 0 makes the run folder and writes every file of it (the
        # checkpoint callbacks take rank 0's folder); this process keeps its own scratch files aside
        run_dir, ckpt_path = Path(tempfile.mkdtemp(prefix=f"clipcomp-rank{process_rank()}-")), None
    named_here = run_dir is None and cfg.run_dir is None  # a folder this call names (not a user's run_dir)
    if run_dir is None:
        run_dir, ckpt_path = open_run(cfg)
    try:
        return fit_in(cfg, module, dm, run_dir, ckpt_path, scratch)
    except SIGTERMException:
        raise
    except Exception:
        if named_here and not scratch and not any((run_dir / "checkpoints").glob("*.ckpt")):
            # nothing to continue from: set aside, so that it is not listed as a run to resume (make bench)
            aside = keep_aside(run_dir, "failed")
            print(f"{run_dir}: failed before its first checkpoint; kept as {aside.name}", file=sys.stderr)
        raise


def fit_in(cfg: DictConfig, module: L.LightningModule, dm: CaptionDataModule, run_dir: Path, ckpt_path: Path | None,
           scratch: bool) -> Path:
    """Fit in the opened run folder (see `train`); returns it."""
    if not (run_dir / "config.yaml").is_file():
        configs.save(cfg, run_dir / "config.yaml")
    record_environment(run_dir)
    if ckpt_path is not None:
        print(f"continuing {run_dir} from {ckpt_path.name}", file=sys.stderr)
    keep_old_metrics(run_dir)
    # the CSV logger shares the run folder with config.yaml (it only ever replaces its own metrics.csv), and a
    # continued run finds its own checkpoints
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    throughput = Throughput(run_dir)
    trainer = run_trainer(cfg, run_dir, throughput)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    except SIGTERMException as e:
        e.run_dir = run_dir  # type: ignore[attr-defined]  # for the message that says how to continue
        raise
    if trainer.is_global_zero:
        mark_done(run_dir, trainer)
        s = throughput.summary()
        rate = s["samples_per_sec_median"]
        print(f"run: {run_dir}\ntraining throughput: {rate:.0f} samples/s (median over {s['measured_steps']} steps)"
              if rate else f"run: {run_dir}")
    if scratch:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in configs.HELP for a in argv):
        print(configs.usage("train", "python -m methods.train", "optim.lr=1e-3 data.batch_size=64",
                                   " | resume=RUN_DIR (continue a stopped run)"))
        return 0
    resume_from = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    try:
        if resume_from:
            if len(argv) > 1:
                raise configs.ConfigError("resume=<run> takes no other arguments: the run's own config.yaml is used")
            cfg, run_dir, ckpt = plan_resume(resume_from[0])
        else:  # the run folder is opened by `train` once the model and data are built: a bad model leaves none
            cfg, run_dir, ckpt = compose_train(argv), None, None
            configs.validate(cfg)
    except (configs.ConfigError, KeyError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    try:
        train(cfg, run_dir=run_dir, ckpt_path=ckpt)
    except (configs.ConfigError, FileExistsError) as e:  # the model's config, or a run_dir that cannot be used
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except SIGTERMException as e:  # a preemption: the checkpoint is written; say so, and exit as killed by SIGTERM
        print(f"stopped by SIGTERM; continue with: python -m methods.train resume={e.run_dir}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())

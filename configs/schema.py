"""Typed schemas of the config groups: a key that is not here, or a value of the wrong type, is rejected."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from configs.checks import (Rule, above, at_least, one_of, optional, registered, steps_or_off, within)

# Lightning 2.x precision strings (the plugin is chosen from the string; there is no registry to ask), less
# float16 mixed precision: its gradient scaler sets fused AdamW's skip flag itself, over the non-finite guard's
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", "bf16",
              "transformer-engine", "transformer-engine-float16")
SCALED = ("16-mixed", "16")


def _precision(v: str) -> str | None:
    if v in SCALED:
        return ("float16 mixed precision's gradient scaler would override the non-finite guard's skip of a bad step "
                "(fused AdamW reads one flag); use bf16-mixed (GPUs with bf16) or 32-true")
    return one_of(*PRECISIONS)(v)


def _accelerators() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return AcceleratorRegistry.available_accelerators()


def _strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return StrategyRegistry.available_strategies()


def _devices(v: Any) -> str | None:
    """Lightning's forms: a count (>= 1, or -1 for all), "auto", a list of indices, or a string of them."""
    if v == "auto" or v == -1 or (isinstance(v, int) and v >= 1):
        return None
    if isinstance(v, list) and v and all(isinstance(d, int) and d >= 0 for d in v):
        return None
    if isinstance(v, str) and all(p.strip().isdigit() for p in v.split(",") if p.strip()) and v.strip(", "):
        return None
    return "must be a count >= 1, -1 (all), 'auto', or a list of device indices"


def _batch_limit(v: float) -> str | None:
    """Lightning reads a float <= 1 as a fraction of the epoch and a whole number > 1 as a count of batches."""
    if v <= 0:
        return "must be > 0 (a fraction <= 1 of the epoch, or a whole number of batches)"
    return None if v <= 1 or float(v).is_integer() else "above 1 it is a count of batches and must be whole"


@dataclass
class ModelConfig:
    """An open_clip model: a built-in name with a pretrained tag or local file, or a custom architecture."""

    name: str = "clipcomp-tiny"  # open_clip model name (or "local-dir:/path": open_clip_config.json + weights)
    pretrained: Optional[str] = None  # a tag (network or its cached file), a weights file, "local-dir:/path", None
    arch: Any = None  # a custom open_clip architecture (embed_dim, vision_cfg, text_cfg) registered under `name`
    force_quick_gelu: bool = False
    # false: the architecture and preprocessing `pretrained` names, without reading or fetching its weights
    # (make bench rebuilds a run so, then loads the run's own checkpoint)
    load_weights: bool = True
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the two towers
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": trace only, to find a problem fast)


@dataclass
class DataConfig:
    """One DataModule over any registered source; `options` is validated by the source's own Config."""

    source: str = "shapes"
    batch_size: int = 128  # per device
    eval_batch_size: int = 256
    num_workers: int = 1
    pin_memory: Optional[bool] = None  # None: pin when a GPU is used
    persistent_workers: bool = True
    prefetch_factor: int = 4  # batches each worker prepares ahead (with num_workers > 0)
    normalize_on_device: Optional[bool] = None  # images cross as uint8, ToTensor+Normalize on the device (None: on a GPU)
    caption_sampling: str = "random"  # "random": any true caption each time; "first": the canonical one
    augment: bool = False  # use the model's training transform (random crops) instead of the eval transform
    # cut the caption-token columns after the batch's longest caption, rounded up to a multiple of this (0: keep
    # the tokenizer's full context). Only where the method's features do not change by it (a causal text tower
    # pooled at the end token: the kept tokens see what they saw before), so the text tower does less work.
    trim_text: int = 16
    # decode each image file once and keep it after the eval transform's Resize (under the source's cache_dir,
    # datamodules/decoded.py): the same tensors, without decoding every epoch. Not with augment=true.
    image_cache: bool = False
    options: Any = None

    RULES: ClassVar[dict[str, Rule]] = {"batch_size": at_least(1), "eval_batch_size": at_least(1),
                                        "num_workers": at_least(0), "caption_sampling": one_of("random", "first"),
                                        "trim_text": at_least(0)}


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments that the lab exposes."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Optional[str] = None  # None: bf16-mixed on a GPU that has bf16, else 32-true
    benchmark: Optional[bool] = None  # cuDNN autotuning (None: on with a GPU, as open_clip's trainer sets it)
    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 20
    gradient_clip_val: Optional[float] = None
    deterministic: bool = False
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0
    # The lab's own (not passed to Lightning): a checkpoint (checkpoints/step.ckpt) every this many optimizer
    # steps, so a kill loses at most that many; 0 turns it off (epoch ends and signals still write one).
    checkpoint_every_n_steps: int = 200

    LAB_KEYS: ClassVar[tuple[str, ...]] = ("checkpoint_every_n_steps",)
    RULES: ClassVar[dict[str, Rule]] = {
        "accelerator": registered("accelerator", _accelerators, ("auto", "gpu", "tpu")),
        "strategy": registered("strategy", _strategies, ("auto",)), "precision": optional(_precision),
        "devices": _devices, "num_nodes": at_least(1), "max_epochs": at_least(1), "max_steps": steps_or_off,
        "limit_train_batches": _batch_limit, "limit_val_batches": at_least(0), "check_val_every_n_epoch": at_least(1),
        "log_every_n_steps": at_least(1), "gradient_clip_val": optional(above(0)), "num_sanity_val_steps": at_least(-1),
        "checkpoint_every_n_steps": at_least(0),
    }


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine (or constant); no decay on gains, biases and the logit scale (unless decay_all)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    decay_all: bool = False  # weight decay on every parameter, as torch's AdamW(model.parameters()) (Structure-CLIP)
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    logit_scale_max: float = 100.0  # the learned temperature is clamped to [1, this] after each step
    max_bad_steps: int = 10  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run

    RULES: ClassVar[dict[str, Rule]] = {
        "lr": above(0), "weight_decay": at_least(0), "beta1": within(0, 1, hi_open=True),
        "beta2": within(0, 1, hi_open=True), "eps": above(0), "warmup_steps": at_least(0),
        "schedule": one_of("cosine", "constant"), "min_lr_ratio": within(0, 1), "logit_scale_max": at_least(1),
        "max_bad_steps": at_least(0),
    }


@dataclass
class TrainConfig:
    """Everything a training run needs; written resolved into the run folder."""

    seed: int = 0
    runs_dir: str = "runs"
    run_name: Optional[str] = None  # appended to the run folder's timestamp
    # a fixed run folder instead of runs/<method>/<time>: a new run if it does not exist, the same run continued
    # if it holds an unfinished one (with the same config), refused if that run finished
    run_dir: Optional[str] = None
    cache_dir: str = ".cache"  # work done once and reused (e.g. NegCLIP's image neighbours)
    method: Any = None  # validated by the method's own Config
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    RULES: ClassVar[dict[str, Rule]] = {"seed": within(0, 2**32, hi_open=True)}


@dataclass
class BenchSpec:
    """One benchmark group file: which benchmarks, on what split, with which seed."""

    name: str = "syn"
    benchmarks: list[str] = field(default_factory=list)
    split: str = "test"
    seed: int = 1  # for the random parts of benchmarks (word-order shuffles), as ARO seeds them
    batch_size: int = 256
    data: Any = None  # overrides of each run's data options for the benchmark's world (None: as trained)
    data_root: Optional[str] = None  # folder with the real benchmark files (layout in README "Real benchmarks")
    skip_bad: bool = False  # skip records with a missing/corrupt image or a malformed field, and report how many
    num_workers: int = 4  # DataLoader workers reading and preprocessing the real benchmarks' images (at most the CPU count)
    amp: Optional[bool] = None  # autocast while encoding the real benchmarks; None: on a GPU only
    amp_dtype: str = "float16"  # float16 as CLIP_benchmark (and ARO's OpenAI CLIP, in half precision); or bfloat16
    parser: Any = None  # options of the caption parser the Order benchmarks tag with (datamodules.parse.ParserConfig)

    RULES: ClassVar[dict[str, Rule]] = {"batch_size": at_least(1), "split": one_of("train", "val", "test"),
                                        "amp_dtype": one_of("float16", "bfloat16")}


@dataclass
class BenchConfig:
    """What `make bench` evaluates and where it writes."""

    runs: list[str] = field(default_factory=list)  # run folders; empty: the latest run of every method in runs_dir
    runs_dir: str = "runs"
    out_dir: str = "results"
    ckpt: str = "best"  # best (selected on the validation split) | last
    device: str = "auto"
    bench: BenchSpec = field(default_factory=BenchSpec)
    model: Any = None  # `model=<name>`: evaluate that bare model (vanilla CLIP, no training run) instead of runs

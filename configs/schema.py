"""Typed schemas of the config groups: a key that is not here, or a value of the wrong type, is rejected."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    """An open_clip model: a built-in name with a pretrained tag or local file, or a custom architecture."""

    name: str = "clipcomp-tiny"  # open_clip model name (or "local-dir:/path": open_clip_config.json + weights)
    pretrained: Optional[str] = None  # a tag (network or its cached file), a weights file, "local-dir:/path", None
    arch: Any = None  # a custom open_clip architecture (embed_dim, vision_cfg, text_cfg) registered under `name`
    force_quick_gelu: bool = False
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
    options: Any = None


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


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine (or constant); no decay on gains, biases and the logit scale."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    logit_scale_max: float = 100.0  # the learned temperature is clamped to [1, this] after each step
    max_bad_steps: int = 10  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run


@dataclass
class TrainConfig:
    """Everything a training run needs; written resolved into the run folder."""

    seed: int = 0
    runs_dir: str = "runs"
    run_name: Optional[str] = None  # appended to the run folder's timestamp
    cache_dir: str = ".cache"  # work done once and reused (e.g. NegCLIP's image neighbours)
    method: Any = None  # validated by the method's own Config
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


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
    num_workers: int = 4  # DataLoader workers reading and preprocessing the real benchmarks' images
    amp: Optional[bool] = None  # bfloat16 autocast while encoding; None: on a GPU only
    parser: Any = None  # options of the caption parser the Order benchmarks tag with (datamodules.parse.ParserConfig)


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

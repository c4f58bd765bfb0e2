"""What every benchmark gets (the model, its preprocessing, the run's config) and the BENCHMARKS registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from omegaconf import DictConfig

from benchmarks.scoring import Encoder
from configs.registry import Registry


@dataclass
class BenchContext:
    """The model under test and everything a benchmark may read; `cache` shares encodings between benchmarks."""

    model: Encoder
    preprocess: Callable  # the model's own evaluation transform (PIL image -> tensor)
    run_cfg: DictConfig  # the training config of the run under test
    spec: DictConfig  # the bench group config: split, seed, batch size, data overrides, data root
    cache: dict[Any, Any] = field(default_factory=dict)

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@dataclass
class BenchResult:
    """Metric columns (named `<benchmark>` or `<benchmark>/<metric>`), the chart family, optional detail rows."""

    metrics: dict[str, float]
    family: str
    details: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chance: dict[str, float] = field(default_factory=dict)  # a metric's accuracy by chance, where it has one (charts)


# name -> benchmark(ctx) -> BenchResult
BENCHMARKS: Registry[Callable[[BenchContext], BenchResult]] = Registry("benchmark")

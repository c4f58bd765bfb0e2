"""What every data source hands the DataModule: one `Sample` per image, and the registry of sources."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from configs.registry import Registry
from datamodules.graph import SceneGraph

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One image with its true captions (captions[0] is the canonical one) and, where known, its scene graph."""

    image: Image.Image
    captions: list[str]
    graph: SceneGraph | None = None
    key: str = ""  # a stable id ("shapes/test/17", a file path) for error messages and caches
    partial_captions: list[str] = field(default_factory=list)  # true captions of part of the image
    # Per-caption extras that fields read where the source has them: "caption_graphs" (list, one graph per
    # caption), "negative_captions" (caption index -> {kind: a caption false of the image}) and
    # "predicate_phrases" (predicate -> how a caption says it, e.g. "left of" -> "to the left of").
    extra: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """A split of a data set: `len(source)` samples, `source[i]` builds sample i."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


# name -> class with a nested `Config` dataclass and a constructor `(cfg, split)`.
SOURCES: Registry[Any] = Registry("data source")

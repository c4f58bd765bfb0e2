"""A stand-in model for the real benchmarks, whose choices the test sets, and a context over a fixture folder."""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import OmegaConf

from benchmarks.base import BenchContext
from configs.schema import BenchSpec


class StandIn:
    """Sees an image as the one-hot vector of its fixture file (told apart by the background colour at its
    top-left pixel), or as the constant e0 when no `image_dims` are given; a caption as the vector the test's
    `caption_vector(text)` returns. So every score is a number the test chose. Records what it was given."""

    def __init__(self, caption_vector: Callable[[str], list[float]], colours: dict[str, tuple] | None = None,
                 image_dims: dict[str, int] | None = None, dim: int = 2) -> None:
        self.caption_vector, self.image_dims, self.dim = caption_vector, image_dims, dim
        self.by_colour = {c: path for path, c in (colours or {}).items()}
        self.sizes: list[tuple[int, int]] = []
        self.pairs: list[tuple[str, object]] = []  # (caption, graph) as encoded
        self.image_batches = 0

    def preprocess(self, image) -> torch.Tensor:
        self.sizes.append(image.size)
        return torch.tensor([*image.getpixel((0, 0)), *image.size], dtype=torch.float32)

    def image_of(self, pixel: torch.Tensor) -> str:
        """The fixture image whose background colour is nearest (JPEG moves colours a little)."""
        return min(self.by_colour.items(), key=lambda kv: sum((a - b) ** 2 for a, b in zip(kv[0], pixel.tolist())))[1]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.image_batches += 1
        out = torch.zeros(len(images), self.dim)
        for i, x in enumerate(images):
            out[i, 0 if self.image_dims is None else self.image_dims[self.image_of(x[:3])]] = 1.0
        return out

    def encode_captions(self, texts: list[str], graphs: list | None = None) -> torch.Tensor:
        self.pairs += list(zip(texts, graphs or [None] * len(texts)))
        return torch.tensor([self.caption_vector(t) for t in texts], dtype=torch.float32)


def context(model: StandIn, root, **spec) -> BenchContext:
    """A bench context over the fixture folder `root`, in-process data loading, small batches."""
    root = None if root is None else str(root)
    node = OmegaConf.merge(OmegaConf.structured(BenchSpec),
                           {"data_root": root, "batch_size": 8, "num_workers": 0, **spec})
    return BenchContext(model, model.preprocess, OmegaConf.create({}), node)

"""Images that cross to the GPU as bytes: the workers stop before the model transform's ToTensor and Normalize,
and the GPU does those two steps on the whole batch.

A worker then spends its time on what only it can do (decoding, drawing, resizing, cropping), the copy to the
device is a quarter of the size (uint8 instead of float32), and the result is the same to the bit: ToTensor is
`x.float() / 255` and Normalize `(x - mean) / std`, the same float32 operations on either side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torchvision import transforms as T


@dataclass
class SplitTransform:
    """A model transform cut before its ToTensor: `host` makes a (3, H, W) uint8 tensor, `normalize` finishes a
    (B, 3, H, W) uint8 batch on any device."""

    host: Callable[[Any], Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    on_device: dict[torch.device, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def normalize(self, images: Tensor) -> Tensor:
        mean, std = self._constants(images.device)  # (3, 1, 1) each
        return images.float().div(255).sub(mean).div(std)  # (B, 3, H, W), as ToTensor then Normalize

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """mean and std on `device`, made once per device: a tensor made from numbers on a GPU is a host-to-device
        copy, which would sync every batch."""
        cache = self.on_device
        if device not in cache:
            cache[device] = tuple(torch.as_tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
                                  for v in (self.mean, self.std))
        return cache[device]


def split(transform: Callable) -> SplitTransform | None:
    """The transform cut before its ToTensor, if it is a Compose that ends with ToTensor then Normalize (open_clip's
    transforms do); None otherwise (then the workers run all of it)."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2], steps[-1]
    if not isinstance(to_tensor, T.ToTensor) or not isinstance(normalize, T.Normalize) or normalize.inplace:
        return None
    before = T.Compose(list(steps[:-2]))
    return SplitTransform(UInt8Transform(before), tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))


@dataclass
class UInt8Transform:
    """`before`, then `to_uint8`: a class rather than a closure so that ddp_spawn can pickle it."""

    before: Callable[[Any], Any]

    def __call__(self, image: Any) -> Tensor:
        return to_uint8(self.before(image))


def to_uint8(image: Any) -> Tensor:
    """(3, H, W) uint8 tensor of an RGB PIL image (ToTensor's layout, before its division)."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def finish_images(batch: dict[str, Any], normalize: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """Every (B, 3, H, W) uint8 tensor of a batch (its images: `image`, a method's `hard_image`) normalised."""
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dtype == torch.uint8 and value.ndim == 4:
            batch[key] = normalize(value)
    return batch

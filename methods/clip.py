"""Vanilla CLIP fine-tuning (Radford et al., 2021): the symmetric contrastive loss over the global batch."""
from __future__ import annotations

from methods.base import METHODS, ContrastiveMethod


@METHODS.register("clip")
class CLIP(ContrastiveMethod):
    """The baseline every other method is compared with: the base module, unchanged."""

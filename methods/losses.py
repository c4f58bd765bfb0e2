"""Loss functions over already-gathered features: pure, so each is tested against a direct computation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(image_features: Tensor, text_features: Tensor, all_image_features: Tensor,
                     all_text_features: Tensor, logit_scale: Tensor, rank: int = 0) -> Tensor:
    """Symmetric InfoNCE with local-loss semantics: this rank's rows against every rank's columns.

    Features are L2-normalised. `all_*` are the features of the global batch (every rank's, concatenated
    in rank order, gathered with gradients), so the negatives are the global batch; the positives of this
    rank's rows sit at columns rank*B .. rank*B+B-1. Averaged over ranks, this equals the loss of one
    process on the concatenated batch, and so do its gradients (see tests/test_ddp_equivalence.py).
    """
    b = image_features.shape[0]
    labels = torch.arange(b, device=image_features.device) + rank * b  # (B,)
    logits_per_image = logit_scale * image_features @ all_text_features.T  # (B, W*B)
    logits_per_text = logit_scale * text_features @ all_image_features.T  # (B, W*B)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

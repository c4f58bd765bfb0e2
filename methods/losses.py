"""Loss functions over already-gathered features: pure, so each is tested against a direct computation.

Every function takes this rank's rows and the global batch's columns (every rank's features, gathered
with gradients, in rank order), and places this rank's positives at columns rank*B .. rank*B+B-1
(local-loss semantics). Averaged over ranks, each equals its loss on the concatenated batch, and so do the
gradients (tests/test_ddp_equivalence.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def positive_columns(b: int, rank: int, device: torch.device) -> Tensor:
    return torch.arange(b, device=device) + rank * b  # (B,)


def contrastive_loss(image_features: Tensor, text_features: Tensor, all_image_features: Tensor,
                     all_text_features: Tensor, logit_scale: Tensor, rank: int = 0, *,
                     all_extra_text: Tensor | None = None, all_extra_valid: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE: this rank's rows against the global batch. Features are L2-normalised.

    `all_extra_text` (N_extra, D) are extra columns for image->text only (NegCLIP's hard negative captions);
    `all_extra_valid` (N_extra,) masks out the ones that do not exist. Text->image sees only the positives'
    images, as NegCLIP's reference does (`logits_per_text[:len(logits_per_image)]`).
    """
    labels = positive_columns(image_features.shape[0], rank, image_features.device)
    texts = all_text_features
    logits_per_image = logit_scale * image_features @ texts.T  # (B, W*B)
    if all_extra_text is not None:
        extra = logit_scale * image_features @ all_extra_text.T  # (B, N_extra)
        if all_extra_valid is not None:
            extra = extra.masked_fill(~all_extra_valid[None, :], float("-inf"))
        logits_per_image = torch.cat([logits_per_image, extra], dim=1)  # (B, W*B + N_extra)
    logits_per_text = logit_scale * text_features @ all_image_features.T  # (B, W*B)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def max_violation_hinge(image_features: Tensor, text_features: Tensor, all_image_features: Tensor,
                        all_text_features: Tensor, rank: int = 0, margin: float = 0.2, *,
                        mean_images: bool = False) -> Tensor:
    """VSE++'s max-violation triplet loss (Structure-CLIP's `WinoLoss`): for each pair, the hardest negative
    caption of the image and the hardest negative image of the caption, each a hinge at `margin`.
    `mean_images`: the caption's term uses the mean score over all images (its own included) instead of
    the hardest one, as the release does for its first 100 iterations (a warm start for the max)."""
    b = image_features.shape[0]
    cols = positive_columns(b, rank, image_features.device)
    rows = torch.arange(b, device=image_features.device)
    i2t = image_features @ all_text_features.T  # (B, W*B)
    t2i = text_features @ all_image_features.T  # (B, W*B)
    pos_i2t, pos_t2i = i2t[rows, cols], t2i[rows, cols]  # (B,), (B,)
    # the positives masked out with a value made on the device (torch.tensor(x, device=...) would copy from the
    # host and wait for the device on every step)
    hardest_text = i2t.index_put((rows, cols), i2t.new_full((), float("-inf"))).max(dim=1).values
    if mean_images:
        hardest_image = t2i.mean(dim=1)  # (B,)
    else:
        hardest_image = t2i.index_put((rows, cols), t2i.new_full((), float("-inf"))).max(dim=1).values
    return (F.relu(margin + hardest_text - pos_i2t) + F.relu(margin + hardest_image - pos_t2i)).mean()


def caption_margin_loss(image_features: Tensor, text_features: Tensor, negative_features: Tensor,
                        valid: Tensor | None = None, margin: float = 0.1) -> Tensor:
    """Each image must score its caption at least `margin` above the caption's negative (Structure-CLIP's
    `MarginLoss`); items without a negative (`valid` False) do not count. Per-item, no gather needed."""
    pos = (image_features * text_features).sum(-1)  # (B,)
    neg = (image_features * negative_features).sum(-1)  # (B,)
    hinge = F.relu(margin - (pos - neg))  # (B,)
    if valid is None:
        return hinge.mean()
    return (hinge * valid).sum() / valid.sum().clamp(min=1)

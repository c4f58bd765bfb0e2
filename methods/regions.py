"""Image-side scene-graph nodes from a ViT's patch embeddings, with no parameter: regions pooled by box
coverage, or by attention driven by a text entity where no box exists (MSG-CLIP's image graph).

Patch embeddings are the vision tower's last-layer patch tokens through CLIP's own `ln_post` and `proj`
(`towers.encode_image_tokens`), in row-major grid order. A pooled node is the weighted sum of the patch
embeddings, L2-normalised (so the weights' total does not matter).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_coverage(boxes: Tensor, grid: tuple[int, int]) -> Tensor:
    """The share of each patch that a box covers, in [0, 1]: boxes (..., 4) as (x0, y0, x1, y1) fractions
    of the model input -> (..., P), P = rows * columns in row-major order (open_clip's patch order)."""
    rows, cols = grid
    x0, y0, x1, y1 = (c.unsqueeze(-1) for c in boxes.unbind(-1))  # each (..., 1)
    left = torch.arange(cols, device=boxes.device, dtype=boxes.dtype) / cols  # (C,)
    top = torch.arange(rows, device=boxes.device, dtype=boxes.dtype) / rows  # (R,)
    across = (torch.minimum(x1, left + 1 / cols) - torch.maximum(x0, left)).clamp(min=0) * cols  # (..., C)
    down = (torch.minimum(y1, top + 1 / rows) - torch.maximum(y0, top)).clamp(min=0) * rows  # (..., R)
    return (down.unsqueeze(-1) * across.unsqueeze(-2)).flatten(-2)  # (..., R, C) -> (..., P)


def pool(weights: Tensor, patches: Tensor) -> Tensor:
    """Normalised weighted sums of patch embeddings: weights (B, N, P) >= 0, patches (B, P, D) -> (B, N, D).
    A node with no weight (a padded entity) comes out as the zero vector."""
    return F.normalize(weights @ patches, dim=-1)  # (B, N, P) @ (B, P, D) -> (B, N, D)


def text_attention(queries: Tensor, patches: Tensor, temperature: float) -> Tensor:
    """Where each text entity is in its own image: softmax over patches of cosine(query, patch) / temperature;
    queries (B, N, D) normalised, patches (B, P, D) -> (B, N, P), rows summing to 1."""
    sims = queries @ F.normalize(patches, dim=-1).transpose(1, 2)  # (B, N, D) @ (B, D, P) -> (B, N, P)
    return (sims / temperature).softmax(dim=-1)


def union(weights: Tensor, pairs: Tensor) -> Tensor:
    """The union of two entities' patch weights (the elementwise max), for a relation's evidence:
    weights (B, E, P), pairs (B, T, 2) entity slots of (subject, object) -> (B, T, P)."""
    b, t, _ = pairs.shape
    picked = weights.gather(1, pairs.reshape(b, 2 * t, 1).expand(-1, -1, weights.shape[-1]))  # (B, 2T, P)
    return picked.view(b, t, 2, -1).amax(dim=2)  # (B, T, 2, P) -> (B, T, P)


def text_pooled_scores(texts: Tensor, patches: Tensor, temperature: float) -> Tensor:
    """cosine(t_n, r_b(t_n)) for every text entity n and image b, where r_b(t_n) is image b's patches pooled
    by t_n's own attention (`text_attention`): texts (N, D) normalised, patches (B, P, D) -> (N, B).

    Computed without the (N, B, D) tensor of pooled nodes: with attention a (N, B, P),
    t . sum_p a_p e_p = sum_p a_p (t . e_p) and |sum_p a_p e_p|^2 = a^T (E E^T) a."""
    att = torch.einsum("nd,bpd->nbp", texts, F.normalize(patches, dim=-1)).div(temperature).softmax(-1)  # (N, B, P)
    along = torch.einsum("nd,bpd->nbp", texts, patches)  # (N, B, P): t_n . e_bp
    gram = patches @ patches.transpose(1, 2)  # (B, P, D) @ (B, D, P) -> (B, P, P)
    norm2 = torch.einsum("nbp,bpq,nbq->nb", att, gram, att)  # (N, B)
    return (att * along).sum(-1) / norm2.clamp(min=1e-24).sqrt()  # (N, B)


def region_max_scores(texts: Tensor, regions: Tensor, valid: Tensor) -> Tensor:
    """Each text's best region in each image, max_k cosine(t_n, r_bk) over image b's valid regions: texts (N, D)
    and regions (B, K, D) normalised, valid (B, K) -> (N, B). An image with no valid region scores -1 (the lowest
    cosine; the caller scores such images another way)."""
    sims = torch.einsum("nd,bkd->nbk", texts, regions)  # (N, B, K)
    return sims.masked_fill(~valid[None], -1.0).amax(-1)

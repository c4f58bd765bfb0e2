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


def directions(same: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(image->text, text->image) true-match masks, each (B, W*B), from one mask for both or a pair."""
    return same if isinstance(same, tuple) else (same, same)


def true_of(claims: Tensor, held: Tensor) -> Tensor:
    """(R, C) True where caption r is true of image c: every fact it claims (claims (R, Kc), keys of
    `datamodules.facts.claimed`) is one the image holds (held (C, Ki), of `facts.held`); -1 pads both. A caption
    that claims nothing known (all -1) is true of no image. Fact keys are below 2**40 (`fields.FACT_KEY_BITS`)."""
    c = held.shape[0]
    if c >= 1 << 20:
        raise ValueError(f"true_of: {c} images; at most {(1 << 20) - 1} (an image's index takes 20 bits)")
    cols = torch.arange(c, device=held.device)
    # (fact, image) packed into one int64, so one sorted membership test answers every (caption, image) pair
    have = torch.where(held >= 0, (held << 20) | cols[:, None], -1)  # (C, Ki); a pad matches no ask (asks >= 0)
    ask = (claims.clamp(min=0)[:, :, None] << 20) | cols[None, None, :]  # (R, Kc, C)
    found = torch.isin(ask, have.flatten()) | (claims < 0)[:, :, None]
    return found.all(dim=1) & (claims >= 0).any(dim=1)[:, None]


def contrastive_loss(image_features: Tensor, text_features: Tensor, all_image_features: Tensor,
                     all_text_features: Tensor, logit_scale: Tensor, rank: int = 0, *,
                     all_extra_text: Tensor | None = None, all_extra_valid: Tensor | None = None,
                     same: Tensor | tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Symmetric InfoNCE: this rank's rows against the global batch. Features are L2-normalised.

    `all_extra_text` (N_extra, D) are extra columns for image->text only (NegCLIP's hard negative captions);
    `all_extra_valid` (N_extra,) masks out the ones that do not exist. Text->image sees only the positives'
    images, as NegCLIP's reference does (`logits_per_text[:len(logits_per_image)]`).
    `same` (B, W*B): pairs that are true matches besides the positive (two images drawn with one caption), left
    out of both directions' softmaxes; or a pair of them, (image i: caption j true of it, caption i: true of
    image j), where the two differ (`true_of`).
    """
    labels = positive_columns(image_features.shape[0], rank, image_features.device)
    texts = all_text_features
    logits_per_image = logit_scale * image_features @ texts.T  # (B, W*B)
    logits_per_text = logit_scale * text_features @ all_image_features.T  # (B, W*B)
    if same is not None:
        i2t, t2i = directions(same)
        own = labels[:, None] == torch.arange(i2t.shape[1], device=i2t.device)  # (B, W*B)
        logits_per_image = logits_per_image.masked_fill(i2t & ~own, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(t2i & ~own, float("-inf"))
    if all_extra_text is not None:
        extra = logit_scale * image_features @ all_extra_text.T  # (B, N_extra)
        if all_extra_valid is not None:
            extra = extra.masked_fill(~all_extra_valid[None, :], float("-inf"))
        logits_per_image = torch.cat([logits_per_image, extra], dim=1)  # (B, W*B + N_extra)
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
                        valid: Tensor | None = None, margin: float = 0.1, denominator: Tensor | None = None) -> Tensor:
    """Each image must score its caption at least `margin` above the caption's negative (Structure-CLIP's
    `MarginLoss`); items without a negative (`valid` False) do not count. Per item, so no features are gathered;
    the mean is over the valid items of the global batch: `denominator` = (valid items over every rank) / (world
    size), as MSG-CLIP's terms below (default: this rank's valid count, right on one process)."""
    pos = (image_features * text_features).sum(-1)  # (B,)
    neg = (image_features * negative_features).sum(-1)  # (B,)
    hinge = F.relu(margin - (pos - neg))  # (B,)
    if valid is None:
        return hinge.mean()
    return (hinge * valid).sum() / (valid.sum().clamp(min=1) if denominator is None else denominator)


# -- MSG-CLIP: entity- and triple-level alignment -------------------------------------------------------
# Rows are this rank's entities (or triples), columns the global batch's; a row's positive is its own column
# (rank * N + i). Rows and columns are padded to a fixed count per sample, so each has a validity flag, and
# the sums are divided by `denominator` = (valid rows in the global batch) / (world size): the mean over
# ranks is then the mean over every valid row of the global batch, however they are spread over ranks.

def masked_infonce_sum(logits: Tensor, target: Tensor, exclude: Tensor, weight: Tensor) -> Tensor:
    """Sum over rows of weight * CE(logits, target), with the `exclude`d columns (other true matches, padding)
    out of the softmax; a row's target column is never excluded."""
    # (R, C), each row's target column (F.one_hot would read the targets' min and max back to check them on a CPU)
    keep_target = target[:, None] == torch.arange(logits.shape[1], device=logits.device)
    logits = logits.masked_fill(exclude & ~keep_target, float("-inf"))  # (R, C)
    return (F.cross_entropy(logits, target, reduction="none") * weight).sum()


def entity_alignment_loss(regions: Tensor, texts: Tensor, all_regions: Tensor, all_texts: Tensor, key: Tensor,
                          all_key: Tensor, valid: Tensor, all_valid: Tensor, scale: float, rank: int,
                          denominator: Tensor) -> Tensor:
    """EMA where image entities are regions (box-pooled): symmetric InfoNCE between each text entity and its
    image entity over every entity of the global batch (the other object of the same image included). An
    entity with the same phrase (`key`) elsewhere is a true match, so it is neither positive nor negative.
    regions, texts (E, D) normalised; all_* (W*E, ...); valid (E,) float; key (E,) int."""
    target = positive_columns(regions.shape[0], rank, regions.device)
    exclude = (key[:, None] == all_key[None, :]) | (all_valid[None, :] < 0.5)  # (E, W*E)
    i2t = scale * regions @ all_texts.T  # (E, W*E)
    t2i = scale * texts @ all_regions.T  # (E, W*E)
    return (masked_infonce_sum(i2t, target, exclude, valid) + masked_infonce_sum(t2i, target, exclude, valid)) \
        / (2 * denominator)


def pooled_entity_alignment_loss(t2i: Tensor, i2t: Tensor, owner: Tensor, all_owner: Tensor, key: Tensor,
                                 all_key: Tensor, all_image_keys: Tensor, valid: Tensor, all_valid: Tensor,
                                 scale: float, rank: int, denominator: Tensor) -> Tensor:
    """EMA where no box exists: the image entity of text entity e in image j is j's patches pooled by e's own
    attention, scored s(e, j) = cosine(t_e, r_j(e)) (`regions.text_pooled_scores`).

    Text->image: each entity against every image of the global batch, its own image the positive; an image
    holding an entity with the same phrase is left out. Image->text: each entity's image against every
    entity of the global batch; every entity whose phrase the image holds is left out (its other entities, the
    same phrase elsewhere, and another image's entity with the phrase of one of this image's: a true match).
    t2i (E, W*B): s(e, j) for this rank's entities; i2t (E, W*E): s(e', owner(e)) for every entity e';
    owner (E,) and all_owner (W*E,) global image index of each entity; all_image_keys (W*B, K) the phrase
    keys of each image's entities (-1 padding)."""
    held = (all_image_keys[None, :, :] == key[:, None, None]).any(-1)  # (E, W*B): image j holds e's phrase
    t2i_loss = masked_infonce_sum(scale * t2i, owner, held, valid)
    target = positive_columns(i2t.shape[0], rank, i2t.device)
    image_keys = all_image_keys.index_select(0, owner)  # (E, K) the phrases of each row's image
    exclude = (all_key[None, :, None] == image_keys[:, None, :]).any(-1) | (all_valid[None, :] < 0.5)  # (E, W*E)
    exclude |= all_owner[None, :] == owner[:, None]  # the image's own entities (padding slots included)
    i2t_loss = masked_infonce_sum(scale * i2t, target, exclude, valid)  # (E, W*E)
    return (t2i_loss + i2t_loss) / (2 * denominator)


def triple_alignment_loss(evidence: Tensor, all_triples: Tensor, hard: Tensor, hard_valid: Tensor, key: Tensor,
                          all_key: Tensor, valid: Tensor, all_valid: Tensor, scale: float, rank: int,
                          denominator: Tensor, batch_negatives: bool = True) -> Tensor:
    """TRA: each triple's visual evidence (the union of its two entities' regions) must pick the triple's text
    over its own hard negatives (the swapped triple, the attribute-swapped one) and, with `batch_negatives`,
    over the other triples of the global batch (a same-text triple is left out).
    evidence (T, D) normalised; all_triples (W*T, D); hard (T, H, D) with hard_valid (T, H)."""
    target = positive_columns(evidence.shape[0], rank, evidence.device)
    in_batch = scale * evidence @ all_triples.T  # (T, W*T)
    own = scale * torch.einsum("td,thd->th", evidence, hard)  # (T, H)
    exclude = (key[:, None] == all_key[None, :]) | (all_valid[None, :] < 0.5)  # (T, W*T)
    if not batch_negatives:
        exclude = torch.ones_like(exclude)
    logits = torch.cat([in_batch, own], dim=1)  # (T, W*T + H)
    return masked_infonce_sum(logits, target, torch.cat([exclude, hard_valid < 0.5], dim=1), valid) / denominator


# -- SmartCLIP: contrast between masked image embeddings and captions --------------------------------------

def masked_logits(images: Tensor, masks: Tensor, texts: Tensor, scale: float | Tensor) -> Tensor:
    """scale * cosine(image_i * mask_j, text_j) for every row i and column j, without the (R, C, D) tensor:
    images (R, D) unnormalised, masks (C, D), texts (C, D) normalised -> (R, C).
    (x * m) . t = x . (m * t) and |x * m|^2 = x^2 . m^2. An all-zero mask scores 0 and passes no gradient: divided
    by the clamped norm, its straight-through gradient would be ~1e12 times a normal one, finite, so no guard would
    stop it reaching AdamW's second moments (the release divides 0 by 0 there, and its fp16 scaler skips the step)."""
    dot = images @ (masks * texts).T  # (R, D) @ (D, C) -> (R, C)
    norm2 = images.square() @ masks.square().T  # (R, D) @ (D, C) -> (R, C)
    # (scale * dot) / norm, the order of the figures made before the mask was checked (float rounding differs)
    return torch.where(norm2 > 1e-24, scale * dot / norm2.clamp(min=1e-24).sqrt(), dot.new_zeros(()))


def smart_alignment_losses(images: Tensor, masks: Tensor, texts: Tensor, all_images: Tensor, all_masks: Tensor,
                           all_texts: Tensor, scale: float | Tensor, rank: int = 0,
                           same: Tensor | tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """SmartCLIP's two masked contrastive terms, as released: `sidm` (same image, each candidate caption with
    its own mask: image i against every caption j of the global batch) and `dism` (same mask, different
    images: caption i with its mask against every image). images (B, D) unnormalised; masks (B, D);
    texts (B, D) normalised; all_* their global batch (W*B, D). `same` (B, W*B): columns whose caption is row
    i's own (another image drawn with the same caption), left out of both softmaxes (not in the release); or a
    pair (captions true of image i, for sidm; images caption i is true of, for dism)."""
    target = positive_columns(images.shape[0], rank, images.device)
    sidm = masked_logits(images, all_masks, all_texts, scale)  # (B, W*B)
    dism = masked_logits(all_images, masks, texts, scale).T  # (W*B, B) -> (B, W*B)
    if same is None:
        return F.cross_entropy(sidm, target), F.cross_entropy(dism, target)
    i2t, t2i = directions(same)
    b = images.shape[0]
    ones = sidm.new_ones(b)
    return masked_infonce_sum(sidm, target, i2t, ones) / b, masked_infonce_sum(dism, target, t2i, ones) / b

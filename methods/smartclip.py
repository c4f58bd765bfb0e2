"""SmartCLIP (Xie et al., CVPR 2025): a caption aligns with the part of the image embedding it describes.

A mask network reads the caption's text-token states (detached) and outputs a hard 0/1 mask over the
image-embedding dimensions (straight-through estimator); the masked image embedding is aligned with the
caption's embedding, so a short caption claims a few dimensions and a long one many. Loss as released
(upstream 729c5a6): two masked contrastive terms at a fixed scale of 100, `sidm` (an image against every
caption, each with its own mask) and `dism` (a caption's mask over every image), weighted 10, plus an L1
sparsity penalty on the masks weighted 2; no plain CLIP term and no learned temperature (the logit scale is
frozen). The mask network trains at its own learning rate (1e-3, no weight decay, no warmup) through the
base module's `own_param_groups`. Captions of several granularities come from the `granular_text` field
(partial captions and sentence prefixes). Inference uses the plain CLIP towers; the mask network is unused.

Departures, stated: a caption drawn for two images of the global batch is a negative of neither
(`exclude_duplicates`, on in configs/method/smartclip.yaml; the release's long captions rarely repeat, the lab's
partial captions do). `exclude_entailed` (off unless set) goes further where the data has scene graphs: a caption
true of another image of the batch ("a red circle" of every image with a red circle) is not that image's negative
(datamodules/facts.py). The hard mask is on where the mask network's logit is >= 0 (the release thresholds the
sigmoid at 0.5, which bf16 rounds to 0.5 for logits just below 0). The release's mask width is the text width,
equal to the embedding width in its models; where they differ a linear map to the embedding width is added (not for
the default model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from methods.base import METHODS, ContrastiveMethod, dist_info
from methods.losses import smart_alignment_losses, true_of
from methods.towers import encode_text_tokens


class MaskNetwork(nn.Module):
    """Text-token states (B, L, W) -> mask logits (B, D): bidirectional transformer blocks, then attention
    pooling (a linear score per position, softmax over every position, padding included), as released."""

    def __init__(self, width: int, heads: int, out_dim: int, *, layers: int = 1, act_layer: type = nn.GELU,
                 norm_layer: type = nn.LayerNorm) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, act_layer=act_layer, norm_layer=norm_layer)
                                      for _ in range(layers)])
        for block in self.blocks:  # the release's (CLIP's) initialisation
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        # no bias: a constant added to every position's score leaves the softmax unchanged, so its gradient is
        # zero up to rounding and it would never train
        self.score = nn.Linear(width, 1, bias=False)
        nn.init.normal_(self.score.weight, std=width ** -0.5)
        self.proj = nn.Linear(width, out_dim) if out_dim != width else None

    def forward(self, states: Tensor) -> Tensor:
        x = self.blocks(states)  # (B, L, W)
        pooled = (self.score(x).softmax(dim=1) * x).sum(dim=1)  # (B, L, 1) * (B, L, W) -> (B, W)
        return self.proj(pooled) if self.proj is not None else pooled  # (B, D)


@METHODS.register("smartclip")
class SmartCLIP(ContrastiveMethod):
    """CLIP whose captions align with text-chosen subsets of the image-embedding dimensions."""

    trim_safe = False  # the mask network pools over every position, padding included, as released

    @dataclass
    class Config:
        name: str = "smartclip"
        align_weight: float = 10.0  # lambda_align, on each of sidm and dism
        sparsity_weight: float = 2.0  # lambda_sparse; 0: off
        scale: float = 100.0  # the fixed logit scale of both terms; 0: CLIP's learned scale instead
        soft_mask: bool = False  # the release's scripts use the hard (straight-through) mask
        mask_layers: int = 1
        mask_lr: float = 1.0e-3
        mask_weight_decay: float = 0.0
        mask_warmup_steps: int = 0
        granularity: bool = True  # captions of random granularity (granular_text); false: the data's captions
        masked: bool = True  # false: no mask network, plain InfoNCE on the same captions (the mask's ablation)
        # a caption drawn for two images of the global batch is a negative of neither: left out of every softmax
        # (with `masked` false too). Not in the release, whose long captions rarely repeat; the shapes world's
        # partial captions do (about 40% of a batch of 128 has a twin). False (the default of a run made before the
        # key existed): as released; configs/method/smartclip.yaml turns it on
        exclude_duplicates: bool = False
        # a caption the scene graph of another image of the global batch makes true ("a red circle", drawn for one
        # image, of every other image with a red circle) is a negative of neither: out of that image's softmax over
        # captions (sidm) and of the caption's over images (dism). Needs graphs of images and captions (the shapes
        # world, Visual Genome); datamodules/facts.py says what counts as true. Not in the release
        exclude_entailed: bool = False

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.mask_net = None
        if self.mcfg.masked:
            text = self.model.transformer
            block = text.resblocks[0]
            self.mask_net = MaskNetwork(text.width, block.attn.num_heads, self.model.text_projection.shape[1],
                                        layers=self.mcfg.mask_layers, act_layer=type(block.mlp.gelu),
                                        norm_layer=type(block.ln_1))
        self.compile_modules(self.mask_net)
        # with a fixed scale the learned one is unused, and a parameter no term reaches stalls DDP
        self.model.logit_scale.requires_grad_(self.mcfg.scale <= 0 or not self.mcfg.masked)

    def fields(self) -> tuple[str, ...]:
        entailed = ("image_facts",) if self.mcfg.exclude_entailed else ()
        if self.mcfg.granularity:
            return ("granular_text", *entailed)  # its captions come with their caption_key and caption_facts
        duplicates = ("caption_key",) if self.mcfg.exclude_duplicates else ()
        return (*duplicates, *(("caption_facts", *entailed) if entailed else ()))

    def own_param_groups(self) -> dict[str, dict[str, Any]]:
        if self.mask_net is None:
            return {}
        return {"mask_net": {"params": list(self.mask_net.parameters()), "lr": self.mcfg.mask_lr,
                             "weight_decay": self.mcfg.mask_weight_decay, "warmup_steps": self.mcfg.mask_warmup_steps}}

    def masks(self, states: Tensor) -> Tensor:
        """(B, D) masks from text-token states (detached: the mask network does not train the text tower)."""
        logits = self.mask_net(states.detach())  # (B, D)
        soft = torch.sigmoid(logits)
        # straight-through: the forward value is exactly 0/1 (soft - soft.detach() is exactly 0), the gradient soft's.
        # On: logit >= 0, i.e. sigmoid >= 0.5 in exact arithmetic (a bf16 sigmoid of a logit just below 0 rounds to 0.5)
        return soft if self.mcfg.soft_mask else (logits >= 0).to(soft.dtype) + (soft - soft.detach())

    def encode(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.mask_net is None:
            return self.encode_pairs(batch)
        image = self._encode_image(batch["image"])  # (B, D) unnormalised: the mask applies before normalising
        text, states = encode_text_tokens(self.model, batch["text"])  # every position, as the release's mask net sees
        return {"image_raw": image, "text_features": F.normalize(text, dim=-1), "mask": self.masks(states)}

    def same_captions(self, batch: dict[str, Any]) -> Tensor | tuple[Tensor, Tensor] | None:
        """The true matches left out of the negatives, or None when both exclusions are off.
        `exclude_duplicates`: (B, W*B), True where column j's caption is row i's (its own column included).
        `exclude_entailed`: a pair (B, W*B) each: captions j true of image i, and images j caption i is true of
        (the twins among them)."""
        twins = None
        if self.mcfg.exclude_duplicates:
            key = self._field(batch, "caption_key", "exclude_duplicates")
            twins = key[:, None] == self.gather(key)[None, :]
        if not self.mcfg.exclude_entailed:
            return twins
        claims = self._field(batch, "caption_facts", "exclude_entailed")
        held = self._field(batch, "image_facts", "exclude_entailed")
        i2t, t2i = true_of(self.gather(claims), held).T, true_of(claims, self.gather(held))  # (B, W*B) each
        return (i2t, t2i) if twins is None else (i2t | twins, t2i | twins)

    @staticmethod
    def _field(batch: dict[str, Any], name: str, option: str) -> Tensor:
        if name not in batch:  # the fields ask for it; a batch made some other way must bring it too
            raise KeyError(f"method.{option}: the batch has no {name} (fields: {', '.join(batch)}); "
                           f"build it with the method's fields, or set method.{option}=false")
        return batch[name]

    def loss_terms(self, batch: dict[str, Any], feats: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.mask_net is None:
            return super().loss_terms(batch, feats)  # InfoNCE with the learned scale (twins left out: same_captions)
        rank, _ = dist_info()
        same = self.same_captions(batch)
        img, mask, txt = feats["image_raw"], feats["mask"], feats["text_features"]
        scale = self.mcfg.scale if self.mcfg.scale > 0 else self.model.logit_scale.exp()
        sidm, dism = smart_alignment_losses(img, mask, txt, self.gather(img), self.gather(mask), self.gather(txt),
                                            scale, rank, same=same)
        terms = {"sidm_loss": self.mcfg.align_weight * sidm, "dism_loss": self.mcfg.align_weight * dism,
                 **mask_dims(mask)}
        if self.mcfg.sparsity_weight > 0:
            terms["sparsity_loss"] = self.mcfg.sparsity_weight * mask.abs().mean()
        return terms


def mask_dims(mask: Tensor) -> dict[str, Tensor]:
    """Logged, not losses: the dimensions a caption's mask keeps, mean and least over the batch (the release logs
    both; a mask that keeps none scores its caption 0 and passes no gradient, `losses.masked_logits`)."""
    kept = (mask.detach() >= 0.5).float().sum(dim=1)  # (B,)
    return {"mask_dims": kept.mean(), "mask_dims_min": kept.min()}

"""MSG-CLIP (Lyu, Zhao et al., Pattern Recognition 173, 2026): scene-graph alignment between caption and image, with
no new parameter. Only the abstract is public; this is the reconstruction of methods.md section 4, and every
choice the abstract leaves open is a config key (configs/method/msgclip.yaml says which is which).

- Text graph: the drawn caption's graph (exact on the shapes world and Visual Genome, parsed on COCO), as
  texts from the `graph_texts` field: entities ("a red circle") and triples ("a red circle to the left of a
  blue square"), encoded with the captions in one text-tower call, each distinct text once.
- Image graph: the vision tower's patch tokens through CLIP's own `ln_post` and `proj` (one pass with the
  pooled feature). `pooling` says how an entity finds its region:
  - `regions` (default; methods.md's EMA, "no grounding labels"): the image's regions carry no label (the boxes
    of all its objects, as a segmenter's masks would be, `fields.image_regions`); an entity's score in image j is
    its best region there (max of cosines), and its region in its own image is that arg-max. An image with no
    regions (a source without boxes, or random crops) falls back to `text`.
  - `boxes`: each entity's own box (ground-truth grounding: a signal the other methods do not get; the lab's
    default before 2026-12-06, then called `auto`), text-driven attention where an entity has no box.
  - `text`: the patches pooled by the entity text's own attention (softmax of cosine / `pool_temperature`).
- EMA: a multiple-instance contrast of each text entity over the images of the global batch, both ways (with
  `boxes`, each text entity against every boxed image entity instead). TRA: the union of the two entities'
  regions must pick the triple over its swapped and attribute-swapped versions and the batch's other triples.
  Both at a fixed temperature; same-phrase entities and triples elsewhere in the batch are never negatives.
- The global contrastive loss stays; `entity_weight` / `triple_weight` 0 switch a term off (0 and 0 is the
  baseline, vanilla CLIP on the same data). Inference uses the plain towers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.fields import GRAPH_TEXT_ROWS
from methods.base import METHODS, ContrastiveMethod, dist_info
from methods.losses import entity_alignment_loss, pooled_entity_alignment_loss, triple_alignment_loss
from methods.regions import patch_coverage, pool, region_max_scores, text_attention, text_pooled_scores, union
from methods.towers import check_patch_tokens, encode_image_tokens, encode_text_tokens

HARD_NEGATIVES = ("swapped", "corrupted")  # the columns of the `triple_hard` field, in order
POOLINGS = ("regions", "boxes", "text")
LEGACY_POOLINGS = {"auto": "boxes"}  # what runs made before 2026-12-06 call the entity's own box


@METHODS.register("msgclip")
class MSGCLIP(ContrastiveMethod):
    """CLIP plus entity-level (EMA) and triple-level (TRA) alignment of caption and image scene graphs."""

    @dataclass
    class Config:
        name: str = "msgclip"
        entity_weight: float = 0.5  # lambda_E of EMA; 0: off
        triple_weight: float = 0.5  # lambda_T of TRA; 0: off
        temperature: float = 0.07  # of EMA and TRA (fixed)
        pooling: str = "regions"  # regions: unlabelled regions, best match; boxes: each entity's own box; text: none
        max_regions: int = 8  # regions an image offers (methods.md: K <= 8), the largest
        pool_temperature: float = 0.07  # of the text-driven attention over patches
        triple_attributes: bool = True  # triples name their entities with attributes
        hard_negatives: list[str] = field(default_factory=lambda: list(HARD_NEGATIVES))
        batch_negatives: bool = True  # the batch's other triples are TRA negatives too
        max_entities: int = 4
        max_triples: int = 4

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.pooling = LEGACY_POOLINGS.get(self.mcfg.pooling, self.mcfg.pooling)
        if self.pooling not in POOLINGS:
            raise ValueError(f"msgclip: unknown pooling '{self.mcfg.pooling}'; available: {', '.join(POOLINGS)}")
        unknown = set(self.mcfg.hard_negatives) - set(HARD_NEGATIVES)
        if unknown:
            raise ValueError(f"msgclip: unknown hard negatives {sorted(unknown)}; available: {', '.join(HARD_NEGATIVES)}")
        check_patch_tokens(self.model.visual)
        self.grid = tuple(self.model.visual.grid_size)
        # which columns of `triple_hard` count, on the module's device (a buffer moves with it; made per step
        # from Python values it would be a host-to-device copy every step)
        self.register_buffer("hard_allowed", torch.tensor([k in self.mcfg.hard_negatives for k in HARD_NEGATIVES]),
                             persistent=False)

    def fields(self) -> tuple[str, ...]:
        return ("graph_texts",) if self.mcfg.entity_weight > 0 or self.mcfg.triple_weight > 0 else ()

    def field_options(self) -> dict[str, Any]:
        # random crops move objects off their boxes: then every region is found by the entity's text
        boxes = not self.cfg.data.augment
        return {"max_entities": self.mcfg.max_entities, "max_triples": self.mcfg.max_triples,
                "triple_attributes": self.mcfg.triple_attributes, "use_boxes": boxes and self.pooling == "boxes",
                "regions": boxes and self.pooling == "regions", "max_regions": self.mcfg.max_regions}

    def encode(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Captions, entities, triples and their hard negatives in one text call; images with their patches."""
        if not self.fields():
            return super().encode(batch)
        b, e, t = batch["text"].shape[0], batch["entity_text"].shape[1], batch["triple_text"].shape[1]
        # each distinct text once: the table of captions, entities, triples and hard triples made with the batch
        # (datamodules.fields.graph_text_table), so nothing here waits for the device
        unique = encode_text_tokens(self.model, batch["graph_unique"])[0]  # (U, D)
        # index_select, not indexing: the backward of `x[inverse]` adds the repeated rows with atomics in parallel on a
        # CPU, in an order that changes from run to run; index_add sums them in index order
        feats = F.normalize(unique, dim=-1).index_select(0, batch["graph_inverse"])  # (B + BE + BT + 2BT, D)
        text, ent, tri, hard = feats.split([batch[k][..., 0].numel() for k in GRAPH_TEXT_ROWS])  # the table's order
        pooled, patches = encode_image_tokens(self.model.visual, batch["image"])  # (B, D), (B, P, D)
        return {"image_features": F.normalize(pooled, dim=-1), "text_features": text, "patches": patches,
                "entity_features": ent.view(b, e, -1), "triple_features": tri, "hard_features": hard.view(b * t, 2, -1),
                "logit_scale": self.model.logit_scale.exp()}

    def loss_terms(self, batch: dict[str, Any], feats: dict[str, Tensor]) -> dict[str, Tensor]:
        terms = super().loss_terms(batch, feats)  # the global contrastive loss stays
        if not self.fields():
            return terms
        patches, ent = feats["patches"], feats["entity_features"]  # (B, P, D), (B, E, D)
        attention = text_attention(ent, patches, self.mcfg.pool_temperature)  # (B, E, P)
        if "region_box" in batch:  # pooling: regions
            region_weights = patch_coverage(batch["region_box"].to(patches.dtype), self.grid)  # (B, K, P)
            regions = pool(region_weights, patches)  # (B, K, D)
            # each entity's region in its own image: its best match among the image's regions
            own = torch.einsum("bed,bkd->bek", ent, regions).masked_fill(~batch["region_valid"][:, None, :], -1.0)
            best = own.argmax(-1)  # (B, E)
            picked = region_weights.gather(1, best[..., None].expand(-1, -1, region_weights.shape[-1]))  # (B, E, P)
            weights = torch.where(batch["region_valid"].any(-1)[:, None, None], picked, attention)  # (B, E, P)
            if self.mcfg.entity_weight > 0:
                terms["entity_loss"] = self.mcfg.entity_weight * self.region_entity_loss(batch, feats, regions)
        else:
            boxed = batch["entity_has_box"] & batch["entity_valid"]  # (B, E)
            weights = torch.where(boxed[..., None], patch_coverage(batch["entity_box"], self.grid), attention)
            if self.mcfg.entity_weight > 0:
                terms["entity_loss"] = self.mcfg.entity_weight * self.entity_loss(batch, feats, pool(weights, patches),
                                                                                  boxed)
        if self.mcfg.triple_weight > 0:
            evidence = pool(union(weights, batch["triple_args"]), patches).flatten(0, 1)  # (BT, D)
            terms["triple_loss"] = self.mcfg.triple_weight * self.triple_loss(batch, feats, evidence)
        return terms

    def entity_loss(self, batch: dict[str, Any], feats: dict[str, Tensor], regions: Tensor, boxed: Tensor) -> Tensor:
        """EMA over the global batch: box regions where the entity has a box, text-driven pooling elsewhere."""
        rank, world = dist_info()
        b, e = boxed.shape
        scale = 1.0 / self.mcfg.temperature
        ent, key = feats["entity_features"].flatten(0, 1), batch["entity_key"].flatten()  # (BE, D), (BE,)
        valid, boxed = batch["entity_valid"].flatten().float(), boxed.flatten().float()  # (BE,)
        all_ent, all_key, all_valid, all_boxed = (self.gather(x) for x in (ent, key, valid, boxed))
        denominator = all_valid.sum().clamp(min=1) / world
        loss = entity_alignment_loss(regions.flatten(0, 1), ent, self.gather(regions.flatten(0, 1)), all_ent, key,
                                     all_key, boxed, all_boxed, scale, rank, denominator)
        # whether some entity has no box: told by the batch on one process; under DDP every rank takes the branch
        # (the ranks must agree, and asking the others would wait for the device), where a boxed entity weighs 0
        if batch["entity_unboxed"] or world > 1:
            owner = torch.arange(b * e, device=ent.device) // e  # (BE,) this rank's image of each entity
            t2i, i2t = self.text_pooled(ent, all_ent, feats["patches"], owner)
            all_owner = torch.arange(len(all_ent), device=ent.device) // e  # (W*BE,)
            loss = loss + pooled_entity_alignment_loss(
                t2i, i2t, owner + rank * b, all_owner, key, all_key, all_key.view(-1, e), valid - boxed,
                all_valid - all_boxed, scale, rank, denominator)
        return loss

    def region_entity_loss(self, batch: dict[str, Any], feats: dict[str, Tensor], regions: Tensor) -> Tensor:
        """EMA with unlabelled regions (methods.md): s(e, j) = max over image j's regions of cosine(t_e, r), a
        multiple-instance contrast over the images of the global batch both ways; an image with no region scores
        by text-driven pooling instead."""
        rank, world = dist_info()
        ent = feats["entity_features"]
        b, e = ent.shape[:2]
        ent, key, valid = ent.flatten(0, 1), batch["entity_key"].flatten(), batch["entity_valid"].flatten().float()
        all_ent, all_key, all_valid = (self.gather(x) for x in (ent, key, valid))
        region_valid = batch["region_valid"]  # (B, K)
        all_regions, all_region_valid = self.gather(regions), self.gather(region_valid.float()) > 0.5  # (W*B, K, ...)
        owner = torch.arange(b * e, device=ent.device) // e  # (BE,) this rank's image of each entity
        t2i = region_max_scores(ent, all_regions, all_region_valid)  # (BE, W*B)
        i2t = region_max_scores(all_ent, regions, region_valid).index_select(1, owner).T  # (BE, W*BE)
        # whether some image has no region: told by the batch on one process; under DDP every rank takes the branch
        if batch["image_regionless"] or world > 1:
            pooled_t2i, pooled_i2t = self.text_pooled(ent, all_ent, feats["patches"], owner)
            t2i = torch.where(all_region_valid.any(-1)[None, :], t2i, pooled_t2i)
            i2t = torch.where(region_valid.any(-1).index_select(0, owner)[:, None], i2t, pooled_i2t)
        all_owner = torch.arange(len(all_ent), device=ent.device) // e  # (W*BE,)
        denominator = all_valid.sum().clamp(min=1) / world
        return pooled_entity_alignment_loss(t2i, i2t, owner + rank * b, all_owner, key, all_key, all_key.view(-1, e),
                                            valid, all_valid, 1.0 / self.mcfg.temperature, rank, denominator)

    def text_pooled(self, ent: Tensor, all_ent: Tensor, patches: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """Text-driven pooling's scores (`regions.text_pooled_scores`): t2i (BE, W*B) this rank's entities on every
        image of the global batch; i2t (BE, W*BE) every entity of the global batch on each entity's own image."""
        t2i = text_pooled_scores(ent, self.gather(patches), self.mcfg.pool_temperature)
        return t2i, text_pooled_scores(all_ent, patches, self.mcfg.pool_temperature).index_select(1, owner).T

    def triple_loss(self, batch: dict[str, Any], feats: dict[str, Tensor], evidence: Tensor) -> Tensor:
        """TRA over the global batch, with each triple's own hard negatives."""
        rank, world = dist_info()
        tri, key, valid = feats["triple_features"], batch["triple_key"].flatten(), batch["triple_valid"].flatten().float()
        hard_valid = (batch["triple_hard_valid"].flatten(0, 1) & self.hard_allowed).float()  # (BT, 2)
        all_valid = self.gather(valid)
        return triple_alignment_loss(evidence, self.gather(tri), feats["hard_features"], hard_valid, key,
                                     self.gather(key), valid, all_valid, 1.0 / self.mcfg.temperature, rank,
                                     all_valid.sum().clamp(min=1) / world, self.mcfg.batch_negatives)

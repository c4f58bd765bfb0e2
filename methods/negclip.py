"""NegCLIP (Yuksekgonul et al., ICLR 2023): hard negative captions and hard negative images.

Each item brings a hard negative caption (a swap of its relation's arguments, of its attributes or of its
nouns; on the shapes world made from the exact scene graph) and a neighbour image (a nearest neighbour in the
starting model's image-embedding space) with its own caption and hard caption. NegCLIP's negatives are swaps
(its paper; its released file): ARO's word-order shuffles are the COCO/Flickr-Order test itself and not among
them. `negative_kinds` may add "shuffle" (one of those shuffles) as an ablation, which trains on the Order
benchmarks' own perturbation.
A batch of B gives 2B images against 4B texts: image->text over every text, text->image over the 2B
positive captions only, as the reference does; every rank's texts join the gather.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from configs.files import atomic_open
from methods.base import METHODS, ContrastiveMethod, dist_info
from methods.losses import contrastive_loss

# generated from a scene graph or tags, and "released": the negatives a data file ships (NegCLIP's TSV);
# "shuffle" (ARO's order perturbations, the Order benchmarks' own negatives) only where a config asks for it
NEGATIVE_KINDS = ("relation", "attribute", "noun", "shuffle", "released")
DEFAULT_KINDS = ("relation", "attribute", "noun", "released")
SPEED_ONLY = ("compile", "compile_backend", "grad_checkpointing")  # model settings that change no feature
log = logging.getLogger(__name__)


class _ModelInputs(Dataset):
    """A split's images through the model transform, for computing their features."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(self.dataset.source[i].image)  # (3, H, W)


def file_stats(value: Any) -> list[list[Any]]:
    """[path, size, mtime] of every existing file a config value names (weights, annotation files, exclude_ids
    lists), for a cache key that changes when one of them is rewritten under the same name."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in file_stats(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in file_stats(v)]
    if isinstance(value, str) and len(value) < 4096 and os.path.isfile(value):
        st = os.stat(value)
        return [[os.path.realpath(value), st.st_size, st.st_mtime_ns]]
    return []


@METHODS.register("negclip")
class NegCLIP(ContrastiveMethod):
    """CLIP with NegCLIP's hard negatives joining the image->text logits."""

    @dataclass
    class Config:
        name: str = "negclip"
        negative_kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
        hard_images: bool = True  # a neighbour image per item (off: hard captions only)
        neighbours: int = 3  # the reference's file holds 3 neighbour rows per item

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        unknown = set(self.mcfg.negative_kinds) - set(NEGATIVE_KINDS)
        if unknown:
            raise ValueError(f"negclip: unknown negative kinds {sorted(unknown)}; available: {', '.join(NEGATIVE_KINDS)}")

    def fields(self) -> tuple[str, ...]:
        return ("neg_text", "hard_image") if self.mcfg.hard_images else ("neg_text",)

    def field_options(self) -> dict[str, Any]:
        return {"negative_kinds": list(self.mcfg.negative_kinds)}

    def prepare_fields(self, datamodule: Any) -> None:
        if self.mcfg.hard_images:
            train = datamodule.dataset("train")
            released = getattr(train.source, "neighbours", None)  # a data file's own hard images win
            datamodule.field_options["neighbours"] = released if released is not None else self.neighbour_table(train)

    @torch.no_grad()
    def neighbour_table(self, dataset: Any) -> Tensor:
        """(N, k) nearest neighbours of each training image by the starting model's image features (of its
        evaluation view, whatever the training augmentation), computed once per (data, model, seed) and cached; the
        key holds the files the weights come from, as they are now, the split's size and what its samples are made
        of as the source says (`identity()`: a file source's prepared records, whose cache key holds the annotation
        files and options, with its image folders' states). A cache file that cannot be read, or holds no table of
        this split's shape, is computed again, with a warning."""
        model = {k: v for k, v in self.cfg.model.items() if k not in SPEED_ONLY}  # same weights, same neighbours
        options = self.cfg.data.get("options")
        identity = getattr(dataset.source, "identity", None)
        key = json.dumps([self.cfg.data.source, options, model, self.cfg.seed, self.mcfg.neighbours, len(dataset),
                          file_stats([options, model]), identity() if callable(identity) else None],
                         sort_keys=True, default=str)
        path = Path(self.cfg.cache_dir) / f"neighbours-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            table = self._cached_table(path, len(dataset))
            if table is not None:
                return table
        was_training, home = self.training, self.device
        # on this process's GPU where there is one (this runs before the Trainer moves the model), the images
        # made by the run's DataLoader workers
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else home
        self.eval().to(device)
        feats = []
        inputs = _ModelInputs(dataset, self.preprocess_val)  # not data.augment's random crops
        for images in DataLoader(inputs, batch_size=256, num_workers=self.cfg.data.num_workers):
            feats.append(self.model.encode_image(images.to(device), normalize=True).float().cpu())  # (<=256, D)
        self.train(was_training).to(home)
        feats = torch.cat(feats)  # (N, D)
        table = []
        for start in range(0, len(feats), 1024):
            sims = feats[start:start + 1024] @ feats.T  # (chunk, N)
            sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = float("-inf")  # not itself
            table.append(sims.topk(self.mcfg.neighbours, dim=1).indices)
        table = torch.cat(table)  # (N, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:  # a temporary name per writer: DDP ranks compute the same table at once
            torch.save(table, f)
        return table

    def _cached_table(self, path: Path, n: int) -> Tensor | None:
        """The table in a cache file if it is an (n, k) integer table of rows of this split, else None, with a
        warning that names the file (torn, foreign or damaged: it is computed again and replaced)."""
        try:
            table = torch.load(path, weights_only=True)
        except Exception as e:  # pickle, zip and torch raise many types for a damaged file
            log.warning("%s: damaged neighbour-table cache (%s: %s); computing it again", path, e.__class__.__name__,
                        str(e)[:200])
            return None
        k = self.mcfg.neighbours
        if (isinstance(table, Tensor) and table.shape == (n, k) and not table.is_floating_point()
                and not table.is_complex() and table.dtype != torch.bool
                and (n == 0 or k == 0 or (int(table.min()) >= 0 and int(table.max()) < n))):
            return table
        what = f"a {tuple(table.shape)} {table.dtype} tensor" if isinstance(table, Tensor) else type(table).__name__
        log.warning("%s: neighbour-table cache holds %s, not a (%d, %d) table of row indices below %d; computing it "
                    "again", path, what, n, k, n)
        return None

    def encode(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Every image (items and neighbours) in one pass, every text (positives and negatives) in another."""
        hard = self.mcfg.hard_images
        images = torch.cat([batch["image"], batch["hard_image"]]) if hard else batch["image"]  # (2B or B, 3, H, W)
        pos = [batch["text"], batch["hard_text"]] if hard else [batch["text"]]
        neg = [batch["neg_text"], batch["hard_neg_text"]] if hard else [batch["neg_text"]]
        texts = self.encode_text_tokens(torch.cat(pos + neg))  # (4B or 2B, D)
        n = images.shape[0]
        valid = torch.cat([batch["has_neg"], batch["hard_has_neg"]]) if hard else batch["has_neg"]
        return {
            "image_features": self.encode_image_tensor(images),
            "text_features": texts[:n],
            "neg_text_features": texts[n:],
            "neg_valid": valid.bool(),
            "logit_scale": self.model.logit_scale.exp(),
        }

    def loss_terms(self, batch: dict[str, Any], feats: dict[str, Tensor]) -> dict[str, Tensor]:
        rank, _ = dist_info()
        img, txt = feats["image_features"], feats["text_features"]
        loss = contrastive_loss(img, txt, self.gather(img), self.gather(txt), feats["logit_scale"], rank,
                                all_extra_text=self.gather(feats["neg_text_features"]),
                                all_extra_valid=self.gather(feats["neg_valid"].float()) > 0.5)
        return {"contrastive_loss": loss}

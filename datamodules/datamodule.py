"""The one LightningDataModule: any registered source, the model's own preprocessing and tokenizer.

A batch always holds `image` (B,3,H,W), `text` (B,L) token ids, `caption` (list of str), `graph`
(list of SceneGraph or None) and `index` (B,). A method asks for more through its `extra_fields`:
each name is looked up in `FIELDS`, whose builders make one value per sample.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from configs.registry import Registry
from datamodules.source import SOURCES, Sample, Source


class CachedTokenizer:
    """Tokenizes each distinct caption once; returns (N, L) token ids."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self.cache[t] for t in texts])  # (N, L)


@dataclass
class FieldContext:
    """What a field builder may use besides the sample."""

    tokenize: CachedTokenizer
    rng: random.Random
    split: str


# name -> builder(sample, caption_index, ctx) -> value (a tensor is stacked in the batch, anything else listed)
FieldBuilder = Callable[[Sample, int, FieldContext], Any]
FIELDS: Registry[FieldBuilder] = Registry("batch field")
MAX_BOXES = 8


@FIELDS.register("boxes")
def boxes_field(sample: Sample, caption_index: int, ctx: FieldContext) -> torch.Tensor:
    """Object boxes (x, y, w, h) as fractions of the image size, padded with -1 to (MAX_BOXES, 4)."""
    out = torch.full((MAX_BOXES, 4), -1.0)
    if sample.graph is not None:
        w, h = sample.image.size
        for k, e in enumerate(sample.graph.objects[:MAX_BOXES]):
            if e.box is not None:
                out[k] = torch.tensor([e.box[0] / w, e.box[1] / h, e.box[2] / w, e.box[3] / h])
    return out


@FIELDS.register("partial_text")
def partial_text_field(sample: Sample, caption_index: int, ctx: FieldContext) -> torch.Tensor:
    """Token ids of one true partial caption (one object, or one relation), drawn at random."""
    text = ctx.rng.choice(sample.partial_captions) if sample.partial_captions else sample.captions[caption_index]
    return ctx.tokenize([text])[0]


class CaptionDataset(Dataset):
    """Image-caption pairs from a source: one true caption per image each time it is drawn."""

    def __init__(self, source: Source, transform: Callable, tokenize: CachedTokenizer, *, split: str,
                 caption_sampling: str = "first", fields: Sequence[str] = ()) -> None:
        if caption_sampling not in ("random", "first"):
            raise ValueError(f"caption_sampling must be 'random' or 'first', got '{caption_sampling}'")
        self.source, self.transform, self.tokenize, self.split = source, transform, tokenize, split
        self.random_caption = caption_sampling == "random"
        self.builders = {name: FIELDS.get(name) for name in fields}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.source[index]
        if not sample.captions:
            raise ValueError(f"{sample.key}: the sample has no caption")
        k = random.randrange(len(sample.captions)) if self.random_caption else 0
        item = {
            "image": self.transform(sample.image),
            "text": self.tokenize([sample.captions[k]])[0],
            "caption": sample.captions[k],
            "graph": sample.graph,
            "index": index,
        }
        ctx = FieldContext(self.tokenize, random, self.split)
        for name, build in self.builders.items():
            item[name] = build(sample, k, ctx)
        return item


class HostList:
    """Per-sample objects (scene graphs) that stay on the host. Not a list on purpose: Lightning's device
    transfer recurses into lists and dataclasses, and refuses frozen ones; it leaves other objects alone."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and numbers; captions stay a list of str, other objects (graphs) a HostList."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
        elif isinstance(values[0], str):
            batch[key] = values
        else:
            batch[key] = HostList(values)
    return batch


def build_source(cfg: DictConfig, split: str) -> Source:
    """The registered source named by cfg.source, for one split, with its typed options."""
    options = OmegaConf.to_object(cfg.options) if isinstance(cfg.options, DictConfig) else cfg.options
    return SOURCES.get(cfg.source)(options, split)


class CaptionDataModule(L.LightningDataModule):
    """Serves any source through the model's preprocessing and tokenizer, plus the fields a method asks for."""

    def __init__(self, cfg: DictConfig, *, preprocess_train: Callable, preprocess_val: Callable,
                 tokenizer: Callable, extra_fields: Sequence[str] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.preprocess_train = preprocess_train if cfg.augment else preprocess_val
        self.preprocess_val = preprocess_val
        self.tokenize = CachedTokenizer(tokenizer)
        self.extra_fields = tuple(extra_fields)
        for name in self.extra_fields:
            FIELDS.get(name)  # an unknown field fails now, listing the known ones
        self.datasets: dict[str, CaptionDataset] = {}

    def dataset(self, split: str) -> CaptionDataset:
        if split not in self.datasets:
            train = split == "train"
            self.datasets[split] = CaptionDataset(
                build_source(self.cfg, split), self.preprocess_train if train else self.preprocess_val, self.tokenize,
                split=split, caption_sampling=self.cfg.caption_sampling if train else "first", fields=self.extra_fields,
            )
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        self.dataset("train" if stage in (None, "fit") else "test")
        if stage in (None, "fit", "validate"):
            self.dataset("val")

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        workers = self.cfg.num_workers
        pin = torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory
        return DataLoader(
            self.dataset(split), batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
            pin_memory=pin, persistent_workers=workers > 0 and self.cfg.persistent_workers, collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        # drop_last: every rank must gather features of the same shape, or the collective stalls
        return self._loader("train", self.cfg.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.cfg.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.cfg.eval_batch_size, train=False)


def data_schema(name: str, node: DictConfig) -> DictConfig:
    """The typed node for a data group file: DataConfig with the source's own options schema."""
    from configs.schema import DataConfig

    source = node.get("source", DataConfig.source)
    typed = OmegaConf.structured(DataConfig)
    typed.source = source
    typed.options = OmegaConf.structured(SOURCES.get(source).Config)
    return typed

"""The one LightningDataModule: any registered source, the model's own preprocessing and tokenizer.

A batch always holds `image` (B,3,H,W), `text` (B,L) token ids, `caption` (list of str), `graph`
(list of SceneGraph or None) and `index` (B,). A method asks for more through its `extra_fields`:
each name is looked up in `FIELDS`, whose builders make one value per sample.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from datamodules.device_images import finish_images
from datamodules.device_images import split as split_transform
from datamodules.fields import FIELDS, FieldContext, check_source_offers
from datamodules.source import SOURCES, Source


class CachedTokenizer:
    """Tokenizes each distinct text once per context length (None: the tokenizer's own); returns (N, L) token ids.
    Each DataLoader worker keeps its own cache, so with persistent workers a caption is tokenized once per worker."""

    def __init__(self, tokenizer: Callable[..., torch.Tensor]) -> None:
        self.tokenizer = tokenizer
        self.caches: dict[int | None, dict[str, torch.Tensor]] = {}

    def __call__(self, texts: Sequence[str], context_length: int | None = None) -> torch.Tensor:
        cache = self.caches.setdefault(context_length, {})
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            kwargs = {} if context_length is None else {"context_length": context_length}
            cache.update(zip(missing, self.tokenizer(missing, **kwargs)))
        return torch.stack([cache[t] for t in texts])  # (N, L)


class CaptionDataset(Dataset):
    """Image-caption pairs from a source: one true caption per image each time it is drawn."""

    def __init__(self, source: Source, transform: Callable, tokenize: CachedTokenizer, *, split: str,
                 caption_sampling: str = "first", fields: Sequence[str] = (),
                 field_options: dict[str, Any] | None = None) -> None:
        if caption_sampling not in ("random", "first"):
            raise ValueError(f"caption_sampling must be 'random' or 'first', got '{caption_sampling}'")
        self.source, self.transform, self.tokenize, self.split = source, transform, tokenize, split
        self.random_caption = caption_sampling == "random"
        self.builders = {name: FIELDS.get(name) for name in fields}
        self.field_options = field_options if field_options is not None else {}  # shared: filled in before fit
        self.host_transform: Callable | None = None  # set by the loader: items end as uint8, normalised on the GPU

    @property
    def item_transform(self) -> Callable:
        """What the items' images go through: the model transform, or its part before ToTensor (device_images)."""
        return self.host_transform or self.transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.source[index]
        if not sample.captions:
            raise ValueError(f"{sample.key}: the sample has no caption")
        k = random.randrange(len(sample.captions)) if self.random_caption else 0
        item = {
            "image": self.item_transform(sample.image),
            "text": self.tokenize([sample.captions[k]])[0],
            "caption": sample.captions[k],
            "graph": sample.graph,
            "index": index,
        }
        ctx = FieldContext(self.tokenize, random, self.split, self.source, self.item_transform, index,
                           self.field_options)
        for name, build in self.builders.items():
            value = build(sample, k, ctx)
            if isinstance(value, dict):
                item.update(value)
            else:
                item[name] = value
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


def source_options(cfg: DictConfig) -> Any:
    """The source's options as its own Config object."""
    return OmegaConf.to_object(cfg.options) if isinstance(cfg.options, DictConfig) else cfg.options


def build_source(cfg: DictConfig, split: str) -> Source:
    """The registered source named by cfg.source, for one split, with its typed options."""
    return SOURCES.get(cfg.source)(source_options(cfg), split)


class CaptionDataModule(L.LightningDataModule):
    """Serves any source through the model's preprocessing and tokenizer, plus the fields a method asks for."""

    def __init__(self, cfg: DictConfig, *, preprocess_train: Callable, preprocess_val: Callable,
                 tokenizer: Callable, extra_fields: Sequence[str] = (), field_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.preprocess_train = preprocess_train if cfg.augment else preprocess_val
        self.preprocess_val = preprocess_val
        self.tokenize = CachedTokenizer(tokenizer)
        # the transforms cut before ToTensor, for images that cross to the GPU as uint8 (None: cannot be cut)
        self.host_parts = {"train": split_transform(self.preprocess_train), "eval": split_transform(self.preprocess_val)}
        self.extra_fields = tuple(extra_fields)
        self.field_options = dict(field_options or {})
        for name in self.extra_fields:
            FIELDS.get(name)  # an unknown field fails now, listing the known ones
        self.datasets: dict[str, CaptionDataset] = {}

    def dataset(self, split: str) -> CaptionDataset:
        if split not in self.datasets:
            train = split == "train"
            self.datasets[split] = CaptionDataset(
                build_source(self.cfg, split), self.preprocess_train if train else self.preprocess_val, self.tokenize,
                split=split, caption_sampling=self.cfg.caption_sampling if train else "first",
                fields=self.extra_fields if train else (),  # validation and test use the plain pairs
                field_options=self.field_options,
            )
            if train and self.extra_fields and len(self.datasets[split]):
                check_source_offers(self.extra_fields, self.datasets[split].source[0], self.cfg.source)
        return self.datasets[split]

    def prepare_data(self) -> None:
        """The source's one-time work (e.g. parsing annotation files into a cache), on rank 0 before `setup`."""
        prepare = getattr(SOURCES.get(self.cfg.source), "prepare", None)
        if prepare is not None:
            prepare(source_options(self.cfg))

    def data_report(self) -> dict[str, Any]:
        """Per split: what the source left out (skipped bad records, replaced images, excluded ids), if it says."""
        return {split: ds.source.report() for split, ds in self.datasets.items() if hasattr(ds.source, "report")}

    def setup(self, stage: str | None = None) -> None:
        self.dataset("train" if stage in (None, "fit") else "test")
        if stage in (None, "fit", "validate"):
            self.dataset("val")

    def normalize_on_device(self) -> bool:
        """Whether images cross to the device as uint8 (data.normalize_on_device; None: when training on a GPU)."""
        if self.cfg.normalize_on_device is not None:
            return self.cfg.normalize_on_device
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: ToTensor and Normalize of the images that came as uint8 (none unless normalize_on_device)."""
        training = self.trainer is not None and self.trainer.training
        part = self.host_parts["train" if training else "eval"]
        return finish_images(batch, part.normalize) if part is not None and isinstance(batch, dict) else batch

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        dataset = self.dataset(split)
        part = self.host_parts["train" if train else "eval"]
        dataset.host_transform = part.host if part is not None and self.normalize_on_device() else None
        workers = self.cfg.num_workers
        pin = torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory
        # workers build batches ahead (prefetch_factor each) into pinned memory, so the copy to the GPU is
        # asynchronous and the step never waits on decoding while the workers keep up
        ahead = {"prefetch_factor": self.cfg.prefetch_factor} if workers > 0 else {}
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
            pin_memory=pin, persistent_workers=workers > 0 and self.cfg.persistent_workers, collate_fn=collate,
            **ahead,
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

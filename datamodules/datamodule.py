"""The one LightningDataModule: any registered source, the model's own preprocessing and tokenizer.

A batch always holds `image` (B,3,H,W), `text` (B,L) token ids, `caption` (list of str), `graph`
(list of SceneGraph or None) and `index` (B,). A method asks for more through its `extra_fields`:
each name is looked up in `FIELDS`, whose builders make one value per sample.
"""
from __future__ import annotations

import logging
import math
import random
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
import torchvision.transforms as T
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules import decoded
from datamodules.device_images import finish_images
from datamodules.device_images import split as split_transform
from datamodules.fields import BATCH_TABLES, CAPTION_TOKEN_FIELDS, FIELDS, NEEDS, FieldContext, check_source_offers
from datamodules.sampling import Draw, EpochSampler, ResumableLoader, derive_seed
from datamodules.source import SOURCES, Source

log = logging.getLogger(__name__)


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
    """Image-caption pairs from a source: one true caption per image each time it is drawn.

    A key is an index (epoch 0) or a `Draw` (index, epoch). Every random choice for the item (the caption,
    the fields' negatives and neighbours, a random crop) comes from a generator seeded by (seed, epoch,
    index), so an item is the same whichever worker builds it and whether or not the run was resumed."""

    def __init__(self, source: Source, transform: Callable, tokenize: CachedTokenizer, *, split: str,
                 caption_sampling: str = "first", fields: Sequence[str] = (),
                 field_options: dict[str, Any] | None = None, seed: int = 0, random_transform: bool = False) -> None:
        if caption_sampling not in ("random", "first"):
            raise ValueError(f"caption_sampling must be 'random' or 'first', got '{caption_sampling}'")
        self.source, self.transform, self.tokenize, self.split = source, transform, tokenize, split
        self.random_caption = caption_sampling == "random"
        self.builders = {name: FIELDS.get(name) for name in fields}
        self.field_options = field_options if field_options is not None else {}  # shared: filled in before fit
        self.seed, self.random_transform = seed, random_transform
        self.host_transform: Callable | None = None  # set by the loader: items end as uint8, normalised on the GPU

    @property
    def item_transform(self) -> Callable:
        """What the items' images go through: the model transform, or its part before ToTensor (device_images)."""
        return self.host_transform or self.transform

    def __len__(self) -> int:
        return len(self.source)

    def image(self, image: Any, seed: int) -> Any:
        """The transformed image; a random transform draws from torch's generator seeded for this item."""
        if not self.random_transform:
            return self.item_transform(image)
        with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
            torch.manual_seed(seed)
            return self.item_transform(image)

    def __getitem__(self, key: int | Draw) -> dict[str, Any]:
        index, epoch = (key.index, key.epoch) if isinstance(key, Draw) else (int(key), 0)
        rng = random.Random(derive_seed("item", self.seed, self.split, epoch, index))
        sample = self.source[index]
        if not sample.captions:
            raise ValueError(f"{sample.key}: the sample has no caption")
        k = rng.randrange(len(sample.captions)) if self.random_caption else 0
        item = {
            "image": self.image(sample.image, rng.getrandbits(63)),
            "text": self.tokenize([sample.captions[k]])[0],
            "caption": sample.captions[k],
            "graph": sample.graph,
            "index": index,
        }
        transform = lambda image: self.image(image, rng.getrandbits(63))  # noqa: E731  (seeded from this item)
        ctx = FieldContext(self.tokenize, rng, self.split, self.source, transform, index, self.field_options)
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


def collate(items: list[dict[str, Any]], trim_text: int = 0) -> dict[str, Any]:
    """Stack tensors and numbers; captions stay a list of str, other objects (graphs) a HostList.
    `trim_text` > 0: the caption-token fields are cut to one common length (see `trim_caption_tokens`).
    Then the whole-batch tables of the fields present (`fields.BATCH_TABLES`), so a batch is not sliced into
    smaller ones: collate the items of each part instead."""
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
    if trim_text > 0:
        batch = trim_caption_tokens(batch, trim_text)
    for key, table in BATCH_TABLES.items():
        if key in batch:
            batch |= table(batch)
    return batch


def trim_caption_tokens(batch: dict[str, Any], multiple: int) -> dict[str, Any]:
    """Cut every caption-token field (CAPTION_TOKEN_FIELDS) after the batch's longest text, rounded up to a
    multiple of `multiple` (few distinct shapes for a compiled tower), never beyond the context. One length
    for all of them, since methods encode them in one call. The end token is the highest id (open_clip's
    argmax pooling), so its position is each text's length. Runs in the loader's workers: no device sync."""
    present = [k for k in CAPTION_TOKEN_FIELDS if isinstance(batch.get(k), torch.Tensor)]
    if not present:
        return batch
    context = batch[present[0]].shape[-1]
    longest = max(int(batch[k].argmax(dim=-1).max()) + 1 for k in present)
    keep = min(context, -(-longest // multiple) * multiple)
    return batch | {k: batch[k][..., :keep].contiguous() for k in present}


def source_options(cfg: DictConfig) -> Any:
    """The source's options as its own Config object."""
    return OmegaConf.to_object(cfg.options) if isinstance(cfg.options, DictConfig) else cfg.options


def build_source(cfg: DictConfig, split: str) -> Source:
    """The registered source named by cfg.source, for one split, with its typed options."""
    return SOURCES.get(cfg.source)(source_options(cfg), split)


class CaptionDataModule(L.LightningDataModule):
    """Serves any source through the model's preprocessing and tokenizer, plus the fields a method asks for."""

    def __init__(self, cfg: DictConfig, *, preprocess_train: Callable, preprocess_val: Callable,
                 tokenizer: Callable, extra_fields: Sequence[str] = (), field_options: dict[str, Any] | None = None,
                 seed: int = 0, trim_text: bool = False) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.trim_text = trim_text  # the method's features allow cutting caption tokens (cfg.trim_text: the multiple)
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
        self.train_loader: ResumableLoader | None = None
        self.resume_from: dict[str, int] | None = None  # the train loader's state in a checkpoint, used once

    def check(self) -> None:
        """What can be known of the data before a run folder is made: the source's annotation files are there (a
        record source's `inputs`, when not read from the hub), its `exclude_ids` files are there and readable, and
        its options hold (a source that is `made_cheaply` is made for `train`, which checks them). Raises
        ConfigError naming the file or the option."""
        from configs import ConfigError
        from datamodules.records import read_ids

        source, opts = SOURCES.get(self.cfg.source), source_options(self.cfg)
        try:
            if hasattr(source, "inputs"):
                if not getattr(opts, "hf_id", None):
                    source.inputs(opts)
                read_ids(list(getattr(opts, "exclude_ids", None) or []))
            elif getattr(source, "made_cheaply", False):
                self.check_fit(source(opts, "train"))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data ({self.cfg.source}): {e.args[0] if e.args else e}") from None

    def check_fit(self, world: Source, scenes: int = 256) -> None:
        """Warn where the model sees less than a drawn world holds: captions of its first scenes longer than the
        text context (cut there), or images drawn larger than the model's input (resized down)."""
        captions = [c for i in range(min(len(world), scenes)) for c in world[i].captions]
        if captions:
            tokens = self.tokenize(captions)
            pad = self.tokenize(["a"])[0, -1]  # what the last position holds when the text is short
            cut = int((tokens[:, -1] != pad).sum())  # a caption reaching the last position: cut there (or as long)
            if cut:
                log.warning("data (%s): %d of %d captions of the first %d training scenes reach the end of the "
                            "model's text context of %d tokens (cut there, unless exactly as long); raise "
                            "model.arch.text_cfg.context_length (or use a model with a longer one)", self.cfg.source,
                            cut, len(captions), min(len(world), scenes), tokens.shape[1])
        drawn = getattr(getattr(world, "cfg", None), "image_size", None)
        size = next((t.size for t in getattr(self.preprocess_val, "transforms", []) if isinstance(t, T.Resize)), None)
        side = size if isinstance(size, int) else min(size) if size else None
        if drawn and side and drawn > side:
            log.warning("data (%s): images are drawn at %d px and resized to the model's %d px input; objects "
                        "shrink with them (raise model.arch.vision_cfg.image_size)", self.cfg.source, drawn, side)

    def dataset(self, split: str) -> CaptionDataset:
        if split not in self.datasets:
            train = split == "train"
            source, transform = build_source(self.cfg, split), self.preprocess_train if train else self.preprocess_val
            if self.cfg.image_cache:
                decoded.attach(source, transform, augment=train and self.cfg.augment)
            # validation and test use the plain pairs, the same for every method; validation also the caption's
            # relation and attribute swaps where the source makes them (val/relation_swap_acc each epoch)
            probe = split == "val" and len(source) > 0 and NEEDS["swap_probe"][1](source[0])
            self.datasets[split] = CaptionDataset(
                source, transform, self.tokenize,
                split=split, caption_sampling=self.cfg.caption_sampling if train else "first",
                fields=self.extra_fields if train else ("swap_probe",) if probe else (),
                field_options=self.field_options, seed=self.seed, random_transform=train and self.cfg.augment,
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

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """`collate`, cutting caption tokens where the method allows it (cfg.trim_text: the multiple)."""
        return partial(collate, trim_text=self.cfg.trim_text if self.trim_text else 0)

    def _loader_options(self, split: str) -> dict[str, Any]:
        """The DataLoader options of a split; sets whether its items end as uint8 (normalised on the device)."""
        part = self.host_parts["train" if split == "train" else "eval"]
        self.dataset(split).host_transform = part.host if part is not None and self.normalize_on_device() else None
        workers = self.cfg.num_workers
        pin = torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory
        # workers build batches ahead (prefetch_factor each) into pinned memory, so the copy to the GPU is
        # asynchronous and the step never waits on decoding while the workers keep up
        ahead = {"prefetch_factor": self.cfg.prefetch_factor} if workers > 0 else {}
        return {"num_workers": workers, "pin_memory": pin, "collate_fn": self.collate_fn(),
                "persistent_workers": workers > 0 and self.cfg.persistent_workers, **ahead}

    def train_dataloader(self) -> ResumableLoader:
        """Batches in an order drawn from (seed, epoch), this rank's shard, from the restored position if the run
        was resumed. Full batches only: every rank must gather features of the same shape, or the collective
        stalls."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = EpochSampler(len(self.dataset("train")), self.cfg.batch_size, self.seed, rank, world)
        loader = ResumableLoader(self.dataset("train"), batch_size=self.cfg.batch_size, sampler=sampler,
                                 drop_last=True, position=self.training_position if self.trainer is not None else None,
                                 **self._loader_options("train"))
        if self.resume_from:
            loader.load_state_dict(self.resume_from)
            self.resume_from = None
        self.train_loader = loader
        return loader

    def training_position(self) -> dict[str, int]:
        """Where the weights the trainer holds now are in the data: the epoch, the batches of it consumed and
        the batches the loop runs per epoch. One optimizer step per batch (the lab has no gradient
        accumulation), so the steps taken this epoch are the batches consumed."""
        t = self.trainer
        per_epoch = int(t.num_training_batches)
        return {"epoch": t.current_epoch, "batches": t.global_step - t.current_epoch * per_epoch,
                "batches_per_epoch": per_epoch}

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint Lightning writes while fitting: the training position of its weights."""
        t = self.trainer
        if self.train_loader is None or t is None or t.state.fn != "fit" or not math.isfinite(t.num_training_batches):
            return {}
        return {"train_loader": self.train_loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Lightning restores this before it builds the training loader (for single-device and DDP strategies),
        so the loader starts where the checkpoint's weights stopped. (Lightning 2.6 restores a stateful loader
        itself only when configure_optimizers does not read estimated_stepping_batches, Lightning issue
        #20550; the lab's does, so the position travels with the DataModule.)"""
        self.resume_from = state.get("train_loader")

    def val_dataloader(self) -> DataLoader:
        """The validation split; under DDP each rank validates every W-th item (`Shard`), each item once (Lightning's
        DistributedSampler would repeat items to even the ranks out, and count them twice)."""
        dataset = self.dataset("val")
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = Shard(dataset, rank, world) if world > 1 else None
        return DataLoader(dataset, batch_size=self.cfg.eval_batch_size, sampler=sampler, **self._loader_options("val"))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("test"), batch_size=self.cfg.eval_batch_size, **self._loader_options("test"))


class Shard(DistributedSampler):
    """Items rank, rank + W, rank + 2W, ... of a dataset, in order, none repeated: ranks may hold one item more than
    another. A DistributedSampler, so that Lightning keeps it (it wraps any other sampler in one that pads)."""

    def __init__(self, dataset: Any, rank: int, world: int) -> None:
        if len(dataset) < world:
            raise ValueError(f"the validation split has {len(dataset)} items for {world} processes; each needs one "
                             f"(raise data.options.val_size)")
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def data_schema(name: str, node: DictConfig) -> DictConfig:
    """The typed node for a data group file: DataConfig with the source's own options schema."""
    from configs.schema import DataConfig

    source = node.get("source", DataConfig.source)
    typed = OmegaConf.structured(DataConfig)
    typed.source = source
    typed.options = OmegaConf.structured(SOURCES.get(source).Config)
    return typed

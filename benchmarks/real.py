"""What the real-data benchmarks share: the data root, reading (and cropping) images, encoding each distinct
image once per bench call (batched, in DataLoader workers, float16 autocast on a GPU: `bench.amp_dtype`), images/s, and the
skip_bad policy for records whose image cannot be read.

Layout under `bench.data_root` (see README "Real benchmarks"):
    aro/visual_genome_relation.json, aro/visual_genome_attribution.json, aro/images/<file>
    coco/coco_karpathy_test.json, coco/val2014/...        (COCO-Order, COCO retrieval)
    coco/val2017/...                                       (SugarCrepe's images)
    flickr30k/flickr30k_test.json, flickr30k/flickr30k-images/...
    sugarcrepe/<subset>.json
    parses/*.conllu                                        (parses of the Order captions, optional)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from benchmarks.base import BenchContext
from benchmarks.formats import Box, KarpathyImage, read_karpathy, require
from benchmarks.scoring import _device, encode_images_guarded
from datamodules.images import BadInput, BadRecords, load_image


def data_root(ctx: BenchContext) -> Path:
    """The folder holding the real benchmark files (bench.data_root)."""
    root = ctx.spec.get("data_root")
    if not root:
        raise FileNotFoundError("bench.data_root is not set: give the folder with the benchmark files, e.g. "
                                "make bench BENCH=aro DATA_ROOT=/data/clipcomp (layout in README 'Real benchmarks')")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: bench.data_root is not a folder")
    return root


def bad_records(ctx: BenchContext) -> BadRecords:
    """A fresh skip_bad guard for one benchmark (bench.skip_bad)."""
    return BadRecords(skip_bad=bool(ctx.spec.get("skip_bad", False)))


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def use_amp(ctx: BenchContext, reference_float32: bool = False) -> torch.dtype | None:
    """The autocast dtype of the encoders (None: full precision): bench.amp (None: on a GPU only, unless the
    benchmark's reference code runs in float32, as SugarCrepe's main_eval.py does: `reference_float32`), to
    bench.amp_dtype (float16 by default: CLIP_benchmark's autocast, and the half precision ARO runs OpenAI's
    CLIP in; bfloat16 keeps 3 fewer mantissa bits, enough to flip a close choice between two captions)."""
    amp = ctx.spec.get("amp")
    on = (_device(ctx.model).type == "cuda" and not reference_float32) if amp is None else bool(amp)
    return AMP_DTYPES[str(ctx.spec.get("amp_dtype", "float16"))] if on else None


def precision_name(amp: torch.dtype | None) -> str:
    return "in float32" if amp is None else f"under {str(amp).removeprefix('torch.')} autocast"


@dataclass(frozen=True)
class ImageRef:
    """One image to encode: a file, and the box to crop it to (None: the whole image)."""

    path: str
    box: Box | None = None


class ImageFiles(Dataset):
    """Preprocessed images (optionally cropped as ARO crops: `(x, y, x + w, y + h)` after convert('RGB')).
    `where[i]` names the records that use image i, for the error when it cannot be read."""

    def __init__(self, refs: Sequence[ImageRef], where: Sequence[str], preprocess: Callable) -> None:
        self.refs, self.where, self.preprocess = list(refs), list(where), preprocess
        self._last: tuple[str, object] | None = None  # the last decoded file: crops of one image come in a row

    def __len__(self) -> int:
        return len(self.refs)

    def load(self, i: int):
        """The PIL image of item i, cropped to its box."""
        ref = self.refs[i]
        if self._last is None or self._last[0] != ref.path:
            self._last = (ref.path, load_image(ref.path, self.where[i]))
        image = self._last[1]
        if ref.box is None:
            return image
        x, y, w, h = ref.box
        return image.crop((x, y, x + w, y + h))

    def __getitem__(self, i: int) -> Tensor:
        return self.preprocess(self.load(i))  # (3, H, W)


@dataclass
class EncodedImages:
    """Features of the distinct images (U, D), the error per image (None: read fine), and the speed."""

    refs: list[ImageRef]
    features: Tensor
    errors: list[str | None]
    seconds: float
    amp: torch.dtype | None = None  # the autocast dtype they were encoded under (None: float32)
    reported: bool = False  # the speed is reported by the first benchmark that used these images

    def speed_note(self, what: str) -> str:
        if self.reported:
            return f"{what}: images shared with an earlier benchmark of this call (encoded once)"
        self.reported = True
        ok = sum(e is None for e in self.errors)
        kind = "image crops" if any(r.box is not None for r in self.refs) else "images"
        return (f"{what}: {ok} distinct {kind} read, preprocessed and encoded {precision_name(self.amp)} (images "
                f"and captions) at {ok / max(self.seconds, 1e-9):.1f} images/s")


def encode_refs(ctx: BenchContext, refs: Sequence[ImageRef], wheres: Sequence[str], what: str,
                reference_float32: bool = False) -> EncodedImages:
    """Encode every distinct image of `refs` once (shared with every benchmark of this call that needs the same
    images at the same precision, e.g. COCO-Order and COCO retrieval); `wheres[i]` names the record of refs[i];
    `reference_float32` as `use_amp`."""
    amp = use_amp(ctx, reference_float32)
    users: dict[ImageRef, list[str]] = {}
    for ref, where in zip(refs, wheres):
        users.setdefault(ref, []).append(where)
    distinct = sorted(users, key=lambda r: (r.path, r.box or ()))  # crops of one file in a row: decoded once

    def make() -> EncodedImages:
        names = [users[r][0] + (f" (and {len(users[r]) - 1} other records)" if len(users[r]) > 1 else "")
                 for r in distinct]
        data = ImageFiles(distinct, names, ctx.preprocess)
        start = time.perf_counter()
        feats, errors = encode_images_guarded(ctx.model, data, batch_size=ctx.spec.batch_size,
                                              num_workers=min(int(ctx.spec.get("num_workers", 0)), os.cpu_count() or 1),
                                              desc=f"{what} images", amp=amp)
        return EncodedImages(distinct, feats, errors, time.perf_counter() - start, amp)

    return ctx.cached(("images", amp, tuple(distinct)), make)


def usable(refs: Sequence[ImageRef], encoded: EncodedImages, bad: BadRecords) -> tuple[list[int], Tensor]:
    """Positions of the records whose image was read, and their image features (n_kept, D); a record with a bad
    image stops the run with the image's error, or with skip_bad is skipped and counted."""
    row = {r: i for i, r in enumerate(encoded.refs)}
    kept = []
    for k, ref in enumerate(refs):
        error = encoded.errors[row[ref]]
        if error is None:
            kept.append(k)
        else:
            bad.guard(lambda e=error: _raise(e))
    index = torch.tensor([row[refs[k]] for k in kept], dtype=torch.long)
    return kept, encoded.features[index]  # (U, D) -> (n_kept, D)


def _raise(message: str) -> None:
    raise BadInput(message)


def notes_for(what: str, bad: BadRecords, encoded: EncodedImages | None = None) -> list[str]:
    """The speed line and, when records were skipped, the skip line."""
    notes = [encoded.speed_note(what)] if encoded is not None else []
    skipped = bad.note(what)
    return notes + ([skipped] if skipped else [])


def nonempty(kept: Sequence, what: str, path: Path) -> None:
    if not kept:
        raise ValueError(f"{path}: {what} has no usable records")


# dataset -> (annotation file pattern, image folder inside the dataset folder, where users get the images)
KARPATHY = {
    "coco": ("coco_karpathy_{split}.json", "val2014", "coco_images"),
    "flickr30k": ("flickr30k_{split}.json", "flickr30k-images", "flickr_images"),
}


def karpathy(ctx: BenchContext, dataset: str, bad: BadRecords) -> tuple[Path, list[KarpathyImage], list[ImageRef]]:
    """The BLIP Karpathy file of `dataset` for bench.split (`<data_root>/<dataset>/...`): its path, its images
    with their captions, and the image files (paths in the file are relative to the dataset folder)."""
    pattern, image_dir, source = KARPATHY[dataset]
    folder = data_root(ctx) / dataset
    path = folder / pattern.format(split=ctx.spec.split)
    entries = read_karpathy(path, bad)
    require(folder / image_dir, f"{dataset} image folder", source)
    return path, entries, [ImageRef(str(folder / e.image)) for e in entries]

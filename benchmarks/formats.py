"""Readers for the real benchmark files, in the formats the reference code reads them.

- ARO's `visual_genome_relation.json` / `visual_genome_attribution.json` (mertyg/vision-language-models-are-bows,
  dataset_zoo/aro_datasets.py): a JSON list of records with `image_path`, `bbox_x/y/w/h`, `true_caption`,
  `false_caption`, and `relation_name` (VG-Relation) or `attributes` (VG-Attribution; the first two name the
  pair). Structure-CLIP's augmented copies add `true_triples` / `false_triples` ([[subject, predicate, object]]).
- BLIP's Karpathy test files `coco_karpathy_test.json` / `flickr30k_test.json` (what ARO's COCO/Flickr30k-Order
  read): a JSON list of {"image": "<folder>/<file>.jpg", "caption": [str, ...]}.
- SugarCrepe's `<subset>.json` (RAIVNLab/sugar-crepe data/): a dict keyed by string index (keys may skip
  numbers) of {"filename", "caption", "negative_caption"}.

Every reader validates each record; a bad one raises BadInput naming `<file>:record <i>` (through the
benchmark's BadRecords guard, so `skip_bad` can skip and count it). A missing file says where users get it.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from datamodules.graph import Entity, Relation, SceneGraph
from datamodules.images import BadInput, BadRecords

Box = tuple[float, float, float, float]  # x, y, w, h (Visual Genome's convention)

# Where users get each file (named in the error when one is missing).
_BLIP = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"
WHERE_TO_GET = {
    "visual_genome_relation.json": "ARO's VG-Relation annotations (github.com/mertyg/vision-language-models-are-bows, "
                                   "Google Drive id 1kX2iCHEv0CADL8dSO1nMdW-V0NqIAiP3)",
    "visual_genome_attribution.json": "ARO's VG-Attribution annotations (github.com/mertyg/vision-language-models-"
                                      "are-bows, Google Drive id 13tWvOrNOLHxl3Rm9cR3geAdHx2qR3-Tw)",
    "aro_images": "ARO's vgr_vga_images.zip (Google Drive id 1qaPlrwhGNMrR3a11iopZUT_GPP_LrgP9), unzipped so that "
                  "the files are directly in this folder",
    **{f"{name}_{split}.json": f"{_BLIP}{name}_{split}.json"  # BLIP's Karpathy files, every split bench.split offers
       for name in ("coco_karpathy", "flickr30k") for split in ("train", "val", "test")},
    "coco_images": "COCO 2014 images (http://images.cocodataset.org/zips/val2014.zip), unzipped here as val2014/",
    "flickr_images": "Flickr30k images (sign up at https://forms.illinois.edu/sec/229675), unzipped here as "
                     "flickr30k-images/",
    "sugarcrepe": "SugarCrepe's data/<subset>.json (https://github.com/RAIVNLab/sugar-crepe/tree/main/data)",
    "coco_val2017": "COCO 2017 validation images (http://images.cocodataset.org/zips/val2017.zip), unzipped as "
                    "val2017/",
}


def require(path: Path, what: str, source: str) -> Path:
    """`path` if it exists; otherwise a FileNotFoundError that names it and says where users get it."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found; get it from {WHERE_TO_GET[source]}")
    return path


def load_json(path: Path, what: str, source: str) -> Any:
    """The parsed file; a missing file says where to get it, a malformed one names the line and column."""
    require(path, what, source)
    if path.is_dir():
        raise ValueError(f"{path}: {what} expected, found a folder")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text, as JSON must be (byte {e.start}: {e.reason})") from None


def _text(record: dict, key: str, where: str) -> str:
    """A non-empty string field, or BadInput (an empty caption is a bad record, not a caption)."""
    value = record.get(key)
    if not isinstance(value, str):
        raise BadInput(f"{where}: field '{key}' must be a string, got {value!r}")
    if not value.strip():
        raise BadInput(f"{where}: empty {'caption in ' if 'caption' in key else ''}field '{key}'")
    return value


def _number(record: dict, key: str, where: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BadInput(f"{where}: field '{key}' must be a finite number, got {value!r}")
    return value


def _record(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise BadInput(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    return record


def graph_from_triples(triples: Any, where: str, key: str) -> SceneGraph:
    """A scene graph whose `triples()` are exactly the given [subject, predicate, object] lists, in order (one
    object node per distinct name): what Structure-CLIP's encoder reads for each caption option."""
    if not isinstance(triples, list) or not all(
            isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t) for t in triples):
        raise BadInput(f"{where}: field '{key}' must be a list of [subject, predicate, object] strings, "
                       f"got {triples!r}")
    names = list(dict.fromkeys(n for s, _, o in triples for n in (s, o)))
    index = {n: i for i, n in enumerate(names)}
    return SceneGraph(tuple(Entity(n) for n in names), tuple(Relation(index[s], p, index[o]) for s, p, o in triples))


@dataclass(frozen=True)
class VGCase:
    """One VG-Relation or VG-Attribution test case: a crop, the true and the false caption, its group (the
    relation name, or the attribute pair `f"{attributes[0]}_{attributes[1]}"`), optional graphs per caption."""

    image: str  # file name relative to the images folder
    box: Box
    true_caption: str
    false_caption: str
    group: str
    true_graph: SceneGraph | None
    false_graph: SceneGraph | None
    where: str


def _vg_case(record: Any, where: str, kind: str) -> VGCase:
    r = _record(record, where)
    image = _text(r, "image_path", where)
    box = tuple(_number(r, k, where) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
    if box[2] <= 0 or box[3] <= 0:
        raise BadInput(f"{where}: the box must have a positive width and height, got bbox_w={box[2]}, bbox_h={box[3]}")
    if kind == "relation":
        group = _text(r, "relation_name", where)
    else:
        attrs = r.get("attributes")
        if not isinstance(attrs, list) or len(attrs) < 2 or not all(isinstance(a, str) for a in attrs[:2]):
            raise BadInput(f"{where}: field 'attributes' must be a list of at least two strings, got {attrs!r}")
        group = f"{attrs[0]}_{attrs[1]}"
    graphs: tuple[SceneGraph | None, SceneGraph | None] = (None, None)
    if ("true_triples" in r) != ("false_triples" in r):
        raise BadInput(f"{where}: has only one of 'true_triples' and 'false_triples'")
    if "true_triples" in r:
        graphs = (graph_from_triples(r["true_triples"], where, "true_triples"),
                  graph_from_triples(r["false_triples"], where, "false_triples"))
    return VGCase(image, box, _text(r, "true_caption", where), _text(r, "false_caption", where), group, *graphs,
                  where=where)


def read_vg(path: Path, kind: str, bad: BadRecords) -> list[VGCase]:
    """ARO's VG-Relation (`kind="relation"`) or VG-Attribution (`kind="attribution"`) records, in file order."""
    return read_list(path, f"ARO VG-{kind.capitalize()} file", "records", bad,
                     lambda r, where: _vg_case(r, where, kind))


Item = TypeVar("Item")


def read_list(path: Path, what: str, shape: str, bad: BadRecords, make: Callable[[Any, str], Item | None]) -> list[Item]:
    """A JSON list file's records, each through `make(record, "<path>:record <i>")` under `bad.guard` (skipped
    and counted with skip_bad, else the error names the record); records made into None are dropped."""
    data = load_json(path, what, path.name)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {shape}, got {type(data).__name__}")
    items = [bad.guard(lambda r=r, i=i: make(r, f"{path}:record {i}")) for i, r in enumerate(data)]
    return [x for x in items if x is not None]


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a BLIP Karpathy test file with its usable captions (raw, as in the file)."""

    image: str  # relative to the dataset folder, e.g. "val2014/COCO_val2014_000000391895.jpg"
    captions: tuple[str, ...]
    where: str


def _karpathy_entry(record: Any, where: str, bad: BadRecords) -> KarpathyImage | None:
    r = _record(record, where)
    image = _text(r, "image", where)
    caps = r.get("caption")
    if isinstance(caps, str):  # the val/test files hold lists; accept the train files' single caption too
        caps = [caps]
    if not isinstance(caps, list) or not caps:
        raise BadInput(f"{where}: field 'caption' must be a non-empty list of captions, got {caps!r}")
    kept = [bad.guard(lambda j=j: _text({"caption": caps[j]}, "caption", f"{where} caption {j}"))
            for j in range(len(caps))]
    kept = [c for c in kept if c is not None]
    return KarpathyImage(image, tuple(kept), where) if kept else None


def read_karpathy(path: Path, bad: BadRecords) -> list[KarpathyImage]:
    """The images of a BLIP Karpathy file, in file order; an image whose captions were all skipped is dropped. The
    train files hold one record per caption: an image's records become one entry (its first record names it), so
    image-to-text retrieval counts any of its captions."""
    merged: dict[str, KarpathyImage] = {}
    for e in read_list(path, "Karpathy split file", "{'image', 'caption'} records", bad,
                       lambda r, where: _karpathy_entry(r, where, bad)):
        first = merged.get(e.image)
        merged[e.image] = e if first is None else KarpathyImage(e.image, first.captions + e.captions, first.where)
    return list(merged.values())


@dataclass(frozen=True)
class SugarCrepeCase:
    key: str
    image: str  # COCO val2017 file name
    caption: str
    negative_caption: str
    where: str


def _sugarcrepe_case(key: str, record: Any, where: str) -> SugarCrepeCase:
    r = _record(record, where)
    return SugarCrepeCase(key, _text(r, "filename", where), _text(r, "caption", where),
                          _text(r, "negative_caption", where), where)


def read_sugarcrepe(path: Path, bad: BadRecords) -> list[SugarCrepeCase]:
    """A SugarCrepe subset, in the file's key order (keys are string indices and may skip numbers)."""
    data = load_json(path, "SugarCrepe subset", "sugarcrepe")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by index, got {type(data).__name__}")
    cases = [bad.guard(lambda k=k, r=r: _sugarcrepe_case(k, r, f"{path}:record '{k}'")) for k, r in data.items()]
    return [c for c in cases if c is not None]


_ARO_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_RUNS_OF_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ARO's (and BLIP's) caption preprocessing: lowercase, `.!"()*#:;~` become spaces, runs of whitespace one
    space, stripped, cut to `max_words` space-separated words. Commas and apostrophes stay."""
    caption = _RUNS_OF_SPACE.sub(" ", _ARO_PUNCTUATION.sub(" ", caption.lower()))
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption

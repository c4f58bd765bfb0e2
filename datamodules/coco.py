"""COCO captions (Karpathy's split file, and the 2017 annotation format) and Flickr30k (Karpathy's file).

`dataset_coco.json` / `dataset_flickr30k.json` (Karpathy and Fei-Fei): {"images": [{"filepath" (COCO only:
train2014 | val2014), "filename", "split" (train | restval | val | test), "sentences": [{"raw", ...}],
"cocoid" (COCO only), ...}]}. The train split is train + restval (COCO: 113,287 images), val and test are
Karpathy's (5,000 each; Flickr30k: 29,000 / 1,014 / 1,000). Every caption of an image is kept (COCO has 5 to
7); captions[0] is the first. Image ids: `cocoid` for COCO, the file name's number for Flickr30k.

`captions_{train,val}2017.json`: the COCO annotation format ({"images": [{"id", "file_name"}],
"annotations": [{"image_id", "caption"}]}), images in train2017/ and val2017/. COCO 2017 has no test captions.
COCO 2017 train holds Karpathy's test images (COCO-Order, COCO retrieval): see `exclude_ids`.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datamodules.images import BadInput
from datamodules.jsonstream import iter_json_array, read_text
from datamodules.parse import CaptionParser, ParsedCaption, ParserConfig
from datamodules.records import Bad, RecordsConfig, RecordSource, file_stat, norm_id
from datamodules.source import SOURCES, Sample
from datamodules.text_negatives import text_negatives

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _file(cfg: Any, name: str) -> Path:
    return Path(cfg.root) / name  # an absolute name stays as it is


def _captions(value: Any) -> list[Any]:
    """A caption column's value as a list: a string, a list of strings, or Karpathy's sentence dicts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v.get("raw") if isinstance(v, dict) else v for v in value]
    return [value]


@dataclass
class CaptionConfig(RecordsConfig):
    """A caption source's options: the shared ones, and whether its captions are parsed into scene graphs."""

    parse: bool = False  # parse every caption once while preparing (graphs for Structure-CLIP, MSG-CLIP; negatives)
    parser: ParserConfig = field(default_factory=ParserConfig)  # the Stanza model folder, CoNLL-U files, cache


PARSE_CHUNK = 2048  # records parsed per call to the parser (its batches are smaller; this bounds one retry)


class CaptionSource(RecordSource):
    """Images with captions from local files or, with `hf_id`, from a hub dataset's columns.

    With `parse`, every caption is parsed once while preparing (`datamodules/parse.py`: cached per caption text
    and parser version) and its parse stored with the record; a sample then carries each caption's scene graph
    (`extra["caption_graphs"]`) and its hard negatives (`extra["negative_captions"]`: relation, attribute and noun
    swaps in the text and an ARO shuffle, `datamodules/text_negatives.py`), as the shapes world does, so NegCLIP,
    Structure-CLIP and MSG-CLIP train on real captions unchanged. A caption the parser cannot read is a bad record
    that names the file and the record (skipped and counted with `skip_bad`).
    """

    @classmethod
    def annotation_key(cls, cfg: Any) -> Any:
        return CaptionParser(cfg.parser).version() if cfg.parse else None

    @classmethod
    def annotate(cls, cfg: Any, records: list[dict[str, Any]]) -> list[Bad]:
        if not cfg.parse:
            return []
        parser, bad = CaptionParser(cfg.parser), []
        for start in range(0, len(records), PARSE_CHUNK):
            chunk = records[start:start + PARSE_CHUNK]
            try:
                parsed = iter(parser.parse([c for r in chunk for c in r["captions"]]))
                for r in chunk:
                    r["parses"] = [next(parsed).to_dict() for _ in r["captions"]]
            except ValueError:  # find the record whose caption the parser cannot read
                for r in chunk:
                    try:
                        r["parses"] = [p.to_dict() for p in parser.parse(r["captions"])]
                    except ValueError as e:
                        bad.append(Bad(f"{r['where']}: the caption parser cannot read a caption: {e}", r.get("split"),
                                       r["id"]))
        return bad

    def sample(self, record: dict[str, Any]) -> Sample:
        sample = super().sample(record)
        if "parses" in record:
            parsed = [ParsedCaption.from_dict(d) for d in record["parses"]]
            seed = zlib.crc32(str(record["id"]).encode())  # the same negatives for a caption in every epoch and run
            sample.extra["caption_graphs"] = [p.graph for p in parsed]
            sample.extra["caption_graphs_written"] = [p.written_graph for p in parsed]  # Structure-CLIP's KEE forms
            sample.extra["negative_captions"] = lambda k: text_negatives(parsed[k], seed * 16 + k)
        return sample

    @classmethod
    def read(cls, cfg: Any, hub: dict[str, Any] | None) -> Iterator[dict[str, Any] | Bad]:
        return cls.read_hub(cfg, hub) if hub is not None else cls.read_files(cfg)

    @classmethod
    def read_files(cls, cfg: Any) -> Iterator[dict[str, Any] | Bad]:
        raise NotImplementedError

    @classmethod
    def read_hub(cls, cfg: Any, hub: dict[str, Any]) -> Iterator[dict[str, Any] | Bad]:
        """Rows of each split's hub dataset: `hf_columns` names the caption column (a string, a list of
        strings or of {"raw"} dicts), the image column (else `file`: columns joined into a path under root),
        the id column, and a `split` column whose value must equal the split (when one hub split holds all)."""
        cols = {k: v for k, v in cfg.hf_columns.items() if v}
        files = [c for c in cols.get("file", "").split(",") if c]
        for split, ds in hub.items():
            base = f"hf:{cfg.hf_id}[{cfg.hf_splits[split]}]"
            wanted = [c for c in (cols.get("captions"), cols.get("id"), cols.get("split"), *files) if c]
            missing = [c for c in wanted if c not in ds.column_names]
            if missing or "captions" not in cols or not (cols.get("image") or files):
                raise ValueError(f"{base}: data.options.hf_columns must name a captions column and an image (or "
                                 f"file) column of {', '.join(ds.column_names)}; missing {missing or cols}")
            for row, values in enumerate(ds.select_columns(wanted)):
                if "split" in cols and values[cols["split"]] != split:
                    continue
                rid = values[cols["id"]] if "id" in cols else row
                where = f"{base} row {row} (id {rid})"
                captions = []
                for j, text in enumerate(_captions(values[cols["captions"]])):
                    if not isinstance(text, str) or not text.strip():
                        what = "empty caption" if isinstance(text, str) else "not a string"
                        yield Bad(f"{where}: caption {j}: {what}", split, rid)
                    else:
                        captions.append(text.strip())
                image = row if "image" in cols else str(Path(cfg.images, *(str(values[c]) for c in files)))
                if not _captions(values[cols["captions"]]):
                    yield Bad(f"{where}: no caption", split, rid)
                if captions:
                    yield {"id": rid, "split": split, "image": image, "captions": captions, "where": where}


@SOURCES.register("coco_karpathy")
class CocoKarpathy(CaptionSource):
    """COCO captions in Karpathy's split (dataset_coco.json): train = train + restval, val, test."""

    name = "coco_karpathy"
    id_kind = "coco"
    cache_options = ("images",)

    @dataclass
    class Config(CaptionConfig):
        annotations: str = "dataset_coco.json"  # under root (or an absolute path)
        images: str = ""  # the folder under root that holds the records' filepath folders (train2014/, val2014/)
        train_splits: list[str] = field(default_factory=lambda: ["train", "restval"])
        hf_splits: dict[str, str] = field(default_factory=lambda: {"train": "train+restval", "val": "validation",
                                                                   "test": "test"})
        hf_columns: dict[str, str] = field(default_factory=lambda: {
            "image": "", "file": "filepath,filename", "captions": "sentences", "id": "cocoid", "split": ""})

    @classmethod
    def inputs(cls, cfg: Any) -> list[list[Any]]:
        return [file_stat(_file(cfg, cfg.annotations), "annotations")]

    @classmethod
    def split_of(cls, cfg: Any, stored: str | None, image_id: Any) -> str | None:
        if stored is None:
            return None
        return "train" if stored in cfg.train_splits else stored if stored in ("val", "test") else ""

    @classmethod
    def read_files(cls, cfg: Any) -> Iterator[dict[str, Any] | Bad]:
        path = _file(cfg, cfg.annotations)
        for k, entry in iter_json_array(path, "images"):
            yield from cls.parse_image(entry, f"{path}: images[{k}]", cfg.images)

    @staticmethod
    def parse_image(e: Any, where: str, folder: str) -> Iterator[dict[str, Any] | Bad]:
        """One entry of Karpathy's `images`: its record, and a Bad for each caption or field it cannot use."""
        if not isinstance(e, dict) or not isinstance(e.get("filename"), str) or not e["filename"]:
            yield Bad(f"{where}: not an image entry with a 'filename' string: {str(e)[:120]}")
            return
        where = f"{where} ({e['filename']})"
        rid = e["cocoid"] if isinstance(e.get("cocoid"), int) else norm_id(e["filename"])
        split = e.get("split")
        if split not in KARPATHY_SPLITS:
            yield Bad(f"{where}: 'split' must be one of {', '.join(KARPATHY_SPLITS)}, got {split!r}", None, rid)
            return
        for key, kind, default in (("filepath", str, ""), ("sentences", list, None)):
            if not isinstance(e.get(key, default), kind):
                yield Bad(f"{where}: '{key}' must be a {kind.__name__}, got {str(e.get(key))[:60]!r}", split, rid)
                return
        captions = []
        for j, s in enumerate(e["sentences"]):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str):
                yield Bad(f"{where}.sentences[{j}]: no 'raw' caption string", split, rid)
            elif not raw.strip():
                yield Bad(f"{where}.sentences[{j}]: empty caption", split, rid)
            else:
                captions.append(raw.strip())
        if not e["sentences"]:
            yield Bad(f"{where}: no caption", split, rid)
        if captions:
            image = os.path.join(folder, e.get("filepath", ""), e["filename"])
            yield {"id": rid, "split": split, "image": image, "captions": captions, "where": where}


@SOURCES.register("flickr30k")
class Flickr30k(CocoKarpathy):
    """Flickr30k in Karpathy's split (dataset_flickr30k.json), images in flickr30k-images/."""

    name = "flickr30k"
    id_kind = "flickr"

    @dataclass
    class Config(CocoKarpathy.Config):
        annotations: str = "dataset_flickr30k.json"
        images: str = "flickr30k-images"
        train_splits: list[str] = field(default_factory=lambda: ["train"])
        # nlphuji/flickr30k (its parquet export: config TEST): every image in split "test", Karpathy's split in
        # the `split` column
        hf_config: str = "TEST"
        hf_splits: dict[str, str] = field(default_factory=lambda: {"train": "test", "val": "test", "test": "test"})
        hf_columns: dict[str, str] = field(default_factory=lambda: {"image": "image", "file": "", "captions": "caption",
                                                                    "id": "filename", "split": "split"})


@SOURCES.register("coco2017")
class Coco2017(CaptionSource):
    """COCO 2017 captions in the COCO annotation format: train and val (test images have no captions)."""

    name = "coco2017"
    id_kind = "coco"
    offered_splits = ("train", "val")
    cache_options = ("images",)

    @dataclass
    class Config(CaptionConfig):
        annotations: str = "annotations/captions_{split}2017.json"  # under root; {split} is train or val
        images: str = "{split}2017"
        hf_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "validation"})
        hf_columns: dict[str, str] = field(default_factory=lambda: {
            "image": "image", "file": "", "captions": "captions", "id": "image_id", "split": ""})

    @classmethod
    def inputs(cls, cfg: Any) -> list[list[Any]]:
        return [file_stat(_file(cfg, cfg.annotations.format(split=s)), "annotations") for s in cls.offered_splits]

    @classmethod
    def read_files(cls, cfg: Any) -> Iterator[dict[str, Any] | Bad]:
        for split in cls.offered_splits:
            path = _file(cfg, cfg.annotations.format(split=split))
            yield from cls.parse_file(path, split, cfg.images.format(split=split))

    @staticmethod
    def parse_file(path: Path, split: str, folder: str) -> Iterator[dict[str, Any] | Bad]:
        """Records of one captions_*.json: captions grouped by image in file order."""
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
            raise BadInput(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
        images: dict[Any, tuple[int, str]] = {}
        for k, im in enumerate(data["images"]):
            if not (isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)):
                yield Bad(f"{path}: images[{k}]: needs an int 'id' and a 'file_name' string", split,
                          im.get("id") if isinstance(im, dict) else None)
            else:
                images[im["id"]] = (k, im["file_name"])
        captions: dict[Any, list[str]] = {i: [] for i in images}
        referenced: set[Any] = set()
        for k, a in enumerate(data["annotations"]):
            image_id = a.get("image_id") if isinstance(a, dict) else None
            caption = a.get("caption") if isinstance(a, dict) else None
            if image_id is not None and type(image_id) is not int:  # a list or dict is no id (and unhashable)
                yield Bad(f"{path}: annotations[{k}]: 'image_id' must be an int, got {str(image_id)[:60]}", split)
                continue
            if image_id not in images:
                yield Bad(f"{path}: annotations[{k}]: 'image_id' {image_id!r} is not in 'images'", split, image_id)
            elif not isinstance(caption, str) or not caption.strip():
                what = "empty caption" if isinstance(caption, str) else "no 'caption' string"
                name = images[image_id][1]
                yield Bad(f"{path}: annotations[{k}] (image {image_id}, {name}): {what}", split, image_id)
            else:
                captions[image_id].append(caption.strip())
            if image_id in images:
                referenced.add(image_id)
        for image_id, (k, name) in images.items():
            where = f"{path}: images[{k}] ({name})"
            if captions[image_id]:
                yield {"id": image_id, "split": split, "image": str(Path(folder, name)),
                       "captions": captions[image_id], "where": where}
            elif image_id not in referenced:  # an image whose every caption is bad was reported with them
                yield Bad(f"{where}: no caption", split, image_id)

"""Real-data sources built from annotation files: parsed once into a cache, then read one record at a time.

A source subclass says which files it reads (`inputs`), how it reads them (`read`: records, and `Bad`
entries for records it cannot use), which split a record is in (`split_of`) and how a record becomes a
Sample (`sample`, the one place a Sample is built). This module does the rest, the same way for every source:

- `prepare(cfg)` (rank 0, from `CaptionDataModule.prepare_data`) parses the files, checks that every image
  exists (with `verify_images`, that it decodes), and writes `records.jsonl` and `meta.json` under
  `<cache_dir>/data/<source>-<key>/`. The key holds the input files' sizes and mtimes, the options that
  change parsing and a format version; the image folders' mtimes are checked too. Prepared once, a second
  call returns at once, so every rank may call it.
- `Source(cfg, split)` reads `meta.json`, keeps the byte offsets of its split's records (minus excluded
  image ids) and applies the skip_bad policy to its split's bad records; a record is read from the JSON-lines
  file when its sample is built, so memory does not grow with the data set.
- An image that fails while training (deleted, or corrupt where only existence was checked): without
  skip_bad the BadInput names the file and the record; with skip_bad the sample is replaced by the next
  record whose image loads, and counted (the counter is shared with the loader workers) in `report()`.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from PIL import Image

from configs.files import atomic_open
from datamodules.decoded import DecodedCache
from datamodules.hub import load_hf_dataset
from datamodules.images import BadInput, BadRecords, load_image, require_image_file
from datamodules.source import SPLITS, Sample

log = logging.getLogger(__name__)
MAX_SUBSTITUTES = 50  # consecutive records tried in place of one whose image fails (skip_bad)


@dataclass
class RecordsConfig:
    """Options every file-based source shares; a source's own Config adds its files and sets its defaults."""

    root: str = "."  # the folder holding the data set's annotation files and image folders
    skip_bad: bool = False  # skip and count bad records and unreadable images instead of stopping at the first
    verify_images: bool = False  # decode every image once while preparing (slow, cached); else check they exist
    exclude_ids: list[str] = field(default_factory=list)  # files of image ids to leave out (a benchmark's images)
    max_images: int = 0  # only the first N images of each split (0: all), for smoke runs
    cache_dir: str = ".cache"
    hf_id: str = ""  # a Hugging Face datasets id, or a save_to_disk folder, instead of local annotation files
    hf_config: str = ""
    hf_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "validation", "test": "test"})
    hf_columns: dict[str, str] = field(default_factory=dict)  # which hub column holds what (per source)


@dataclass(frozen=True)
class Bad:
    """A record that cannot be used: the message (file and record first), its split and image id where known."""

    message: str
    split: str | None = None
    id: Any = None


def norm_id(value: Any) -> str:
    """An image id as compared across files: 391895, "391895", "COCO_val2014_000000391895.jpg" -> "391895"."""
    text = str(value).strip()
    if text.isdigit():
        return str(int(text))
    digits = re.findall(r"\d+", Path(text).stem)
    return str(int(digits[-1])) if digits else text


ID_KEYS = ("image_id", "cocoid", "img_id", "image_path", "image", "filename", "file_name")
COCO_NAME = re.compile(r"(^|[/_])coco_|COCO_(train|val|test)20\d\d_|(^|/)(train|val|test)20(14|17)/")
ExcludedIds = set[tuple[str | None, str]]  # (the dataset an id names, or None where the file does not say; the id)


def id_kind(key: str, value: Any, record: dict | None) -> str | None:
    """The dataset an exclude file's image id names, where the file says so: "coco" (Karpathy's `cocoid`, a COCO
    file name `COCO_val2014_000000391895.jpg` or 2017's `000000391895.jpg`, BLIP's `coco_391895`, a path under
    train2014/ or val2017/), "flickr" (a path under flickr30k-images/), "vg" (ARO's VG-Relation and
    VG-Attribution records, the ones with a box); None for a bare id."""
    text = str(value)
    if key == "cocoid" or COCO_NAME.search(text) or re.fullmatch(r"\d{12}\.jpg", Path(text).name):
        return "coco"
    if "flickr30k" in text.lower():
        return "flickr"
    if record is not None and "bbox_x" in record:
        return "vg"
    return None


def read_ids(paths: list[str]) -> ExcludedIds:
    """(dataset, image id) pairs from files: one id per line, a JSON list of ids, or JSON records (a list, or a dict
    of them as SugarCrepe ships) with an id or a file name (ARO's `image_id` / `image_path`, SugarCrepe's
    `filename`, BLIP's `image`); the dataset as `id_kind` tells it. A Visual Genome image that is also a COCO
    image is left out by its COCO id, and a COCO id never leaves out the VG image that has the same number."""
    ids: ExcludedIds = set()
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"exclude_ids: file not found: {path}")
        if path.suffix != ".json":
            ids.update((id_kind("", line, None), norm_id(line)) for line in path.read_text().split() if line.strip())
            continue
        items = json.loads(path.read_text())
        items = list(items.values()) if isinstance(items, dict) else items
        for k, item in enumerate(items):
            key, record = "", None
            if isinstance(item, dict):
                key = next((key for key in ID_KEYS if item.get(key) not in (None, "")), None)
                if key is None:
                    raise BadInput(f"{path}: [{k}]: no image id (looked for {', '.join(ID_KEYS)})")
                record, item = item, item[key]
            ids.add((id_kind(key, item, record), norm_id(item)))
    return ids


def is_excluded(kind: str | None, rid: Any, others: dict[str, Any] | None, excluded: ExcludedIds) -> bool:
    """Whether a record of dataset `kind` with image id `rid` (and the same image's ids in other datasets,
    `others`: a VG image's `coco_id`) is among the excluded ids; a bare id (no dataset) matches `rid`."""
    own = norm_id(rid)
    keys = {(kind, own), (None, own)} | {(k, norm_id(v)) for k, v in (others or {}).items() if v is not None}
    return not keys.isdisjoint(excluded)


def file_stat(path: Path, option: str) -> list[Any]:
    """[resolved path, size, mtime_ns] of an input file; a missing one names the option that points at it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (set data.options.{option}, or data.options.root)")
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _decode_problem(job: tuple[str, str]) -> str | None:
    """The BadInput message if the image does not decode, else None (run in a worker process)."""
    try:
        load_image(*job)
        return None
    except BadInput as e:
        return str(e)


class RecordSource:
    """Base of the file-based sources (COCO, Flickr30k, Visual Genome); see the module docstring."""

    name: ClassVar[str] = ""
    id_kind: ClassVar[str | None] = None  # the dataset whose image ids `id` holds ("coco", "flickr", "vg")
    Config: ClassVar[type] = RecordsConfig
    FORMAT_VERSION: ClassVar[int] = 2  # 2: meta.json holds each record's ids in other datasets
    offered_splits: ClassVar[tuple[str, ...]] = SPLITS
    cache_options: ClassVar[tuple[str, ...]] = ()  # options (besides the files) that change what `read` yields

    # -- what a source says ----------------------------------------------------------------------------
    @classmethod
    def inputs(cls, cfg: Any) -> list[list[Any]]:
        """file_stat(...) of every local annotation file `read` will parse."""
        raise NotImplementedError

    @classmethod
    def read(cls, cfg: Any, hub: dict[str, Any] | None) -> Iterator[dict[str, Any] | Bad]:
        """Records {"id", "split", "image" (path under root, or a row of hub[split]), "captions", "where", ...;
        optionally "other_ids": the image's ids in other datasets, {"coco": ...}} and Bad entries. `hub` maps each
        offered split to its hub dataset when `hf_id` is set."""
        raise NotImplementedError

    @classmethod
    def split_of(cls, cfg: Any, stored: str | None, image_id: Any) -> str | None:
        """The split a record belongs to, from its stored split (None: unknown, i.e. it concerns every split)."""
        return stored

    @classmethod
    def annotate(cls, cfg: Any, records: list[dict[str, Any]]) -> list[Bad]:
        """Work added to the records while preparing (a caption source parses its captions here); returns the
        Bad entries of records it could not annotate, which are then left out. None by default."""
        return []

    @classmethod
    def annotation_key(cls, cfg: Any) -> Any:
        """What `annotate` depends on besides the records (e.g. the parser's version), for the cache key."""
        return None

    # -- preparing the cache (once, on rank 0) ---------------------------------------------------------
    @classmethod
    def hub_datasets(cls, cfg: Any) -> dict[str, Any]:
        return {s: load_hf_dataset(cfg.hf_id, cfg.hf_config, cfg.hf_splits[s], f"{cls.name}: data.options.hf_id")
                for s in cls.offered_splits}

    @classmethod
    def cache_folder(cls, cfg: Any, hub: dict[str, Any] | None) -> Path:
        key: dict[str, Any] = {"source": cls.name, "version": cls.FORMAT_VERSION, "verify": cfg.verify_images,
                               "root": str(Path(cfg.root).resolve()),
                               "options": {k: getattr(cfg, k) for k in cls.cache_options},
                               "annotation": cls.annotation_key(cfg)}
        if hub is not None:
            key["hub"] = [cfg.hf_id, cfg.hf_config, dict(cfg.hf_columns), {s: d._fingerprint for s, d in hub.items()}]
        else:
            key["inputs"] = cls.inputs(cfg)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Path(cfg.cache_dir) / "data" / f"{cls.name}-{digest}"

    @staticmethod
    def _fresh(folder: Path) -> bool:
        """meta.json is there and no image folder changed since (a fixed or added image re-prepares)."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return all(os.path.isdir(d) and os.stat(d).st_mtime_ns == t for d, t in meta["image_dirs"].items())

    @classmethod
    def prepare(cls, cfg: Any) -> Path:
        """Parse the annotation files into the cache folder, unless done already; returns the folder."""
        hub = cls.hub_datasets(cfg) if cfg.hf_id else None
        folder = cls.cache_folder(cfg, hub)
        if cls._fresh(folder):
            return folder
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        records: list[dict[str, Any]] = []
        bad: list[Bad] = []
        collecting = gc.isenabled()
        gc.disable()  # millions of small containers: the cyclic collector would rescan them again and again
        try:
            for item in cls.read(cfg, hub):
                (bad if isinstance(item, Bad) else records).append(item)
        finally:
            if collecting:
                gc.enable()
        unannotated = cls.annotate(cfg, records)
        if unannotated:
            left_out = {(b.split, b.id) for b in unannotated}
            records = [r for r in records if (r.get("split"), r["id"]) not in left_out]
            bad += unannotated
        problems = cls._image_problems(cfg, records, hub)
        bad += [Bad(problems[k], records[k].get("split"), records[k]["id"]) for k in sorted(problems)]
        offsets, ids, splits, others = [], [], [], []
        with atomic_open(folder / "records.jsonl", "wb") as f:
            for k, r in enumerate(records):
                if k not in problems:
                    offsets.append(f.tell())
                    ids.append(r["id"])
                    splits.append(r.get("split"))
                    others.append(r.get("other_ids"))
                    f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
        dirs = {str((Path(cfg.root) / p).resolve()) for p in {os.path.dirname(r["image"]) for r in records
                                                               if isinstance(r["image"], str)}}
        seconds = time.perf_counter() - start
        meta = {"offsets": offsets, "ids": ids, "splits": splits, "other_ids": others, "bad": [asdict(b) for b in bad],
                "image_dirs": {d: os.stat(d).st_mtime_ns for d in sorted(dirs) if os.path.isdir(d)},
                "stats": {"records": len(offsets), "bad": len(bad), "seconds": round(seconds, 2)}}
        with atomic_open(folder / "meta.json") as f:
            json.dump(meta, f)
        print(f"{cls.name}: prepared {len(offsets)} records ({len(bad)} bad) in {seconds:.1f} s, cached in {folder}")
        return folder

    @classmethod
    def _image_problems(cls, cfg: Any, records: list[dict[str, Any]], hub: dict[str, Any] | None) -> dict[int, str]:
        """Record index -> why its image cannot be used: missing always, undecodable with verify_images."""
        problems: dict[int, str] = {}
        jobs: list[tuple[int, tuple[str, str]]] = []
        for k, r in enumerate(records):
            if isinstance(r["image"], str):
                path = os.path.join(cfg.root, r["image"])  # (os.path: pathlib costs seconds over 100k images)
                if os.path.isfile(path):
                    jobs.append((k, (path, r["where"])))
                else:
                    try:
                        require_image_file(path, r["where"])
                    except BadInput as e:
                        problems[k] = str(e)
            elif cfg.verify_images and hub is not None:
                try:
                    images = hub.get(r["split"]) or next(iter(hub.values()))  # (VG: one dataset serves every split)
                    hub_image(images, r["image"], cfg.hf_columns["image"], r["where"])
                except BadInput as e:
                    problems[k] = str(e)
        if cfg.verify_images and jobs:
            with ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for (k, _), problem in zip(jobs, pool.map(_decode_problem, [j for _, j in jobs], chunksize=64)):
                    if problem:
                        problems[k] = problem
        return problems

    # -- one split, on every rank ----------------------------------------------------------------------
    def __init__(self, cfg: Any, split: str) -> None:
        if split not in self.offered_splits:
            raise ValueError(f"{self.name} has the splits {', '.join(self.offered_splits)}, not '{split}'")
        self.cfg, self.split, self.root = cfg, split, Path(cfg.root)
        folder = self.prepare(cfg)
        meta = json.loads((folder / "meta.json").read_text())
        self.path = folder / "records.jsonl"
        excluded = read_ids(list(cfg.exclude_ids))
        keep, self.excluded = [], 0
        for offset, stored, rid, others in zip(meta["offsets"], meta["splits"], meta["ids"], meta["other_ids"]):
            if self.split_of(cfg, stored, rid) == split:
                if is_excluded(self.id_kind, rid, others, excluded):
                    self.excluded += 1
                else:
                    keep.append(offset)
        self.offsets = array("q", keep[:cfg.max_images] if cfg.max_images > 0 else keep)
        if not self.offsets:
            raise ValueError(f"{self.name}/{split}: no usable images ({meta['stats']['records']} records prepared, "
                             f"{self.excluded} excluded, {len(meta['bad'])} bad) in {cfg.hf_id or cfg.root}")
        self.bad = BadRecords(cfg.skip_bad)
        mine = [b["message"] for b in meta["bad"] if (b["id"] is None or not is_excluded(self.id_kind, b["id"], None,
                                                                                          excluded))
                and self.split_of(cfg, b["split"], b["id"]) in (None, split)]
        for k, message in enumerate(mine):
            note = "" if cfg.skip_bad or k else (f" [{len(mine)} bad record(s) in {self.name}/{split}; "
                                                 f"data.options.skip_bad=true skips them and counts them]")
            self.bad.guard(lambda: _raise(message + note))
        if self.bad.count:
            log.warning(self.bad.note(f"{self.name}/{split}"))
        self.hub = self.hub_datasets(cfg)[split] if cfg.hf_id and cfg.hf_columns.get("image") else None
        self._file: Any = None
        self._pid = -1
        self.decoded: DecodedCache | None = None  # image files decoded once (data.image_cache)
        self.substituted = multiprocessing.get_context().Value("i", 0)  # shared with forked or spawned workers

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, index: int) -> dict[str, Any]:
        """Record `index` of this split, read from the cache (one open file per process)."""
        if self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(self.offsets[index])
        return json.loads(self._file.readline())

    def __getitem__(self, index: int) -> Sample:
        for k in range(min(len(self), MAX_SUBSTITUTES)):
            record = self.record((index + k) % len(self))
            try:
                return self.sample(record)
            except BadInput as e:
                if not self.cfg.skip_bad:
                    raise
                with self.substituted.get_lock():
                    self.substituted.value += 1
                log.warning("%s (skip_bad: replaced by the next record)", e)
        raise BadInput(f"{self.name}/{self.split}: the images of {MAX_SUBSTITUTES} records in a row from {index} "
                       f"cannot be read; check {self.root}")

    def image(self, record: dict[str, Any]) -> Image.Image:
        if isinstance(record["image"], str):
            if self.decoded is not None:  # set by the DataModule with data.image_cache (datamodules/decoded.py)
                return self.decoded.get(self.root / record["image"], record["where"])
            return load_image(self.root / record["image"], record["where"])
        return hub_image(self.hub, record["image"], self.cfg.hf_columns["image"], record["where"])

    def sample(self, record: dict[str, Any]) -> Sample:
        """The Sample of a record: the one place a source builds one (subclasses add graphs)."""
        return Sample(image=self.image(record), captions=list(record["captions"]), key=record["where"])

    def report(self) -> dict[str, Any]:
        """What was left out of this split and why: for the run folder's data_report.json."""
        return {"source": self.name, "split": self.split, "images": len(self), "excluded_images": self.excluded,
                "skipped_records": self.bad.count, "skipped_first": self.bad.skipped[:5],
                "substituted_images": int(self.substituted.value)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__, _file=None, _pid=-1)
        if not _spawning():  # the shared counter travels only to a process being started; a copy counts alone
            state["substituted"] = _Counter(int(self.substituted.value))
        return state


def _spawning() -> bool:
    from multiprocessing import context

    return context.get_spawning_popen() is not None


class _Counter:
    """A process-local stand-in for the shared counter, in a copy of a source made outside process start-up."""

    def __init__(self, value: int) -> None:
        self.value = value

    def get_lock(self) -> Any:
        return contextlib.nullcontext()


def _raise(message: str) -> None:
    raise BadInput(message)


def hub_image(dataset: Any, row: int, column: str, where: str) -> Image.Image:
    """The image in `column` of a hub dataset's row, as RGB, or a BadInput naming the record."""
    try:
        value = dataset[int(row)][column]
        if isinstance(value, dict):  # an undecoded Image feature: {"bytes", "path"}
            import io

            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        return value.convert("RGB")
    except BadInput:
        raise
    except Exception as e:  # datasets and PIL raise many types for a bad image
        raise BadInput(f"{where}: cannot read image in column '{column}': {e.__class__.__name__}: {e}") from None

"""Real-data sources built from annotation files: parsed once into a cache, then read one record at a time.

A source subclass says which files it reads (`inputs`), how it reads them (`read`: records, and `Bad`
entries for records it cannot use), which split a record is in (`split_of`) and how a record becomes a
Sample (`sample`, the one place a Sample is built). This module does the rest, the same way for every source:

- `prepare(cfg)` (rank 0, from `CaptionDataModule.prepare_data`) parses the files, checks that every image
  exists (with `verify_images`, that it decodes), and writes `records.jsonl` and `meta.json` under
  `<cache_dir>/data/<source>-<key>/`. The key holds the input files' sizes and mtimes, the options that
  change parsing and a format version. meta.json also holds the state of every image folder the records name
  or the source looks in (its mtime, or that it is missing: a folder that appears later counts) and the size
  and digest of records.jsonl; a changed folder, or a records.jsonl of another size (torn, truncated), makes
  the cache stale and it is prepared again. meta.json is removed before records.jsonl is rewritten, so a crash
  between the two leaves no meta.json, never one that describes another records.jsonl. Prepared once, a second
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
from datamodules.jsonstream import read_text
from datamodules.source import SPLITS, Sample

log = logging.getLogger(__name__)
MAX_SUBSTITUTES = 50  # consecutive records tried in place of one whose image fails (skip_bad)


class CacheDamaged(RuntimeError):
    """A prepared-data cache file that cannot be read back (not a BadInput: skip_bad must not skip it)."""


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
    """(dataset, image id) pairs from files: one id per line, a JSON list of ids, JSON records (a list, or a dict
    of them as SugarCrepe ships) with an id or a file name (ARO's `image_id` / `image_path`, SugarCrepe's
    `filename`, BLIP's `image`), or JSON lines (`.jsonl`: one record or id per line); the dataset as `id_kind`
    tells it. A Visual Genome image that is also a COCO image is left out by its COCO id, and a COCO id never
    leaves out the VG image that has the same number. A file that is none of these is a BadInput naming the
    file and the record."""
    ids: ExcludedIds = set()
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"exclude_ids: file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            for n, line in enumerate(read_text(path).splitlines(), 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadInput(f"{path}:{n}: malformed JSON at column {e.colno}: {e.msg}") from None
                    ids.add(_excluded_id(item, f"{path}:{n}"))
        elif suffix == ".json":
            try:
                items = json.loads(read_text(path))
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
            if isinstance(items, dict):  # SugarCrepe's {"0": {record}, ...}
                for k, item in items.items():
                    if not isinstance(item, dict):
                        raise BadInput(f"{path}: [{k!r}]: a JSON object's values must be records (objects), got "
                                       f"{str(item)[:60]}")
                    ids.add(_excluded_id(item, f"{path}: [{k!r}]"))
            elif isinstance(items, list):
                ids.update(_excluded_id(item, f"{path}: [{k}]") for k, item in enumerate(items))
            else:
                raise BadInput(f"{path}: exclude_ids needs a JSON list (of ids or records) or an object of records, "
                               f"got a {type(items).__name__}: {str(items)[:60]}")
        else:
            ids.update((id_kind("", line, None), norm_id(line)) for line in read_text(path).split() if line.strip())
    return ids


def _excluded_id(item: Any, where: str) -> tuple[str | None, str]:
    """(dataset, id) of one entry of an exclude file: a bare id (a string or an int), or a record holding one."""
    key, record = "", None
    if isinstance(item, dict):
        key = next((key for key in ID_KEYS if item.get(key) not in (None, "")), None)
        if key is None:
            raise BadInput(f"{where}: no image id (looked for {', '.join(ID_KEYS)})")
        record, item = item, item[key]
    if isinstance(item, bool) or not isinstance(item, (str, int)) or (isinstance(item, str) and not item.strip()):
        what = f"'{key}'" if key else "an entry"
        raise BadInput(f"{where}: {what} must be an image id (a string or an int) or a record, got {str(item)[:60]}")
    return id_kind(key, item, record), norm_id(item)


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
    # 2: meta.json holds each record's ids in other datasets; 3: missing image folders and records.jsonl's size
    FORMAT_VERSION: ClassVar[int] = 3
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

    @classmethod
    def image_folders(cls, cfg: Any) -> list[str]:
        """Folders under root that `read` looks for images in, besides those the records name: their state (there
        or not, mtime) is part of the cache's freshness. None by default (Visual Genome: VG_100K, VG_100K_2)."""
        return []

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
        """meta.json is there, records.jsonl has the size meta.json gives it, and no image folder changed since,
        appeared or went (a fixed or added image, or a folder unzipped later, re-prepares)."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            dirs, size = dict(meta["image_dirs"]), int(meta["records_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        try:
            actual = os.stat(folder / "records.jsonl").st_size
        except OSError:
            actual = None
        if actual != size:
            log.warning("%s: %s, meta.json gives %d bytes (a torn or truncated cache): prepared again",
                        folder / "records.jsonl", "missing" if actual is None else f"{actual} bytes", size)
            return False
        return all(_dir_state(d) == t for d, t in dirs.items())

    @classmethod
    def _dir_states(cls, cfg: Any, folders: Any) -> dict[str, int | None]:
        """Resolved folder (under root) -> its mtime_ns, or None where it is not there (yet)."""
        return {d: _dir_state(d) for d in sorted({str((Path(cfg.root) / f).resolve()) for f in folders})}

    @classmethod
    def prepare(cls, cfg: Any) -> Path:
        """Parse the annotation files into the cache folder, unless done already; returns the folder."""
        hub = cls.hub_datasets(cfg) if cfg.hf_id else None
        folder = cls.cache_folder(cfg, hub)
        if cls._fresh(folder):
            return folder
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)  # a crash from here on leaves no meta.json: prepared again
        # folder states are taken before images are looked for (here while reading, VG's folder of each image;
        # then every image's existence), so an image added meanwhile changes a folder after its state was taken
        watched = cls._dir_states(cfg, [] if hub is not None else cls.image_folders(cfg))
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
        watched = cls._dir_states(cfg, {os.path.dirname(r["image"]) for r in records if isinstance(r["image"], str)}
                                  ) | watched
        problems = cls._image_problems(cfg, records, hub)
        bad += [Bad(problems[k], records[k].get("split"), records[k]["id"]) for k in sorted(problems)]
        offsets, ids, splits, others = [], [], [], []
        digest = hashlib.sha1()
        with atomic_open(folder / "records.jsonl", "wb") as f:
            for k, r in enumerate(records):
                if k not in problems:
                    offsets.append(f.tell())
                    ids.append(r["id"])
                    splits.append(r.get("split"))
                    others.append(r.get("other_ids"))
                    line = json.dumps(r, ensure_ascii=False).encode() + b"\n"
                    digest.update(line)
                    f.write(line)
            size = f.tell()
        seconds = time.perf_counter() - start
        meta = {"offsets": offsets, "ids": ids, "splits": splits, "other_ids": others, "bad": [asdict(b) for b in bad],
                "image_dirs": watched, "records_size": size, "records_sha1": digest.hexdigest(),
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
        for attempt in range(3):
            folder = self.prepare(cfg)
            try:
                meta = json.loads((folder / "meta.json").read_text())
                break
            except (OSError, ValueError):  # another process began preparing it again (meta.json goes first)
                if attempt == 2:
                    raise
        self.path = folder / "records.jsonl"
        self.records_size = meta["records_size"]
        self.prepared = {"records_sha1": meta["records_sha1"], "image_dirs": meta["image_dirs"]}
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
            size = os.fstat(self._file.fileno()).st_size
            if size != self.records_size:  # these offsets are of another records.jsonl
                self._file.close()
                self._file, self._pid = None, -1
                raise CacheDamaged(f"{self.path}: {size} bytes, not the {self.records_size} this split's offsets were "
                                   "read for: it was prepared again (or damaged) since; start again (if it is damaged, "
                                   f"delete the folder {self.path.parent} and it is prepared again)")
        offset = self.offsets[index]
        self._file.seek(offset)
        line = self._file.readline()
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: the file changed under meta.json
            raise CacheDamaged(f"{self.path}: byte {offset} (record {index} of {self.name}/{self.split}): damaged "
                               f"prepared-data cache ({e.__class__.__name__}: {e}); delete the folder "
                               f"{self.path.parent} and it is prepared again") from None
        if not isinstance(record, dict):
            raise CacheDamaged(f"{self.path}: byte {offset} (record {index} of {self.name}/{self.split}): damaged "
                               f"prepared-data cache (not a record); delete the folder {self.path.parent} and it "
                               "is prepared again")
        return record

    def identity(self) -> dict[str, Any]:
        """What this split's samples are made of, for the keys of caches built from them (NegCLIP's neighbour
        table): the prepared records' digest, the image folders' states and which records the split keeps."""
        return dict(self.prepared, source=self.name, split=self.split,
                    offsets=hashlib.sha1(self.offsets.tobytes()).hexdigest())

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


def _dir_state(path: str) -> int | None:
    """A folder's mtime_ns, or None where there is no folder (yet)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns if os.path.isdir(path) else None


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

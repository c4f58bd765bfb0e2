"""Visual Genome: each image's scene graph with boxes, from the released JSON files (v1.2 / v1.4 layout).

Files under root (see benchmarks.md section 3): image_data.json (the images: `image_id` or `id`, width,
height), objects.json, attributes.json, relationships.json (one entry per image: {image_id | id, objects |
attributes | relationships: [...]}) and, optionally, region_descriptions.json ({id | image_id, regions:
[{phrase, ...}]}). Images: <root>/VG_100K/<id>.jpg or <root>/VG_100K_2/<id>.jpg. The files are read as
streams (hundreds of MB each) and reduced once, in `prepare`, to one compact JSON line per image.

The graph: objects merged by `object_id` across the three files (v1.4's `merged_object_ids` point at the
object they were merged into); a name (`names[0]` or `name`, lower case); the box (x, y, w, h in pixels, as
VG gives it); the attributes of attributes.json (the key may be missing: none); the relations of
relationships.json (predicate lower-cased, spaces collapsed: "ON" -> "on"); duplicates dropped.

Captions, decided here: with `region_descriptions` set, the image's region phrases. Otherwise they are
rendered from the graph in ARO's style, relations first: "the man is wearing the shirt" (ARO VG-Relation's
template; "is" is left out before a predicate that starts with is/are/has/have), then one per attribute: "the
green clock" (one half of ARO VG-Attribution's). A rendered caption's exact graph (its objects with boxes)
goes into `Sample.extra["caption_graphs"]`. An image with nothing to caption is left out (counted at prepare).

Split: VG has none. An image is in val when a hash of its id falls below `val_fraction`, in test below
`val_fraction + test_fraction`, else in train; adding or removing images never moves another image.
ARO's VG-Relation and VG-Attribution test images are VG images: leave them out with `exclude_ids`.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datamodules.graph import Entity, Relation, SceneGraph
from datamodules.hub import load_hf_dataset
from datamodules.jsonstream import iter_json_array
from datamodules.records import Bad, RecordsConfig, RecordSource, file_stat, norm_id
from datamodules.source import SOURCES, Sample

log = logging.getLogger(__name__)
FILES = ("objects", "attributes", "relationships", "region_descriptions")
LIST_KEY = {"objects": "objects", "attributes": "attributes", "relationships": "relationships",
            "region_descriptions": "regions"}
FINITE = {"is", "are", "has", "have"}  # a predicate that starts with these takes no "is"


def clean(text: str) -> str:
    """Lower case, spaces collapsed: VG's names and predicates differ in case ("ON", "on")."""
    return " ".join(text.lower().split())


def relation_caption(subject: str, predicate: str, obj: str) -> str:
    verb = "" if predicate.split()[0] in FINITE else "is "
    return f"the {subject} {verb}{predicate} the {obj}"


def parse_object(o: Any) -> tuple[int, str, list[float], Any]:
    """(object_id, name, box, merged ids) of an object element; ValueError says what is wrong. (Called for
    every object of every file, millions of times: plain type checks, no pathlib, no generators.)"""
    if type(o) is not dict:
        raise ValueError(f"not an object: {str(o)[:80]}")
    oid = o["object_id"] if "object_id" in o else o.get("id")
    if type(oid) is not int:
        raise ValueError("no int 'object_id'")
    names = o.get("names")
    name = names[0] if type(names) is list and names else o.get("name")
    if type(name) is not str or not name.strip():
        raise ValueError(f"object {oid}: no name ('names' or 'name')")
    box = [o.get("x"), o.get("y"), o.get("w"), o.get("h")]
    for v in box:
        if type(v) is not int and type(v) is not float:
            raise ValueError(f"object {oid}: box x, y, w, h must be numbers, got {box}")
    merged = o.get("merged_object_ids")
    if merged is None:
        return oid, clean(name), box, ()
    if type(merged) is not list or not all(type(m) is int for m in merged):
        raise ValueError(f"object {oid}: 'merged_object_ids' must be a list of int object ids, got {str(merged)[:80]}")
    return oid, clean(name), box, merged


class Graphs:
    """Objects, relations and region phrases of every image, gathered across the files."""

    def __init__(self) -> None:
        self.objects: dict[int, dict[int, list[Any]]] = defaultdict(dict)  # image -> object id -> [name, attrs, box]
        self.alias: dict[int, dict[int, int]] = defaultdict(dict)  # image -> merged id -> object id
        self.relations: dict[int, list[tuple[int, str, int]]] = defaultdict(list)
        self.regions: dict[int, list[str]] = defaultdict(list)

    def add_object(self, image: int, o: Any) -> int:
        oid, name, box, merged = parse_object(o)
        oid = self.alias[image].get(oid, oid)
        self.objects[image].setdefault(oid, [name, [], box])
        for m in merged:
            self.alias[image][m] = oid
        return oid

    def add(self, kind: str, image: int, element: Any) -> None:
        """One element of an image's list in file `kind`."""
        if kind == "objects":
            self.add_object(image, element)
        elif kind == "attributes":
            attrs = element.get("attributes") if isinstance(element, dict) else None
            attrs = [] if attrs is None else attrs  # the key is missing on objects without attributes
            if not isinstance(attrs, list) or not all(isinstance(a, str) for a in attrs):
                raise ValueError(f"'attributes' must be a list of strings, got {str(attrs)[:80]}")
            known = self.objects[image][self.add_object(image, element)][1]
            known += [a for a in dict.fromkeys(clean(a) for a in attrs) if a and a not in known]
        elif kind == "relationships":
            if not isinstance(element, dict) or not isinstance(element.get("predicate"), str):
                raise ValueError("no 'predicate' string")
            predicate = clean(element["predicate"])
            if not predicate:
                raise ValueError("empty predicate")
            subject = self.add_object(image, element.get("subject"))
            rel = (subject, predicate, self.add_object(image, element.get("object")))
            if rel not in self.relations[image]:
                self.relations[image].append(rel)
        else:
            phrase = element.get("phrase") if isinstance(element, dict) else None
            if not isinstance(phrase, str):
                raise ValueError("no 'phrase' string")
            if not phrase.strip():
                raise ValueError("empty caption")
            if phrase.strip() not in self.regions[image]:
                self.regions[image].append(phrase.strip())

    def record(self, image: int, use_regions: bool) -> tuple[dict[str, Any], list[str], list[list[Any]]]:
        """(compact graph, captions, what each caption renders: ["r", relation] or ["a", object, attribute])."""
        ids = list(self.objects.get(image, {}))
        index = {oid: i for i, oid in enumerate(ids)}
        objects = [self.objects[image][oid] for oid in ids]
        relations = [[index[s], p, index[o]] for s, p, o in self.relations.get(image, [])]
        if use_regions:
            return {"objects": objects, "relations": relations}, list(self.regions.get(image, [])), []
        captions: dict[str, list[Any]] = {}
        for k, (s, p, o) in enumerate(relations):
            captions.setdefault(relation_caption(objects[s][0], p, objects[o][0]), ["r", k])
        for i, (name, attrs, _) in enumerate(objects):
            for j, a in enumerate(attrs):
                captions.setdefault(f"the {a} {name}", ["a", i, j])
        return {"objects": objects, "relations": relations}, list(captions), list(captions.values())


@SOURCES.register("visual_genome")
class VisualGenome(RecordSource):
    """Visual Genome images with their scene graphs (boxes included) and captions; see the module docstring."""

    name = "visual_genome"
    id_kind = "vg"
    cache_options = ("region_descriptions", "image_folders")

    @dataclass
    class Config(RecordsConfig):
        image_data: str = "image_data.json"
        objects: str = "objects.json"
        attributes: str = "attributes.json"
        relationships: str = "relationships.json"
        region_descriptions: str = ""  # e.g. region_descriptions.json: its phrases become the captions
        image_folders: list[str] = field(default_factory=lambda: ["VG_100K", "VG_100K_2"])
        val_fraction: float = 0.02
        test_fraction: float = 0.02
        # hub: every image in one split; hf_config lists configs ("attributes_v1.2.0,relationships_v1.2.0"),
        # the first one's rows hold the images
        hf_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "train", "test": "train"})
        hf_columns: dict[str, str] = field(default_factory=lambda: {"image": "image"})

    @classmethod
    def files(cls, cfg: Any) -> dict[str, Path]:
        names = {"image_data": cfg.image_data, **{k: getattr(cfg, k) for k in FILES}}
        return {k: Path(cfg.root) / v for k, v in names.items() if v}

    @classmethod
    def inputs(cls, cfg: Any) -> list[list[Any]]:
        return [file_stat(path, option) for option, path in cls.files(cfg).items()]

    @classmethod
    def split_of(cls, cfg: Any, stored: str | None, image_id: Any) -> str | None:
        if image_id is None:
            return None
        u = int(hashlib.sha1(f"vg-{norm_id(image_id)}".encode()).hexdigest()[:8], 16) / 16 ** 8
        return "val" if u < cfg.val_fraction else "test" if u < cfg.val_fraction + cfg.test_fraction else "train"

    @classmethod
    def hub_datasets(cls, cfg: Any) -> dict[str, Any]:
        first = load_hf_dataset(cfg.hf_id, cfg.hf_config.split(",")[0], cfg.hf_splits["train"], f"{cls.name}: hf_id")
        return {s: first for s in cls.offered_splits}

    @classmethod
    def entries(cls, cfg: Any, hub: dict[str, Any] | None) -> Iterator[tuple[str, str, int, Any]]:
        """(kind, where, index, entry) over image_data then every annotation file (or hub config's rows)."""
        if hub is None:
            for kind, path in cls.files(cfg).items():
                yield from ((kind, str(path), k, e) for k, e in iter_json_array(path))
            return
        configs = cfg.hf_config.split(",")
        for n, config in enumerate(configs):
            ds = hub["train"] if n == 0 else load_hf_dataset(cfg.hf_id, config, cfg.hf_splits["train"], cls.name)
            lists = [c for c in ds.column_names if c in LIST_KEY.values()]
            rows = ds.remove_columns([cfg.hf_columns["image"]]) if cfg.hf_columns["image"] in ds.column_names else ds
            for k, row in enumerate(rows):
                if n == 0:
                    yield "image_data", f"hf:{cfg.hf_id}/{config}", k, row
                for key in lists:
                    kind = next(f for f, v in LIST_KEY.items() if v == key)
                    yield kind, f"hf:{cfg.hf_id}/{config}", k, {"image_id": row.get("image_id"), key: row[key]}

    @classmethod
    def read(cls, cfg: Any, hub: dict[str, Any] | None) -> Iterator[dict[str, Any] | Bad]:
        graphs, images = Graphs(), {}  # images: id -> (where, width, height, hub row)
        for kind, path, k, e in cls.entries(cfg, hub):
            image = e.get("image_id", e.get("id")) if isinstance(e, dict) else None
            where = f"{path}: [{k}] (image {image})"
            if not isinstance(image, int):
                yield Bad(f"{path}: [{k}]: no int 'image_id' (or 'id')")
                continue
            if kind == "image_data":
                # about 51k VG images are COCO images: their COCO id leaves them out where a COCO test set is
                # excluded (None where the image is not one)
                others = {d: e.get(f"{d}_id") for d in ("coco", "flickr") if isinstance(e.get(f"{d}_id"), int)}
                images[image] = (where, e.get("width"), e.get("height"), k, others or None)
                continue
            if image not in images:
                yield Bad(f"{where}: image_id {image} is not in image_data", None, image)
                continue
            items = e.get(LIST_KEY[kind])
            if not isinstance(items, list):
                yield Bad(f"{where}: '{LIST_KEY[kind]}' must be a list", None, image)
                continue
            for j, element in enumerate(items):
                try:
                    graphs.add(kind, image, element)
                except ValueError as err:
                    yield Bad(f"{where}.{LIST_KEY[kind]}[{j}]: {err}", None, image)
        uncaptioned = 0
        for image, (where, width, height, row, others) in images.items():
            graph, captions, parts = graphs.record(image, bool(cfg.region_descriptions))
            if not captions:
                uncaptioned += 1
                continue
            yield {"id": image, "split": None, "image": row if hub is not None else cls.image_path(cfg, image),
                   "captions": captions, "parts": parts, "graph": graph, "size": [width, height], "where": where,
                   "other_ids": others}
        if uncaptioned:
            log.warning("%s: %d images have nothing to caption (no relation, attribute or region): left out",
                        cls.name, uncaptioned)

    @classmethod
    def image_folders(cls, cfg: Any) -> list[str]:
        """Every image folder, watched by the cache whether it is there or not: a folder added later (VG_100K_2 unzipped
        after a first run) or an image added to one makes the prepared records stale, so each image is looked for
        again (`image_path`)."""
        return list(cfg.image_folders)

    @staticmethod
    def image_path(cfg: Any, image: int) -> str:
        """<folder>/<id>.jpg in the first image folder that has it (the first one if none does)."""
        names = [str(Path(folder, f"{image}.jpg")) for folder in cfg.image_folders]
        return next((n for n in names if (Path(cfg.root) / n).is_file()), names[0])

    def __init__(self, cfg: Any, split: str) -> None:
        super().__init__(cfg, split)
        if split == "train" and not cfg.exclude_ids:
            log.warning("visual_genome: exclude_ids is empty, so ARO's VG-Relation and VG-Attribution test images "
                        "are in this training split; leave them out with data.options.exclude_ids="
                        "[<aro>/visual_genome_relation.json,<aro>/visual_genome_attribution.json]")

    def sample(self, record: dict[str, Any]) -> Sample:
        g = record["graph"]
        graph = SceneGraph(tuple(Entity(n, tuple(a), tuple(map(float, b))) for n, a, b in g["objects"]),  # type: ignore
                           tuple(Relation(s, p, o) for s, p, o in g["relations"]))
        extra = {"caption_graphs": [caption_graph(graph, part) for part in record["parts"]]} if record["parts"] else {}
        return Sample(image=self.image(record), captions=list(record["captions"]), graph=graph, key=record["where"],
                      extra=extra)


def caption_graph(graph: SceneGraph, part: list[Any]) -> SceneGraph:
    """The exact graph of one rendered caption: a relation's two objects, or one object with one attribute."""
    if part[0] == "a":
        o = graph.objects[part[1]]
        return SceneGraph((Entity(o.name, (o.attributes[part[2]],), o.box),))
    r = graph.relations[part[1]]
    s, o = graph.objects[r.subject], graph.objects[r.object]
    if r.subject == r.object:
        return SceneGraph((Entity(s.name, (), s.box),), (Relation(0, r.predicate, 0),))
    return SceneGraph((Entity(s.name, (), s.box), Entity(o.name, (), o.box)), (Relation(0, r.predicate, 1),))

"""Visual Genome on fixtures in the released layout: graphs with boxes merged across files, captions, the
id-hash split, ARO exclusion, bad input named by file and record, the cache, and a hub dataset."""
from __future__ import annotations

import hashlib
import json
import logging

import pytest

from datamodules.fields import FIELDS
from datamodules.graph import Entity, Relation, SceneGraph
from datamodules.images import BadInput
from datamodules.visual_genome import VisualGenome
from fixtures.make_train_data import COLOURS, THINGS, make_vg

VG = VisualGenome


def cfg_of(root, tmp_path, **kw):
    kw = {"val_fraction": 0.0, "test_fraction": 0.0, **kw}  # everything in train unless a test asks for splits
    return VG.Config(root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def test_graphs_with_boxes_merged_across_files(tmp_path):
    make_vg(tmp_path / "vg")
    src = VG(cfg_of(tmp_path / "vg", tmp_path), "train")
    assert len(src) == 12
    s = src[0]  # image 1: benchmarks.md's real records (merged object id, "name" vs "names", "ON")
    shade, sidewalk, clock = (2.0, 3.0, 27.0, 20.0), (7.0, 22.0, 40.0, 15.0), (38.0, 2.0, 8.0, 9.0)
    assert s.graph == SceneGraph(
        (Entity("shade", ("red",), shade), Entity("sidewalk", ("yellow", "small"), sidewalk),
         Entity("clock", (), clock)),
        (Relation(0, "on", 1),))  # the relation's object 5046 is sidewalk (merged into 1058534); duplicate dropped
    assert s.captions == ["the shade is on the sidewalk", "the red shade", "the yellow sidewalk", "the small sidewalk"]
    assert s.extra["caption_graphs"] == [
        SceneGraph((Entity("shade", (), shade), Entity("sidewalk", (), sidewalk)), (Relation(0, "on", 1),)),
        SceneGraph((Entity("shade", ("red",), shade),)), SceneGraph((Entity("sidewalk", ("yellow",), sidewalk),)),
        SceneGraph((Entity("sidewalk", ("small",), sidewalk),))]
    assert s.key.endswith("image_data.json: [0] (image 1)") and s.image.size == (48, 40)
    # upper-case names lowered; "has" takes no "is"; a multi-word predicate keeps its words
    assert src[4].captions[0] == f"the {THINGS[4]} has the {THINGS[6]}"
    assert src[5].captions[0] == f"the {THINGS[5]} is in front of the {THINGS[7]}"
    assert src[2].graph.objects[1].attributes == (COLOURS[5], "small")
    # the boxes field reads the graph: fractions of the image size
    boxes = FIELDS.get("boxes")(s, 0, None)
    assert boxes[0].tolist() == pytest.approx([2 / 48, 3 / 40, 27 / 48, 20 / 40])


def test_region_descriptions_as_captions(tmp_path):
    info = make_vg(tmp_path / "vg")
    src = VG(cfg_of(tmp_path / "vg", tmp_path, region_descriptions="region_descriptions.json"), "train")
    assert src[3].captions == [r["phrase"] for r in info["regions"][3]["regions"]]
    assert "caption_graphs" not in src[3].extra and src[3].graph.relations  # the graph stays


def test_split_by_id_hash_is_deterministic_and_disjoint(tmp_path):
    info = make_vg(tmp_path / "vg", n=40)
    cfg = cfg_of(tmp_path / "vg", tmp_path, val_fraction=0.25, test_fraction=0.25)
    ids = {s: [VG(cfg, s).record(k)["id"] for k in range(len(VG(cfg, s)))] for s in ("train", "val", "test")}
    assert sorted(sum(ids.values(), [])) == sorted(e["image_id"] for e in info["image_data"])
    assert all(ids[s] for s in ids) and ids == {s: [VG(cfg, s).record(k)["id"] for k in range(len(VG(cfg, s)))]
                                                for s in ids}
    # an image's split depends on its id alone: removing other images moves nothing
    assert all(VG.split_of(cfg, None, i) == s for s in ids for i in ids[s])
    # and it is the documented stable hash, computed here independently (so it holds in every process, whatever
    # PYTHONHASHSEED): u = the first 8 hex digits of sha1("vg-<id>") / 16**8; val below 0.25, test below 0.5
    def expected(image_id):
        u = int(hashlib.sha1(f"vg-{int(image_id)}".encode()).hexdigest()[:8], 16) / 16 ** 8
        return "val" if u < 0.25 else "test" if u < 0.5 else "train"

    assert {s: sorted(ids[s]) for s in ids} == {
        s: sorted(e["image_id"] for e in info["image_data"] if expected(e["image_id"]) == s) for s in ids}
    # a few ids pinned (u = 0.984, 0.0971, 0.2506, 0.2202), each written as VG's files and ARO's write it
    for image_id, want in ((1, "train"), (2, "val"), (1000, "test"), (2417997, "val")):
        assert expected(image_id) == want
        assert [VG.split_of(cfg, None, v) for v in (image_id, str(image_id), f"{image_id}.jpg")] == [want] * 3


def test_aro_images_are_excluded(tmp_path, caplog):
    info = make_vg(tmp_path / "vg")
    ids = [e["image_id"] for e in info["image_data"]]
    vgr = [{"image_id": str(ids[2]), "image_path": f"{ids[2]}.jpg", "true_caption": "the x is on the y",
            "false_caption": "the y is on the x", "relation_name": "on"}]  # ARO's VG-Relation record keys
    vga = [{"image_path": f"{ids[5]}.jpg", "true_caption": "the red x and the blue y", "attributes": ["red", "blue"]}]
    (tmp_path / "vgr.json").write_text(json.dumps(vgr))
    (tmp_path / "vga.json").write_text(json.dumps(vga))
    src = VG(cfg_of(tmp_path / "vg", tmp_path, exclude_ids=[str(tmp_path / "vgr.json"), str(tmp_path / "vga.json")]),
             "train")
    assert len(src) == 10 and src.report()["excluded_images"] == 2
    assert {src.record(k)["id"] for k in range(len(src))} == set(ids) - {ids[2], ids[5]}
    with caplog.at_level(logging.WARNING):
        VG(cfg_of(tmp_path / "vg", tmp_path), "train")
    assert "ARO's VG-Relation and VG-Attribution test images are in this training split" in caplog.text


def test_coco_ids_leave_out_the_vg_images_that_are_those_coco_images_and_no_other(tmp_path):
    """About 51k VG images are COCO images (image_data's coco_id): a COCO test file leaves those out, and never the
    VG image whose own id happens to be the same number as an excluded COCO id."""
    info = make_vg(tmp_path / "vg")
    ids = [e["image_id"] for e in info["image_data"]]
    data = json.loads((tmp_path / "vg" / "image_data.json").read_text())
    data[4]["coco_id"] = 391895  # VG image ids[4] is COCO image 391895
    (tmp_path / "vg" / "image_data.json").write_text(json.dumps(data))
    assert ids[0] == 1  # a VG id that is also a COCO id in the file below
    blip = [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["x"]},
            {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["y"]}]  # BLIP's Karpathy test file
    sugar = {"0": {"filename": "000000391895.jpg", "caption": "x", "negative_caption": "y"}}  # SugarCrepe's
    for name, content in (("coco_test.json", blip), ("sugarcrepe.json", sugar)):
        (tmp_path / name).write_text(json.dumps(content))
        src = VG(cfg_of(tmp_path / "vg", tmp_path, exclude_ids=[str(tmp_path / name)]), "train")
        kept = {src.record(k)["id"] for k in range(len(src))}
        assert kept == set(ids) - {ids[4]} and src.report()["excluded_images"] == 1, name
    (tmp_path / "bare.txt").write_text(f"{ids[4]}\n")  # a bare id list names the source's own ids
    src = VG(cfg_of(tmp_path / "vg", tmp_path, exclude_ids=[str(tmp_path / "bare.txt")]), "train")
    assert ids[4] not in {src.record(k)["id"] for k in range(len(src))} and len(src) == len(ids) - 1


def test_bad_input_is_named_and_skip_bad_counts_it(tmp_path):
    info = make_vg(tmp_path / "vg", bad=True)
    ids = [e["image_id"] for e in info["image_data"]]
    with pytest.raises(BadInput, match=rf"relationships.json: \[4\] \(image {ids[4]}\).relationships\[0\]: "
                                       rf"no 'predicate' string \[2 bad record"):
        VG(cfg_of(tmp_path / "vg", tmp_path), "train")
    src = VG(cfg_of(tmp_path / "vg", tmp_path, skip_bad=True), "train")
    assert src.bad.count == 2 and len(src) == 11  # the image without its file is out; image 4 keeps its other relation
    assert any(f"image_data.json: [2] (image {ids[2]}): image not found" in m for m in src.bad.skipped)
    assert src[3].key.endswith(f"[4] (image {ids[4]})") and src[3].graph.relations == (Relation(0, "has", 1),)
    with pytest.raises(BadInput, match=rf"image_data.json: \[3\] \(image {ids[3]}\): cannot read image"):
        VG(cfg_of(tmp_path / "vg", tmp_path, exclude_ids=[str(_ids(tmp_path, ids[2], ids[4]))]), "train")[2]
    regions = VG(cfg_of(tmp_path / "vg", tmp_path, skip_bad=True, region_descriptions="region_descriptions.json"),
                 "train")
    assert any(f"region_descriptions.json: [5] (image {ids[5]}).regions[1]: empty caption" in m
               for m in regions.bad.skipped)


def _ids(tmp_path, *ids):
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(map(str, ids)))
    return path


def test_malformed_entries_and_truncated_files(tmp_path):
    info = make_vg(tmp_path / "vg")
    info["attributes"][6]["attributes"][0]["attributes"] = "red"  # a string where a list belongs
    info["objects"][7] = {"objects": []}  # no image id
    for name in ("attributes", "objects"):
        (tmp_path / "vg" / f"{name}.json").write_text(json.dumps(info[name]))
    src = VG(cfg_of(tmp_path / "vg", tmp_path, skip_bad=True), "train")
    assert sorted(src.bad.skipped) == sorted([
        f"{tmp_path / 'vg' / 'attributes.json'}: [6] (image {info['image_data'][6]['image_id']}).attributes[0]: "
        "'attributes' must be a list of strings, got red",
        f"{tmp_path / 'vg' / 'objects.json'}: [7]: no int 'image_id' (or 'id')"])
    path = tmp_path / "vg" / "relationships.json"
    path.write_text(path.read_text()[:-300])
    with pytest.raises(BadInput, match=r"relationships.json: \[\d+\]: malformed JSON at character \d+"):
        VG(cfg_of(tmp_path / "vg", tmp_path, skip_bad=True), "train")  # a truncated file cannot be skipped


def test_cache_is_reused_and_refreshed_when_an_image_comes_back(tmp_path, monkeypatch):
    info = make_vg(tmp_path / "vg", bad=True)
    cfg = cfg_of(tmp_path / "vg", tmp_path, skip_bad=True)
    folder = VG.prepare(cfg)
    calls = []
    read = VG.read.__func__
    monkeypatch.setattr(VG, "read", classmethod(lambda cls, *a: calls.append(1) or read(cls, *a)))
    assert VG.prepare(cfg) == folder and not calls
    from PIL import Image

    Image.new("RGB", (48, 40)).save(tmp_path / "vg" / "VG_100K" / f"{info['image_data'][2]['image_id']}.jpg")
    assert len(VG(cfg, "train")) == 12 and calls == [1]  # the folder changed: prepared again, the image is back


def test_a_hub_dataset_gives_the_same_graphs(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    info = make_vg(tmp_path / "vg")
    rows = [{"image": Image.open(tmp_path / "vg" / ("VG_100K_2" if k % 3 == 0 else "VG_100K") / f"{e['image_id']}.jpg"),
             "image_id": e["image_id"], "width": 48, "height": 40, "attributes": info["attributes"][k]["attributes"],
             "relationships": info["relationships"][k]["relationships"]} for k, e in enumerate(info["image_data"])]
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hub"))
    hub = VG(cfg_of(tmp_path, tmp_path, hf_id=str(tmp_path / "hub")), "train")
    local = VG(cfg_of(tmp_path / "vg", tmp_path), "train")
    assert len(hub) == len(local)
    for k in (0, 4, 7):
        assert hub[k].graph == local[k].graph and hub[k].captions == local[k].captions
        assert list(hub[k].image.getdata()) == list(local[k].image.getdata())


def test_what_each_caption_claims_is_held_by_its_own_image(tmp_path):
    """SmartCLIP's `exclude_entailed` on Visual Genome: each rendered caption's claims are facts its own image's
    graph holds; a caption is true of another image only where that image's graph holds them all; region
    descriptions (no graph of their own) claim nothing known."""
    import torch
    from methods.losses import true_of

    make_vg(tmp_path / "vg")
    src = VG(cfg_of(tmp_path / "vg", tmp_path), "train")
    claims_of, held_of = FIELDS.get("caption_facts"), FIELDS.get("image_facts")
    samples = [src[i] for i in range(len(src))]
    held = torch.stack([held_of(s, 0, None) for s in samples])
    for i, s in enumerate(samples):
        claims = torch.stack([claims_of(s, k, None) for k in range(len(s.captions))])
        assert (claims >= 0).any(1).all()
        assert true_of(claims, held)[:, i].all(), s.key  # every caption is true of its own image
    red_shade = claims_of(samples[0], 1, None)[None]  # "the red shade"
    for j, s in enumerate(samples):
        has = any(e.name == "shade" and "red" in e.attributes for e in s.graph.objects)
        assert bool(true_of(red_shade, held)[0, j]) == has, s.key
    regions = VG(cfg_of(tmp_path / "vg", tmp_path, region_descriptions="region_descriptions.json"), "train")
    assert (claims_of(regions[3], 0, None) == -1).all()
    from datamodules.fields import check_source_offers
    check_source_offers(("granular_text", "image_facts"), samples[0], "visual_genome")  # rendered captions: fine
    with pytest.raises(ValueError, match="offers no scene graphs of images and of their captions"):
        check_source_offers(("granular_text", "image_facts"), regions[3], "visual_genome")  # it would do nothing

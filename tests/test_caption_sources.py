"""COCO (Karpathy, 2017) and Flickr30k sources on fixtures in the released formats: splits, captions, the
cache, bad input named by file and record, skip_bad counts, hub ids, and a short training run."""
from __future__ import annotations

import json

import pytest
import torch

from datamodules.coco import Coco2017, CocoKarpathy, Flickr30k
from datamodules.datamodule import CaptionDataModule
from datamodules.images import BadInput
from datamodules.records import RecordSource
from fixtures.make_train_data import make_coco, make_coco2017, make_flickr
from methods.train import compose_train, train


def cfg_of(cls, root, tmp_path, **kw):
    return cls.Config(root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def test_karpathy_splits_and_every_caption(tmp_path):
    info = make_coco(tmp_path / "coco")
    raw = json.loads((tmp_path / "coco" / "dataset_coco.json").read_text())["images"]  # read here, independently
    for split, wanted in (("train", {"train", "restval"}), ("val", {"val"}), ("test", {"test"})):
        src = CocoKarpathy(cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path), split)
        entries = [e for e in raw if e["split"] in wanted]
        assert len(src) == len(entries)
        for k, e in enumerate(entries):
            s = src[k]
            assert s.captions == [x["raw"] for x in e["sentences"]]
            assert s.key.endswith(f"dataset_coco.json: images[{raw.index(e)}] ({e['filename']})")
            assert s.image.size == (48, 40) and s.graph is None
    test = CocoKarpathy(cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path), "test")
    assert len(test[0].captions) == 6  # some COCO images have more than 5 captions; all are kept
    first = CocoKarpathy(cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path), "train")[0]
    assert first.captions[0] == "A man with a red helmet on a small moped on a dirt road."
    only_train = CocoKarpathy(cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path, train_splits=["train"]), "train")
    assert len(only_train) == sum(e["split"] == "train" for e in info["images"])


def test_flickr30k_and_coco2017(tmp_path):
    make_flickr(tmp_path / "flickr")
    raw = json.loads((tmp_path / "flickr" / "dataset_flickr30k.json").read_text())["images"]
    sizes = {s: len(Flickr30k(cfg_of(Flickr30k, tmp_path / "flickr", tmp_path), s)) for s in ("train", "val", "test")}
    assert sizes == {s: sum(e["split"] == s for e in raw) for s in sizes}
    val = Flickr30k(cfg_of(Flickr30k, tmp_path / "flickr", tmp_path), "val")
    assert val[1].captions[4] == raw[7]["sentences"][4]["raw"]

    files = make_coco2017(tmp_path / "coco")
    val = Coco2017(cfg_of(Coco2017, tmp_path / "coco", tmp_path), "val")
    ann = files["val"]["annotations"]
    for k, im in enumerate(files["val"]["images"]):  # captions grouped by image, in the file's order
        assert val[k].captions == [a["caption"] for a in ann if a["image_id"] == im["id"]]
    with pytest.raises(ValueError, match="coco2017 has the splits train, val, not 'test'"):
        Coco2017(cfg_of(Coco2017, tmp_path / "coco", tmp_path), "test")


def test_prepared_once_then_only_read(tmp_path, monkeypatch):
    make_coco(tmp_path / "coco")
    cfg = cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path)
    folder = CocoKarpathy.prepare(cfg)
    assert (folder / "records.jsonl").is_file() and (folder / "meta.json").is_file()

    def no_parsing(*a, **k):
        raise AssertionError("parsed again")

    monkeypatch.setattr(CocoKarpathy, "read", classmethod(no_parsing))
    assert CocoKarpathy.prepare(cfg) == folder and len(CocoKarpathy(cfg, "val")) == 3
    # a changed annotation file is a new cache key, so it is parsed again
    path = tmp_path / "coco" / "dataset_coco.json"
    path.write_text(path.read_text().replace("dirt road", "dirt track"))
    with pytest.raises(AssertionError, match="parsed again"):
        CocoKarpathy(cfg, "val")


def test_datamodule_prepares_on_rank_zero_and_setup_only_loads(tmp_path, monkeypatch):
    make_coco(tmp_path / "coco")
    cfg = compose_train(["data=coco", f"data.options.root={tmp_path / 'coco'}", f"cache_dir={tmp_path / 'cache'}"])
    dm = CaptionDataModule(cfg.data, preprocess_train=lambda im: im, preprocess_val=lambda im: im,
                           tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    dm.prepare_data()
    assert list((tmp_path / "cache" / "data").iterdir())
    monkeypatch.setattr(RecordSource, "_image_problems", classmethod(lambda *a: pytest.fail("prepared twice")))
    dm.setup("fit")
    assert len(dm.dataset("train")) == 9 and len(dm.dataset("val")) == 3


@pytest.mark.parametrize("cls,maker,name", [(CocoKarpathy, make_coco, "dataset_coco.json"),
                                            (Flickr30k, make_flickr, "dataset_flickr30k.json")])
def test_bad_records_are_named_and_skip_bad_counts_them(tmp_path, cls, maker, name):
    info = maker(tmp_path / "d", bad=True)
    imgs = info["images"]
    with pytest.raises(BadInput) as e:
        cls(cfg_of(cls, tmp_path / "d", tmp_path), "train")
    # the first bad record, its file and record, and how many there are
    assert f"{name}: images[3] ({imgs[3]['filename']}): 'sentences' must be a list" in str(e.value)
    assert "3 bad record(s)" in str(e.value) and "skip_bad=true" in str(e.value)
    src = cls(cfg_of(cls, tmp_path / "d", tmp_path, skip_bad=True), "train")
    msgs = src.bad.skipped
    assert src.bad.count == 3 and src.report()["skipped_records"] == 3
    assert any(f"images[1] ({imgs[1]['filename']}): image not found" in m for m in msgs)
    assert any(f"images[4] ({imgs[4]['filename']}).sentences[2]: empty caption" in m for m in msgs)
    n_train = sum(e["split"] in ("train", "restval") for e in imgs)
    assert len(src) == n_train - 2  # the missing image and the malformed record are out; images[4] keeps 4 captions
    assert len(src[2].captions) == 4 and src[2].key.endswith(f"({imgs[4]['filename']})")
    # the corrupt image (images[2]) is found when read: named without skip_bad, replaced and counted with it
    strict = cls(cfg_of(cls, tmp_path / "d", tmp_path, exclude_ids=[str(_ids(tmp_path, imgs))]), "train")
    with pytest.raises(BadInput, match=rf"{name}: images\[2\] \({imgs[2]['filename']}\): cannot read image"):
        strict[1]
    assert src[1].key.endswith(f"({imgs[4]['filename']})") and src.report()["substituted_images"] == 1
    # verify_images finds it while preparing instead, and skip_bad counts it with the others
    checked = cls(cfg_of(cls, tmp_path / "d", tmp_path, skip_bad=True, verify_images=True), "train")
    assert checked.bad.count == 4 and len(checked) == n_train - 3


def _ids(tmp_path, imgs):
    """An exclusion file holding the ids of the images whose records are malformed or miss their image."""
    path = tmp_path / "bad_ids.txt"
    path.write_text("\n".join(e["filename"] for e in (imgs[1], imgs[3], imgs[4])))
    return path


def test_coco2017_bad_input(tmp_path):
    files = make_coco2017(tmp_path / "coco", bad=True)
    with pytest.raises(BadInput, match=r"captions_train2017.json: annotations\[3\] \(image 500003, 000000500003.jpg\): "
                                       r"empty caption \[3 bad record"):
        Coco2017(cfg_of(Coco2017, tmp_path / "coco", tmp_path), "train")
    src = Coco2017(cfg_of(Coco2017, tmp_path / "coco", tmp_path, skip_bad=True), "train")
    assert src.bad.count == 3 and len(src) == len(files["train"]["images"]) - 1
    assert any("annotations[5]: 'image_id' 42 is not in 'images'" in m for m in src.bad.skipped)
    assert len(Coco2017(cfg_of(Coco2017, tmp_path / "coco", tmp_path), "val")) == 3  # val has no bad record


def test_malformed_and_truncated_json_are_named(tmp_path):
    make_coco(tmp_path / "coco")
    path = tmp_path / "coco" / "dataset_coco.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    cfg = cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path, skip_bad=True)
    with pytest.raises(BadInput, match=r"dataset_coco.json: images\[\d+\]: malformed JSON at character \d+"):
        CocoKarpathy(cfg, "train")
    path.write_text(text.replace('"split": "val"', '"split": val', 1))
    with pytest.raises(BadInput, match=r"dataset_coco.json: images\[9\]: malformed JSON at character"):
        CocoKarpathy(cfg, "train")
    path.unlink()
    with pytest.raises(FileNotFoundError, match="dataset_coco.json: file not found .*data.options.annotations"):
        CocoKarpathy(cfg, "train")


def test_exclude_ids_from_a_benchmark_file(tmp_path):
    info = make_coco(tmp_path / "coco")
    test_ids = [e for e in info["images"] if e["split"] == "test"]
    blip = [{"image": f"val2014/{e['filename']}", "caption": ["x"]} for e in test_ids[:3]]  # BLIP's Karpathy test file
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(blip))
    cfg = cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path, exclude_ids=[str(tmp_path / "coco_karpathy_test.json")])
    src = CocoKarpathy(cfg, "test")
    assert len(src) == len(test_ids) - 3 and src.report()["excluded_images"] == 3
    assert src[0].key.endswith(f"({test_ids[3]['filename']})")
    # ARO's VG-Relation records name VG images (they carry a box): a COCO image with the same number stays
    vgr = [{"image_id": test_ids[0]["cocoid"], "image_path": f"{test_ids[0]['cocoid']}.jpg", "bbox_x": 1, "bbox_y": 1,
            "bbox_w": 5, "bbox_h": 5, "relation_name": "on", "true_caption": "a", "false_caption": "b"}]
    (tmp_path / "vgr.json").write_text(json.dumps(vgr))
    cfg = cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path, exclude_ids=[str(tmp_path / "vgr.json")])
    assert len(CocoKarpathy(cfg, "test")) == len(test_ids)


def test_hub_datasets_map_to_the_same_samples(tmp_path):
    datasets = pytest.importorskip("datasets")
    info = make_coco(tmp_path / "coco")
    # yerevann/coco-karpathy's layout: captions as a list of strings, no image column (images stay under root)
    rows = {s: [e for e in info["images"] if e["split"] == s] for s in ("train", "restval", "val", "test")}
    hub = datasets.DatasetDict({("validation" if s == "val" else s): datasets.Dataset.from_dict({
        "filepath": [e["filepath"] for e in r], "filename": [e["filename"] for e in r],
        "cocoid": [e["cocoid"] for e in r],
        "sentences": [[x["raw"] for x in e["sentences"]] for e in r]}) for s, r in rows.items()})
    hub.save_to_disk(str(tmp_path / "hub"))
    cfg = cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path, hf_id=str(tmp_path / "hub"))
    local = CocoKarpathy(cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path), "train")
    from_hub = CocoKarpathy(cfg, "train")
    assert len(from_hub) == len(local) == 9
    for k in range(len(local)):
        assert from_hub[k].captions == local[k].captions
        assert list(from_hub[k].image.getdata()) == list(local[k].image.getdata())
    # nlphuji/flickr30k's layout: one hub split, the images in a column, Karpathy's split in a column
    images = [e for e in info["images"]][:5]
    from PIL import Image

    flickr = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (20 + k, 10), (40 * k, 0, 0)) for k in range(5)],
        "caption": [[x["raw"] for x in e["sentences"]] for e in images], "filename": [e["filename"] for e in images],
        "split": ["train", "val", "train", "test", ""]}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": flickr}).save_to_disk(str(tmp_path / "flickr_hub"))
    src = Flickr30k(cfg_of(Flickr30k, tmp_path, tmp_path, hf_id=str(tmp_path / "flickr_hub")), "train")
    assert len(src) == 2 and src[1].image.size == (22, 10) and src[1].captions == flickr[2]["caption"]
    assert src[1].key == f"hf:{tmp_path / 'flickr_hub'}[test] row 2 (id {images[2]['filename']})"


def test_a_hub_id_offline_fails_at_once(tmp_path, monkeypatch):
    import datamodules.hub as hub

    monkeypatch.setattr(hub, "_hub_answers", lambda timeout=2.0: False)
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = cfg_of(CocoKarpathy, tmp_path, tmp_path, hf_id="yerevann/coco-karpathy")
    with pytest.raises(hub.HubUnavailable, match="needs the network .* HF_DATASETS_OFFLINE=1"):
        CocoKarpathy(cfg, "train")


def test_substituted_images_are_counted_across_loader_workers(tmp_path):
    make_coco(tmp_path / "coco", bad=True)
    src = CocoKarpathy(cfg_of(CocoKarpathy, tmp_path / "coco", tmp_path, skip_bad=True), "train")
    loader = torch.utils.data.DataLoader(range(len(src)), batch_size=1, num_workers=2,
                                         collate_fn=lambda idx: src[idx[0]].key)
    keys = list(loader)
    assert len(keys) == len(src) and src.report()["substituted_images"] == 1  # counted in a worker, seen here


def test_training_on_the_coco_files(tmp_path):
    """The DataModule path with real-format data: prepare, setup, a few steps of the tiny model, the report."""
    make_coco(tmp_path / "coco", counts={"train": 10, "restval": 6, "val": 4, "test": 2}, bad=True)
    cfg = compose_train([f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "data=coco",
                         f"data.options.root={tmp_path / 'coco'}", "data.options.skip_bad=true", "data.batch_size=4",
                         "data.eval_batch_size=4", "data.num_workers=0", "trainer=debug", "optim.warmup_steps=1"])
    run = train(cfg)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "done.json").is_file()
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["skipped_records"] == 3 and report["train"]["images"] == 14
    assert report["val"]["skipped_records"] == 0

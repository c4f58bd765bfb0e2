"""The data path against bad input and stale caches: an image folder that appears after preparing, a torn
records cache, files that are not UTF-8, malformed records that used to raise bare TypeErrors, exclude_ids files
(malformed, scalar, JSON lines, missing), a root that is a relative clause, a damaged neighbour-table cache, and
the cache keys of NegCLIP's neighbours and of decoded images."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import pytest
import torch

from datamodules.coco import Coco2017, CocoKarpathy
from datamodules.datamodule import CaptionDataModule
from datamodules.images import BadInput
from datamodules.negclip_tsv import read_negclip_tsv
from datamodules.records import RecordSource, read_ids
from datamodules.visual_genome import VisualGenome as VG
from fixtures.make_train_data import draw, make_coco, make_coco2017, make_vg
from methods.train import build, compose_train
from test_negclip_tsv import write_fixture


def coco_cfg(cls, root, tmp_path, **kw):
    return cls.Config(root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def vg_cfg(root, tmp_path, **kw):
    return VG.Config(root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.0, test_fraction=0.0, **kw)


def counting_reads(monkeypatch, cls):
    """Monkeypatch cls.read to count how often the annotation files are parsed."""
    calls = []
    read = cls.read.__func__
    monkeypatch.setattr(cls, "read", classmethod(lambda c, *a: calls.append(1) or read(c, *a)))
    return calls


def tiny_karpathy(root):
    """dataset_coco.json with one train image (train2014/a.jpg, present) and one val image (val2014/b.jpg, whose
    folder is not there)."""
    root.mkdir(parents=True)
    images = [{"filepath": "train2014", "filename": "a.jpg", "split": "train", "cocoid": 1,
               "sentences": [{"raw": "A dog on a mat."}]},
              {"filepath": "val2014", "filename": "b.jpg", "split": "val", "cocoid": 2,
               "sentences": [{"raw": "A cat on a bed."}]}]
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    draw(root / "train2014" / "a.jpg", 0)


# -- 1. an image folder that was missing when the cache was built ---------------------------------------------------

@pytest.mark.parametrize("skip_bad", [False, True])
def test_an_image_folder_that_appears_after_preparing_is_seen(tmp_path, skip_bad):
    tiny_karpathy(tmp_path / "coco")
    cfg = coco_cfg(CocoKarpathy, tmp_path / "coco", tmp_path, skip_bad=skip_bad)
    with pytest.raises(ValueError, match="no usable images"):  # its only image is missing
        CocoKarpathy(cfg, "val")
    bad = json.loads((CocoKarpathy.prepare(cfg) / "meta.json").read_text())["bad"]
    assert len(bad) == 1 and "image not found" in bad[0]["message"] and bad[0]["message"].endswith("val2014/b.jpg")
    draw(tmp_path / "coco" / "val2014" / "b.jpg", 1)  # the folder is unzipped later
    val = CocoKarpathy(cfg, "val")
    assert len(val) == 1 and val[0].captions == ["A cat on a bed."] and val.bad.count == 0


def test_a_folder_under_a_missing_images_folder_is_watched_too(tmp_path, monkeypatch):
    tiny_karpathy(tmp_path / "coco")
    shutil.move(tmp_path / "coco" / "train2014", tmp_path / "train2014")
    cfg = coco_cfg(CocoKarpathy, tmp_path / "coco", tmp_path, images="imgs", skip_bad=True)
    with pytest.raises(ValueError, match="no usable images"):
        CocoKarpathy(cfg, "train")
    calls = counting_reads(monkeypatch, CocoKarpathy)
    with pytest.raises(ValueError, match="no usable images"):
        CocoKarpathy(cfg, "train")
    assert calls == []  # nothing changed: the cache is used
    (tmp_path / "coco" / "imgs").mkdir()
    shutil.move(tmp_path / "train2014", tmp_path / "coco" / "imgs" / "train2014")
    assert len(CocoKarpathy(cfg, "train")) == 1 and calls == [1]


def test_visual_genome_sees_a_second_image_folder_added_later(tmp_path, monkeypatch):
    info = make_vg(tmp_path / "vg")
    in_second = [e["image_id"] for k, e in enumerate(info["image_data"]) if k % 3 == 0]  # the fixture's VG_100K_2
    shutil.move(tmp_path / "vg" / "VG_100K_2", tmp_path / "VG_100K_2")
    cfg = vg_cfg(tmp_path / "vg", tmp_path, skip_bad=True)
    src = VG(cfg, "train")
    assert len(src) == 12 - len(in_second) and src.bad.count == len(in_second)
    calls = counting_reads(monkeypatch, VG)
    assert len(VG(cfg, "train")) == 12 - len(in_second) and calls == []  # unchanged: read from the cache
    shutil.move(tmp_path / "VG_100K_2", tmp_path / "vg" / "VG_100K_2")
    src = VG(cfg, "train")
    assert len(src) == 12 and src.bad.count == 0 and calls == [1]
    found = {src.record(k)["id"]: src.record(k)["image"] for k in range(len(src))}
    assert all(found[i] == os.path.join("VG_100K_2", f"{i}.jpg") for i in in_second)
    assert src[0].image.size == (48, 40)


# -- 2. a torn records cache -----------------------------------------------------------------------------------------

def test_a_truncated_records_file_is_prepared_again(tmp_path, monkeypatch, caplog):
    make_coco(tmp_path / "coco")
    cfg = coco_cfg(CocoKarpathy, tmp_path / "coco", tmp_path)
    folder = CocoKarpathy.prepare(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    records = folder / "records.jsonl"
    assert meta["records_size"] == records.stat().st_size
    records.write_bytes(records.read_bytes()[: records.stat().st_size // 2])  # torn: meta.json is whole
    calls = counting_reads(monkeypatch, CocoKarpathy)
    with caplog.at_level(logging.WARNING, logger="datamodules.records"):
        test = CocoKarpathy(cfg, "test")
    assert calls == [1] and "torn or truncated" in caplog.text and str(records) in caplog.text
    assert [len(test[k].captions) for k in range(len(test))] == [6, 5, 5, 5]


def test_a_records_file_damaged_under_a_source_names_the_cache_and_the_offset(tmp_path):
    make_coco(tmp_path / "coco")
    cfg = coco_cfg(CocoKarpathy, tmp_path / "coco", tmp_path, skip_bad=True)  # skip_bad must not skip it
    val = CocoKarpathy(cfg, "val")
    records = CocoKarpathy.prepare(cfg) / "records.jsonl"
    offset = val.offsets[1]
    with open(records, "r+b") as f:  # same size, a damaged record
        f.seek(offset)
        f.write(b"\x00\xff{")
    assert val[0].captions  # the records before it still read
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(records))}: byte {offset} .*damaged prepared-data cache"
                                           rf".*delete the folder {re.escape(str(records.parent))}"):
        val[1]


# -- 3. bare tracebacks become named errors --------------------------------------------------------------------------

def test_annotation_files_that_are_not_utf8_are_named_with_the_byte(tmp_path):
    make_coco(tmp_path / "coco")
    make_coco2017(tmp_path / "coco")
    for name, make in (("dataset_coco.json", lambda: CocoKarpathy(coco_cfg(CocoKarpathy, tmp_path / "coco", tmp_path),
                                                                   "val")),
                       ("annotations/captions_val2017.json", lambda: Coco2017(
                           coco_cfg(Coco2017, tmp_path / "coco", tmp_path), "val"))):
        path = tmp_path / "coco" / name
        data = path.read_bytes().replace(b"number", "n\u00fcmber".encode("latin-1"), 1)  # a Latin-1 byte, 0xfc
        path.write_bytes(data)
        offset = data.index(b"\xfc")
        with pytest.raises(BadInput, match=rf"{re.escape(str(path))}: byte {offset}: not UTF-8 text"):
            make()


def test_the_streaming_reader_counts_bytes_across_chunks(tmp_path, monkeypatch):
    """A character split by a chunk's end reads whole; a bad byte after multi-byte characters is named by its byte
    offset (not its character offset)."""
    from datamodules import jsonstream

    monkeypatch.setattr(jsonstream, "CHUNK", 7)
    path = tmp_path / "a.json"
    good = json.dumps(["caf\u00e9 \u2014 na\u00efve", "\u65e5\u672c"], ensure_ascii=False).encode()
    path.write_bytes(good)
    assert [v for _, v in jsonstream.iter_json_array(path)] == ["caf\u00e9 \u2014 na\u00efve", "\u65e5\u672c"]
    bad = good[:-2] + b"\xe6\x97" + b'"]'  # a character cut short before the closing quote
    path.write_bytes(bad)
    with pytest.raises(BadInput, match=rf"{re.escape(str(path))}: byte {len(good) - 2}: not UTF-8 text"):
        list(jsonstream.iter_json_array(path))


def test_a_negclip_tsv_that_is_not_utf8_is_named(tmp_path):
    path = write_fixture(tmp_path)
    data = path.read_bytes().replace(b"thing 5", b"thing \xa75", 1)
    path.write_bytes(data)
    offset = data.index(b"\xa7")
    with pytest.raises(BadInput, match=rf"{re.escape(str(path))}: byte {offset}: not UTF-8 text"):
        read_negclip_tsv(path)


def test_visual_genome_merged_object_ids_that_are_not_a_list_are_a_named_bad_record(tmp_path):
    info = make_vg(tmp_path / "vg")
    image = info["image_data"][1]["image_id"]
    info["objects"][1]["objects"][0]["merged_object_ids"] = 7
    info["objects"][2]["objects"][0]["merged_object_ids"] = [[5]]
    (tmp_path / "vg" / "objects.json").write_text(json.dumps(info["objects"]))
    with pytest.raises(BadInput, match=rf"objects.json: \[1\] \(image {image}\).objects\[0\]: object 1001: "
                                       r"'merged_object_ids' must be a list of int object ids, got 7"):
        VG(vg_cfg(tmp_path / "vg", tmp_path), "train")
    src = VG(vg_cfg(tmp_path / "vg", tmp_path, skip_bad=True), "train")
    assert src.bad.count == 2 and len(src) == 12  # each image keeps its other objects


def test_coco2017_image_id_that_is_a_list_is_a_named_bad_record(tmp_path):
    files = make_coco2017(tmp_path / "coco")
    first = files["val"]["images"][0]["id"]
    files["val"]["annotations"][2]["image_id"] = [first]
    path = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps(files["val"]))
    with pytest.raises(BadInput, match=rf"{re.escape(str(path))}: annotations\[2\]: 'image_id' must be an int, "
                                       rf"got \[{first}\]"):
        Coco2017(coco_cfg(Coco2017, tmp_path / "coco", tmp_path), "val")
    val = Coco2017(coco_cfg(Coco2017, tmp_path / "coco", tmp_path, skip_bad=True), "val")
    assert len(val) == 3 and val.bad.count == 1


@pytest.mark.parametrize("corrupt,match", [
    (lambda t: t.replace("[5, 6, 7]", "[]"), r"train.csv:6: column 'neg_image' is an empty list"),
    (lambda t: t.replace("['thing 3 of a photo .']", "['thing 3 of a photo .', '  ']"),
     r"train.csv:5: column 'neg_caption': empty hard negative caption\(s\) at \[1\]"),
    (lambda t: t.replace("['thing 3 of a photo .']", "['']"),
     r"train.csv:5: column 'neg_caption': empty hard negative caption\(s\) at \[0\]"),
])
def test_negclip_tsv_empty_hard_images_and_captions_are_rejected_at_read_time(tmp_path, corrupt, match):
    path = write_fixture(tmp_path)
    path.write_text(corrupt(path.read_text()))
    with pytest.raises(ValueError, match=match):
        read_negclip_tsv(path)


def _conllu(text, rows):
    """One CoNLL-U sentence from (form, lemma, upos, xpos, head, deprel) rows."""
    from stanza.utils.conll import CoNLL

    lines = "".join(f"{i}\t{f}\t{lem}\t{u}\t{x}\t_\t{h}\t{d}\t_\t_\n" for i, (f, lem, u, x, h, d) in enumerate(rows, 1))
    return CoNLL.conll2doc(input_str=f"# text = {text}\n{lines}\n").sentences[0]


@pytest.mark.parametrize("text,rows", [
    ("who rides horses", [("who", "who", "PRON", "WP", 2, "nsubj"), ("rides", "ride", "VERB", "VBZ", 0, "acl:relcl"),
                          ("horses", "horse", "NOUN", "NNS", 2, "obj")]),
    ("horses ride that", [("horses", "horse", "NOUN", "NNS", 2, "nsubj"),
                          ("ride", "ride", "VERB", "VBP", 0, "acl:relcl"), ("that", "that", "PRON", "WDT", 2, "obj")]),
])
def test_a_root_labelled_as_a_relative_clause_gives_no_relation(text, rows):
    """A relative pronoun under a root labelled acl:relcl has no antecedent: no relation (it used to recurse without
    end, or take the last word for the antecedent)."""
    from datamodules.parse_rules import graph_from_sentence

    p = graph_from_sentence(_conllu(text, rows))
    assert [o.name for o in p.graph.objects] == ["horse"] and p.graph.relations == ()


# -- 3f, 5. NegCLIP's neighbour table --------------------------------------------------------------------------------

@pytest.fixture
def negclip_built(make_cfg, tmp_path):
    module, dm = build(make_cfg("method=negclip", f"cache_dir={tmp_path}"))
    (path,) = tmp_path.glob("neighbours-*.pt")
    return module, dm.dataset("train"), dm.field_options["neighbours"], path


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b"PK\x03\x04 not a torch file"),
    lambda p: p.write_bytes(p.read_bytes()[:40]),
    lambda p: torch.save({"table": 1}, p),
    lambda p: torch.save(torch.zeros(3, 3, dtype=torch.long), p),
    lambda p: torch.save(torch.zeros(64, 3), p),  # the right shape, floats
])
def test_a_damaged_neighbour_table_cache_is_computed_again(negclip_built, damage, caplog):
    module, ds, table, path = negclip_built
    damage(path)
    with caplog.at_level(logging.WARNING, logger="methods.negclip"):
        again = module.neighbour_table(ds)
    assert torch.equal(again, table) and str(path) in caplog.text and "computing it again" in caplog.text
    assert torch.equal(torch.load(path, weights_only=True), table)  # and replaced


def test_the_neighbour_table_key_follows_the_annotation_file_under_root(tmp_path):
    """The default annotation name is relative to data.options.root, not to the working directory: an edit that
    keeps the record count still gives a new table, not the cached one of the old file."""
    import configs
    from methods import METHODS

    make_coco(tmp_path / "coco")
    cfg = compose_train(["method=negclip", "data=coco", f"data.options.root={tmp_path / 'coco'}",
                         f"cache_dir={tmp_path / 'c'}", "data.num_workers=0"])
    module = METHODS.get("negclip")(configs.to_plain(cfg))

    def table():
        dm = CaptionDataModule(cfg.data, preprocess_train=module.preprocess_val, preprocess_val=module.preprocess_val,
                               tokenizer=module.tokenizer)
        return module.neighbour_table(dm.dataset("train"))

    def tables():
        return len(list((tmp_path / "c").glob("neighbours-*.pt")))

    first = table()
    assert tables() == 1 and torch.equal(table(), first) and tables() == 1  # unchanged data: the cached table
    path = tmp_path / "coco" / "dataset_coco.json"
    data = json.loads(path.read_text())
    a, b = data["images"][0], data["images"][1]  # two train images change places: the same record count
    a["filename"], b["filename"] = b["filename"], a["filename"]
    path.write_text(json.dumps(data))
    second = table()
    assert tables() == 2 and not torch.equal(second, first)


# -- 4. exclude_ids files --------------------------------------------------------------------------------------------

def test_exclude_ids_files_that_are_not_lists_of_ids_are_named(tmp_path):
    cases = {"malformed.json": ('[1, 2', r"malformed.json: malformed JSON at line 1 column 6"),
             "scalar.json": ("5", r"scalar.json: exclude_ids needs a JSON list .* got a int"),
             "nested.json": ("[[1, 2]]", r"nested.json: \[0\]: an entry must be an image id"),
             "values.json": ('{"a": 5}', r"values.json: \['a'\]: a JSON object's values must be records"),
             "noid.jsonl": ('{"image_id": 4}\n{"caption": "x"}\n', r"noid.jsonl:2: no image id"),
             "bad.jsonl": ('{"image_id": 4}\n{"image_id": \n', r"bad.jsonl:2: malformed JSON at column 14")}
    for name, (content, match) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(BadInput, match=match):
            read_ids([str(tmp_path / name)])
    (tmp_path / "latin.txt").write_bytes(b"12\n3\xe94\n")
    with pytest.raises(BadInput, match=r"latin.txt: byte 4: not UTF-8"):
        read_ids([str(tmp_path / "latin.txt")])


def test_exclude_ids_jsonl_is_read_as_records_line_by_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"image_id": 10, "caption": "2 dogs and 3 cats"}\n\n'
                    '{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": "A man 4 u"}\n"77"\n')
    assert read_ids([str(path)]) == {(None, "10"), ("coco", "391895"), (None, "77")}


def test_a_missing_exclude_ids_file_is_named_before_a_run_folder(tmp_path):
    from configs import ConfigError
    from methods.train import main

    make_coco(tmp_path / "coco")
    missing = tmp_path / "nowhere" / "aro.json"
    cfg = compose_train(["data=coco", f"data.options.root={tmp_path / 'coco'}", f"cache_dir={tmp_path / 'cache'}",
                         f"data.options.exclude_ids=[{missing}]"])
    dm = CaptionDataModule(cfg.data, preprocess_train=lambda im: im, preprocess_val=lambda im: im,
                           tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    named = rf"data \(coco_karpathy\): exclude_ids: file not found: {re.escape(str(missing))}"
    with pytest.raises(ConfigError, match=named):
        dm.check()
    assert main(["data=coco", f"data.options.root={tmp_path / 'coco'}", f"cache_dir={tmp_path / 'cache'}",
                 f"data.options.exclude_ids=[{missing}]", f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# -- 6. the decoded-image cache's folder -----------------------------------------------------------------------------

def test_the_decoded_image_cache_folder_names_pillow_and_torchvision(tmp_path):
    import PIL
    import torchvision
    from torchvision import transforms as T

    from datamodules.decoded import DecodedCache

    name = DecodedCache(tmp_path, T.Resize(32)).folder.name
    clean = lambda v: "".join(c if c.isalnum() or c in "-_." else "_" for c in v)  # noqa: E731
    assert f"pil{clean(PIL.__version__)}" in name and f"tv{clean(torchvision.__version__)}" in name


def test_an_unchanged_cache_is_not_prepared_again(tmp_path, monkeypatch):
    """The freshness checks cost a stat per folder and do not make a cache stale by themselves."""
    make_coco(tmp_path / "coco")
    make_vg(tmp_path / "vg")
    for cls, cfg in ((CocoKarpathy, coco_cfg(CocoKarpathy, tmp_path / "coco", tmp_path)),
                     (VG, vg_cfg(tmp_path / "vg", tmp_path))):
        folder = cls.prepare(cfg)
        monkeypatch.setattr(RecordSource, "_image_problems", classmethod(lambda *a: pytest.fail("prepared twice")))
        assert cls.prepare(cfg) == folder
        monkeypatch.undo()


def test_a_records_file_prepared_again_under_a_running_split_is_not_read_with_old_offsets(tmp_path):
    """A loader worker opens records.jsonl by its name: if another run prepared the folder again meanwhile (an image
    came back), this split's offsets are of the old file, and it says so rather than read other records."""
    info = make_coco(tmp_path / "coco", bad=True)
    cfg = coco_cfg(CocoKarpathy, tmp_path / "coco", tmp_path, skip_bad=True)
    train = CocoKarpathy(cfg, "train")
    draw(tmp_path / "coco" / "train2014" / info["images"][1]["filename"], 1)  # the missing image is back
    assert len(CocoKarpathy(cfg, "train")) == len(train) + 1  # another run prepares the folder again
    with pytest.raises(RuntimeError, match=r"records.jsonl: \d+ bytes, not the \d+ this split's offsets were read for"):
        train[0]

"""Bad input in the real benchmark files: each kind names the file and the record; skip_bad skips and counts."""
from __future__ import annotations

import math

import pytest

from benchmarks.base import BENCHMARKS
from datamodules.images import BadInput
from fixtures.make_benchmark_data import BAD_KINDS, TARGETS, corrupt, make

from benchmark_standins import StandIn, context

# which benchmark reads each target file
BENCH_OF = {"vg_relation": "vg_relation", "vg_attribution": "vg_attribution", "coco": "coco_retrieval",
            "flickr30k": "flickr30k_order", "sugarcrepe": "sugarcrepe"}
SAYS = {"missing_image": "image not found", "corrupt_image": "cannot read image", "malformed_record": "field '",
        "empty_caption": "empty caption"}


def run(root, target, **spec):
    model = StandIn(lambda t: [float(len(t) % 7), 1.0])
    ctx = context(model, root, **spec)
    ctx.cache["order_tagger"] = lambda texts: [[(w, "NN" if len(w) > 3 else "DT") for w in t.split()] for t in texts]
    return BENCHMARKS.get(BENCH_OF[target])(ctx)


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_bad_record_is_named_then_skipped_and_counted(tmp_path, kind, target):
    make(tmp_path)
    clean = run(tmp_path, target).metrics
    path, record = corrupt(tmp_path, kind, target)
    with pytest.raises(BadInput) as err:
        run(tmp_path, target)
    message = str(err.value)
    assert message.startswith(f"{path}:{record}") and SAYS[kind] in message, message

    result = run(tmp_path, target, skip_bad=True)
    (note,) = [n for n in result.notes if "skipped" in n]
    assert note.startswith("1 bad record(s) skipped") and f"{path}:{record}" in note, note
    assert result.metrics.keys() == clean.keys() and all(not math.isnan(v) for v in result.metrics.values())


def test_missing_files_say_where_to_get_them(tmp_path):
    for target, needs in (("vg_relation", "1kX2iCHEv0CADL8dSO1nMdW-V0NqIAiP3"),
                          ("coco", "coco_karpathy_test.json"), ("sugarcrepe", "RAIVNLab/sugar-crepe")):
        with pytest.raises(FileNotFoundError, match=needs):
            run(tmp_path, target)
    make(tmp_path)
    (tmp_path / "aro" / "images" / "2410000.jpg").unlink()
    (tmp_path / "aro" / "images").rename(tmp_path / "aro" / "imgs")
    with pytest.raises(FileNotFoundError, match="vgr_vga_images.zip"):
        run(tmp_path, "vg_relation")


def test_malformed_json_and_no_data_root(tmp_path):
    make(tmp_path)
    path = tmp_path / "sugarcrepe" / "add_att.json"
    path.write_text(path.read_text()[:-3])
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON \(line"):
        run(tmp_path, "sugarcrepe")
    with pytest.raises(FileNotFoundError, match="bench.data_root is not set"):
        run(None, "sugarcrepe")


def test_not_utf8_a_folder_and_a_box_of_nan_are_named(tmp_path):
    make(tmp_path)
    path = tmp_path / "sugarcrepe" / "add_att.json"
    path.write_bytes(b"\xff\xfe" + path.read_bytes())
    with pytest.raises(ValueError, match=rf"{path}: not UTF-8 text, as JSON must be \(byte 0"):
        run(tmp_path, "sugarcrepe")
    path.unlink()
    path.mkdir()
    with pytest.raises(ValueError, match=rf"{path}: SugarCrepe subset expected, found a folder"):
        run(tmp_path, "sugarcrepe")
    vg = tmp_path / "aro" / "visual_genome_relation.json"
    vg.write_text(vg.read_text().replace('"bbox_w": ', '"bbox_w": NaN, "was": ', 1))  # json reads NaN
    with pytest.raises(BadInput, match=rf"{vg}:record 0: field 'bbox_w' must be a finite number, got nan"):
        run(tmp_path, "vg_relation")


def test_a_karpathy_train_file_groups_its_records_by_image(tmp_path):
    """BLIP's train files hold one record per caption: image-to-text retrieval must count any of an image's
    captions, so an image's records make one image; a missing train file says where to get it."""
    import json

    fx = make(tmp_path)
    test = json.loads((tmp_path / "coco" / "coco_karpathy_test.json").read_text())
    train = [{"image": r["image"], "caption": c, "image_id": k} for k, r in enumerate(test) for c in r["caption"]]
    with pytest.raises(FileNotFoundError, match="coco_karpathy_train.json: Karpathy split file not found; get it from "
                                                "https://storage.googleapis.com/.*/coco_karpathy_train.json"):
        run(tmp_path, "coco", split="train")
    (tmp_path / "coco" / "coco_karpathy_train.json").write_text(json.dumps(train))
    assert run(tmp_path, "coco", split="train").metrics == run(tmp_path, "coco").metrics
    assert fx is not None


def test_a_caption_the_tagger_cannot_read_names_its_record_and_can_be_skipped(tmp_path):
    from datamodules.parse import CaptionNotParsed

    make(tmp_path)
    model = StandIn(lambda t: [float(len(t) % 7), 1.0])
    data = __import__("json").loads((tmp_path / "flickr30k" / "flickr30k_test.json").read_text())
    bad = data[1]["caption"][2]

    def tag(texts):
        if bad.strip() in texts:
            raise CaptionNotParsed(f"caption not in the CoNLL-U files and no parser to read it: {bad.strip()!r}")
        return [[(w, "NN" if len(w) > 3 else "DT") for w in t.split()] for t in texts]

    for skip in (False, True):
        ctx = context(model, tmp_path, skip_bad=skip)
        ctx.cache["order_tagger"] = tag
        if not skip:
            with pytest.raises(BadInput, match=r"flickr30k_test.json:record 1 caption 2: caption not in the CoNLL-U"):
                BENCHMARKS.get("flickr30k_order")(ctx)
        else:
            result = BENCHMARKS.get("flickr30k_order")(ctx)
            (note,) = [n for n in result.notes if "skipped" in n]
            assert note.startswith("1 bad record(s) skipped") and "record 1 caption 2" in note

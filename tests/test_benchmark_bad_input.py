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

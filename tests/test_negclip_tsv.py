"""NegCLIP's released TSV format: read as the reference reads it, trained on, and bad records named."""
from __future__ import annotations

import csv
import random

import pytest
import torch
from PIL import Image

from datamodules.datamodule import collate
from datamodules.images import BadInput
from datamodules.negclip_tsv import NegCLIPTSV, read_negclip_tsv
from methods.train import build, compose_train, train

HEADER = "\ttitle\tfilepath\tneg_caption\tneg_image\n"


QUOTED_TITLE = 'A "stop" sign on a truck\'s flatbed.'
QUOTED_NEGS = ["A flatbed on a stop sign 's truck ."]  # an apostrophe: repr writes it in double quotes


def fixture_rows(rows: int) -> list[tuple[str, list[str]]]:
    """(caption, hard captions) per row: row 0 as in valid_neg_clip.tsv; row 1 with quotes in both columns."""
    out = [("A child holding a flowered umbrella and petting a yak.",
            ["A umbrella holding a flowered child and petting a yak .",
             "A child petting a flowered umbrella and holding a yak ."]), (QUOTED_TITLE, QUOTED_NEGS)]
    return (out + [(f"a photo of thing {i}.", [f"thing {i} of a photo ."]) for i in range(2, rows)])[:rows]


def write_fixture(root, rows: int = 12, name: str = "train.csv", offsets=(1, 2, 3), first_id: int = 0):
    """A file in the released layout, written as pandas' to_csv(sep="\\t") writes it (a field holding a quote
    is quoted, its quotes doubled), with generated images. Row i has the row id first_id + i, and its
    neg_image column names the rows i + offsets (mod rows) by their row ids."""
    (root / "coco" / "val2014").mkdir(parents=True, exist_ok=True)
    with open(root / name, "w", newline="") as f:
        f.write(HEADER)
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # QUOTE_MINIMAL, doubled quotes: pandas'
        for i, (caption, negs) in enumerate(fixture_rows(rows)):
            path = f"val2014/COCO_val2014_{i:012d}.jpg"
            Image.new("RGB", (40, 30), (20 * i % 255, 100, 150)).save(root / "coco" / path)
            neighbours = [first_id + (i + o) % rows for o in offsets]
            writer.writerow([first_id + i, caption, path, repr(negs), repr(neighbours)])
    return root / name


def test_reads_the_released_format(tmp_path):
    path = write_fixture(tmp_path)
    rows = read_negclip_tsv(path)
    assert len(rows) == 12 and rows[0]["title"].startswith("A child holding")
    assert rows[0]["neg_caption"][1] == "A child petting a flowered umbrella and holding a yak ."
    assert rows[0]["neighbours"] == [1, 2, 3]
    assert '"[""A flatbed' in path.read_text().splitlines()[2]  # the released file's quoting of such a row
    assert rows[1]["title"] == QUOTED_TITLE and rows[1]["neg_caption"] == QUOTED_NEGS and rows[1]["row_id"] == 1
    src = NegCLIPTSV(NegCLIPTSV.Config(train_file=str(path), image_root=str(tmp_path / "coco")), "train")
    s = src[0]
    assert s.image.size == (40, 30) and s.captions == [rows[0]["title"]]
    assert s.extra["negative_captions"](0) == {"released": rows[0]["neg_caption"]}


def test_negclip_trains_on_the_file_with_its_own_negatives(tmp_path):
    path = write_fixture(tmp_path)
    argv = ["method=negclip", "data=negclip_coco", f"data.options.train_file={path}", f"data.options.val_file={path}",
            f"data.options.image_root={tmp_path / 'coco'}", "data.batch_size=4", "data.num_workers=0",
            f"cache_dir={tmp_path / 'cache'}", f"runs_dir={tmp_path / 'runs'}", "trainer=debug", "data.eval_batch_size=4"]
    cfg = compose_train(argv)
    module, dm = build(cfg)
    assert dm.field_options["neighbours"][0] == [1, 2, 3]  # the released hard images, no kNN computed
    assert not (tmp_path / "cache").exists()
    ds = dm.dataset("train")
    random.seed(0)
    item = ds[0]
    negs = read_negclip_tsv(path)[0]["neg_caption"]
    assert any(item["neg_text"].equal(module.tokenizer([n])[0]) for n in negs) and item["has_neg"]
    assert collate([ds[i] for i in range(4)])["hard_image"].shape[0] == 4
    run = train(cfg)
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_negclip_hard_image_is_a_row_its_neg_image_column_names(tmp_path):
    """Each item's hard image is exactly the image of a row that its neg_image column names (by row id, which
    is not the row's position), its hard caption that row's title, its hard negative one of that row's
    released negatives. The fixture's neighbours are rows i+4 and i+7: never the item itself or the next row."""
    rows, offsets = 12, (4, 7)
    path = write_fixture(tmp_path, rows=rows, offsets=offsets, first_id=100)
    argv = ["method=negclip", "data=negclip_coco", f"data.options.train_file={path}", f"data.options.val_file={path}",
            f"data.options.image_root={tmp_path / 'coco'}", "data.batch_size=4", "data.num_workers=0",
            f"cache_dir={tmp_path / 'cache'}", f"runs_dir={tmp_path / 'runs'}", "trainer=debug", "data.eval_batch_size=4"]
    module, dm = build(compose_train(argv))
    ds = dm.dataset("train")
    tok = lambda t: module.tokenizer([t])[0]  # noqa: E731
    text = fixture_rows(rows)
    # every row's image, read from its file here and put through the model transform
    images = []
    for p in range(rows):
        with Image.open(tmp_path / "coco" / f"val2014/COCO_val2014_{p:012d}.jpg") as im:
            images.append(ds.transform(im.convert("RGB")))
    assert all(not torch.equal(images[p], images[q]) for p in range(rows) for q in range(p))
    picked = set()
    for i in range(rows):
        named = [(i + o) % rows for o in offsets]  # the positions of the row ids in row i's neg_image
        item = ds[i]
        (p,) = [q for q in range(rows) if torch.equal(item["hard_image"], images[q])]
        assert p in named, f"row {i}: the hard image is row {p}'s, not one of the rows its neg_image names {named}"
        assert torch.equal(item["hard_text"], tok(text[p][0]))
        assert item["hard_has_neg"] and any(torch.equal(item["hard_neg_text"], tok(n)) for n in text[p][1])
        picked.add((p - i) % rows)
    assert len(picked) > 1  # drawn among the named rows, not always the first


@pytest.mark.parametrize("corrupt,match", [
    (lambda t: t.replace("['thing 3 of a photo .']", "['thing 3 of a photo ."), r"train.csv:5: column 'neg_caption'"),
    (lambda t: t.replace("[5, 6, 7]", "[5, 6, 99]"), r"train.csv:6: neg_image row ids \[99\]"),
    (lambda t: t.replace("a photo of thing 7.", " "), r"train.csv:9: empty caption"),
    (lambda t: t.replace("[8, 9, 10]", "'8, 9'"), r"train.csv:9: column 'neg_image' must be a list of int"),
])
def test_bad_records_are_named(tmp_path, corrupt, match):
    path = write_fixture(tmp_path)
    path.write_text(corrupt(path.read_text()))
    with pytest.raises(ValueError, match=match):
        read_negclip_tsv(path)


def test_missing_and_corrupt_images_are_named(tmp_path):
    path = write_fixture(tmp_path)
    src = NegCLIPTSV(NegCLIPTSV.Config(train_file=str(path), image_root=str(tmp_path / "coco")), "train")
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(BadInput, match=r"train.csv:4: image not found: .*000000000002.jpg"):
        src[2]
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadInput, match=r"train.csv:5: cannot read image .*000000000003.jpg"):
        src[3]
    with pytest.raises(FileNotFoundError, match="NegCLIP TSV not found"):
        read_negclip_tsv(tmp_path / "nope.csv")

"""Caption sources with `parse`: each caption's scene graph and its hard negatives come from the caption
parser (here from CoNLL-U parses, as CI has no Stanza model), a caption the parser cannot read is a bad
record named by file and record, and NegCLIP trains on the parsed negatives."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.coco import CocoKarpathy
from datamodules.datamodule import collate
from datamodules.graph import Entity, Relation, SceneGraph
from datamodules.images import BadInput
from fixtures.make_train_data import draw
from methods.train import build, compose_train
from tests_support import TINY_ARGS

CONLLU = Path(__file__).parent / "fixtures" / "captions.conllu"
CAPTIONS = [  # captions whose parses are in the fixture file, two per image
    ["A man with a red helmet on a small moped on a dirt road.", "A man riding a horse."],
    ["A cat is sitting on a red couch.", "The cat is on the mat."],
    ["A dog sitting next to a cat.", "A man rides a brown horse."],
    ["A lamp on top of a table.", "A cat to the left of a dog."],
]
# A parse that is not a tree (word 1 and 2 are each other's heads): the rules refuse it.
BROKEN = """# text = A broken parse.
1	A	a	DET	DT	_	2	det	_	_
2	broken	broken	ADJ	JJ	_	1	amod	_	_
3	parse	parse	NOUN	NN	_	0	root	_	SpaceAfter=No
4	.	.	PUNCT	.	_	3	punct	_	_
"""


def write_coco(root: Path, captions: list[list[str]]) -> None:
    images = []
    for i, caps in enumerate(captions):
        name = f"COCO_train2014_{i:012d}.jpg"
        draw(root / "train2014" / name, i)
        images.append({"filepath": "train2014", "filename": name, "imgid": i, "split": "train", "cocoid": i,
                       "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i, "sentid": 2 * i + j}
                                     for j, c in enumerate(caps)]})
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))


def parsed_cfg(root: Path, tmp_path: Path, conllu: list[str], **kw) -> CocoKarpathy.Config:
    cfg = CocoKarpathy.Config(root=str(root), cache_dir=str(tmp_path / "cache"), parse=True, **kw)
    cfg.parser.backend, cfg.parser.conllu, cfg.parser.cache_dir = "conllu", conllu, str(tmp_path / "parses")
    return cfg


def test_parsed_captions_carry_their_graphs_and_negatives(tmp_path):
    write_coco(tmp_path / "coco", CAPTIONS)
    src = CocoKarpathy(parsed_cfg(tmp_path / "coco", tmp_path, [str(CONLLU)]), "train")
    first = src[0]
    graphs = first.extra["caption_graphs"]
    assert len(graphs) == 2
    # "A man with a red helmet on a small moped on a dirt road." as the fixture file says
    assert sorted(o.phrase() for o in graphs[0].objects) == ["dirt road", "man", "red helmet", "small moped"]
    assert ("man", "with", "helmet") in graphs[0].relation_triples()
    assert graphs[1].relation_triples() == [("man", "ride", "horse")]
    negatives = first.extra["negative_captions"](0)
    # Structure-CLIP's released example of a relation swap, on the same caption
    assert negatives["relation"] == "A helmet with a red man on a small moped on a dirt road."
    assert all(n != first.captions[0] for n in negatives.values())
    assert first.extra["negative_captions"](0) == negatives  # the same negatives every time
    # without `parse` a sample has neither (the graphs are not guessed)
    plain = CocoKarpathy(CocoKarpathy.Config(root=str(tmp_path / "coco"), cache_dir=str(tmp_path / "c2")), "train")
    assert "caption_graphs" not in plain[0].extra and "negative_captions" not in plain[0].extra


def test_a_caption_the_parser_cannot_read_is_a_named_bad_record(tmp_path):
    broken = tmp_path / "broken.conllu"
    broken.write_text(BROKEN)
    write_coco(tmp_path / "coco", CAPTIONS + [["A broken parse."]])
    cfg = parsed_cfg(tmp_path / "coco", tmp_path, [str(CONLLU), str(broken)])
    with pytest.raises(BadInput, match=r"dataset_coco.json: images\[4\] \(COCO_train2014_000000000004.jpg\): "
                                       r"the caption parser cannot read a caption"):
        CocoKarpathy(cfg, "train")
    cfg.skip_bad = True
    src = CocoKarpathy(cfg, "train")
    assert len(src) == 4 and src.report()["skipped_records"] == 1


def test_negclip_trains_on_parsed_negatives(tmp_path):
    write_coco(tmp_path / "coco", CAPTIONS * 2)
    args = [a for a in TINY_ARGS if not a.startswith("data.options.")]
    cfg = compose_train(["method=negclip", "data=coco", f"data.options.root={tmp_path / 'coco'}",
                         "data.options.parse=true", "data.options.parser.backend=conllu",
                         f"data.options.parser.conllu=[{CONLLU}]", f"data.options.parser.cache_dir={tmp_path / 'p'}",
                         f"data.options.cache_dir={tmp_path / 'cache'}", f"cache_dir={tmp_path / 'cache'}",
                         "method.hard_images=false", *args])
    module, dm = build(cfg)
    dm.prepare_data()
    ds = dm.dataset("train")
    items = [ds[i] for i in range(len(ds))]
    assert sum(bool(it["has_neg"]) for it in items) == len(items)  # every fixture caption offers a negative
    loss, terms = module.training_loss(collate(items[:4]))
    assert loss.isfinite() and "contrastive_loss" in terms


@pytest.mark.parametrize("method", ["negclip", "structureclip"])
def test_a_method_that_reads_negatives_or_graphs_refuses_unparsed_captions(tmp_path, method):
    write_coco(tmp_path / "coco", CAPTIONS)
    args = [a for a in TINY_ARGS if not a.startswith("data.options.")]
    cfg = compose_train([f"method={method}", "data=coco", f"data.options.root={tmp_path / 'coco'}",
                         f"data.options.cache_dir={tmp_path / 'cache'}", f"cache_dir={tmp_path / 'cache'}",
                         "method.hard_images=false" if method == "negclip" else "method.kee=true", *args])
    _, dm = build(cfg)
    with pytest.raises(ValueError, match="data source 'coco_karpathy' offers no .*data.options.parse=true"):
        dm.setup("fit")


def test_smartclip_leaving_true_captions_out_refuses_a_source_without_graphs_of_images(tmp_path):
    """`method.exclude_entailed` needs the image's own graph: COCO has none, and parsing its captions gives none."""
    write_coco(tmp_path / "coco", CAPTIONS)
    args = [a for a in TINY_ARGS if not a.startswith("data.options.")]
    cfg = compose_train(["method=smartclip", "method.exclude_entailed=true", "data=coco",
                         f"data.options.root={tmp_path / 'coco'}", f"data.options.cache_dir={tmp_path / 'cache'}",
                         f"cache_dir={tmp_path / 'cache'}", *args])
    _, dm = build(cfg)
    with pytest.raises(ValueError, match="offers no scene graphs of images and of their captions.*a parse of the "
                                         "captions is not one"):
        dm.setup("fit")


def test_structureclip_reads_parsed_triples_in_written_forms_unless_told(tmp_path):
    """The KEE's triples of a parsed caption are in the caption's words by default (as Structure-CLIP's released
    files write them: "riding", "dogs", lemmatised attributes, no numerals); `method.triple_forms=parser` gives the
    parser's lemmas; an unknown form is refused."""
    from datamodules.fields import triple_tokens

    write_coco(tmp_path / "coco", [["A man riding a horse.", "Two dogs playing with a frisbee."]] * 4)
    args = [a for a in TINY_ARGS if not a.startswith("data.options.")]
    base = ["method=structureclip", "data=coco", f"data.options.root={tmp_path / 'coco'}",
            "data.options.parse=true", "data.options.parser.backend=conllu", f"data.options.parser.conllu=[{CONLLU}]",
            f"data.options.parser.cache_dir={tmp_path / 'p'}", f"data.options.cache_dir={tmp_path / 'cache'}",
            f"cache_dir={tmp_path / 'cache'}", "data.caption_sampling=first", *args]

    def triples_of(*extra):
        module, dm = build(compose_train([*base, *extra]))
        dm.prepare_data()
        item = dm.dataset("train")[0]
        return module, item["triple_ids"], item["triple_mask"]

    module, ids, mask = triples_of()
    written = triple_tokens([SceneGraph((Entity("man"), Entity("horse")), (Relation(0, "riding", 1),))],
                            module.kee.tokenize, module.mcfg.max_triples)
    assert torch.equal(ids, written["triple_ids"][0]) and torch.equal(mask, written["triple_mask"][0])
    _, ids, _ = triples_of("method.triple_forms=parser")
    lemmas = triple_tokens([SceneGraph((Entity("man"), Entity("horse")), (Relation(0, "ride", 1),))],
                           module.kee.tokenize, module.mcfg.max_triples)
    assert torch.equal(ids, lemmas["triple_ids"][0])
    with pytest.raises(ValueError, match="triple_forms must be one of written, parser"):
        build(compose_train([*base, "method.triple_forms=lemma"]))

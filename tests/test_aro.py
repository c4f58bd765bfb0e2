"""ARO on fixture files in the real formats, with a stand-in model whose choices are known by construction."""
from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from benchmarks.aro import MANY_SENTENCES, excluded_relations, order_options, word_tokenizer
from benchmarks.base import BENCHMARKS
from benchmarks.formats import pre_caption
from benchmarks.real import ImageFiles, ImageRef
from datamodules.images import BadRecords
from datamodules.negatives import order_negatives
from fixtures.make_benchmark_data import make

from benchmark_standins import StandIn, context


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make(tmp_path_factory.mktemp("bench-data"))


def records(fx, name):
    return json.loads((fx.root / "aro" / name).read_text())


def test_the_shipped_exclusion_list_is_aros_157_relations():
    excluded = excluded_relations()
    assert len(excluded) == 157
    assert {"next to", "with", "near", "by", "of", "beside", "holding onto"} <= excluded
    assert not {"on", "behind", "wearing", "holding", "in front of", "to the left of"} & excluded


def test_vg_relation_macro_averages_by_hand_with_and_without_the_excluded_relations(fx):
    recs = records(fx, "visual_genome_relation.json")
    wearing = [r for r in recs if r["relation_name"] == "wearing"]
    # the model prefers the true caption for every "on" and "next to" record and the first "wearing" one,
    # the false caption for "behind"; it ties on the rest ("holding", "with", the second "wearing")
    prefer = {r["true_caption"] for r in recs if r["relation_name"] in ("on", "next to")} | {wearing[0]["true_caption"]}
    prefer |= {r["false_caption"] for r in recs if r["relation_name"] == "behind"}
    model = StandIn(lambda t: [1.0 if t in prefer else 0.5, 0.0])
    result = BENCHMARKS.get("vg_relation")(context(model, fx.root))
    # per relation: on 1, behind 0, wearing 1/2, holding 0 (tie = wrong); excluded: next to 1, with 0 (tie)
    assert result.metrics["vg_relation"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert result.metrics["vg_relation/all_relations"] == pytest.approx((1 + 0 + 0.5 + 0 + 1 + 0) / 6)
    rows = {d["relation"]: d for d in result.details}
    assert {r: (d["accuracy"], d["count"], d["excluded_symmetric"]) for r, d in rows.items()} == {
        "on": (1.0, 3, False), "behind": (0.0, 2, False), "wearing": (0.5, 2, False), "holding": (0.0, 1, False),
        "next to": (1.0, 2, True), "with": (0.0, 1, True)}


def test_vg_crops_are_the_records_boxes_and_each_crop_is_encoded_once(fx):
    recs = records(fx, "visual_genome_relation.json")
    model = StandIn(lambda t: [0.5, 0.0])
    BENCHMARKS.get("vg_relation")(context(model, fx.root))
    boxes = {(r["image_path"], r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"]) for r in recs}
    assert sorted(model.sizes) == sorted((b[3], b[4]) for b in boxes)  # one crop per distinct (image, box)
    # the crop is ARO's image.crop((x, y, x + w, y + h)) after convert("RGB")
    r = recs[3]
    path = fx.root / "aro" / "images" / r["image_path"]
    box = (r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"])
    crop = ImageFiles([ImageRef(str(path), box)], ["record 3"], lambda im: im).load(0)
    from PIL import Image
    whole = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(crop), whole[box[1]:box[1] + box[3], box[0]:box[0] + box[2]])


def test_vg_options_carry_their_own_triples_where_the_record_has_them(fx):
    recs = records(fx, "visual_genome_relation.json")
    model = StandIn(lambda t: [0.5, 0.0])
    BENCHMARKS.get("vg_relation")(context(model, fx.root))
    encoded = {text: graph for text, graph in model.pairs}
    with_triples = [r for r in recs if "true_triples" in r]
    assert with_triples and len(with_triples) < len(recs)
    for r in recs:
        for caption, key in ((r["true_caption"], "true_triples"), (r["false_caption"], "false_triples")):
            graph = encoded[caption]
            if key in r:
                assert [list(t) for t in graph.triples()] == r[key]
            else:
                assert graph is None


def test_vg_attribution_drops_pairs_under_25_then_macro_averages(fx):
    recs = records(fx, "visual_genome_attribution.json")
    red_blue = [r for r in recs if r["attributes"][:2] == ["red", "blue"]]
    # true preferred: all white/black (26) and wooden/metal (3), the first 10 of red/blue (25); small/large (24) ties
    prefer = {r["true_caption"] for r in recs if r["attributes"][0] in ("white", "wooden")}
    prefer |= {r["true_caption"] for r in red_blue[:10]}
    model = StandIn(lambda t: [1.0 if t in prefer else 0.5, 0.0])
    result = BENCHMARKS.get("vg_attribution")(context(model, fx.root))
    assert result.metrics["vg_attribution"] == pytest.approx((1.0 + 10 / 25) / 2)  # only the pairs with >= 25 cases
    rows = {d["attributes"]: (d["accuracy"], d["count"], d["kept"]) for d in result.details}
    assert rows == {"white_black": (1.0, 26, True), "red_blue": (0.4, 25, True), "small_large": (0.0, 24, False),
                    "wooden_metal": (1.0, 3, False)}


def test_pre_caption_is_aros():
    assert pre_caption("A man (in a hat) rides: a horse!  ") == "a man in a hat rides a horse"
    assert pre_caption("Two dogs, a cat's toy; and #1 ~ball*.") == "two dogs, a cat's toy and 1 ball"
    assert pre_caption(" ".join(f"w{i}" for i in range(40))) == " ".join(f"w{i}" for i in range(30))
    assert pre_caption("road .") == "road" and pre_caption("A\tB") == "a\tb"  # one tab is no run of whitespace


def simple_tagger(fx, seen=None):
    def tag(texts):
        if seen is not None:
            seen.extend(texts)
        return [fx.tags[t] for t in texts]  # a KeyError if the caption was not stripped as the parses were made
    return tag


def test_order_options_tag_the_raw_caption_and_pre_caption_every_option(fx):
    raw = "The dog is sitting near the wooden street, and a road is near the wooden dog "
    seen = []
    (row,) = order_options([raw], ["f:record 0 caption 0"], simple_tagger(fx, seen), np.random.default_rng(1),
                           BadRecords())
    assert seen == [raw.strip()]
    assert row[0] == "the dog is sitting near the wooden street, and a road is near the wooden dog"
    words, tags = zip(*fx.tags[raw.strip()])
    expected = order_negatives(list(words), list(tags), np.random.default_rng(1))
    assert row[1:] == [pre_caption(s) for s in expected]  # ARO's order: nouns/adj, all but, within trigrams, trigrams
    assert all(sorted(o.replace(",", " ,").split()) == sorted(row[0].replace(",", " ,").split()) for o in row[1:])


def test_trigram_shuffles_split_the_caption_as_nltk_does_and_the_others_take_the_taggers_words():
    raw = 'A black-and-white cat sits on a "red" couch.'
    # the parser splits the hyphens (as Stanza and spaCy do); ARO's trigram shuffles read NLTK's word_tokenize
    tokens = [("A", "DT"), ("black", "JJ"), ("-", "HYPH"), ("and", "CC"), ("-", "HYPH"), ("white", "JJ"),
              ("cat", "NN"), ("sits", "VBZ"), ("on", "IN"), ("a", "DT"), ('"', "``"), ("red", "JJ"), ('"', "''"),
              ("couch", "NN"), (".", ".")]
    tokenize, _ = word_tokenizer()
    nltk_words = tokenize(raw)
    assert nltk_words == ["A", "black-and-white", "cat", "sits", "on", "a", "``", "red", "''", "couch", "."]
    (row,) = order_options([raw], ["f:0"], lambda texts: [tokens for _ in texts], np.random.default_rng(3),
                           BadRecords(), tokenize=tokenize)
    words, tags = [w for w, _ in tokens], [t for _, t in tokens]
    expected = order_negatives(words, tags, np.random.default_rng(3), trigram_words=nltk_words)
    assert row[1:] == [pre_caption(s) for s in expected]
    assert "black-and-white" in row[3].split() and "black-and-white" in row[4].split()  # the trigram shuffles
    assert "black-and-white" not in row[1].split() + row[2].split()  # the tagger's words, hyphens apart
    assert "``" in row[3] and "''" in row[4]  # NLTK's quotes survive pre_caption, as in ARO


def test_captions_of_several_sentences_are_recognised_for_the_punkt_note():
    assert MANY_SENTENCES.search("A man rides a bike. He wears a helmet.")
    assert MANY_SENTENCES.search('A sign says "stop!" next to a road')
    assert not MANY_SENTENCES.search("A man rides a bike.") and not MANY_SENTENCES.search("A 3.5 inch screen")


def _originals(fx, dataset, file):
    data = json.loads((fx.root / dataset / file).read_text())
    return data, {" ".join(c.lower().replace(".", " ").split()): i for i, e in enumerate(data) for c in e["caption"]}


def test_order_ties_count_as_right(fx):
    model = StandIn(lambda t: [0.5, 0.0])
    ctx = context(model, fx.root)
    ctx.cache["order_tagger"] = simple_tagger(fx)
    assert BENCHMARKS.get("coco_order")(ctx).metrics == {"coco_order": 1.0}
    assert BENCHMARKS.get("flickr30k_order")(ctx).metrics == {"flickr30k_order": 1.0}


def test_order_accuracy_by_construction(fx):
    data, originals = _originals(fx, "coco", "coco_karpathy_test.json")
    dims = {f"coco/{e['image']}": i for i, e in enumerate(data)}
    chosen = {0, 2}  # images whose captions the model gets right: 5 + 6 of the 31 captions

    def vector(text):  # the original scores 1 with its own image when chosen, 0 otherwise; a shuffle 0.5 everywhere
        if text in originals:
            return [1.0 if (i == originals[text] and i in chosen) else 0.0 for i in range(len(data))]
        return [0.5] * len(data)

    model = StandIn(vector, fx.colours, dims, dim=len(data))
    ctx = context(model, fx.root)
    ctx.cache["order_tagger"] = simple_tagger(fx)
    result = BENCHMARKS.get("coco_order")(ctx)
    assert sum(len(e["caption"]) for e in data) == 31 and len(data[2]["caption"]) == 6
    assert result.metrics["coco_order"] == pytest.approx(11 / 31)
    assert model.sizes and len(model.sizes) == len(data)  # each image read once for 31 cases


def test_encoding_precision_defaults_to_float16_autocast_on_a_gpu_only_and_the_notes_say_which(fx, monkeypatch):
    from benchmarks.real import use_amp

    model = StandIn(lambda t: [0.5, 0.0])
    assert use_amp(context(model, fx.root)) is None  # a CPU model: float32
    assert use_amp(context(model, fx.root, amp=True)) is torch.float16  # CLIP_benchmark's autocast
    assert use_amp(context(model, fx.root, amp=True, amp_dtype="bfloat16")) is torch.bfloat16
    notes = BENCHMARKS.get("vg_relation")(context(model, fx.root)).notes
    assert any("encoded in float32" in n for n in notes)
    # on a GPU: float16 autocast, but SugarCrepe as its main_eval.py in float32 unless bench.amp is set
    import benchmarks.real

    monkeypatch.setattr(benchmarks.real, "_device", lambda m: torch.device("cuda"))
    assert use_amp(context(model, fx.root)) is torch.float16 and use_amp(context(model, fx.root), True) is None
    assert use_amp(context(model, fx.root, amp=True), True) is torch.float16
    monkeypatch.undo()
    notes = BENCHMARKS.get("vg_relation")(context(model, fx.root, amp=True)).notes
    assert any("encoded under float16 autocast" in n for n in notes)

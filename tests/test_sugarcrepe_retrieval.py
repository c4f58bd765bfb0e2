"""SugarCrepe and COCO/Flickr30k retrieval on fixture files in the real formats, with stand-in models whose
scores the test sets, so every number is computed by hand."""
from __future__ import annotations

import json

import pytest

from benchmarks.base import BENCHMARKS
from fixtures.make_benchmark_data import SUGARCREPE_SUBSETS, make

from benchmark_standins import StandIn, context


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make(tmp_path_factory.mktemp("bench-data"))


def test_sugarcrepe_per_subset_groups_and_overall_by_hand(fx):
    cases = {s: json.loads((fx.root / "sugarcrepe" / f"{s}.json").read_text()) for s in SUGARCREPE_SUBSETS}
    assert list(cases["swap_obj"]) == ["0", "1", "3", "7"]  # keys skip numbers, as in the release
    images = sorted({c["filename"] for subset in cases.values() for c in subset.values()})
    dims = {f"coco/val2017/{name}": i for i, name in enumerate(images)}
    vectors = {}
    for subset in cases.values():
        # per subset, in key order: the caption wins, the negative wins, a tie (wrong), then the caption wins
        for n, case in enumerate(subset.values()):
            pos, neg = {0: (1.0, 0.5), 1: (0.5, 1.0), 2: (0.5, 0.5)}.get(n, (1.0, 0.5))
            own = dims[f"coco/val2017/{case['filename']}"]  # the score is on the case's own image only
            vectors[case["caption"]] = [pos if i == own else 0.0 for i in range(len(images))]
            vectors[case["negative_caption"]] = [neg if i == own else 0.0 for i in range(len(images))]
    model = StandIn(vectors.__getitem__, fx.colours, dims, dim=len(images))
    result = BENCHMARKS.get("sugarcrepe")(context(model, fx.root))
    m = result.metrics
    # sizes: add_att 3, add_obj 4, replace_att 5, replace_obj 3, replace_rel 4, swap_att 5, swap_obj 4
    expected = {"add_att": 1 / 3, "add_obj": 2 / 4, "replace_att": 3 / 5, "replace_obj": 1 / 3, "replace_rel": 2 / 4,
                "swap_att": 3 / 5, "swap_obj": 2 / 4}
    for subset, acc in expected.items():
        assert m[f"sugarcrepe/{subset}"] == pytest.approx(acc), subset
    assert m["sugarcrepe/replace"] == pytest.approx((3 / 5 + 1 / 3 + 2 / 4) / 3)
    assert m["sugarcrepe/swap"] == pytest.approx((3 / 5 + 2 / 4) / 2)
    assert m["sugarcrepe/add"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert m["sugarcrepe/overall"] == pytest.approx(14 / 28)  # micro: 14 right of 28 cases
    assert {d["subset"]: d["count"] for d in result.details} == {"add_att": 3, "add_obj": 4, "replace_att": 5,
                                                                  "replace_obj": 3, "replace_rel": 4, "swap_att": 5,
                                                                  "swap_obj": 4}
    assert len(model.sizes) == len(images)  # images shared between subsets are read and encoded once


def test_retrieval_recall_on_a_constructed_similarity_matrix_both_ways(fx):
    data = json.loads((fx.root / "flickr30k" / "flickr30k_test.json").read_text())
    assert [len(e["caption"]) for e in data] == [5, 5, 5, 5]
    dims = {f"flickr30k/{e['image']}": i for i, e in enumerate(data)}
    # score of caption j of image X with images (A, B, C, D); own image 0.5 + 0.01 j unless listed
    rows = {}
    for i, e in enumerate(data):
        for j, caption in enumerate(e["caption"]):
            row = [0.0] * 4
            row[i] = 0.5 + 0.01 * j
            rows[caption] = row
    a, b, c, d = (e["caption"] for e in data)
    for j, caption in enumerate(a):
        rows[caption][3] = 0.8 + 0.01 * j  # A's captions all prefer D
    rows[b[1]] = [0.6, 0.51, 0.0, 0.0]  # B's caption 1 prefers A
    rows[c[2]] = [0.55, 0.0, 0.52, 0.7]  # C's caption 2 ranks C third
    model = StandIn(rows.__getitem__, fx.colours, dims, dim=4)
    m = BENCHMARKS.get("flickr30k_retrieval")(context(model, fx.root)).metrics
    # text -> image, over 20 captions: right at rank 1 for B's 4, C's 4 and D's 5; every own image in the top 4
    assert m["flickr30k_retrieval/t2i_R@1"] == pytest.approx(13 / 20)
    assert m["flickr30k_retrieval/t2i_R@5"] == m["flickr30k_retrieval/t2i_R@10"] == 1.0
    # image -> text, over 4 images: A's column tops with B1 (0.6), C2 (0.55), then A4 (0.54): miss at 1, hit at 5;
    # B and C: their own captions top; D's column: A's five (0.80-0.84), C2 (0.7), then D's own at ranks 7-11
    assert m["flickr30k_retrieval/i2t_R@1"] == pytest.approx(2 / 4)
    assert m["flickr30k_retrieval/i2t_R@5"] == pytest.approx(3 / 4)
    assert m["flickr30k_retrieval/i2t_R@10"] == 1.0


def test_coco_retrieval_with_an_image_of_six_captions_and_shared_image_encodings(fx):
    data = json.loads((fx.root / "coco" / "coco_karpathy_test.json").read_text())
    dims = {f"coco/{e['image']}": i for i, e in enumerate(data)}
    own = {c: i for i, e in enumerate(data) for c in e["caption"]}
    model = StandIn(lambda t: [1.0 if own.get(t) == i else 0.0 for i in range(len(data))], fx.colours, dims,
                    dim=len(data))
    ctx = context(model, fx.root)
    m = BENCHMARKS.get("coco_retrieval")(ctx).metrics
    assert all(v == 1.0 for v in m.values()) and len(m) == 6
    ctx.cache["order_tagger"] = lambda texts: [[(w, "NN") for w in t.split()] for t in texts]
    result = BENCHMARKS.get("coco_order")(ctx)  # the same Karpathy images: read and encoded once for both
    assert len(model.sizes) == len(data) and model.image_batches == 1
    assert any("shared with an earlier benchmark" in n for n in result.notes)

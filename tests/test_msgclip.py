"""MSG-CLIP: the towers' token outputs equal open_clip's own features, the image graph's regions and pooled
entities have the promised shapes and ranges, each loss term equals a direct computation on a hand-made
batch (and splits over ranks), the graph-text field says what the scene graph says, no parameter is added."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from datamodules.datamodule import collate, trim_caption_tokens
from datamodules.fields import crop_box, phrase_key
from methods.losses import entity_alignment_loss, pooled_entity_alignment_loss, triple_alignment_loss
from methods.regions import patch_coverage, pool, text_attention, text_pooled_scores, union
from methods.towers import encode_image_tokens, encode_text_tokens
from methods.train import build


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def ce(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], written out."""
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


@pytest.fixture(scope="module")
def msg(tmp_path_factory):
    from methods.train import compose_train
    from tests_support import TINY_ARGS

    cfg = compose_train([f"runs_dir={tmp_path_factory.mktemp('runs')}", *TINY_ARGS, "method=msgclip"])
    torch.manual_seed(0)  # the same weights whichever tests ran before
    module, dm = build(cfg)
    random.seed(0)
    ds = dm.dataset("train")
    return module, ds, collate([ds[i] for i in range(8)])


def test_token_outputs_equal_open_clips_features(msg):
    module, _, batch = msg
    model = module.model.eval()
    with torch.no_grad():
        pooled, patches = encode_image_tokens(model.visual, batch["image"])
        torch.testing.assert_close(pooled, model.encode_image(batch["image"]))
        assert patches.shape == (8, 16, pooled.shape[1])  # 32 px, patch 8: a 4 x 4 grid
        full, states = encode_text_tokens(model, batch["text"])
        trimmed, short = encode_text_tokens(model, trim_caption_tokens({"text": batch["text"]}, 1)["text"])
        torch.testing.assert_close(full, model.encode_text(batch["text"]))
        # causal: the padding changes nothing but float rounding (shorter matmuls sum in another order: up to 1.5e-6
        # seen, on features of 0.9 on average, one of them near 0.02), whatever weights earlier tests left
        torch.testing.assert_close(trimmed, full, rtol=1e-4, atol=1e-5)
        assert states.shape[1] == batch["text"].shape[1] > short.shape[1]
    model.train()


def test_patch_coverage_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 0.25, 0.25],  # exactly patch (0, 0) of a 4 x 4 grid
                          [0.125, 0.5, 0.375, 0.75],  # half of patch (2, 0) and half of (2, 1)
                          [0.0, 0.0, 1.0, 1.0]])
    cover = patch_coverage(boxes, (4, 4))
    assert cover.shape == (3, 16) and cover.min() >= 0 and cover.max() <= 1
    assert torch.equal(cover[0], F.one_hot(torch.tensor(0), 16).float())
    expected = torch.zeros(16)
    expected[8], expected[9] = 0.5, 0.5
    torch.testing.assert_close(cover[1], expected)
    assert torch.equal(cover[2], torch.ones(16))


def test_pooled_entities_shapes_and_ranges():
    patches = torch.randn(2, 16, 6, dtype=torch.float64)
    queries = unit(2, 3, 6, seed=1)
    att = text_attention(queries, patches, 0.07)
    assert att.shape == (2, 3, 16) and (att >= 0).all()
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    weights = torch.cat([att[:, :2], torch.zeros(2, 1, 16, dtype=torch.float64)], dim=1)  # third entity: padding
    nodes = pool(weights, patches)
    assert nodes.shape == (2, 3, 6)
    torch.testing.assert_close(nodes[:, :2].norm(dim=-1), torch.ones(2, 2, dtype=torch.float64))
    assert torch.equal(nodes[:, 2], torch.zeros(2, 6, dtype=torch.float64))
    # a relation's evidence: the elementwise max of its subject's and object's weights
    pairs = torch.tensor([[[0, 1]], [[1, 0]]])
    torch.testing.assert_close(union(att, pairs)[:, 0], torch.maximum(att[:, 0], att[:, 1]))


def test_text_pooled_scores_equal_pooling_each_pair():
    patches = torch.randn(3, 5, 4, dtype=torch.float64)
    texts = unit(2, 4, seed=2)
    got = text_pooled_scores(texts, patches, 0.5)
    for n in range(2):
        for b in range(3):
            a = (texts[n] @ F.normalize(patches[b], dim=-1).T / 0.5).softmax(-1)  # (P,)
            assert math.isclose(got[n, b].item(), float(texts[n] @ F.normalize(a @ patches[b], dim=0)), rel_tol=1e-9)


def test_entity_loss_by_hand_and_over_ranks():
    regions, texts = unit(6, 5, seed=3), unit(6, 5, seed=4)
    key = torch.tensor([1, 2, 3, 1, 5, 6])  # entities 0 and 3 share a phrase
    valid = torch.tensor([1.0, 1, 1, 1, 1, 0])  # entity 5 is padding
    s = 10.0
    total = 0.0
    for i in range(5):
        keep = [j for j in range(6) if j == i or (key[j] != key[i] and valid[j] > 0)]
        total += ce([s * float(regions[i] @ texts[j]) for j in keep], keep.index(i))
        total += ce([s * float(texts[i] @ regions[j]) for j in keep], keep.index(i))
    expected = total / (2 * 5)
    got = entity_alignment_loss(regions, texts, regions, texts, key, key, valid, valid, s, 0, torch.tensor(5.0))
    assert math.isclose(got.item(), expected, rel_tol=1e-9)
    # two ranks of 3 rows with unequal valid counts (3 and 2): the mean over ranks is still the global mean
    ranks = [entity_alignment_loss(regions[r * 3:(r + 1) * 3], texts[r * 3:(r + 1) * 3], regions, texts,
                                   key[r * 3:(r + 1) * 3], key, valid[r * 3:(r + 1) * 3], valid, s, r,
                                   torch.tensor(5.0 / 2)) for r in range(2)]
    assert math.isclose(sum(ranks).item() / 2, expected, rel_tol=1e-9)


def test_pooled_entity_loss_by_hand():
    # 2 images with 2 entity slots each; image 1's second slot is padding; entities 0 and 2 share a phrase
    t2i = torch.tensor([[0.9, 0.1], [0.5, 0.2], [0.3, 0.8], [0.0, 0.0]], dtype=torch.float64)  # s(e, image)
    i2t = torch.tensor([[0.9, 0.5, 0.4, 0.1], [0.7, 0.5, 0.1, 0.0], [0.6, 0.2, 0.8, 0.3],
                        [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # row e: s(e', owner(e)) for every e'
    owner, key = torch.tensor([0, 0, 1, 1]), torch.tensor([7, 8, 7, -1])
    valid = torch.tensor([1.0, 1, 1, 0])
    s = 5.0
    got = pooled_entity_alignment_loss(t2i, i2t, owner, owner, key, key, key.view(2, 2), valid, valid, s, 0,
                                       torch.tensor(3.0))
    # by hand: entity 0 ("7") is in both images, so only its own image stays (CE 0); entity 1 against both images;
    # entity 2 ("7") likewise alone. Image->text: every entity whose phrase the row's image holds leaves: for
    # entity 1 ("8", image 0 = {7, 8}) that is entity 0 (its image) and entity 2 (phrase 7, in another image: a
    # true match for image 0, not a negative); entity 2's image 1 = {7} keeps entity 1 ("8") as its negative
    t2i_sum = 0.0 + ce([s * 0.5, s * 0.2], 0) + 0.0
    i2t_sum = ce([s * 0.9], 0) + ce([s * 0.5], 0) + ce([s * 0.2, s * 0.8], 1)
    assert math.isclose(got.item(), (t2i_sum + i2t_sum) / 6, rel_tol=1e-9)


def test_triple_loss_by_hand():
    evidence, triples, hard = unit(3, 4, seed=5), unit(3, 4, seed=6), unit(3, 2, 4, seed=7)
    hard_valid = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    key, valid = torch.tensor([4, 4, 9]), torch.tensor([1.0, 1.0, 1.0])
    s = 3.0
    total = 0.0
    for i in range(3):
        cols = [j for j in range(3) if j == i or key[j] != key[i]]
        logits = [s * float(evidence[i] @ triples[j]) for j in cols]
        logits += [s * float(evidence[i] @ hard[i, h]) for h in range(2) if hard_valid[i, h] > 0]
        total += ce(logits, cols.index(i))
    got = triple_alignment_loss(evidence, triples, hard, hard_valid, key, key, valid, valid, s, 0, torch.tensor(3.0))
    assert math.isclose(got.item(), total / 3, rel_tol=1e-9)
    alone = triple_alignment_loss(evidence, triples, hard, hard_valid, key, key, valid, valid, s, 0,
                                  torch.tensor(3.0), batch_negatives=False)
    by_hand = sum(ce([s * float(evidence[i] @ triples[i])] + [s * float(evidence[i] @ hard[i, h]) for h in range(2)
                     if hard_valid[i, h] > 0], 0) for i in range(3))
    assert math.isclose(alone.item(), by_hand / 3, rel_tol=1e-9)


def test_graph_texts_field_says_what_the_graph_says(msg):
    module, ds, batch = msg
    decode = lambda ids: module.tokenizer.decode([t for t in ids.tolist() if t]).replace("<start_of_text>", "") \
        .replace("<end_of_text>", "").strip()  # noqa: E731
    random.seed(3)
    item, sample = ds[0], ds.source[0]
    k = sample.captions.index(item["caption"])
    g = sample.extra["caption_graphs"][k]
    a, b = g.objects
    article = lambda t: ("an " if t[0] in "aeiou" else "a ") + t  # noqa: E731
    assert [decode(item["entity_text"][i]) for i in range(2)] == [article(a.phrase()), article(b.phrase())]
    assert item["entity_valid"].tolist() == [True, True, False, False]
    assert item["entity_key"][0] == phrase_key(article(a.phrase())) and item["entity_key"][2] == -1
    # pooling: regions (the default): no entity has a box; the image offers every object's box, largest first, and
    # nothing says which entity is which region
    assert not item["entity_has_box"].any() and not item["entity_box"].any()
    frame = lambda e: torch.tensor([e.box[0], e.box[1], e.box[0] + e.box[2], e.box[1] + e.box[3]]) / 32  # noqa: E731
    by_area = sorted(sample.graph.objects, key=lambda e: -e.box[2] * e.box[3])
    n = len(by_area)
    assert item["region_valid"].tolist() == [True] * n + [False] * (8 - n)
    torch.testing.assert_close(item["region_box"][:n], torch.stack([frame(e) for e in by_area]))
    assert {tuple(frame(x).tolist()) for x in (a, b)} <= {tuple(r.tolist()) for r in item["region_box"][:n]}
    (r,) = g.relations
    words = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
    s, o = g.objects[r.subject], g.objects[r.object]
    assert decode(item["triple_text"][0]) == f"{article(s.phrase())} {words[r.predicate]} {article(o.phrase())}"
    assert decode(item["triple_hard"][0, 0]) == f"{article(o.phrase())} {words[r.predicate]} {article(s.phrase())}"
    swapped_attrs = f"{article(' '.join(o.attributes + (s.name,)))} {words[r.predicate]} " \
                    f"{article(' '.join(s.attributes + (o.name,)))}"
    assert decode(item["triple_hard"][0, 1]) == swapped_attrs
    assert item["triple_args"][0].tolist() == [r.subject, r.object] and item["triple_hard_valid"][0].all()
    assert not item["triple_valid"][1:].any()
    # the crop frame: a 200 x 100 image is cut to its centre 100 x 100
    assert crop_box((50.0, 0.0, 100.0, 50.0), (200, 100)) == (0.0, 0.0, 1.0, 0.5)
    assert crop_box((0.0, 0.0, 40.0, 40.0), (200, 100)) is None


def test_no_parameter_is_added_and_zero_weights_are_vanilla_clip(make_cfg):
    clip, _ = build(make_cfg("method=clip"))
    torch.manual_seed(0)
    msg, dm = build(make_cfg("method=msgclip"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(msg) == count(clip) and len(list(msg.parameters())) == len(list(clip.parameters()))
    torch.manual_seed(0)
    base, dm = build(make_cfg("method=msgclip", "method.entity_weight=0", "method.triple_weight=0"))
    assert base.fields() == ()
    random.seed(0)
    batch = collate([dm.dataset("train")[i] for i in range(8)])
    loss, terms = base.training_loss(batch)
    assert set(terms) == {"contrastive_loss"}
    torch.manual_seed(0)
    clip, _ = build(make_cfg("method=clip"))
    torch.testing.assert_close(loss, clip.training_loss(batch)[0])


@pytest.mark.parametrize("argv", [["method.pooling=text"], ["method.pooling=boxes"], ["method.pooling=auto"],
                                  ["method.triple_attributes=false", "method.hard_negatives=[swapped]"]])
def test_variants_take_a_finite_step(make_cfg, argv):
    module, dm = build(make_cfg("method=msgclip", *argv))
    random.seed(0)
    batch = collate([dm.dataset("train")[i] for i in range(8)])
    assert batch["entity_has_box"].any() == (argv[0] in ("method.pooling=boxes", "method.pooling=auto"))
    assert ("region_box" in batch) == argv[0].startswith("method.triple")  # the default pooling: regions
    loss, terms = module.training_loss(batch)
    assert torch.isfinite(loss) and {"entity_loss", "triple_loss"} <= set(terms)
    loss.backward()
    assert module.model.visual.conv1.weight.grad.abs().sum() > 0


def test_bad_options_are_named(make_cfg):
    with pytest.raises(ValueError, match="unknown pooling 'box'; available: regions, boxes, text"):
        build(make_cfg("method=msgclip", "method.pooling=box"))
    with pytest.raises(ValueError, match="unknown hard negatives.*available: swapped, corrupted"):
        build(make_cfg("method=msgclip", "method.hard_negatives=[reversed]"))


def test_an_object_outside_the_models_crop_is_no_entity_and_in_no_triple():
    """A 640 x 480 image is cut to its centre 480 x 480 (x from 80): a dog at x 10-70 is not in what the model sees."""
    import random as stdlib_random

    from PIL import Image

    from datamodules.fields import FieldContext, graph_texts_field
    from datamodules.graph import Entity, Relation, SceneGraph
    from datamodules.source import Sample

    graph = SceneGraph((Entity("man", (), (300.0, 100.0, 100.0, 200.0)), Entity("dog", (), (10.0, 380.0, 60.0, 60.0)),
                        Entity("bench", (), (200.0, 300.0, 200.0, 100.0))),
                       (Relation(0, "near", 1), Relation(0, "on", 2)))
    sample = Sample(image=Image.new("RGB", (640, 480)), captions=["a man near a dog, on a bench"], graph=graph,
                    key="k", extra={"caption_graphs": [graph]})
    ctx = FieldContext(tokenize=lambda ts, **kw: torch.zeros(len(ts), 8, dtype=torch.long), rng=stdlib_random.Random(0),
                       split="train", source=None, transform=None, index=0, options={})
    out = graph_texts_field(sample, 0, ctx)
    assert out["entity_valid"].tolist() == [True, False, True, False]
    assert out["entity_has_box"].tolist() == [True, False, True, False]
    assert out["triple_valid"].tolist() == [True, False, False, False]
    assert out["triple_args"][0].tolist() == [0, 2]  # "a man on a bench"; the dog's triple is left out


def test_region_max_scores_by_hand():
    from methods.regions import region_max_scores

    texts, regions = unit(3, 4, seed=1), unit(2, 3, 4, seed=2)
    valid = torch.tensor([[True, False, True], [False, False, False]])
    got = region_max_scores(texts, regions, valid)
    for n in range(3):
        assert math.isclose(got[n, 0].item(), max(float(texts[n] @ regions[0, k]) for k in (0, 2)), rel_tol=1e-12)
        assert got[n, 1].item() == -1.0  # no region: the caller scores the image another way


def test_regions_carry_no_label(msg):
    """pooling: regions reads no entity's box, and the order of an image's regions changes nothing."""
    module, _, batch = msg
    torch.manual_seed(0)
    with torch.no_grad():
        loss, terms = module.training_loss(batch)
        shuffled = dict(batch)
        order = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i)) for i in range(8)])
        shuffled["region_box"] = batch["region_box"].gather(1, order[..., None].expand(-1, -1, 4))
        shuffled["region_valid"] = batch["region_valid"].gather(1, order)
        shuffled["entity_box"] = torch.rand_like(batch["entity_box"])
        shuffled["entity_has_box"] = torch.ones_like(batch["entity_has_box"])
        loss2, terms2 = module.training_loss(shuffled)
    assert batch["region_valid"].sum(1).ge(2).all() and not batch["image_regionless"]
    for k in ("entity_loss", "triple_loss"):
        torch.testing.assert_close(terms2[k], terms[k])


def test_images_without_regions_score_as_pooling_text(make_cfg):
    """An image with no region falls back to the entity text's attention: with none anywhere, both terms equal
    pooling: text's on the same weights and batch."""
    torch.manual_seed(0)
    regions, dm = build(make_cfg("method=msgclip"))
    torch.manual_seed(0)
    text, _ = build(make_cfg("method=msgclip", "method.pooling=text"))
    random.seed(0)
    batch = collate([dm.dataset("train")[i] for i in range(8)])
    none = dict(batch, region_valid=torch.zeros_like(batch["region_valid"]), image_regionless=True)
    plain = {k: v for k, v in batch.items() if k not in ("region_box", "region_valid", "image_regionless")}
    with torch.no_grad():
        _, got = regions.training_loss(none)
        _, want = text.training_loss(plain)
        _, mixed = regions.training_loss(dict(batch, region_valid=batch["region_valid"] & (torch.arange(8) < 4)[:, None],
                                              image_regionless=True))
    for k in ("entity_loss", "triple_loss"):
        torch.testing.assert_close(got[k], want[k])
        assert torch.isfinite(mixed[k])


def test_a_symmetric_predicates_swap_is_no_hard_negative():
    """'a dog next to a cat' swapped is still true of the image: TRA does not push it away (a directed predicate's
    swap, 'a dog on a bench' -> 'a bench on a dog', stays a hard negative)."""
    import random as stdlib_random

    from PIL import Image

    from datamodules.fields import FieldContext, graph_texts_field
    from datamodules.graph import Entity, Relation, SceneGraph
    from datamodules.source import Sample

    graph = SceneGraph((Entity("dog"), Entity("cat"), Entity("bench")),
                       (Relation(0, "next to", 1), Relation(0, "on", 2), Relation(1, "Near", 2)))
    sample = Sample(image=Image.new("RGB", (64, 64)), captions=["a dog next to a cat, on a bench"], graph=graph,
                    key="k", extra={"caption_graphs": [graph]})
    ctx = FieldContext(tokenize=lambda ts, **kw: torch.zeros(len(ts), 8, dtype=torch.long), rng=stdlib_random.Random(0),
                       split="train", source=None, transform=None, index=0, options={})
    out = graph_texts_field(sample, 0, ctx)
    assert out["triple_valid"][:3].all()
    assert out["triple_hard_valid"][:3, 0].tolist() == [False, True, False]

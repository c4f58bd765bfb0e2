"""The shapes-world benchmarks, mirroring ARO and retrieval on a world whose scene graphs are exact.

- Syn-Relation: the true caption against the same caption with a relation's subject and object swapped
  (ARO VG-Relation's idea; a tie counts as wrong, as in ARO's VG benchmarks).
- Syn-Relation-Converse: the same pairs with each relation stated the other way ("b right of a" against "a right
  of b"), which tells relations learned from canonical captions alone from a phrasing the model has memorised.
- Syn-Attribution: the true caption against the one with the two objects' attributes swapped (tie = wrong).
- Syn-Order: the true caption against ARO's four word-order shuffles of it (tie = right, as ARO's Order).
- Syn-Retrieval: image->text and text->image Recall@1/5/10 with the canonical caption of each test image.
- Syn-Partial-Retrieval: the same with short prompts (SmartCLIP's claim): every distinct partial caption of
  the test split (one object with its attributes; one relation without attributes) against every test image,
  an image a positive wherever the partial caption is true of it.
- Syn-Swaps (a diagnosis, not an accuracy): how far the text tower puts a caption from its relation swap, from
  its attribute swap and from its predicate flip ("a right of b" for "a left of b", one word apart; mean cosine
  of their features), how far the image tower puts a scene from the scene the swap describes (the two objects'
  boxes exchanged, or their colours), and the image's mean score margin between the caption and each swap, the
  quantity Syn-Relation and Syn-Attribution threshold at 0. A tower that reads captions as bags of words gives
  text cosine 1 for the relation swap, one that also ignores the predicate word 1 for the predicate flip, one
  that sees an image as a bag of objects image cosine 1; an accuracy at chance says which side cannot yet tell
  the two apart.
Every test image is encoded once and shared by the benchmarks, and so is every distinct caption (with its
graph). Each caption option is passed with its own exact scene graph (the swapped graph for a swap), for methods that read graphs at test time.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from benchmarks.base import BENCHMARKS, BenchContext, BenchResult
from benchmarks.scoring import (choice_correct, encode_image_dataset, encode_unique_texts, retrieval_metrics,
                                score_options, tie_right_chance)
from datamodules.negatives import order_negatives, swap_attributes, swap_relation
from datamodules.graph import SceneGraph
from datamodules.shapes import ShapesWorld, converse, flip_predicate, holds, render_caption, word_tags

FAMILY_CHOICE, FAMILY_RETRIEVAL, FAMILY_PARTIAL, FAMILY_SWAPS = "syn_choice", "syn_retrieval", "syn_partial", "syn_swaps"


def world(ctx: BenchContext) -> ShapesWorld:
    """The test split of the world the run trained on (or the default world), with the bench's overrides."""
    def make() -> ShapesWorld:
        options = OmegaConf.structured(ShapesWorld.Config)
        data = ctx.run_cfg.get("data", {})
        if data.get("source") == "shapes" and data.get("options"):  # a bare model (no run) has no options
            options = OmegaConf.merge(options, data.options)
        if ctx.spec.get("data"):
            options = OmegaConf.merge(options, ctx.spec.data)
        return ShapesWorld(OmegaConf.to_object(options), ctx.spec.split)
    return ctx.cached("syn_world", make)


class _Images(torch.utils.data.Dataset):
    """Scenes of the world (full graphs, distractors included) drawn and put through the model transform."""

    def __init__(self, w: ShapesWorld, preprocess, scenes: list[SceneGraph]) -> None:
        self.w, self.preprocess, self.scenes = w, preprocess, scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(self.w.render(self.scenes[i]))


def scenes(ctx: BenchContext) -> list[SceneGraph]:
    """Each test scene's full graph, distractors included (what is drawn)."""
    w = world(ctx)
    return ctx.cached("syn_scenes", lambda: [w.graph(i) for i in range(len(w))])


def image_features(ctx: BenchContext) -> torch.Tensor:
    w = world(ctx)
    return ctx.cached("syn_images", lambda: encode_image_dataset(ctx.model, _Images(w, ctx.preprocess, scenes(ctx)),
                                                                  batch_size=ctx.spec.batch_size, desc="syn images"))


def graphs(ctx: BenchContext) -> list:
    w = world(ctx)
    return ctx.cached("syn_graphs", lambda: [w.mentioned(w.graph(i)) for i in range(len(w))])


def text_features(ctx: BenchContext, texts: list[str], graphs_: list | None = None) -> torch.Tensor:
    """Features (M, D) of `texts` (each with its graph, if given), every distinct (caption, graph) encoded once per
    bench run and shared by the Syn benchmarks: the true captions serve five of them, the swaps two."""
    store = ctx.cached("syn_texts", dict)
    keys = list(zip(texts, graphs_)) if graphs_ is not None else [(t, None) for t in texts]
    new = [k for k in dict.fromkeys(keys) if k not in store]
    for with_graph in (False, True):  # a caption without a graph and with one may encode differently
        part = [k for k in new if (k[1] is not None) == with_graph]
        if part:
            feats = encode_unique_texts(ctx.model, [t for t, _ in part], [g for _, g in part] if with_graph else None,
                                        batch_size=ctx.spec.batch_size)
            store.update(zip(part, feats))
    return torch.stack([store[k] for k in keys])


def choice_benchmark(ctx: BenchContext, options: list[list[str]], ties: str,
                     option_graphs: list[list] | None = None) -> tuple[float, torch.Tensor]:
    """Accuracy of picking option 0 (the true caption) for each test image, under the given tie rule.
    `option_graphs` gives each option its own scene graph, for methods that read graphs at test time."""
    k = len(options[0])
    graphs_flat = [g for row in option_graphs for g in row] if option_graphs is not None else None
    feats = text_features(ctx, [t for row in options for t in row], graphs_flat)
    scores = score_options(image_features(ctx), feats.view(len(options), k, -1))  # (N, K)
    correct = choice_correct(scores, 0, ties=ties)
    return correct.float().mean().item(), correct


def swap_choice(ctx: BenchContext, option_graphs: list[list[SceneGraph]], metric: str, note: str) -> BenchResult:
    """Each test image against its options, rendered from their graphs (the true one first; tie counts as wrong)."""
    options = [[render_caption(g) for g in row] for row in option_graphs]
    acc, _ = choice_benchmark(ctx, options, ties="wrong", option_graphs=option_graphs)
    return BenchResult({metric: acc}, FAMILY_CHOICE, notes=[note], chance={metric: 0.5})


@BENCHMARKS.register("syn_relation")
def syn_relation(ctx: BenchContext) -> BenchResult:
    return swap_choice(ctx, [[g, swap_relation(g, 0)] for g in graphs(ctx)], "syn_relation",
                       "Syn-Relation: tie counts as wrong; chance 0.5")


@BENCHMARKS.register("syn_relation_converse")
def syn_relation_converse(ctx: BenchContext) -> BenchResult:
    """Syn-Relation with every relation stated the other way: "b right of a" against "a right of b". A model
    trained on canonical captions alone has seen this phrasing only as other scenes' canonical captions."""
    return swap_choice(ctx, [[converse(g), converse(swap_relation(g, 0))] for g in graphs(ctx)], "syn_relation_converse",
                       "Syn-Relation-Converse: the Syn-Relation pairs with each relation stated the other way (the "
                       "converse predicate, its objects exchanged); tie counts as wrong; chance 0.5")


@BENCHMARKS.register("syn_attribution")
def syn_attribution(ctx: BenchContext) -> BenchResult:
    return swap_choice(ctx, [[g, swap_attributes(g, 0, 1)] for g in graphs(ctx)], "syn_attribution",
                       "Syn-Attribution: tie counts as wrong; chance 0.5")


@BENCHMARKS.register("syn_order")
def syn_order(ctx: BenchContext) -> BenchResult:
    rng = np.random.default_rng(ctx.spec.seed)
    options = []
    for g in graphs(ctx):
        caption = render_caption(g)
        words, tags = zip(*word_tags(caption))
        options.append([caption, *order_negatives(list(words), list(tags), rng)])
    acc, _ = choice_benchmark(ctx, options, ties="right")  # a shuffle has no scene graph: no option gets one
    chance = tie_right_chance(options)  # a shuffle may give the caption back
    return BenchResult({"syn_order": acc}, FAMILY_CHOICE, chance={"syn_order": chance},
                       notes=[f"Syn-Order: 4 ARO shuffles (seed {ctx.spec.seed}); tie counts as right, as in ARO; chance "
                              f"{chance:.3f} (a shuffle may equal the caption); no option carries a scene graph"])


def caption_retrieval(images: torch.Tensor, text: torch.Tensor, captions: list[str],
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Syn-Retrieval's recalls for images (N, D) and their captions (N, D), `captions[i]` image i's (exact, so true
    of every image with the same one). Text->image: one query per image, every image the caption is true of a
    hit. Image->text: each distinct caption is one candidate; copies of one wrong caption (images that share it)
    would otherwise fill several of the top k."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    m = retrieval_metrics(images, text, positives=caption_id[:, None] == caption_id[None, :], ks=ks)
    t2i = {f"syn_retrieval/t2i_R@{k}": m[f"image_retrieval_recall@{k}"] for k in ks}
    first = torch.tensor([captions.index(c) for c in ids])  # a row of each distinct caption, (N_distinct,)
    distinct = torch.arange(len(ids))[:, None] == caption_id[None, :]  # (N_distinct, N_image)
    m = retrieval_metrics(images, text[first], positives=distinct, ks=ks)
    return {f"syn_retrieval/i2t_R@{k}": m[f"text_retrieval_recall@{k}"] for k in ks} | t2i


@BENCHMARKS.register("syn_retrieval")
def syn_retrieval(ctx: BenchContext) -> BenchResult:
    captions = [render_caption(g) for g in graphs(ctx)]
    text = text_features(ctx, captions, graphs(ctx))
    # a caption is exact, so it truly describes every test image whose canonical caption it is
    metrics = caption_retrieval(image_features(ctx), text, captions)
    ids = dict.fromkeys(captions)
    return BenchResult(metrics, FAMILY_RETRIEVAL,
                       notes=[f"Syn-Retrieval: {len(captions)} test images with their canonical captions ({len(ids)} "
                              f"distinct); image->text ranks the distinct captions, text->image queries each image's "
                              f"caption; R@1 chance about {1 / len(captions):.4f}"])


def partial_facts(w: ShapesWorld, g: SceneGraph) -> list[tuple[str, tuple]]:
    """(partial caption, its fact) for each of a scene's partial captions, in `partial_captions`' order (each
    mentioned object, then each relation): ("object", name, attributes) or ("relation", subject, predicate, object)."""
    texts = w.partial_captions(g)
    facts = [("object", e.name, frozenset(e.attributes)) for e in g.objects[: w.cfg.num_objects]]
    facts += [("relation", g.objects[r.subject].name, r.predicate, g.objects[r.object].name) for r in g.relations]
    if len(texts) != len(facts):
        raise RuntimeError(f"shapes world: {len(texts)} partial captions for {len(facts)} facts; the two disagree")
    return list(zip(texts, facts))


def fact_holds(fact: tuple, scene: SceneGraph) -> bool:
    """Whether a partial caption's fact is true of a scene, every drawn object (distractors too) counted: an
    object with that shape and exactly those attributes; or two objects with those shapes whose boxes stand in
    the relation on its axis (one wholly on that side of the other)."""
    if fact[0] == "object":
        return any(e.name == fact[1] and frozenset(e.attributes) == fact[2] for e in scene.objects)
    _, subject, predicate, obj = fact
    return any(a.name == subject and b.name == obj and holds(predicate, a.box, b.box, 0.0)
               for a in scene.objects for b in scene.objects if a is not b)


@BENCHMARKS.register("syn_partial_retrieval")
def syn_partial_retrieval(ctx: BenchContext) -> BenchResult:
    w = world(ctx)
    facts = dict(f for g in graphs(ctx) for f in partial_facts(w, g))  # distinct partial captions, first-seen order
    texts = list(facts)
    drawn = scenes(ctx)
    positives = torch.tensor([[fact_holds(facts[t], s) for s in drawn] for t in texts])  # (N_text, N_image)
    feats = text_features(ctx, texts)
    m = retrieval_metrics(image_features(ctx), feats, positives=positives, ks=(1, 5, 10))
    metrics = {f"syn_partial/t2i_R@{k}": m[f"image_retrieval_recall@{k}"] for k in (1, 5, 10)}
    metrics |= {f"syn_partial/i2t_R@{k}": m[f"text_retrieval_recall@{k}"] for k in (1, 5, 10)}
    for kind in ("object", "relation"):  # text->image R@1 by kind of prompt
        rows = torch.tensor([facts[t][0] == kind for t in texts])
        hits = retrieval_metrics(image_features(ctx), feats[rows], positives=positives[rows], ks=(1,))
        metrics[f"syn_partial/t2i_R@1_{kind}"] = hits["image_retrieval_recall@1"]
    return BenchResult(metrics, FAMILY_PARTIAL, notes=[
        f"Syn-Partial-Retrieval: {len(texts)} distinct partial captions ({int(sum(facts[t][0] == 'object' for t in texts))} "
        f"objects, the rest relations without attributes) against {len(drawn)} test images; a hit if any image the "
        f"caption is true of is in the top k (text->image, mean {positives.sum(1).float().mean():.1f} true images per "
        f"caption), or any caption true of the image is (image->text)"])


def exchange_boxes(scene: SceneGraph) -> SceneGraph:
    """The scene its first relation's swap describes: that relation's subject and object trade places (their
    boxes; with 2 mentioned objects of one size and one relation, every other fact stays as it was)."""
    r = scene.relations[0]
    objects = list(scene.objects)
    a, b = objects[r.subject], objects[r.object]
    objects[r.subject], objects[r.object] = type(a)(a.name, a.attributes, b.box), type(b)(b.name, b.attributes, a.box)
    return scene.with_objects(tuple(objects))


@BENCHMARKS.register("syn_swaps")
def syn_swaps(ctx: BenchContext) -> BenchResult:
    w, gs = world(ctx), graphs(ctx)
    captions = [render_caption(g) for g in gs]
    true = text_features(ctx, captions, gs)
    images = image_features(ctx)
    true_score = score_options(images, true[:, None])[:, 0]  # (N,)
    unit = lambda x: F.normalize(x.float(), dim=-1)  # noqa: E731
    # the scene a swap describes is drawn exactly (two boxes or two colours exchanged) with 2 mentioned objects
    # of one size; distractors stay where they are
    drawable = w.cfg.num_objects == 2 and not w.cfg.sizes
    metrics, notes = {}, []
    trade_attributes = lambda g: swap_attributes(g, 0, 1)  # noqa: E731  (the caption's swap draws as it is)
    # the predicate flip ("a right of b" for "a left of b") describes the relation swap's scene: no image of its own
    swaps = (("relation", lambda g: swap_relation(g, 0), exchange_boxes), ("attribute", trade_attributes, trade_attributes),
             ("predicate", lambda g: flip_predicate(g, 0), None))
    for kind, swap, redraw in swaps:
        swapped = [swap(g) for g in gs]
        feats = text_features(ctx, [render_caption(g) for g in swapped], swapped)  # (N, D)
        margin = true_score - score_options(images, feats[:, None])[:, 0]  # (N,)
        metrics[f"syn_swaps/{kind}_text_cos"] = (unit(true) * unit(feats)).sum(-1).mean().item()
        if drawable and redraw is not None:
            drawn = encode_image_dataset(ctx.model, _Images(w, ctx.preprocess, [redraw(g) for g in scenes(ctx)]),
                                         batch_size=ctx.spec.batch_size, desc=f"{kind}-swapped scenes")  # (N, D)
            metrics[f"syn_swaps/{kind}_image_cos"] = (unit(images) * unit(drawn)).sum(-1).mean().item()
        metrics[f"syn_swaps/{kind}_margin"] = margin.mean().item()
        notes.append(f"{kind} swap: margin {margin.mean().item():.4f} ± {margin.std().item():.4f}, "
                     f"positive for {(margin > 0).float().mean().item():.3f} of the images")
    if not drawable:
        notes.append("image cosines not measured: a swapped scene is drawn exactly only with 2 mentioned objects "
                     "and no sizes")
    # a scale for the text cosines: each test caption against the next test image's, where the two differ
    other = [i for i in range(len(gs)) if captions[i] != captions[(i + 1) % len(gs)]]
    if other:
        pair = (unit(true[other]) * unit(true[[(i + 1) % len(gs) for i in other]])).sum(-1).mean().item()
        notes.append(f"two different test captions: mean text cosine {pair:.3f} ({len(other)} pairs)")
    return BenchResult(metrics, FAMILY_SWAPS, notes=[
        "Syn-Swaps: text cosine of a caption and its swap, image cosine of a scene and the scene the swap describes, "
        "image score margin true minus swap (" + "; ".join(notes) + ")"])

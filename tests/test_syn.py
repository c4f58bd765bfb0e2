"""The Syn benchmarks with stand-in models whose answers are known by construction."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from benchmarks.base import BENCHMARKS, BenchContext
from configs.schema import BenchSpec
from datamodules.shapes import BACKGROUND, COLOURS, ShapesWorld, holds, render_caption
from tests_support import CLAUSE, PREDICATE_OF_PHRASE

VOCAB = ["a", "an", "there", "is", "the", "to", "left", "right", "of", "above", "below",
         "red", "green", "blue", "yellow", "purple", "orange", "white", "cyan",
         "circle", "square", "triangle", "diamond", "cross", "star", "small", "large", "and"]


def bag_of_words(text: str) -> torch.Tensor:
    counts = Counter(text.split())
    return F.normalize(torch.tensor([float(counts[w]) for w in VOCAB]), dim=0)


class BagOfWordsModel:
    """Sees an image as the bag of words of its true caption: blind to order, so relation and attribute swaps
    tie with the truth (scored wrong) and word shuffles tie too (scored right, as ARO's Order counts)."""

    def __init__(self, world: ShapesWorld) -> None:
        self.caption_of = {np.asarray(world[i].image).tobytes(): world[i].captions[0] for i in range(len(world))}

    def preprocess(self, image) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(np.asarray(image).tobytes(), dtype=np.uint8).copy())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:  # a scene not in the test split: zeros
        return torch.stack([bag_of_words(self.caption_of[x.numpy().tobytes()]) if x.numpy().tobytes() in self.caption_of
                            else torch.zeros(len(VOCAB)) for x in images])

    def encode_captions(self, texts, graphs=None) -> torch.Tensor:
        return torch.stack([bag_of_words(t) for t in texts])


class OracleModel(BagOfWordsModel):
    """Knows the exact scene: an image matches exactly the captions true of it."""

    def __init__(self, world: ShapesWorld) -> None:
        super().__init__(world)
        self.index = {c: i for i, c in enumerate(dict.fromkeys(self.caption_of.values()))}

    def encode_images(self, images):  # a scene not in the test split: the slot of captions it does not know
        return F.one_hot(torch.tensor([self.index.get(self.caption_of.get(x.numpy().tobytes()), len(self.index))
                                       for x in images]), len(self.index) + 1).float()

    def encode_captions(self, texts, graphs=None):
        return F.one_hot(torch.tensor([self.index.get(t, len(self.index)) for t in texts]), len(self.index) + 1).float()


def context(model_cls, test_size: int, seed: int | None = None, **world_options) -> tuple[BenchContext, ShapesWorld]:
    """A bench context over the default world's first `test_size` test scenes (with `world_options` set), with a
    stand-in model; `seed`, where given, is the bench spec's seed (its default otherwise)."""
    options = {"test_size": test_size, **world_options}
    world = ShapesWorld(ShapesWorld.Config(**options), "test")
    model = model_cls(world)
    run_cfg = OmegaConf.create({"data": {"source": "shapes", "options": options}})
    spec = OmegaConf.merge(OmegaConf.structured(BenchSpec), {"batch_size": 16} | ({} if seed is None else {"seed": seed}))
    return BenchContext(model, model.preprocess, run_cfg, spec), world


def run_all(model_cls, test_size=60):
    ctx, world = context(model_cls, test_size)
    metrics = {}
    for name in ("syn_relation", "syn_attribution", "syn_order", "syn_retrieval"):
        metrics |= BENCHMARKS.get(name)(ctx).metrics
    return metrics, world


def test_bag_of_words_model_shows_the_tie_rules():
    m, _ = run_all(BagOfWordsModel)
    assert m["syn_relation"] == 0.0  # the swap has the same words: a tie, counted wrong (ARO VG rule)
    assert m["syn_attribution"] == 0.0
    assert m["syn_order"] == 1.0  # every shuffle has the same words: a tie, counted right (ARO Order rule)


def test_oracle_model_is_perfect():
    m, world = run_all(OracleModel)
    assert m["syn_relation"] == 1.0 and m["syn_attribution"] == 1.0
    assert m["syn_retrieval/i2t_R@1"] == 1.0 and m["syn_retrieval/t2i_R@1"] == 1.0
    # an order shuffle that reproduces the caption exactly ties with it and counts as right; others lose
    assert m["syn_order"] == 1.0


class OrderModel(BagOfWordsModel):
    """Reads word order, and records every caption it is asked to encode. A caption is, per vocabulary word, the
    sum of the (1-based) positions it stands at; an image is its true caption's word counts, each weighted 1, 2
    or 3 by the word's place in VOCAB. Every value is a small integer, so scores are exact: a shuffle scores as
    its caption only by chance of where it puts the words, and equal texts score equally (a tie)."""

    def __init__(self, world: ShapesWorld) -> None:
        super().__init__(world)
        self.seen: list[str] = []

    @staticmethod
    def image_vector(caption: str) -> torch.Tensor:
        counts = Counter(caption.split())
        return torch.tensor([float(counts[w] * (1 + k % 3)) for k, w in enumerate(VOCAB)])

    @staticmethod
    def text_vector(text: str) -> torch.Tensor:
        v = torch.zeros(len(VOCAB))
        for position, w in enumerate(text.split()):
            v[VOCAB.index(w)] += position + 1
        return v

    def encode_images(self, images):
        return torch.stack([self.image_vector(self.caption_of.get(x.numpy().tobytes(), "")) for x in images])

    def encode_captions(self, texts, graphs=None):
        self.seen += list(texts)
        return torch.stack([self.text_vector(t) for t in texts])


def expected_order_options(world: ShapesWorld, seed: int) -> list[list[str]]:
    """Syn-Order's options as its recipe states them: per test scene in order, the canonical caption of the
    mentioned objects, then ARO's four perturbations of its (word, tag) pairs, all drawn from one generator
    seeded with the bench spec's seed."""
    from datamodules.negatives import order_negatives

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(len(world)):
        caption = render_caption(world.mentioned(world.graph(i)))
        words = caption.split()
        tags = ["NN" if w in ("circle", "square", "triangle", "diamond", "cross", "star") else
                "JJ" if w in COLOURS or w in ("small", "large") else "X" for w in words]
        rows.append([caption, *order_negatives(words, tags, rng)])
    return rows


def order_run(seed: int | None, test_size: int = 40):
    ctx, world = context(OrderModel, test_size, seed=seed)
    return BENCHMARKS.get("syn_order")(ctx), ctx.model, world


def test_seeded_order_benchmark_is_reproducible():
    default_seed = OmegaConf.structured(BenchSpec).seed
    a, model_a, world = order_run(None)
    b, model_b, _ = order_run(None)
    c, model_c, _ = order_run(default_seed + 1)
    options = expected_order_options(world, default_seed)
    other = expected_order_options(world, default_seed + 1)
    # the recipe does shuffle, and another seed draws other shuffles
    assert any(o != row[0] for row in options for o in row[1:])
    assert options != other
    # the benchmark scored exactly the caption and the seeded shuffles, each distinct text once
    assert sorted(model_a.seen) == sorted({t for row in options for t in row})
    assert sorted(model_b.seen) == sorted(model_a.seen)
    assert sorted(model_c.seen) == sorted({t for row in other for t in row})
    for result, rows in ((a, options), (c, other)):
        # our own scoring of those options, each image against its own five; a tie counts as right (ARO Order)
        right = []
        for i, row in enumerate(rows):
            image = OrderModel.image_vector(world[i].captions[0])
            scores = [float(image @ OrderModel.text_vector(t)) for t in row]
            right.append(scores[0] >= max(scores[1:]))
        assert result.metrics["syn_order"] == pytest.approx(sum(right) / len(right), abs=1e-6)
        # a random scorer gives each distinct text one score: the caption wins against its distinct other texts
        chance = sum(1 / (1 + len({t for t in row[1:] if t != row[0]})) for row in rows) / len(rows)
        assert result.chance["syn_order"] == pytest.approx(chance)
    assert 0.0 < a.metrics["syn_order"] < 1.0  # the order-reading model is neither always right nor always wrong
    assert a.metrics == b.metrics and a.chance == b.chance and a.notes == b.notes
    assert c.notes != a.notes  # the note names the seed


class TruthModel(OracleModel):
    """Knows every true caption of a scene, in each template and direction: an image is the normalised sum of
    its true captions' one-hots."""

    def __init__(self, world: ShapesWorld) -> None:
        BagOfWordsModel.__init__(self, world)
        self.truths = {np.asarray(world[i].image).tobytes(): world[i].captions for i in range(len(world))}
        self.index = {c: k for k, c in enumerate(dict.fromkeys(c for cs in self.truths.values() for c in cs))}

    def encode_images(self, images):
        return F.normalize(torch.stack([F.one_hot(torch.tensor([self.index[c] for c in self.truths[x.numpy().tobytes()]]),
                                                  len(self.index) + 1).sum(0).float() for x in images]), dim=-1)


def test_converse_relation_benchmark_reads_the_other_direction():
    ctx, _ = context(TruthModel, 40)
    assert BENCHMARKS.get("syn_relation_converse")(ctx).metrics["syn_relation_converse"] == 1.0
    # the oracle of the canonical captions alone knows no converse caption: every pair ties, counted wrong
    ctx, _ = context(OracleModel, 40)
    assert BENCHMARKS.get("syn_relation")(ctx).metrics["syn_relation"] == 1.0
    assert BENCHMARKS.get("syn_relation_converse")(ctx).metrics["syn_relation_converse"] == 0.0
    ctx, _ = context(BagOfWordsModel, 40)  # the converse pair has the same words too
    assert BENCHMARKS.get("syn_relation_converse")(ctx).metrics["syn_relation_converse"] == 0.0


class FactModel(BagOfWordsModel):
    """Knows every partial fact of a scene: an image is the normalised sum of its true partial captions'
    one-hots (its own), a caption its one-hot; so each prompt scores highest on the images it names."""

    def __init__(self, world: ShapesWorld) -> None:
        super().__init__(world)
        self.partials = {np.asarray(world[i].image).tobytes(): world[i].partial_captions for i in range(len(world))}
        self.vocab = {t: k for k, t in enumerate(dict.fromkeys(t for ts in self.partials.values() for t in ts))}

    def encode_images(self, images):
        rows = [F.one_hot(torch.tensor([self.vocab[t] for t in self.partials[x.numpy().tobytes()]]),
                          len(self.vocab)).sum(0).float() for x in images]
        return F.normalize(torch.stack(rows), dim=-1)

    def encode_captions(self, texts, graphs=None):
        return F.one_hot(torch.tensor([self.vocab[t] for t in texts]), len(self.vocab)).float()


def partial_metrics(model_cls, test_size=60):
    ctx, world = context(model_cls, test_size)
    return BENCHMARKS.get("syn_partial_retrieval")(ctx), world


OUR_PREDICATE = {  # box (x, y, w, h), y downwards: subject wholly on that side of the object
    "left of": lambda a, b: a[0] + a[2] <= b[0], "right of": lambda a, b: b[0] + b[2] <= a[0],
    "above": lambda a, b: a[1] + a[3] <= b[1], "below": lambda a, b: b[1] + b[3] <= a[1],
}


def prompt_true_of(text: str, scene) -> bool:
    """Our own reading of a partial caption against a drawn scene (every object, distractors too): "a/an <attributes>
    <shape>" is true where some object has that shape and exactly those attributes; "a/an <shape> <phrase> a/an
    <shape>" where two objects of those shapes have boxes standing in the relation."""
    m = CLAUSE[0].match(text)
    if m is None:
        *attributes, shape = text.split()[1:]
        return any(e.name == shape and set(e.attributes) == set(attributes) for e in scene.objects)
    relation = OUR_PREDICATE[PREDICATE_OF_PHRASE[m["p"]]]
    return any(a.name == m["s"] and b.name == m["o"] and relation(a.box, b.box)
               for a in scene.objects for b in scene.objects if a is not b)


class UnnamedTruthModel(BagOfWordsModel):
    """Scores a prompt 2 on an image it is true of (our reading of the drawn geometry) whose own partial captions do
    not name it, 1 on an image that names it, 0 elsewhere; a prompt's feature is its one-hot. Both directions
    therefore rank a true-but-unnamed image (or prompt) first wherever there is one: every recall is 1 only if the
    benchmark counts every image a prompt is true of as a positive, not only the images that name it."""

    FALSE = 0.0  # the score of a prompt on an image it is false of

    def __init__(self, world: ShapesWorld) -> None:
        super().__init__(world)
        scenes = {np.asarray(world[i].image).tobytes(): world.graph(i) for i in range(len(world))}
        named = {key: world.partial_captions(g) for key, g in scenes.items()}
        self.prompts = list(dict.fromkeys(t for ts in named.values() for t in ts))
        self.rows = {}
        for key, g in scenes.items():
            truth = [prompt_true_of(t, g) for t in self.prompts]
            assert all(truth[k] for k, t in enumerate(self.prompts) if t in named[key])  # a named prompt is true
            self.rows[key] = torch.tensor([1.0 if t in named[key] else 2.0 if true else self.FALSE
                                           for t, true in zip(self.prompts, truth)])

    def encode_images(self, images):
        return torch.stack([self.rows[x.numpy().tobytes()] for x in images])

    def encode_captions(self, texts, graphs=None):
        return F.one_hot(torch.tensor([self.prompts.index(t) for t in texts]), len(self.prompts)).float()


@pytest.mark.parametrize("distractors", [0, 1])
def test_partial_retrieval_positives_are_every_image_the_prompt_is_true_of(distractors):
    ctx, world = context(UnnamedTruthModel, 60, distractors=distractors)
    scores = torch.stack(list(ctx.model.rows.values()))  # (N_image, N_prompt)
    # some prompt is true of an image that does not name it (there the named-only reading would rank a miss first)
    assert (scores == 2).any(dim=0).sum() >= 3
    result = BENCHMARKS.get("syn_partial_retrieval")(ctx)
    recalls = {k: v for k, v in result.metrics.items() if "R@" in k}
    assert len(recalls) == 8 and all(v == 1.0 for v in recalls.values()), recalls
    if distractors:  # a distractor counts too: an object prompt true only through another scene's distractor
        assert any(CLAUSE[0].match(t) is None for t in np.array(ctx.model.prompts)[(scores == 2).any(dim=0).numpy()])
    # and an image a prompt is false of is no positive: ranked first, it is a miss wherever there is one
    ctx, _ = context(FalseFirstModel, 60, distractors=distractors)
    scores = torch.stack(list(ctx.model.rows.values()))  # (N_image, N_prompt)
    m = BENCHMARKS.get("syn_partial_retrieval")(ctx).metrics
    assert m["syn_partial/t2i_R@1"] == pytest.approx((scores != 3).all(dim=0).float().mean().item())
    assert m["syn_partial/i2t_R@1"] == pytest.approx((scores != 3).all(dim=1).float().mean().item())
    assert m["syn_partial/t2i_R@1"] < 0.5 and m["syn_partial/i2t_R@1"] < 0.5


class FalseFirstModel(UnnamedTruthModel):
    """UnnamedTruthModel, but a prompt scores highest (3) on the images it is false of."""

    FALSE = 3.0


def test_partial_facts_agree_with_our_reading_of_the_scenes():
    from benchmarks.syn import fact_holds, partial_facts

    world = ShapesWorld(ShapesWorld.Config(test_size=60), "test")
    scenes = [world.graph(i) for i in range(60)]
    for i, g in enumerate(scenes[:10]):
        for text, fact in partial_facts(world, g):
            true_of = {j for j, s in enumerate(scenes) if fact_holds(fact, s)}
            assert i in true_of
            # our own reading: an image's own partial captions, or its converse-free relation facts, name it
            named = {j for j, s in enumerate(scenes) if text in world.partial_captions(s)}
            assert named <= true_of
            assert true_of == {j for j, s in enumerate(scenes) if prompt_true_of(text, s)}  # the geometry agrees
    # a relation prompt is not true of the scene with the two shapes' places exchanged
    g = scenes[0]
    (_, fact), = [(t, f) for t, f in partial_facts(world, g) if f[0] == "relation"]
    a, b = g.objects
    swapped = g.with_objects((a.__class__(a.name, a.attributes, b.box), b.__class__(b.name, b.attributes, a.box)))
    assert fact_holds(fact, g) and not fact_holds(fact, swapped)


def test_partial_retrieval_oracle_is_perfect_and_bag_of_words_is_blind_to_direction():
    oracle, _ = partial_metrics(FactModel)
    assert oracle.family == "syn_partial"
    assert all(v == 1.0 for k, v in oracle.metrics.items() if "R@" in k), oracle.metrics
    bow, _ = partial_metrics(BagOfWordsModel)
    # an object prompt's words are in its image's caption; a relation prompt's words are in both directions'
    assert bow.metrics["syn_partial/t2i_R@1_relation"] < 1.0
    assert set(bow.metrics) == set(oracle.metrics)


def swap_metrics(model_cls, test_size=40):
    return BENCHMARKS.get("syn_swaps")(context(model_cls, test_size)[0])


def test_swaps_measure_how_far_the_text_side_puts_a_swap():
    bow = swap_metrics(BagOfWordsModel)  # a swap has the same words: the same features, no margin
    assert bow.family == "syn_swaps"
    assert bow.metrics["syn_swaps/relation_text_cos"] == pytest.approx(1.0)
    assert bow.metrics["syn_swaps/attribute_text_cos"] == pytest.approx(1.0)
    assert bow.metrics["syn_swaps/relation_margin"] == pytest.approx(0.0, abs=1e-6)
    oracle = swap_metrics(OracleModel).metrics  # a swap is never a true caption: orthogonal, margin 1
    assert oracle["syn_swaps/relation_text_cos"] == pytest.approx(0.0)
    assert oracle["syn_swaps/relation_margin"] == pytest.approx(1.0)
    assert oracle["syn_swaps/attribute_margin"] == pytest.approx(1.0)
    assert any("two different test captions" in n for n in bow.notes)
    assert bow.metrics["syn_swaps/predicate_text_cos"] < 0.95  # "left" and "right" are different words
    assert oracle["syn_swaps/predicate_text_cos"] == pytest.approx(0.0)
    assert oracle["syn_swaps/predicate_margin"] == pytest.approx(1.0)
    assert "syn_swaps/predicate_image_cos" not in oracle  # the flip describes the relation swap's scene
    blind = swap_metrics(PredicateBlindModel).metrics
    assert blind["syn_swaps/predicate_text_cos"] == pytest.approx(1.0)
    assert blind["syn_swaps/predicate_margin"] == pytest.approx(0.0, abs=1e-6)


class PredicateBlindModel(BagOfWordsModel):
    """A bag of words that drops the predicate's words: "a left of b" and "a right of b" are the same text."""

    @staticmethod
    def _drop(text: str) -> str:
        return " ".join(w for w in text.split() if w not in ("left", "right", "above", "below"))

    def encode_images(self, images):  # a scene not in the test split (a drawn swap): no words, zeros
        return super().encode_captions([self._drop(self.caption_of.get(x.numpy().tobytes(), "")) for x in images])

    def encode_captions(self, texts, graphs=None):
        return super().encode_captions([self._drop(t) for t in texts])


class CountingModel(BagOfWordsModel):
    """Records every (caption, graph) it is asked to encode."""

    def __init__(self, world: ShapesWorld) -> None:
        super().__init__(world)
        self.seen: list = []

    def encode_captions(self, texts, graphs=None):
        self.seen += list(zip(texts, graphs if graphs is not None else [None] * len(texts)))
        return super().encode_captions(texts, graphs)


def test_every_distinct_caption_is_encoded_once_across_the_benchmarks():
    ctx, world = context(CountingModel, 30)
    model = ctx.model
    for name in ("syn_relation", "syn_relation_converse", "syn_attribution", "syn_order", "syn_retrieval",
                 "syn_partial_retrieval", "syn_swaps"):
        BENCHMARKS.get(name)(ctx)
    assert len(model.seen) == len(set(model.seen))
    true = {(render_caption(world.mentioned(world.graph(i))), world.mentioned(world.graph(i))) for i in range(30)}
    assert true <= set(model.seen)  # the true captions with their graphs, asked for by five benchmarks, came once


class ColourCountModel(BagOfWordsModel):
    """Sees an image as a bag of objects: how many pixels of each palette colour (layout-blind), beside
    bag-of-words captions."""

    def preprocess(self, image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image).astype(np.float32))  # (H, W, 3)

    def encode_images(self, images):
        palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (C, 3)
        counts = (images[:, :, :, None, :] == palette).all(-1).flatten(1, 2).sum(1).float()  # (N, C)
        return F.normalize(F.pad(counts, (0, len(VOCAB) - counts.shape[1])), dim=-1)


class PixelModel(ColourCountModel):
    """Sees an image as its pixels less the background: where every object is."""

    def encode_images(self, images):
        return F.normalize((images - torch.tensor(BACKGROUND, dtype=torch.float32)).flatten(1), dim=-1)

    def encode_captions(self, texts, graphs=None):  # the scores are not looked at; only the dimensions must agree
        return F.normalize(torch.ones(len(texts), 32 * 32 * 3), dim=-1)


def test_swaps_measure_how_far_the_image_side_puts_the_swapped_scene():
    blind = swap_metrics(ColourCountModel).metrics
    assert blind["syn_swaps/relation_image_cos"] > 0.99  # the same objects elsewhere: the same colour counts
    assert blind["syn_swaps/attribute_image_cos"] < 0.99  # colours traded between shapes of different areas
    seeing = swap_metrics(PixelModel).metrics
    assert seeing["syn_swaps/relation_image_cos"] < 0.5  # objects moved: their pixels hardly overlap


def test_exchanged_boxes_draw_the_scene_the_relation_swap_describes():
    from benchmarks.syn import exchange_boxes

    world = ShapesWorld(ShapesWorld.Config(test_size=50), "test")
    for i in range(len(world)):
        scene = world.graph(i)
        r, swapped = scene.relations[0], exchange_boxes(scene)
        a, b = swapped.objects[r.subject], swapped.objects[r.object]
        assert (a.name, a.attributes, b.name, b.attributes) == tuple(
            x for e in (scene.objects[r.subject], scene.objects[r.object]) for x in (e.name, e.attributes))
        assert holds(r.predicate, b.box, a.box, world.cfg.margin * world.cfg.image_size)  # now b stands where a did
        assert not holds(r.predicate, a.box, b.box, 0.0)


def test_retrieval_counts_each_distinct_caption_once_for_image_to_text():
    """Images 1 and 2 share caption B; image 0 (caption A) scores B above A. Ranked over distinct captions, A is
    image 0's second candidate (R@2 = 1); over one row per image, B's two copies would fill its top 2."""
    from benchmarks.syn import caption_retrieval

    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # A, B, B
    images = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])  # image 0: B 0.8 > A 0.6
    m = caption_retrieval(images, text, ["A", "B", "B"], ks=(1, 2))
    assert m["syn_retrieval/i2t_R@2"] == 1.0 and m["syn_retrieval/i2t_R@1"] == pytest.approx(2 / 3)
    assert m["syn_retrieval/t2i_R@1"] == 1.0  # A finds image 0 first; B finds image 1 or 2, both true

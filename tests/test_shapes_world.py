"""The shapes world: deterministic, disjoint splits, and every caption true of the pixels it comes with.

Geometry, caption grammar and colours are recomputed here from the boxes and the pixels with this
file's own tables, so a mistake in the source's tables (PREDICATES, TEMPLATES) shows up as a failure.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests_support import PHRASE, CONVERSE, PREDICATE_OF_PHRASE, CLAUSE
from datamodules.shapes import BACKGROUND, COLOURS, SHAPES, SIZES, ShapesWorld, draw

DEFAULT = ShapesWorld.Config()
HARD = ShapesWorld.Config(image_size=64, num_objects=3, distractors=2, sizes=True, object_size=0.2)
CONFIGS = pytest.mark.parametrize("cfg", [DEFAULT, HARD], ids=["default", "hard"])



def article(text: str) -> str:
    return "an" if text[0] in "aeiou" else "a"


def colour_of(entity) -> str:
    (colour,) = [a for a in entity.attributes if a in COLOURS]
    return colour


def satisfies(predicate: str, a, b, margin: float) -> bool:
    """a <predicate> b from the boxes (x, y, w, h): a gap >= margin on the relation's axis, overlap on the other."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    x_overlap = ax < bx + bw and bx < ax + aw
    y_overlap = ay < by + bh and by < ay + ah
    if predicate == "left of":
        return ax + aw + margin <= bx + 1e-9 and y_overlap
    if predicate == "right of":
        return bx + bw + margin <= ax + 1e-9 and y_overlap
    if predicate == "above":
        return ay + ah + margin <= by + 1e-9 and x_overlap
    if predicate == "below":
        return by + bh + margin <= ay + 1e-9 and x_overlap
    raise AssertionError(f"unexpected predicate {predicate!r}")


def parse(caption: str, template: int, phrases: dict[str, int]) -> list[tuple[int, str, int]]:
    """(subject index, predicate, object index) of every clause, read back from the words of the caption."""
    triples = []
    for clause in caption.split(" and "):
        m = CLAUSE[template].match(clause)
        assert m, f"{clause!r} does not read as template {template}"
        assert m["s"] in phrases and m["o"] in phrases, (caption, sorted(phrases))
        if template < 2:  # "a"/"an" agrees with the phrase that follows it
            assert m["da"] == article(m["s"]) and m["db"] == article(m["o"]), caption
        triples.append((phrases[m["s"]], PREDICATE_OF_PHRASE[m["p"]], phrases[m["o"]]))
    return triples


def box_region(box) -> tuple[slice, slice]:
    """Every pixel the box touches (boxes have float sides)."""
    x, y, w, h = box
    return slice(math.floor(y), math.ceil(y + h)), slice(math.floor(x), math.ceil(x + w))


def as_keys(pixels: np.ndarray) -> np.ndarray:
    p = pixels.reshape(-1, 3).astype(np.int64)
    return (p[:, 0] << 16) | (p[:, 1] << 8) | p[:, 2]


def key(rgb) -> int:
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


# --------------------------------------------------------------------------------------- determinism


@CONFIGS
@pytest.mark.parametrize("split", ["train", "test"])
def test_same_config_gives_same_scene_in_any_access_order(cfg, split):
    a, b = ShapesWorld(cfg, split), ShapesWorld(cfg, split)
    indices = [0, 7, 123, 511]
    first = {i: a[i] for i in indices}
    for i in reversed(indices):  # a scene depends on its index only, not on what was built before it
        s, t = first[i], b[i]
        assert np.array_equal(np.asarray(s.image), np.asarray(t.image)), i
        assert s.graph == t.graph and a.graph(i) == b.graph(i)
        assert s.captions == t.captions and s.partial_captions == t.partial_captions
        assert s.key == t.key == f"shapes/{split}/{i}"
        assert s.extra["caption_graphs"] == t.extra["caption_graphs"]
        assert s.extra["negative_captions"](0) == t.extra["negative_captions"](0)
    # and the scenes are not all the same scene
    assert len({np.asarray(first[i].image).tobytes() for i in indices}) == len(indices)


def test_hard_config_is_what_it_says():
    world = ShapesWorld(HARD, "train")
    s = world[5]
    assert s.image.size == (64, 64) and s.image.mode == "RGB"
    assert len(s.graph.objects) == 3 and len(s.graph.relations) == 2
    assert len(world.graph(5).objects) == 5
    assert all(e.box[2] in (pytest.approx(0.2 * 64 * f) for f in SIZES.values()) for e in world.graph(5).objects)


def test_splits_come_from_disjoint_streams():
    worlds = {split: ShapesWorld(DEFAULT, split) for split in ("train", "val", "test")}
    images = {split: [np.asarray(w[i].image).tobytes() for i in range(50)] for split, w in worlds.items()}
    for split in images:
        assert len(set(images[split])) == 50, f"{split} repeats a scene among its first 50"
    for one, other in (("train", "test"), ("train", "val"), ("val", "test")):
        # not at the same index, and not anywhere among the first 50 of each
        assert not any(x == y for x, y in zip(images[one], images[other])), (one, other)
        assert not set(images[one]) & set(images[other]), (one, other)
    graphs = [worlds["train"].graph(i) for i in range(50)]
    assert not any(g == worlds["test"].graph(i) for i, g in enumerate(graphs))


def test_a_different_seed_gives_different_scenes():
    base, other = ShapesWorld(DEFAULT, "train"), ShapesWorld(ShapesWorld.Config(seed=1), "train")
    same = [i for i in range(50) if np.array_equal(np.asarray(base[i].image), np.asarray(other[i].image))]
    assert same == []
    assert sum(base[i].captions[0] == other[i].captions[0] for i in range(50)) < 10


# ---------------------------------------------------------------------- captions true of the pixels


@pytest.mark.parametrize("cfg,n", [(DEFAULT, 200), (HARD, 100)], ids=["default", "hard"])
def test_relations_hold_in_the_boxes_and_objects_are_in_the_pixels(cfg, n):
    world = ShapesWorld(cfg, "test")
    size, margin = cfg.image_size, cfg.margin * cfg.image_size
    background = key(BACKGROUND)
    for i in range(n):
        full = world.graph(i)
        sample = world[i]
        img = np.asarray(sample.image)
        assert img.shape == (size, size, 3)
        assert sample.graph.objects == full.objects[: cfg.num_objects]
        assert sample.graph.relations == full.relations and len(full.relations) == cfg.num_objects - 1
        for r in sample.graph.relations:
            a, b = sample.graph.objects[r.subject].box, sample.graph.objects[r.object].box
            assert satisfies(r.predicate, a, b, margin), (i, r, a, b)
            assert not satisfies(r.predicate, b, a, 0.0), (i, r)  # and it is not true the other way round
        for e in full.objects:
            x, y, w, h = e.box
            assert 0 <= x and 0 <= y and x + w <= size and y + h <= size, (i, e)
            keys = as_keys(img[box_region(e.box)])
            drawn = keys[keys != background]
            values, counts = np.unique(drawn, return_counts=True)
            assert len(values), (i, e, "nothing drawn in the box")
            assert values[counts.argmax()] == key(COLOURS[colour_of(e)]), (i, e)
            assert (keys == key(COLOURS[colour_of(e)])).mean() > 0.2, (i, e)
        # outside every box (grown by one pixel for anti-aliasing slack) there is only background;
        # the exact-box version is test_nothing_is_drawn_outside_the_exact_boxes
        covered = np.zeros((size, size), dtype=bool)
        for e in full.objects:
            ys, xs = box_region(e.box)
            covered[max(0, ys.start - 1): ys.stop + 1, max(0, xs.start - 1): xs.stop + 1] = True
        assert (as_keys(img[~covered]) == background).all(), i


def _outside_exact_boxes(cfg, split: str, n: int) -> list[int]:
    world = ShapesWorld(cfg, split)
    bad = []
    for i in range(n):
        img = np.asarray(world[i].image)
        covered = np.zeros(img.shape[:2], dtype=bool)
        for e in world.graph(i).objects:
            covered[box_region(e.box)] = True
        if not (as_keys(img[~covered]) == key(BACKGROUND)).all():
            bad.append(i)
    return bad


def test_nothing_is_drawn_outside_the_exact_boxes_default():
    assert _outside_exact_boxes(DEFAULT, "test", 200) == []




def test_nothing_is_drawn_outside_the_exact_boxes_hard():
    assert _outside_exact_boxes(HARD, "test", 100) == []


def test_star_stays_inside_its_box():
    bad = []
    for side in (0.2 * 64 * 0.7, 0.3 * 32, 0.2 * 64, 0.2 * 64 * 1.25):
        for y in range(0, 40):
            image = Image.new("L", (64, 64))
            draw(ImageDraw.Draw(image), "star", (10.0, float(y), side, side), 255)
            rows = np.nonzero(np.asarray(image).any(axis=1))[0]
            if rows.min() < y:
                bad.append((side, y))
    assert bad == []


@CONFIGS
def test_every_caption_names_both_objects_and_a_predicate_and_the_converse_is_true_too(cfg):
    world = ShapesWorld(cfg, "val")
    margin = cfg.margin * cfg.image_size
    for i in range(40):
        s = world[i]
        objects = s.graph.objects
        phrases = {e.phrase(): k for k, e in enumerate(objects)}
        assert len(phrases) == len(objects)
        for e in objects:  # the phrase is "[size] colour shape"
            words = e.phrase().split()
            assert words[-1] == e.name in SHAPES and words[-2] == colour_of(e)
            assert len(words) == (3 if cfg.sizes else 2)
            if cfg.sizes:
                assert words[0] in SIZES
        truth = [(r.subject, r.predicate, r.object) for r in s.graph.relations]
        assert len(s.captions) == 6
        for k, caption in enumerate(s.captions):
            triples = parse(caption, k % 3, phrases)
            expected = truth if k < 3 else [(o, CONVERSE[p], sub) for sub, p, o in truth]
            assert triples == expected, (i, k, caption)
            for sub, p, o in triples:  # read back from the words, the caption is true of the boxes
                assert satisfies(p, objects[sub].box, objects[o].box, margin), (i, caption)
            for e in world.graph(i).objects[cfg.num_objects:]:
                assert e.name not in caption.split() and colour_of(e) not in caption.split(), (i, caption)
        assert s.extra["caption_graphs"][0] == s.graph
        conv = s.extra["caption_graphs"][3]
        assert [(r.subject, r.predicate, r.object) for r in conv.relations] == [(o, CONVERSE[p], sub) for sub, p, o in truth]


def test_without_converse_captions_only_the_stated_direction_is_a_caption_and_its_negatives_follow():
    both = ShapesWorld(DEFAULT, "train")
    forward = ShapesWorld(ShapesWorld.Config(converse_captions=False), "train")
    for i in range(20):
        s, f = both[i], forward[i]
        assert f.image.tobytes() == s.image.tobytes() and f.graph == s.graph  # same scenes
        assert f.captions == s.captions[:3]
        assert f.extra["caption_graphs"] == [s.graph] * 3
        for k in range(3):
            assert f.extra["negative_captions"](k) == s.extra["negative_captions"](k)
        # no caption states a relation the other way: its words give the graph's own triples
        phrases = {e.phrase(): j for j, e in enumerate(f.graph.objects)}
        truth = [(r.subject, r.predicate, r.object) for r in f.graph.relations]
        assert [parse(c, k, phrases) for k, c in enumerate(f.captions)] == [truth] * 3


@pytest.mark.parametrize(
    "cfg",
    [HARD, ShapesWorld.Config(image_size=64, num_objects=4, distractors=2, object_size=0.15),
     ShapesWorld.Config(image_size=64, num_objects=2, distractors=3, object_size=0.2)],
    ids=["hard", "4+2", "2+3"],
)
def test_mentioned_objects_are_distinct_and_distractors_use_nothing_of_theirs(cfg):
    world = ShapesWorld(cfg, "train")
    n = cfg.num_objects
    for i in range(60):
        full = world.graph(i)
        assert len(full.objects) == n + cfg.distractors
        mentioned, distractors = full.objects[:n], full.objects[n:]
        colours, shapes = [colour_of(e) for e in mentioned], [e.name for e in mentioned]
        assert len(set(colours)) == n and len(set(shapes)) == n, (i, mentioned)
        for d in distractors:
            assert colour_of(d) not in colours and d.name not in shapes, (i, d)
        assert world[i].graph.objects == mentioned


# ----------------------------------------------------------------------------------------- holdout

HOLDOUT = ["red circle", "blue square"]


def drawn_pairs(graph) -> set[str]:
    return {f"{colour_of(e)} {e.name}" for e in graph.objects}


@pytest.mark.parametrize("sizes", [False, True], ids=["plain", "sizes"])
def test_holdout_pairs_are_never_mentioned_in_training_but_appear_in_test(sizes):
    cfg = ShapesWorld.Config(holdout=list(HOLDOUT), sizes=sizes)
    train, test = ShapesWorld(cfg, "train"), ShapesWorld(cfg, "test")
    leaked = [i for i in range(300) if drawn_pairs(train[i].graph) & set(HOLDOUT)]
    assert leaked == []
    for i in range(60):  # and the words never come together in a training caption either
        assert not any(p in c for c in train[i].captions for p in HOLDOUT), i
    assert any(drawn_pairs(test[i].graph) & set(HOLDOUT) for i in range(300))
    # without the holdout the same training stream does show them: the filter is doing the work
    plain = ShapesWorld(ShapesWorld.Config(sizes=sizes), "train")
    assert any(drawn_pairs(plain[i].graph) & set(HOLDOUT) for i in range(300))


def test_holdout_pairs_are_never_said_by_a_training_negative():
    """Swapped attributes or nouns can put a held-out pair into a negative caption, and swapped attributes into
    MSG-CLIP's corrupted triple: in train such texts are left out (in test they may appear)."""
    import random

    from datamodules.fields import FieldContext, graph_texts_field

    def said(world, n=300):
        negatives = [v for i in range(n) for k in range(len(world[i].captions))
                     for v in world[i].extra["negative_captions"](k).values()]
        return [v for v in negatives if any(p in v for p in HOLDOUT)], len(negatives)

    train = ShapesWorld(ShapesWorld.Config(holdout=list(HOLDOUT)), "train")
    leaked, total = said(train)
    assert leaked == [] and total > 1000
    # with sizes, a word-order shuffle can put the size between colour and shape ("a red small circle")
    sized = ShapesWorld(ShapesWorld.Config(holdout=list(HOLDOUT), sizes=True, num_objects=3), "train")
    negatives = [v for i in range(200) for k in range(len(sized[i].captions))
                 for v in sized[i].extra["negative_captions"](k).values()]
    assert not [v for v in negatives for p in HOLDOUT
                if re.search(p.replace(" ", r"(?: (?:small|large))* "), v)]
    assert said(ShapesWorld(ShapesWorld.Config(), "train"))[0]  # without the holdout they are said: the filter works
    assert said(ShapesWorld(ShapesWorld.Config(holdout=list(HOLDOUT)), "test"))[0]

    ctx = FieldContext(tokenize=lambda ts, **kw: torch.zeros(len(ts), 8, dtype=torch.long), rng=random.Random(0),
                       split="train", source=train, transform=lambda x: x, index=0, options={})
    corrupted = 0
    for i in range(300):
        sample = train[i]
        out, graph = graph_texts_field(sample, 0, ctx), sample.extra["caption_graphs"][0]
        for t, r in enumerate(graph.relations[:4]):
            s, o = graph.objects[r.subject], graph.objects[r.object]
            # the corrupted triple gives each of the two objects the other's attributes
            if {f"{colour_of(o)} {s.name}", f"{colour_of(s)} {o.name}"} & set(HOLDOUT):
                corrupted += 1
                assert not out["triple_hard_valid"][t, 1], (i, t)
    assert corrupted > 0  # the case happened


def test_holdout_pairs_are_never_drawn_in_training_even_as_distractors():
    cfg = ShapesWorld.Config(holdout=list(HOLDOUT), distractors=2)
    train = ShapesWorld(cfg, "train")
    assert [i for i in range(300) if drawn_pairs(train.graph(i)) & set(HOLDOUT)] == []


# ------------------------------------------------------------------------------------------- sizes


def test_sizes_are_named_and_drawn():
    cfg = ShapesWorld.Config(sizes=True, image_size=64)
    world = ShapesWorld(cfg, "train")
    sides = {"small": [], "large": []}
    areas: dict[tuple[str, str], list[int]] = {}
    for i in range(60):
        s = world[i]
        img = np.asarray(s.image)
        for e in s.graph.objects:
            assert len(e.attributes) == 2 and e.attributes[0] in SIZES and e.attributes[1] in COLOURS, e
            size = e.attributes[0]
            assert e.phrase().startswith(size + " ")
            assert any(e.phrase() in c for c in s.captions)
            sides[size].append(e.box[2])
            assert e.box[2] == e.box[3]
            region = img[box_region(e.box)]
            areas.setdefault((e.name, size), []).append(int((as_keys(region) == key(COLOURS[colour_of(e)])).sum()))
    assert sides["small"] and sides["large"]
    assert max(sides["small"]) < min(sides["large"])
    assert all(side == pytest.approx(0.3 * 64 * SIZES["small"]) for side in sides["small"])
    assert all(side == pytest.approx(0.3 * 64 * SIZES["large"]) for side in sides["large"])
    compared = 0
    for shape in SHAPES:  # the drawn area follows the size, shape by shape
        if (shape, "small") in areas and (shape, "large") in areas:
            assert max(areas[(shape, "small")]) < min(areas[(shape, "large")]), shape
            compared += 1
    assert compared >= 3


def test_no_sizes_by_default():
    world = ShapesWorld(DEFAULT, "train")
    for i in range(20):
        for e in world[i].graph.objects:
            assert len(e.attributes) == 1 and e.attributes[0] in COLOURS
            assert e.box[2] == pytest.approx(0.3 * 32)


# ---------------------------------------------------------------------------------- partial captions


@CONFIGS
def test_partial_captions_are_each_object_and_each_bare_relation(cfg):
    world = ShapesWorld(cfg, "train")
    margin = cfg.margin * cfg.image_size
    saw_an = False
    for i in range(40):
        s = world[i]
        objects = s.graph.objects
        expected = [f"{article(e.phrase())} {e.phrase()}" for e in objects]
        expected += [f"{article(objects[r.subject].name)} {objects[r.subject].name} {PHRASE[r.predicate]} "
                     f"{article(objects[r.object].name)} {objects[r.object].name}" for r in s.graph.relations]
        assert s.partial_captions == expected, i
        saw_an |= any(p.startswith("an ") for p in s.partial_captions)
        names = {e.name: k for k, e in enumerate(objects)}
        for p in s.partial_captions[len(objects):]:
            for sub, pred, o in parse(p, 0, names):
                assert satisfies(pred, objects[sub].box, objects[o].box, margin)
        for p in s.partial_captions[: len(objects)]:  # no relation words in an object caption
            assert not any(ph in p for ph in PHRASE.values())
    assert saw_an or cfg.sizes  # "an orange ..." shows up and is spelt right (sizes put "small"/"large" first)


# -------------------------------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    "bad,words",
    [
        ({"num_objects": 5}, ["num_objects", "5"]),
        ({"num_objects": 1}, ["num_objects", "1"]),
        ({"holdout": ["red cube"]}, ["holdout", "red cube"]),
        ({"holdout": ["pink circle"]}, ["holdout", "pink circle"]),
        ({"holdout": ["circle red"]}, ["holdout", "circle red"]),
        ({"num_objects": 4, "distractors": 3}, ["at most"]),
        ({"object_size": 0.5}, ["object_size 0.5", "do not fit side by side", "smaller object_size or margin"]),
        ({"object_size": 0.42, "sizes": True}, ["x1.25 when large", "2 x 0.525"]),
    ],
    ids=["5-objects", "1-object", "unknown-shape", "unknown-colour", "reversed-pair", "too-many", "too-big",
         "too-big-when-large"],
)
def test_bad_config_raises_a_value_error_naming_the_problem(bad, words):
    with pytest.raises(ValueError) as info:
        ShapesWorld(ShapesWorld.Config(**bad), "train")
    for w in words:
        assert w in str(info.value)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ShapesWorld(DEFAULT, "dev")


@pytest.mark.parametrize("split", ["train", "test"])
def test_negative_distractors_are_rejected(split):
    with pytest.raises(ValueError, match="distractors"):
        ShapesWorld(ShapesWorld.Config(distractors=-1), split)[0]


def test_index_outside_the_split_is_an_index_error():
    world = ShapesWorld(ShapesWorld.Config(test_size=10), "test")
    assert len(world) == 10
    world[9]
    with pytest.raises(IndexError, match="shapes/test"):
        world[10]
    with pytest.raises(IndexError):
        world.graph(-1)

"""The shapes world is deterministic, its splits are disjoint, and its captions are true of its pixels."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from datamodules.negatives import swap_attributes, swap_relation
from datamodules.shapes import BACKGROUND, COLOURS, PREDICATES, SIZES, ShapesWorld, render_caption

DEFAULT = ShapesWorld.Config()
HARD = ShapesWorld.Config(image_size=64, num_objects=3, distractors=2, sizes=True, object_size=0.2)


def pixels(world: ShapesWorld, i: int) -> np.ndarray:
    return np.asarray(world[i].image)


@pytest.mark.parametrize("cfg", [DEFAULT, HARD], ids=["default", "hard"])
def test_same_config_same_scene(cfg):
    a, b = ShapesWorld(cfg, "train"), ShapesWorld(cfg, "train")
    for i in (0, 7, 123):
        assert np.array_equal(pixels(a, i), pixels(b, i))
        assert a[i].graph == b[i].graph and a[i].captions == b[i].captions


def test_splits_and_seeds_give_different_scenes():
    train, test = ShapesWorld(DEFAULT, "train"), ShapesWorld(DEFAULT, "test")
    other_seed = ShapesWorld(ShapesWorld.Config(seed=1), "train")
    same = sum(np.array_equal(pixels(train, i), pixels(test, i)) for i in range(50))
    assert same == 0
    assert sum(np.array_equal(pixels(train, i), pixels(other_seed, i)) for i in range(50)) == 0


def geometry_holds(pred: str, a, b, margin: float) -> bool:
    """Recomputed here from the boxes: the relation's axis has the gap, the other axis overlaps."""
    _, _, axis, sign = PREDICATES[pred]
    gap = (b[axis] - (a[axis] + a[axis + 2])) if sign < 0 else (a[axis] - (b[axis] + b[axis + 2]))
    other = 1 - axis
    overlap = a[other] < b[other] + b[other + 2] and b[other] < a[other] + a[other + 2]
    return gap >= margin and overlap


@pytest.mark.parametrize("cfg,n", [(DEFAULT, 200), (HARD, 80)], ids=["default", "hard"])
def test_captions_are_true_of_the_pixels(cfg, n):
    world = ShapesWorld(cfg, "test")
    margin = cfg.margin * cfg.image_size
    for i in range(n):
        full = world.graph(i)
        img = pixels(world, i)
        for r in full.relations:
            a, b = full.objects[r.subject].box, full.objects[r.object].box
            assert geometry_holds(r.predicate, a, b, margin), (i, r)
            assert not geometry_holds(PREDICATES[r.predicate][1], a, b, margin)  # the converse is false
        covered = np.zeros(img.shape[:2], dtype=bool)
        for e in full.objects:
            x, y, w, h = (int(round(v)) for v in e.box)
            patch = img[y:y + h, x:x + w].reshape(-1, 3)
            colour = next(a for a in e.attributes if a in COLOURS)
            drawn = Counter(map(tuple, patch)) - Counter({BACKGROUND: len(patch)})
            assert drawn.most_common(1)[0][0] == COLOURS[colour], (i, e)
            assert (patch == COLOURS[colour]).all(axis=1).mean() > 0.2, (i, e)
            covered[max(0, y - 1):y + h + 1, max(0, x - 1):x + w + 1] = True
        assert (img[~covered] == BACKGROUND).all(), i  # nothing is drawn outside the objects


def test_captions_name_the_objects_and_the_converse_is_stated_both_ways():
    world = ShapesWorld(DEFAULT, "val")
    for i in range(30):
        s = world[i]
        (r,) = s.graph.relations
        subj, obj = s.graph.objects[r.subject].phrase(), s.graph.objects[r.object].phrase()
        phrase, converse, _, _ = PREDICATES[r.predicate]
        for c in s.captions[:3]:
            assert c.index(subj) < c.index(phrase) < c.index(obj)
        for c in s.captions[3:]:
            assert c.index(obj) < c.index(PREDICATES[converse][0]) < c.index(subj)
        assert s.captions[0] == render_caption(s.graph)


def test_mentioned_objects_are_distinct_and_distractors_disjoint():
    world = ShapesWorld(HARD, "train")
    for i in range(50):
        full = world.graph(i)
        mentioned, distractors = full.objects[:3], full.objects[3:]
        colours = [next(a for a in e.attributes if a in COLOURS) for e in full.objects]
        assert len(set(colours)) == len(colours) and len({e.name for e in full.objects}) == len(full.objects)
        assert len(distractors) == 2 and all(e.name not in {m.name for m in mentioned} for e in distractors)
        assert not any(e.name in c for e in distractors for c in world[i].captions)


def test_holdout_pairs_never_reach_training():
    cfg = ShapesWorld.Config(holdout=["red circle", "blue square"])
    train, test = ShapesWorld(cfg, "train"), ShapesWorld(cfg, "test")
    phrases = lambda w, i: {e.phrase() for e in w[i].graph.objects}  # noqa: E731
    assert not any(phrases(train, i) & {"red circle", "blue square"} for i in range(300))
    assert any(phrases(test, i) & {"red circle", "blue square"} for i in range(300))


def test_sizes_are_drawn_and_named():
    world = ShapesWorld(ShapesWorld.Config(sizes=True, image_size=64), "train")
    seen = set()
    for i in range(40):
        for e in world[i].graph.objects:
            size = next(a for a in e.attributes if a in SIZES)
            seen.add(size)
            assert e.box[2] == pytest.approx(0.3 * 64 * SIZES[size])
    assert seen == set(SIZES)


def test_partial_captions():
    s = ShapesWorld(DEFAULT, "train")[3]
    a, b = s.graph.objects
    (r,) = s.graph.relations
    assert s.partial_captions[:2] == [f"a{'n' if a.phrase()[0] in 'aeiou' else ''} {a.phrase()}",
                                      f"a{'n' if b.phrase()[0] in 'aeiou' else ''} {b.phrase()}"]
    assert s.partial_captions[2] == f"a {a.name} {PREDICATES[r.predicate][0]} a {b.name}"  # no shape name starts with a vowel


def test_negatives_are_false_of_the_scene():
    world = ShapesWorld(DEFAULT, "test")
    margin = DEFAULT.margin * DEFAULT.image_size
    for i in range(100):
        g = world[i].graph
        neg = swap_relation(g)
        (r,) = neg.relations
        assert not geometry_holds(r.predicate, neg.objects[r.subject].box, neg.objects[r.object].box, margin)
        assert render_caption(neg) not in world[i].captions
        swapped = swap_attributes(g)
        present = {e.phrase() for e in g.objects}
        assert not ({e.phrase() for e in swapped.objects} & present)  # "blue circle", "red square" are not there


@pytest.mark.parametrize("bad,match", [({"num_objects": 5}, "num_objects"), ({"holdout": ["red cube"]}, "holdout"),
                                       ({"num_objects": 4, "distractors": 3}, "at most")])
def test_bad_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        ShapesWorld(ShapesWorld.Config(**bad), "train")
    with pytest.raises(ValueError, match="unknown split"):
        ShapesWorld(DEFAULT, "dev")

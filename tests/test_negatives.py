"""Negative captions are really false, and ARO's four order perturbations move only what they promise to move."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from tests_support import PREDICATE_OF_PHRASE, CLAUSE
from datamodules.graph import Entity, Relation, SceneGraph
from datamodules.negatives import (ORDER_PERTURBATIONS, order_negatives, shuffle_allbut_nouns_and_adj,
                                   shuffle_nouns_and_adj, shuffle_trigrams, shuffle_within_trigrams,
                                   swap_attributes, swap_relation)
from datamodules.shapes import COLOURS, ShapesWorld, render_caption, word_tags

DEFAULT = ShapesWorld.Config()
HARD = ShapesWorld.Config(image_size=64, num_objects=3, distractors=2, sizes=True, object_size=0.2)
TWO_WITH_DISTRACTORS = ShapesWorld.Config(image_size=64, num_objects=2, distractors=2, sizes=True, object_size=0.2)



def satisfies(predicate: str, a, b, margin: float = 0.0) -> bool:
    """a <predicate> b from the boxes (x, y, w, h): a gap >= margin on the relation's axis, overlap on the other."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    x_overlap = ax < bx + bw and bx < ax + aw
    y_overlap = ay < by + bh and by < ay + ah
    return {
        "left of": ax + aw + margin <= bx and y_overlap,
        "right of": bx + bw + margin <= ax and y_overlap,
        "above": ay + ah + margin <= by and x_overlap,
        "below": by + bh + margin <= ay and x_overlap,
    }[predicate]


def clauses(caption: str, template: int) -> list[tuple[str, str, str]]:
    """(subject phrase, predicate, object phrase) of each clause, read back from the words."""
    out = []
    for clause in caption.split(" and "):
        m = CLAUSE[template].match(clause)
        assert m, (template, clause)
        out.append((m["s"], PREDICATE_OF_PHRASE[m["p"]], m["o"]))
    return out


def colour_of(entity) -> str:
    (colour,) = [a for a in entity.attributes if a in COLOURS]
    return colour


# -------------------------------------------------------------------------------------- graph swaps


@pytest.mark.parametrize("cfg,n", [(DEFAULT, 150), (HARD, 60)], ids=["default", "hard"])
def test_swap_relation_makes_the_relation_false_of_the_boxes(cfg, n):
    world = ShapesWorld(cfg, "test")
    margin = cfg.margin * cfg.image_size
    for i in range(n):
        g = world[i].graph
        boxes = {e.phrase(): e.box for e in g.objects}
        for k in range(len(g.relations)):
            neg = swap_relation(g, k)
            assert neg.objects == g.objects and g.relations[k] != neg.relations[k]
            for template in range(3):
                for conv in (False, True):
                    read = clauses(render_caption(neg, template, conv), template)
                    assert len(read) == len(g.relations)
                    for j, (s, p, o) in enumerate(read):
                        if j == k:  # the swapped clause is false, even with no margin at all
                            assert not satisfies(p, boxes[s], boxes[o]), (i, k, read)
                        else:  # the others are untouched and still true
                            assert satisfies(p, boxes[s], boxes[o], margin), (i, k, read)
                    assert render_caption(neg, template, conv) not in world[i].captions


def test_swap_relation_leaves_the_input_alone_and_swaps_only_one_edge():
    g = SceneGraph((Entity("circle", ("red",)), Entity("square", ("blue",)), Entity("star", ("green",))),
                   (Relation(0, "left of", 1), Relation(1, "above", 2)))
    neg = swap_relation(g, 1)
    assert neg.relations == (Relation(0, "left of", 1), Relation(2, "above", 1))
    assert g.relations == (Relation(0, "left of", 1), Relation(1, "above", 2))
    assert render_caption(swap_relation(g, 0)) == ("a blue square to the left of a red circle and "
                                                    "a blue square above a green star")


@pytest.mark.parametrize("cfg", [DEFAULT, TWO_WITH_DISTRACTORS], ids=["default", "sizes+distractors"])
def test_swap_attributes_names_pairs_that_are_not_in_the_scene(cfg):
    world = ShapesWorld(cfg, "test")
    background = np.array([18, 18, 26])
    for i in range(100):
        full = world.graph(i)
        g = world[i].graph
        img = np.asarray(world[i].image)
        present = {(colour_of(e), e.name) for e in full.objects}  # distractors included
        neg = swap_attributes(g, 0, 1)
        assert [e.name for e in neg.objects] == [e.name for e in g.objects]
        assert [e.box for e in neg.objects] == [e.box for e in g.objects]
        assert (neg.objects[0].attributes, neg.objects[1].attributes) == (g.objects[1].attributes, g.objects[0].attributes)
        claimed = {(colour_of(e), e.name) for e in neg.objects}
        assert not claimed & present, (i, claimed, present)
        for template in range(3):
            for conv in (False, True):
                caption = render_caption(neg, template, conv)
                for s, _, o in clauses(caption, template):
                    for ph in (s, o):
                        colour, shape = [w for w in ph.split() if w in COLOURS][0], ph.split()[-1]
                        assert (colour, shape) not in present, (i, caption)
        # and the pixels agree: the box of each object holds none of the colour the negative gives it
        for e, fake in zip(g.objects, neg.objects):
            x, y, w, h = e.box
            patch = img[math.floor(y): math.ceil(y + h), math.floor(x): math.ceil(x + w)].reshape(-1, 3)
            assert not (patch == COLOURS[colour_of(fake)]).all(axis=1).any(), (i, e, fake)
            assert (patch != background).any(axis=1).any()


def test_the_worlds_negative_captions_are_false_and_in_the_caption_form():
    world = ShapesWorld(DEFAULT, "train")
    margin = DEFAULT.margin * DEFAULT.image_size
    for i in range(30):
        s = world[i]
        boxes = {e.phrase(): e.box for e in s.graph.objects}
        present = {(colour_of(e), e.name) for e in world.graph(i).objects}
        for k, caption in enumerate(s.captions):
            negs = s.extra["negative_captions"](k)
            template = k % 3
            assert {"relation", "attribute", "noun"} <= set(negs)
            ((sub, p, o),) = clauses(negs["relation"], template)
            assert not satisfies(p, boxes[sub], boxes[o])
            ((sub, p, o),) = clauses(caption, template)
            assert satisfies(p, boxes[sub], boxes[o], margin)
            for kind in ("attribute", "noun"):
                for ph in clauses(negs[kind], template)[0][::2]:
                    assert (ph.split()[-2], ph.split()[-1]) not in present, (i, k, kind, negs[kind])
            assert negs["relation"] not in s.captions and negs["attribute"] not in s.captions
            if "shuffle" in negs:
                assert negs["shuffle"] != caption and Counter(negs["shuffle"].split()) == Counter(caption.split())
            assert negs == s.extra["negative_captions"](k)  # seeded by (index, caption)


# ----------------------------------------------------------------------------- order perturbations

# Hand-tagged (Penn tags, with NNS/NNP/JJR/JJS to check the prefix rule) and 17 words long, so the last
# trigram is a 2-word chunk.
PENN = [
    ("the", "DT"), ("small", "JJ"), ("red", "JJ"), ("circles", "NNS"), ("are", "VBP"), ("larger", "JJR"),
    ("than", "IN"), ("the", "DT"), ("biggest", "JJS"), ("square", "NN"), ("near", "IN"), ("Paris", "NNP"),
    ("and", "CC"), ("a", "DT"), ("blue", "JJ"), ("tree", "NN"), ("grows", "VBZ"),
]
WORDS, TAGS = [w for w, _ in PENN], [t for _, t in PENN]
NOUN = [t.startswith("NN") for t in TAGS]
ADJ = [t.startswith("JJ") for t in TAGS]
SHAPES_CAPTION = "there is a small red circle to the left of a large blue square and a large blue square above a green star"


def seeds(n: int = 30):
    return [np.random.default_rng(s) for s in range(n)]


def at(words: list[str], mask: list[bool]) -> Counter:
    return Counter(w for w, m in zip(words, mask) if m)


def chunks(words: list[str]) -> list[list[str]]:
    return [words[i: i + 3] for i in range(0, len(words), 3)]


def is_chunk_order(out: list[str], units: list[tuple[str, ...]]) -> bool:
    """Whether `out` is the units, each whole, one after another in some order (each used once)."""
    if not units:
        return not out
    for k, unit in enumerate(units):
        if tuple(out[: len(unit)]) == unit and is_chunk_order(out[len(unit):], units[:k] + units[k + 1:]):
            return True
    return False


def test_shuffle_nouns_and_adj_moves_nouns_among_nouns_and_adjectives_among_adjectives():
    outs = []
    for rng in seeds():
        out = shuffle_nouns_and_adj(WORDS, TAGS, rng)
        assert Counter(out) == Counter(WORDS)
        assert at(out, NOUN) == at(WORDS, NOUN) and at(out, ADJ) == at(WORDS, ADJ)
        assert [o for o, n, a in zip(out, NOUN, ADJ) if not (n or a)] == [w for w, n, a in zip(WORDS, NOUN, ADJ)
                                                                           if not (n or a)]
        assert all(o == w for o, w, n, a in zip(out, WORDS, NOUN, ADJ) if not (n or a))
        outs.append(out)
    # it does shuffle: both nouns and adjectives leave their places in some outputs
    assert any([o for o, n in zip(out, NOUN) if n] != [w for w, n in zip(WORDS, NOUN) if n] for out in outs)
    assert any([o for o, a in zip(out, ADJ) if a] != [w for w, a in zip(WORDS, ADJ) if a] for out in outs)
    assert WORDS == [w for w, _ in PENN]  # input not mutated


def test_shuffle_allbut_nouns_and_adj_keeps_nouns_and_adjectives_in_place():
    other = [not (n or a) for n, a in zip(NOUN, ADJ)]
    outs = []
    for rng in seeds():
        out = shuffle_allbut_nouns_and_adj(WORDS, TAGS, rng)
        assert Counter(out) == Counter(WORDS)
        assert all(o == w for o, w, n, a in zip(out, WORDS, NOUN, ADJ) if n or a)
        assert at(out, other) == at(WORDS, other)
        outs.append(out)
    assert any(out != WORDS for out in outs)


def test_shuffle_within_trigrams_keeps_each_chunk_in_place():
    outs = []
    for rng in seeds():
        out = shuffle_within_trigrams(WORDS, TAGS, rng)
        assert len(out) == len(WORDS)
        assert [Counter(c) for c in chunks(out)] == [Counter(c) for c in chunks(WORDS)]
        outs.append(out)
    assert any(out != WORDS for out in outs)
    assert len({tuple(o) for o in outs}) > 5


def test_shuffle_trigrams_keeps_chunks_whole():
    units = [tuple(c) for c in chunks(WORDS)]
    assert len(units) == 6 and len(units[-1]) == 2
    orders = set()
    for rng in seeds():
        out = shuffle_trigrams(WORDS, TAGS, rng)
        assert Counter(out) == Counter(WORDS)
        assert is_chunk_order(out, units), out  # the output is the chunks, each whole, in some order
        orders.add(tuple(out))
    assert len(orders) > 5
    # the checker itself: a split chunk or a reordered one is not accepted
    assert not is_chunk_order(WORDS[1:] + WORDS[:1], units)
    assert not is_chunk_order(WORDS[:2] + [WORDS[3], WORDS[2]] + WORDS[4:], units)


def test_order_negatives_on_a_shapes_caption_with_word_tags():
    words, tags = map(list, zip(*word_tags(SHAPES_CAPTION)))
    assert tags[:6] == ["X", "X", "X", "JJ", "JJ", "NN"] and tags[-2:] == ["JJ", "NN"]
    noun, adj = [t == "NN" for t in tags], [t == "JJ" for t in tags]
    kinds = {n: [] for n in range(4)}
    for seed in range(30):
        negs = order_negatives(words, tags, np.random.default_rng(seed))
        assert len(negs) == 4 and all(isinstance(n, str) for n in negs)
        outs = [n.split() for n in negs]
        for out in outs:
            assert Counter(out) == Counter(words)
        nouns_adj, allbut, within, across = outs
        assert at(nouns_adj, noun) == at(words, noun) and at(nouns_adj, adj) == at(words, adj)
        assert all(o == w for o, w, n, a in zip(nouns_adj, words, noun, adj) if not (n or a))
        assert all(o == w for o, w, n, a in zip(allbut, words, noun, adj) if n or a)
        assert [Counter(c) for c in chunks(within)] == [Counter(c) for c in chunks(words)]
        assert is_chunk_order(across, [tuple(c) for c in chunks(words)]), across
        for k, out in enumerate(outs):
            kinds[k].append(out != words)
    assert all(any(v) for v in kinds.values())  # each perturbation does change the caption sometimes


def test_order_negatives_are_aro_order_and_seeded():
    a = order_negatives(WORDS, TAGS, np.random.default_rng(7))
    b = order_negatives(WORDS, TAGS, np.random.default_rng(7))
    assert a == b
    rng = np.random.default_rng(7)  # the four perturbations in ARO's order, sharing one generator
    assert a == [" ".join(f(WORDS, TAGS, rng)) for f in (shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj,
                                                          shuffle_within_trigrams, shuffle_trigrams)]
    assert ORDER_PERTURBATIONS == (shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj,
                                   shuffle_within_trigrams, shuffle_trigrams)
    for f in ORDER_PERTURBATIONS:
        assert f(WORDS, TAGS, np.random.default_rng(3)) == f(WORDS, TAGS, np.random.default_rng(3))
    assert len({tuple(order_negatives(WORDS, TAGS, np.random.default_rng(s))) for s in range(10)}) > 1


@pytest.mark.parametrize("tags", [TAGS[:-1], TAGS + ["NN"], []], ids=["fewer", "more", "none"])
def test_order_negatives_rejects_mismatched_tags(tags):
    with pytest.raises(ValueError, match=f"{len(WORDS)} words but {len(tags)} tags"):
        order_negatives(WORDS, tags, np.random.default_rng(0))


def test_perturbations_handle_short_inputs():
    for n in range(0, 4):
        words, tags = WORDS[:n], TAGS[:n]
        negs = order_negatives(words, tags, np.random.default_rng(0))
        assert len(negs) == 4 and all(Counter(x.split()) == Counter(words) for x in negs)


def test_trigram_words_feed_only_the_two_trigram_shuffles():
    words, tags = ["a", "red", "-", "ish", "ball", "on", "a", "box"], ["DT", "JJ", "HYPH", "JJ", "NN", "IN", "DT", "NN"]
    trigram_words = ["a", "red-ish", "ball", "on", "a", "box"]
    got = order_negatives(words, tags, np.random.default_rng(5), trigram_words=trigram_words)
    rng = np.random.default_rng(5)  # the same draws in the same order, each shuffle on its own words
    assert got == [" ".join(shuffle_nouns_and_adj(words, tags, rng)),
                   " ".join(shuffle_allbut_nouns_and_adj(words, tags, rng)),
                   " ".join(shuffle_within_trigrams(trigram_words, tags, rng)),
                   " ".join(shuffle_trigrams(trigram_words, tags, rng))]
    assert sorted(got[2].split()) == sorted(got[3].split()) == sorted(trigram_words)
    assert sorted(got[0].split()) == sorted(got[1].split()) == sorted(words)
    assert order_negatives(words, tags, np.random.default_rng(5)) == order_negatives(
        words, tags, np.random.default_rng(5), trigram_words=words)


def test_a_negative_the_model_reads_as_a_true_caption_is_never_drawn():
    """'a cat on A bed .' is 'A cat on a bed.' to CLIP's tokenizer (lower case, punctuation split off), and a relation
    swap can be another of the image's true captions: neither is a negative, nor is an empty candidate."""
    import random

    import open_clip
    import torch

    from datamodules.datamodule import CachedTokenizer
    from datamodules.fields import FieldContext, negative_caption, swap_probe_field
    from datamodules.source import Sample

    offered = {"shuffle": ["a cat on A bed .", "  ", "a bed on a cat"], "relation": "A bed under a cat.",
               "attribute": ""}
    sample = Sample(image=None, captions=["A cat on a bed.", "A bed under a cat."], key="k",
                    extra={"negative_captions": lambda k: offered})
    tokenize = CachedTokenizer(open_clip.get_tokenizer("ViT-B-32"))
    ctx = FieldContext(tokenize=tokenize, rng=random.Random(0), split="train", source=None, transform=None, index=0,
                       options={"negative_kinds": ("shuffle", "relation", "attribute")})
    assert {negative_caption(sample, 0, ctx) for _ in range(50)} == {"a bed on a cat"}
    probe = swap_probe_field(sample, 0, ctx)
    assert probe["swap_valid"].tolist() == [False, False]  # the relation swap is a true caption; no attribute swap
    assert torch.equal(probe["swap_text"][0], tokenize(["A cat on a bed."])[0])

"""Negatives for real captions: each kind rewrites only what it promises, and is absent when it cannot apply."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datamodules.parse import graph_from_sentence
from datamodules.text_negatives import (attribute_negative, noun_negative, relation_negative, shuffle_negative,
                                        text_negatives)

FIXTURE = Path(__file__).parent / "fixtures" / "captions.conllu"
EXTRA = """# text = Man riding an elephant.
1\tMan\tman\tNOUN\tNN\t_\t0\troot\t_\t_
2\triding\tride\tVERB\tVBG\t_\t1\tacl\t_\t_
3\tan\ta\tDET\tDT\t_\t4\tdet\t_\t_
4\telephant\telephant\tNOUN\tNN\t_\t2\tobj\t_\tSpaceAfter=No
5\t.\t.\tPUNCT\t.\t_\t1\tpunct\t_\t_

# text = TV on a table
1\tTV\tTV\tNOUN\tNN\t_\t0\troot\t_\t_
2\ton\ton\tADP\tIN\t_\t4\tcase\t_\t_
3\ta\ta\tDET\tDT\t_\t4\tdet\t_\t_
4\ttable\ttable\tNOUN\tNN\t_\t1\tnmod\t_\t_

# text = Two dogs and three cats.
1\tTwo\ttwo\tNUM\tCD\t_\t2\tnummod\t_\t_
2\tdogs\tdog\tNOUN\tNNS\t_\t0\troot\t_\t_
3\tand\tand\tCCONJ\tCC\t_\t5\tcc\t_\t_
4\tthree\tthree\tNUM\tCD\t_\t5\tnummod\t_\t_
5\tcats\tcat\tNOUN\tNNS\t_\t2\tconj\t_\tSpaceAfter=No
6\t.\t.\tPUNCT\t.\t_\t2\tpunct\t_\t_

# text = Dogs
1\tDogs\tdog\tNOUN\tNNS\t_\t0\troot\t_\t_

# text = A white cat and a black cat on a bed.
1\tA\ta\tDET\tDT\t_\t3\tdet\t_\t_
2\twhite\twhite\tADJ\tJJ\t_\t3\tamod\t_\t_
3\tcat\tcat\tNOUN\tNN\t_\t0\troot\t_\t_
4\tand\tand\tCCONJ\tCC\t_\t7\tcc\t_\t_
5\ta\ta\tDET\tDT\t_\t7\tdet\t_\t_
6\tblack\tblack\tADJ\tJJ\t_\t7\tamod\t_\t_
7\tcat\tcat\tNOUN\tNN\t_\t3\tconj\t_\t_
8\ton\ton\tADP\tIN\t_\t10\tcase\t_\t_
9\ta\ta\tDET\tDT\t_\t10\tdet\t_\t_
10\tbed\tbed\tNOUN\tNN\t_\t3\tnmod\t_\tSpaceAfter=No
11\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

"""


HELMET = "A man with a red helmet on a small moped on a dirt road."


@pytest.fixture(scope="module")
def parsed():
    """text -> ParsedCaption for the fixture captions and a few more."""
    from stanza.utils.conll import CoNLL

    sentences = CoNLL.conll2doc(input_file=str(FIXTURE)).sentences + CoNLL.conll2doc(input_str=EXTRA).sentences
    return {s.text: graph_from_sentence(s) for s in sentences}


@pytest.mark.parametrize("text, expected", [
    # Structure-CLIP's released example (Scene-CLIP test_coco_aug ... relation.json) gives exactly this false caption
    (HELMET, "A helmet with a red man on a small moped on a dirt road."),
    ("A horse is ridden by a man.", "A man is ridden by a horse."),
    ("A man standing in front of a bus.", "A bus standing in front of a man."),
    ("A fire hydrant on the side of a street.", "A street on the side of a fire hydrant."),
    ("A woman is holding an umbrella while walking down the street.",
     "An umbrella is holding a woman while walking down the street."),  # articles follow their new noun
    ("Man riding an elephant.", "Elephant riding a man."),  # the start of the caption keeps its capital
    ("TV on a table", "Table on a TV"),  # an acronym keeps its case
    ("The car is red.", None),  # no relation
    ("He is riding a horse on the beach.", None),  # a pronoun is not an object
])
def test_relation_negative(parsed, text, expected):
    assert relation_negative(parsed[text]) == expected


@pytest.mark.parametrize("text, expected", [
    (HELMET, "A man with a small helmet on a red moped on a dirt road."),
    ("Two dogs and three cats.", "Three dogs and two cats."),
    ("A red and white bus.", None),  # both attributes belong to one object
    ("The cat and the dog are black.", None),  # the same attribute on both
    ("Three people standing next to a parked car.", None),  # a numeral never swaps with an adjective
    ("A man riding a horse.", None),
    # two objects of one name: the swap would say the same ("a black cat and a white cat"), so it is no negative
    ("A white cat and a black cat on a bed.", None),
])
def test_attribute_negative(parsed, text, expected):
    assert attribute_negative(parsed[text]) == expected


@pytest.mark.parametrize("text, expected", [
    ("A dog and a cat on a bed.", "A cat and a dog on a bed."),
    (HELMET, "A moped with a red helmet on a small man on a dirt road."),
    ("A man riding a horse.", "A horse riding a man."),  # the only pair: the same as the relation swap
    ("The car is red.", None),
    ("A small dog that is brown.", None),
])
def test_noun_negative(parsed, text, expected):
    assert noun_negative(parsed[text]) == expected


def test_shuffles_are_permutations_never_the_caption(parsed):
    for p in parsed.values():
        for seed in range(4):
            s = shuffle_negative(p, np.random.default_rng(seed))
            if s is not None:
                assert s not in (p.text, " ".join(p.words)) and Counter(s.split(" ")) == Counter(p.words)
    assert shuffle_negative(parsed["Dogs"], np.random.default_rng(0)) is None
    p = parsed["A man riding a horse."]
    assert text_negatives(p, seed=3) == text_negatives(p, seed=3)


def test_no_kind_returns_the_caption(parsed):
    kinds = Counter()
    for p in parsed.values():
        negatives = text_negatives(p, seed=0)
        assert set(negatives) <= {"relation", "attribute", "noun", "shuffle"}
        assert p.text not in negatives.values()
        kinds.update(negatives.keys())
    assert kinds["relation"] >= 30 and kinds["attribute"] >= 2 and kinds["noun"] >= 30 and kinds["shuffle"] >= 40

"""ARO's four word-order perturbations move only what they promise to move, reproducibly."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from datamodules.negatives import (order_negatives, shuffle_allbut_nouns_and_adj, shuffle_nouns_and_adj,
                                   shuffle_trigrams, shuffle_within_trigrams)
from datamodules.shapes import word_tags

WORDS = "a small red circle is to the left of a large blue square near the tree".split()
TAGS = ["DT", "JJ", "JJ", "NN", "VBZ", "TO", "DT", "NN", "IN", "DT", "JJ", "JJ", "NN", "IN", "DT", "NN"]


def rngs():
    return [np.random.default_rng(s) for s in range(20)]


def test_nouns_and_adjectives_move_among_their_own_kind():
    moved = False
    for rng in rngs():
        out = shuffle_nouns_and_adj(WORDS, TAGS, rng)
        assert Counter(out) == Counter(WORDS)
        for w, o, t in zip(WORDS, out, TAGS):
            if t.startswith("NN"):
                assert TAGS[WORDS.index(o)].startswith("NN")
            elif t.startswith("JJ"):
                assert TAGS[WORDS.index(o)].startswith("JJ")
            else:
                assert o == w
        moved |= out != WORDS
    assert moved


def test_everything_but_nouns_and_adjectives_moves():
    for rng in rngs():
        out = shuffle_allbut_nouns_and_adj(WORDS, TAGS, rng)
        assert Counter(out) == Counter(WORDS)
        assert all(o == w for w, o, t in zip(WORDS, out, TAGS) if t[:2] in ("NN", "JJ"))


def test_trigram_shuffles():
    chunks = [WORDS[i:i + 3] for i in range(0, len(WORDS), 3)]
    for rng in rngs():
        within = shuffle_within_trigrams(WORDS, TAGS, rng)
        assert [Counter(within[i:i + 3]) for i in range(0, len(WORDS), 3)] == [Counter(c) for c in chunks]
        across = shuffle_trigrams(WORDS, TAGS, rng)
        pieces, i = [], 0
        while i < len(across):  # the output is the chunks, whole, in some order
            match = next(c for c in chunks if across[i:i + len(c)] == c and c not in pieces)
            pieces.append(match)
            i += len(match)
        assert sorted(map(tuple, pieces)) == sorted(map(tuple, chunks))


def test_order_negatives_are_seeded_and_checked():
    caption = "a red circle to the left of a blue square"
    words, tags = zip(*word_tags(caption))
    assert list(tags) == ["X", "JJ", "NN", "X", "X", "X", "X", "X", "JJ", "NN"]
    a = order_negatives(list(words), list(tags), np.random.default_rng(1))
    b = order_negatives(list(words), list(tags), np.random.default_rng(1))
    assert a == b and len(a) == 4 and all(sorted(n.split()) == sorted(words) for n in a)
    with pytest.raises(ValueError, match="10 words but 2 tags"):
        order_negatives(list(words), ["NN", "JJ"], np.random.default_rng(0))

"""Negative captions: scene-graph swaps (relation, attributes) and ARO's four word-order perturbations.

Graph swaps return a new graph that a source renders back into a fluent caption. The order
perturbations follow ARO's `TextShuffler` (dataset_zoo/perturbations.py): they act on words with
part-of-speech tags (Penn tags: NN* nouns, JJ* adjectives) and may return the original order.
"""
from __future__ import annotations

import re

import numpy as np

from datamodules.graph import Relation, SceneGraph


# Predicates whose subject and object can trade places with the relation still true ("a man next to a woman" is
# "a woman next to a man"): swapping them makes no negative. Spatial proximity only; a verb before them ("sitting
# next to") is not symmetric (the other may be standing).
SYMMETRIC_PREDICATES = frozenset({"next to", "near", "beside", "by", "close to", "touching", "adjacent to",
                                  "alongside", "near to", "nearby", "beside each other", "next to each other"})


def symmetric(predicate: str) -> bool:
    return " ".join(predicate.lower().split()) in SYMMETRIC_PREDICATES


def swap_relation(graph: SceneGraph, index: int = 0) -> SceneGraph:
    """The graph with relation `index`'s subject and object exchanged ("a left of b" -> "b left of a")."""
    r = graph.relations[index]
    relations = list(graph.relations)
    relations[index] = Relation(r.object, r.predicate, r.subject)
    return graph.with_relations(tuple(relations))


def swap_attributes(graph: SceneGraph, i: int = 0, j: int = 1) -> SceneGraph:
    """The graph with the attributes of objects i and j exchanged ("red circle, blue square" -> "blue circle, red square")."""
    objects = list(graph.objects)
    a, b = objects[i], objects[j]
    objects[i] = type(a)(a.name, b.attributes, a.box)
    objects[j] = type(b)(b.name, a.attributes, b.box)
    return graph.with_objects(tuple(objects))


def mentions(text: str, phrases: tuple[str, ...] | list[str], between: tuple[str, ...] = ()) -> bool:
    """Whether `text` says any of `phrases` as whole words, with any of the words `between` allowed between
    theirs ("a small red square" mentions "red square"; with between=("small",), so does "a red small square",
    which a word-order shuffle can make)."""
    gap = " (?:(?:" + "|".join(map(re.escape, between)) + ") )*" if between else " "
    return any(re.search(r"(?<![\w-])" + gap.join(map(re.escape, p.split())) + r"(?![\w-])", text) for p in phrases)


def _is_noun(tag: str) -> bool:
    return tag.startswith("NN")


def _is_adj(tag: str) -> bool:
    return tag.startswith("JJ")


def _permute_where(words: list[str], mask: list[bool], rng: np.random.Generator) -> list[str]:
    """Permute the words at the masked positions among themselves; the others stay."""
    positions = [i for i, m in enumerate(mask) if m]
    out = list(words)
    for dst, src in zip(positions, rng.permutation(positions)):
        out[dst] = words[int(src)]
    return out


def shuffle_nouns_and_adj(words: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    """Nouns are permuted among nouns and adjectives among adjectives."""
    out = _permute_where(words, [_is_noun(t) for t in tags], rng)
    return _permute_where(out, [_is_adj(t) for t in tags], rng)


def shuffle_allbut_nouns_and_adj(words: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    """Every word that is neither a noun nor an adjective is permuted among its kind."""
    return _permute_where(words, [not (_is_noun(t) or _is_adj(t)) for t in tags], rng)


def _trigrams(words: list[str]) -> list[list[str]]:
    return [words[i : i + 3] for i in range(0, len(words), 3)]


def shuffle_within_trigrams(words: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    """Consecutive 3-word chunks, each shuffled inside."""
    return [w for chunk in _trigrams(words) for w in (chunk[int(k)] for k in rng.permutation(len(chunk)))]


def shuffle_trigrams(words: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    """Consecutive 3-word chunks in a shuffled order."""
    chunks = _trigrams(words)
    return [w for k in rng.permutation(len(chunks)) for w in chunks[int(k)]]


# ARO's option order for COCO-Order and Flickr30k-Order (after the original caption).
ORDER_PERTURBATIONS = (shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj, shuffle_within_trigrams, shuffle_trigrams)
TRIGRAM_PERTURBATIONS = (shuffle_within_trigrams, shuffle_trigrams)  # they read words only, not tags


def order_negatives(words: list[str], tags: list[str], rng: np.random.Generator,
                    trigram_words: list[str] | None = None) -> list[str]:
    """The four ARO perturbations of one tagged caption, joined with spaces, in ARO's order.

    `trigram_words`: the words of the two trigram shuffles where the caption is tokenized for them apart (ARO
    splits it with NLTK's word_tokenize for those and with spaCy's tagger for the other two); default `words`."""
    if len(words) != len(tags):
        raise ValueError(f"{len(words)} words but {len(tags)} tags: {' '.join(words)!r}")
    trigram_words = words if trigram_words is None else trigram_words
    return [" ".join(f(trigram_words if f in TRIGRAM_PERTURBATIONS else words, tags, rng))
            for f in ORDER_PERTURBATIONS]

"""Hard negative captions for real captions, made from their parse (`datamodules.parse.ParsedCaption`).

The same kinds the shapes world offers (`ShapesWorld.negative_captions`), so NegCLIP and Structure-CLIP run on
COCO unchanged: `{"relation", "attribute", "noun", "shuffle"}`, each a caption false of the image, absent when the
caption does not allow it. The swaps rewrite the caption text in place, so the negative stays a fluent caption
(Structure-CLIP's semantic negatives, NegCLIP's swaps): only the swapped words move, modifiers stay where they
are, and a word that moves to or from the start of the caption takes the capitalisation of its new place.
Grammatical number is not adjusted ("two dogs and a cat" -> "two cat and a dogs").
"""
from __future__ import annotations

import numpy as np

from datamodules.negatives import order_negatives
from datamodules.parse_rules import ParsedCaption

PROPER = ("NNP", "NNPS")


def _span(p: ParsedCaption, words: tuple[int, ...]) -> tuple[int, int]:
    """Character span from the first to the last of `words`."""
    return p.spans[min(words)][0], p.spans[max(words)][1]


def _fit(phrase: str, first_word_tag: str, at_start: bool, was_at_start: bool) -> str:
    """`phrase` as it should read in its new place: capitalised at the start of the caption, and lower-cased
    when it leaves the start (unless it is a proper noun or an acronym such as "TV")."""
    if not phrase:
        return phrase
    head = phrase.split(" ", 1)[0]
    if at_start:
        return phrase[0].upper() + phrase[1:]
    if was_at_start and first_word_tag not in PROPER and not (len(head) > 1 and head.isupper()):
        return phrase[0].lower() + phrase[1:]
    return phrase


def _article(p: ParsedCaption, slot: int, phrase: str) -> tuple[int, int, str] | None:
    """The indefinite article before word `slot` made to fit the phrase that now follows it ("a" <-> "an")."""
    k = slot - 1
    if k < 0 or p.words[k].lower() not in ("a", "an") or p.xpos[k] != "DT":
        return None
    article = "an" if phrase[:1].lower() in tuple("aeiou") else "a"
    s, e = p.spans[k]
    return s, e, (article.capitalize() if p.text[s:s + 1].isupper() else article)


def swap_spans(p: ParsedCaption, a: tuple[int, ...], b: tuple[int, ...]) -> str | None:
    """The caption with the words `a` and the words `b` exchanged in the text (and "a"/"an" before them fitted to
    their new neighbour); None when they overlap or the result is the caption itself."""
    (a, (sa, ea)), (b, (sb, eb)) = sorted([(a, _span(p, a)), (b, _span(p, b))], key=lambda x: x[1])
    if ea > sb:
        return None
    text, start = p.text, p.spans[0][0]
    first = _fit(text[sb:eb], p.xpos[min(b)], at_start=sa == start and text[sa:sa + 1].isupper(), was_at_start=False)
    second = _fit(text[sa:ea], p.xpos[min(a)], at_start=False, was_at_start=sa == start)
    edits = [(sa, ea, first), (sb, eb, second)]
    before_a, before_b = _article(p, min(a), first), _article(p, min(b), second)
    edits += [before_a] if before_a is not None else []
    edits += [before_b] if before_b is not None and before_b[0] >= ea else []  # not a word of the first span
    out = text
    for s, e, new in sorted(set(edits), reverse=True):
        out = out[:s] + new + out[e:]
    return None if out == text else out


def relation_negative(p: ParsedCaption) -> str | None:
    """Structure-CLIP's relation swap: the first relation whose subject and object names differ, with the two
    names exchanged in the text ("a man with a red helmet" -> "a helmet with a red man"); None without one."""
    for r in p.graph.relations:
        out = swap_spans(p, p.object_words[r.subject], p.object_words[r.object])
        if out is not None:
            return out
    return None


def attribute_negative(p: ParsedCaption) -> str | None:
    """Two attributes of different objects exchanged ("a red car next to a blue bus" -> "a blue car next to a red
    bus"); numerals only with numerals. None when no two objects have different attributes of one kind. Objects
    of one name are not paired: "a white cat and a black cat" swapped says the same thing (and where a relation
    tells them apart, the swap is the relation swap, which `relation_negative` leaves out for one name too)."""
    objects = range(len(p.graph.objects))
    names = [o.name.lower() for o in p.graph.objects]
    for i in objects:
        for j in (j for j in objects if j > i and names[j] != names[i]):
            for a in p.attribute_words[i]:
                for b in p.attribute_words[j]:
                    if (p.xpos[a] == "CD") == (p.xpos[b] == "CD") and p.words[a].lower() != p.words[b].lower():
                        out = swap_spans(p, (a,), (b,))
                        if out is not None:
                            return out
    return None


def noun_negative(p: ParsedCaption) -> str | None:
    """The names of two objects that differ, exchanged in the text: the first such pair whose result is not the
    relation negative (for variety), else the first pair; None with fewer than two different objects."""
    objects = range(len(p.graph.objects))
    swaps = (swap_spans(p, p.object_words[i], p.object_words[j]) for i in objects for j in objects
             if j > i and p.graph.objects[i].name.lower() != p.graph.objects[j].name.lower())
    options = [s for s in swaps if s is not None]
    relation = relation_negative(p)
    return next((s for s in options if s != relation), options[0] if options else None)


def shuffle_negative(p: ParsedCaption, rng: np.random.Generator) -> str | None:
    """One of ARO's four word-order shuffles (on the Penn tags), never the caption itself; None if all are."""
    same = {p.text, " ".join(p.words)}
    options = [s for s in order_negatives(list(p.words), list(p.xpos), rng) if s not in same]
    return options[int(rng.integers(len(options)))] if options else None


def text_negatives(p: ParsedCaption, seed: int) -> dict[str, str]:
    """Every kind of negative the caption allows: {"relation", "attribute", "noun", "shuffle"} -> caption.
    `seed` fixes the shuffle, so a caption always gets the same negatives."""
    out = {
        "relation": relation_negative(p),
        "attribute": attribute_negative(p),
        "noun": noun_negative(p),
        "shuffle": shuffle_negative(p, np.random.default_rng(seed)),
    }
    return {k: v for k, v in out.items() if v is not None}

"""What a caption's scene graph claims, and what an image's scene graph makes true, as sets of fact strings.

A caption is true of an image when every fact it claims is one the image's graph holds. The loss of a method
whose captions describe part of a scene (SmartCLIP's partial captions: "a red circle" is true of every image of a
batch with a red circle in it) uses this to leave such true matches out of its negatives (`losses.true_of`).

Facts: an object with a set of attributes ("circle" with {red}), and a relation between two such objects. A
caption claims each of its objects and relations with all the attributes it gives them. An image holds each of
its objects with every subset of its attributes ("a circle", "a red circle" and "a small red circle" are all true
of a small red circle), and each relation with its ends named bare or with all their attributes, stated both
ways where the converse is known (`converse`: "left of" -> "right of") and both ways for a symmetric predicate
("next to"). Held facts are a lower bound: a claim the graph does not state (a relation with only one of an
end's attributes, a relation the graph leaves out) counts as false, so the image stays a negative, as it is
without this check. Facts do not say which object they are about: "a left of b, and b above c" is held by an
image where a is left of one b and another b is above c. The lab's sources are safe: a shapes-world scene never
repeats a shape, and each of Visual Genome's rendered captions states one relation or one attribute.
"""
from __future__ import annotations

from itertools import combinations
from typing import Mapping

from datamodules.graph import Entity, SceneGraph
from datamodules.negatives import symmetric

MAX_ATTRIBUTES_SUBSETS = 3  # an object with more attributes holds its bare name, each attribute alone, and all


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _object(name: str, attributes: tuple[str, ...] | frozenset[str]) -> str:
    return f"{_norm(name)}[{','.join(sorted({_norm(a) for a in attributes}))}]"


def _variants(e: Entity) -> list[frozenset[str]]:
    """The attribute sets under which an object is truly named."""
    attrs = sorted({_norm(a) for a in e.attributes})
    if len(attrs) <= MAX_ATTRIBUTES_SUBSETS:
        return [frozenset(c) for k in range(len(attrs) + 1) for c in combinations(attrs, k)]
    return [frozenset(), *(frozenset([a]) for a in attrs), frozenset(attrs)]


def claimed(graph: SceneGraph) -> list[str]:
    """The facts a caption with this graph states: each object and each relation, with all their attributes."""
    objects = [_object(e.name, e.attributes) for e in graph.objects]
    relations = [f"{objects[r.subject]} {_norm(r.predicate)} {objects[r.object]}" for r in graph.relations]
    return sorted({f"o:{o}" for o in objects} | {f"r:{r}" for r in relations})


def held(graph: SceneGraph, converse: Mapping[str, str] | None = None) -> list[str]:
    """The facts this graph makes true of its image, the least specific first (fewest attributes named): each
    object under every attribute set it holds (`_variants`), each relation with each end bare or fully named,
    and its converse where known."""
    converse = {_norm(k): _norm(v) for k, v in (converse or {}).items()}
    out: dict[str, int] = {}  # fact -> how many attributes it names
    for e in graph.objects:
        out.update({f"o:{_object(e.name, v)}": len(v) for v in _variants(e)})
    for r in graph.relations:
        s, o, p = graph.objects[r.subject], graph.objects[r.object], _norm(r.predicate)
        stated = [(s, p, o)]
        if p in converse:
            stated.append((o, converse[p], s))
        if symmetric(p):
            stated.append((o, p, s))
        for a, pred, b in stated:
            for va in {frozenset(), frozenset(_norm(x) for x in a.attributes)}:
                for vb in {frozenset(), frozenset(_norm(x) for x in b.attributes)}:
                    out[f"r:{_object(a.name, va)} {pred} {_object(b.name, vb)}"] = len(va) + len(vb)
    return sorted(out, key=lambda f: (out[f], f))

"""The one scene-graph type that every source emits (shapes world, COCO parses, Visual Genome).

A method never cares where a graph came from: it sees objects with attributes and optional boxes,
and (subject, predicate, object) relations between them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

Box = tuple[float, float, float, float]  # x, y, w, h in pixels, top-left origin (Visual Genome's convention)


def indefinite(text: str) -> str:
    """The phrase with its indefinite article: 'a red circle', 'an orange star'."""
    return ("an " if text[:1] in tuple("aeiou") else "a ") + text


@dataclass(frozen=True)
class Entity:
    """An object node: its name ("circle"), its attributes ("red", "small") and, where known, its box."""

    name: str
    attributes: tuple[str, ...] = ()
    box: Box | None = None

    def phrase(self) -> str:
        """The noun phrase the node stands for: attributes then name ("small red circle")."""
        return " ".join((*self.attributes, self.name))


@dataclass(frozen=True)
class Relation:
    """A directed edge: objects[subject] <predicate> objects[object]."""

    subject: int
    predicate: str
    object: int


@dataclass(frozen=True)
class SceneGraph:
    """Objects and relations of one image or caption."""

    objects: tuple[Entity, ...] = ()
    relations: tuple[Relation, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.objects)
        for r in self.relations:
            if not (0 <= r.subject < n and 0 <= r.object < n):
                raise ValueError(f"relation {r} points outside the {n} objects of the graph")

    def relation_triples(self) -> list[tuple[str, str, str]]:
        """(subject name, predicate, object name) for every relation."""
        return [(self.objects[r.subject].name, r.predicate, self.objects[r.object].name) for r in self.relations]

    def attribute_triples(self) -> list[tuple[str, str, str]]:
        """(object name, "is", attribute) for every attribute, the form Structure-CLIP's encoder reads."""
        return [(o.name, "is", a) for o in self.objects for a in o.attributes]

    def triples(self, limit: int | None = None) -> list[tuple[str, str, str]]:
        """Relations first, then attributes, cut to `limit`."""
        out = self.relation_triples() + self.attribute_triples()
        return out if limit is None else out[:limit]

    def with_objects(self, objects: tuple[Entity, ...]) -> "SceneGraph":
        return replace(self, objects=objects)

    def with_relations(self, relations: tuple[Relation, ...]) -> "SceneGraph":
        return replace(self, relations=relations)

"""The shapes world: procedurally drawn scenes whose scene graphs are known exactly.

A scene is a pure function of (seed, split, index): the same config gives the same pixels everywhere.
The objects a caption mentions have distinct colours and distinct shapes; distractors are drawn in
colours and shapes that no mentioned object uses, so no caption (and no negative caption) can be made
true or false by a distractor. Every mentioned pair linked by a relation is separated on the
relation's axis by a clear margin and overlaps on the other axis, so the relation is unambiguous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw

from datamodules.graph import Entity, Relation, SceneGraph, indefinite
from datamodules.negatives import mentions, order_negatives, swap_attributes, swap_relation
from datamodules.source import SOURCES, SPLITS, Sample

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245), "yellow": (240, 230, 40),
    "purple": (165, 60, 225), "orange": (250, 145, 25), "white": (245, 245, 245), "cyan": (40, 225, 230),
}
SIZES = {"small": 0.7, "large": 1.25}
BACKGROUND = (18, 18, 26)
# predicate -> (phrase in captions, converse predicate, axis, sign): "a left of b" means a.x1 + gap <= b.x0.
PREDICATES = {
    "left of": ("to the left of", "right of", 0, -1),
    "right of": ("to the right of", "left of", 0, 1),
    "above": ("above", "below", 1, -1),
    "below": ("below", "above", 1, 1),
}
PREDICATE_PHRASES = {p: v[0] for p, v in PREDICATES.items()}
CONVERSE = {p: v[1] for p, v in PREDICATES.items()}
# Full-caption templates; every one is true of the scene, in both directions of each relation.
TEMPLATES = ("{a_s} {p} {a_o}", "there is {a_s} {p} {a_o}", "the {s} is {p} the {o}")
SPLIT_STREAM = {name: i for i, name in enumerate(SPLITS)}  # disjoint seed streams per split


def holds(predicate: str, a: tuple[float, ...], b: tuple[float, ...], margin: float) -> bool:
    """Whether box a stands in `predicate` to box b with a clear gap (boxes are x, y, w, h)."""
    _, _, axis, sign = PREDICATES[predicate]
    a0, a1 = a[axis], a[axis] + a[axis + 2]
    b0, b1 = b[axis], b[axis] + b[axis + 2]
    return (b0 - a1 >= margin) if sign < 0 else (a0 - b1 >= margin)


def overlap_on(axis: int, a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether the boxes' projections on `axis` overlap (so the other-axis relation is the only one)."""
    return a[axis] < b[axis] + b[axis + 2] and b[axis] < a[axis] + a[axis + 2]


def phrase(e: Entity) -> str:
    return e.phrase()


def render_caption(graph: SceneGraph, template: int = 0, converse: bool = False) -> str:
    """The caption of every relation in the graph, joined by "and"; `converse` states each one the other way."""
    clauses = []
    for r in graph.relations:
        s, o, p = graph.objects[r.subject], graph.objects[r.object], r.predicate
        if converse:
            s, o, p = o, s, PREDICATES[p][1]
        text, _, _, _ = PREDICATES[p]
        s_, o_ = phrase(s), phrase(o)
        clauses.append(TEMPLATES[template].format(s=s_, o=o_, a_s=indefinite(s_), a_o=indefinite(o_), p=text))
    return " and ".join(clauses)


def converse(graph: SceneGraph) -> SceneGraph:
    """The same facts with every relation stated the other way ("a left of b" -> "b right of a")."""
    return graph.with_relations(tuple(Relation(r.object, PREDICATES[r.predicate][1], r.subject) for r in graph.relations))


def flip_predicate(graph: SceneGraph, index: int = 0) -> SceneGraph:
    """The graph with relation `index`'s predicate replaced by its converse, the objects left in place ("a left of
    b" -> "a right of b"): a false caption one word away from the true one."""
    relations = list(graph.relations)
    r = relations[index]
    relations[index] = Relation(r.subject, PREDICATES[r.predicate][1], r.object)
    return graph.with_relations(tuple(relations))


def swap_names(graph: SceneGraph, i: int = 0, j: int = 1) -> SceneGraph:
    """The graph with the nouns (shapes) of objects i and j exchanged, attributes left in place."""
    objects = list(graph.objects)
    a, b = objects[i], objects[j]
    objects[i], objects[j] = Entity(b.name, a.attributes, a.box), Entity(a.name, b.attributes, b.box)
    return graph.with_objects(tuple(objects))


def word_tags(caption: str) -> list[tuple[str, str]]:
    """(word, tag) for a shapes-world caption: shapes are nouns (NN), colours and sizes adjectives (JJ)."""
    adjectives = set(COLOURS) | set(SIZES)
    return [(w, "NN" if w in SHAPES else "JJ" if w in adjectives else "X") for w in caption.split()]


def draw(canvas: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: tuple) -> None:
    """Draw one filled shape inside its box."""
    x, y, w, h = box
    x1, y1, cx, cy = x + w - 1, y + h - 1, x + (w - 1) / 2, y + (h - 1) / 2
    if shape == "circle":
        canvas.ellipse((x, y, x1, y1), fill=fill)
    elif shape == "square":
        canvas.rectangle((x, y, x1, y1), fill=fill)
    elif shape == "triangle":
        canvas.polygon([(cx, y), (x1, y1), (x, y1)], fill=fill)
    elif shape == "diamond":
        canvas.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=fill)
    elif shape == "cross":
        t = w / 3
        canvas.rectangle((x + t, y, x1 - t, y1), fill=fill)
        canvas.rectangle((x, y + t, x1, y1 - t), fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            r = (w - 1) / 2 if k % 2 == 0 else (w - 1) / 5
            a = -math.pi / 2 + k * math.pi / 5
            # clamped: float rounding would put the tip a hair above y, and PIL floors it to the row above
            points.append((min(max(cx + r * math.cos(a), x), x1), min(max(cy + r * math.sin(a), y), y1)))
        canvas.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape '{shape}'; available: {', '.join(SHAPES)}")


@SOURCES.register("shapes")
class ShapesWorld:
    """One split of the shapes world: `world[i]` is a `Sample` with exact graph, boxes and true captions."""

    made_cheaply: ClassVar[bool] = True  # scenes are drawn on demand: making one checks the options, nothing more

    @dataclass
    class Config:
        image_size: int = 32  # canvas side in pixels
        num_objects: int = 2  # objects the caption mentions (2..4), linked in a chain of relations
        distractors: int = 0  # extra objects drawn but never mentioned
        sizes: bool = False  # objects get a size (small/large) that is drawn and named
        object_size: float = 0.3  # object side as a fraction of the canvas (before the size factor)
        margin: float = 0.08  # clear gap on a relation's axis, as a fraction of the canvas
        seed: int = 0  # base seed; each split draws from its own stream
        train_size: int = 8192
        val_size: int = 512
        test_size: int = 1000
        holdout: list[str] = field(default_factory=list)  # "colour shape" pairs never drawn in train
        # the true captions include each relation stated the other way ("b right of a" beside "a left of b");
        # off: only the direction the scene graph states, in each template
        converse_captions: bool = True

    def __init__(self, cfg: "ShapesWorld.Config", split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; available: {', '.join(SPLITS)}")
        if not 2 <= cfg.num_objects <= 4:
            raise ValueError(f"shapes world: num_objects must be 2..4, got {cfg.num_objects}")
        if cfg.distractors < 0:
            raise ValueError(f"shapes world: distractors must be >= 0, got {cfg.distractors}")
        if not 0 < cfg.object_size <= 0.5:
            raise ValueError(f"shapes world: object_size is a fraction of the canvas in (0, 0.5], got {cfg.object_size}")
        if cfg.margin < 0:
            raise ValueError(f"shapes world: margin must be >= 0, got {cfg.margin}")
        largest = cfg.object_size * (max(SIZES.values()) if cfg.sizes else 1.0)
        if 2 * largest + cfg.margin >= 1:  # a relation needs two objects clear of each other on one axis
            raise ValueError(f"shapes world: two objects of object_size {cfg.object_size}"
                             f"{' (x1.25 when large)' if cfg.sizes else ''} and the margin {cfg.margin} do not fit "
                             f"side by side on the canvas (2 x {largest:.3g} + {cfg.margin} >= 1): use a smaller "
                             f"object_size or margin")
        if cfg.image_size < 16:
            raise ValueError(f"shapes world: image_size must be at least 16 pixels, got {cfg.image_size}")
        if cfg.num_objects + cfg.distractors > min(len(SHAPES), len(COLOURS)):
            raise ValueError(f"shapes world: at most {len(SHAPES)} objects in all (mentioned plus distractors)")
        for pair in cfg.holdout:
            colour, _, shape = pair.partition(" ")
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"shapes world: holdout pair '{pair}' is not '<colour> <shape>'")
        self.cfg, self.split = cfg, split
        self.size = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}[split]

    def __len__(self) -> int:
        return self.size

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, SPLIT_STREAM[self.split], index])

    def graph(self, index: int) -> SceneGraph:
        """The scene graph of scene `index`: mentioned objects first (caption order), then distractors."""
        if not 0 <= index < self.size:
            raise IndexError(f"shapes/{self.split}: index {index} outside 0..{self.size - 1}")
        rng = self.rng(index)
        for _ in range(1000):
            graph = self._try_graph(rng)
            if graph is not None:
                return graph
        raise RuntimeError(f"shapes/{self.split}/{index}: no layout found in 1000 tries; use a smaller object_size or "
                           f"margin, or fewer objects (num_objects, distractors)")

    def _try_graph(self, rng: np.random.Generator) -> SceneGraph | None:
        c, n = self.cfg, self.cfg.num_objects
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[: n + c.distractors]]
        colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[: n + c.distractors]]
        if self.split == "train" and any(f"{colours[i]} {shapes[i]}" in c.holdout for i in range(len(shapes))):
            return None
        sizes = [str(rng.choice(list(SIZES))) if c.sizes else "" for _ in shapes]
        sides = [c.object_size * c.image_size * (SIZES[s] if s else 1.0) for s in sizes]
        margin = c.margin * c.image_size
        boxes: list[tuple[float, float, float, float]] = []
        relations = []
        for i, side in enumerate(sides):
            if 0 < i < n:  # chain: object i-1 <predicate> object i, clear on one axis, overlapping on the other
                predicate = str(rng.choice(list(PREDICATES)))
                box = self._place_beside(boxes[i - 1], side, predicate, margin, rng)
                relations.append(Relation(i - 1, predicate, i))
            else:
                box = (float(rng.integers(0, int(c.image_size - side) + 1)),
                       float(rng.integers(0, int(c.image_size - side) + 1)), side, side)
            # every object stays clear of every other one (a visible gap, so shapes never merge)
            if box is None or any(not any(holds(p, b, box, 1.0) for p in PREDICATES) for b in boxes):
                return None
            boxes.append(box)
        objects = tuple(
            Entity(shapes[i], tuple(a for a in (sizes[i], colours[i]) if a), boxes[i]) for i in range(len(shapes))
        )
        return SceneGraph(objects, tuple(relations))

    def _place_beside(self, prev: tuple[float, ...], side: float, predicate: str, margin: float,
                      rng: np.random.Generator) -> tuple[float, float, float, float] | None:
        """A box for the next object so that `prev <predicate> box` holds with the margin, or None if it cannot."""
        _, _, axis, sign = PREDICATES[predicate]
        limit = self.cfg.image_size - side
        p0, p1 = prev[axis], prev[axis] + prev[axis + 2]
        lo, hi = (p1 + margin, limit) if sign < 0 else (0.0, p0 - margin - side)
        q0, q1 = prev[1 - axis], prev[1 - axis] + prev[1 - axis + 2]
        olo, ohi = max(0.0, q0 - side / 2), min(limit, q1 - side / 2)  # centres within the other box's extent
        if math.ceil(lo) > math.floor(hi) or math.ceil(olo) > math.floor(ohi):
            return None
        along = float(rng.integers(math.ceil(lo), math.floor(hi) + 1))
        across = float(rng.integers(math.ceil(olo), math.floor(ohi) + 1))
        xy = (along, across) if axis == 0 else (across, along)
        return (xy[0], xy[1], side, side)

    def mentioned(self, graph: SceneGraph) -> SceneGraph:
        """The part of the graph that captions describe (distractors dropped)."""
        return graph.with_objects(graph.objects[: self.cfg.num_objects])

    def render(self, graph: SceneGraph) -> Image.Image:
        image = Image.new("RGB", (self.cfg.image_size, self.cfg.image_size), BACKGROUND)
        canvas = ImageDraw.Draw(image)
        for e in graph.objects:
            colour = next(a for a in e.attributes if a in COLOURS)
            draw(canvas, e.name, e.box, COLOURS[colour])
        return image

    def caption_forms(self) -> list[tuple[int, bool]]:
        """(template, converse) of each full caption, in the order of `captions`."""
        directions = (False, True) if self.cfg.converse_captions else (False,)
        return [(t, conv) for conv in directions for t in range(len(TEMPLATES))]

    def captions(self, graph: SceneGraph) -> list[str]:
        """Every true full caption: each template, in each direction (`converse_captions`); captions[0] is the
        canonical one."""
        g = self.mentioned(graph)
        return [render_caption(g, t, conv) for t, conv in self.caption_forms()]

    def negative_captions(self, graph: SceneGraph, template: int, conv: bool, seed: int) -> dict[str, str]:
        """Captions false of the scene, in the same template and direction as a true one: the first relation's
        subject and object swapped, the first two objects' attributes swapped, their nouns swapped, and a
        word-order shuffle (one of ARO's four, chosen by `seed`)."""
        g = self.mentioned(graph)
        out = {
            "relation": render_caption(swap_relation(g, 0), template, conv),
            "attribute": render_caption(swap_attributes(g, 0, 1), template, conv),
            "noun": render_caption(swap_names(g, 0, 1), template, conv),
        }
        caption = render_caption(g, template, conv)
        words, tags = zip(*word_tags(caption))
        rng = np.random.default_rng(seed)
        shuffles = [s for s in order_negatives(list(words), list(tags), rng) if s != caption]
        if shuffles:
            out["shuffle"] = shuffles[int(rng.integers(len(shuffles)))]
        # a held-out pair is never shown in training, not even as a negative ("a red square" after a swap)
        return {k: v for k, v in out.items() if not mentions(v, self.held_out, between=tuple(SIZES))}

    @property
    def held_out(self) -> tuple[str, ...]:
        """The colour-shape pairs training never shows (`holdout`), in this split; none outside train."""
        return tuple(self.cfg.holdout) if self.split == "train" else ()

    def partial_captions(self, graph: SceneGraph, partials: list[SceneGraph] | None = None) -> list[str]:
        """True captions of part of the scene: each mentioned object alone, each relation without attributes; the
        captions of `partial_graphs(graph)` (`partials`, where the caller already has them)."""
        return [render_caption(p) if p.relations else indefinite(phrase(p.objects[0]))
                for p in (self.partial_graphs(graph) if partials is None else partials)]

    def partial_graphs(self, graph: SceneGraph) -> list[SceneGraph]:
        """The graph of each partial caption, in the same order: one object with its attributes, or one relation
        between bare objects."""
        g = self.mentioned(graph)
        return [SceneGraph((e,)) for e in g.objects] + [
            SceneGraph((Entity(g.objects[r.subject].name), Entity(g.objects[r.object].name)),
                       (Relation(0, r.predicate, 1),)) for r in g.relations]

    def __getitem__(self, index: int) -> Sample:
        graph = self.graph(index)
        g = self.mentioned(graph)
        forms = self.caption_forms()
        partials = self.partial_graphs(graph)
        return Sample(
            image=self.render(graph),
            captions=self.captions(graph),
            graph=g,
            key=f"shapes/{self.split}/{index}",
            partial_captions=self.partial_captions(graph, partials),
            extra={
                # each caption's own scene graph (a converse caption states the converse relation)
                "caption_graphs": [converse(g) if conv else g for _, conv in forms],
                # each partial caption's graph; the image's whole graph (distractors too) and each predicate's
                # converse: what makes a caption true of the image (datamodules/facts.py)
                "partial_graphs": partials,
                "image_graph": graph,
                "converse_predicates": CONVERSE,
                # how captions say each predicate, for fields that render a relation as text
                "predicate_phrases": PREDICATE_PHRASES,
                # caption index -> {kind: false caption}, made only when a method asks for it
                "negative_captions": lambda k: self.negative_captions(graph, *forms[k], seed=index * 8 + k),
                # phrases no text of this sample may say (held-out pairs, in train): fields leave such texts out
                "held_out": self.held_out,
            },
        )

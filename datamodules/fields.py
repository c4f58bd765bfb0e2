"""Per-sample fields a method can ask the DataModule for, by name (its `extra_fields`).

A builder gets the sample, the index of the caption drawn for it, and a `FieldContext`; it returns one
value (a tensor is stacked in the batch, anything else listed) or a dict of several named values.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from configs.registry import Registry
from datamodules import facts
from datamodules.decoded import image_size
from datamodules.graph import Box, Entity, SceneGraph, indefinite
from datamodules.negatives import mentions, symmetric
from datamodules.source import Sample, Source


@dataclass
class FieldContext:
    """What a field builder may use besides the sample: the split's source (to fetch other samples), the
    image transform, the tokenizer, a random generator, and the options the method passed for its fields."""

    tokenize: Callable  # CachedTokenizer: list of str -> (N, L) token ids
    rng: random.Random
    split: str
    source: Source
    transform: Callable
    index: int
    options: dict[str, Any]


# name -> builder(sample, caption_index, ctx) -> value. A tensor is stacked in the batch, anything else listed;
# a dict is several fields at once (e.g. a neighbour image with its caption).
FieldBuilder = Callable[[Sample, int, FieldContext], Any]
FIELDS: Registry[FieldBuilder] = Registry("batch field")
MAX_BOXES = 8


# field -> (what it reads of a sample, a test that the sample offers it): a method whose fields read what the
# source does not offer would train on nothing (no negatives, empty graphs) without a word, so it fails instead.
NEEDS: dict[str, tuple[str, Callable[[Sample], bool]]] = {
    "neg_text": ("negative captions", lambda s: s.extra.get("negative_captions") is not None),
    "caption_graph": ("scene graphs", lambda s: bool(s.extra.get("caption_graphs")) or s.graph is not None),
}
NEEDS["caption_triples"] = NEEDS["caption_graph"]
# what makes a caption true of an image: the image's graph, and graphs of the captions drawn (without them no
# caption claims anything known, and leaving true captions out of the negatives would do nothing)
NEEDS["image_facts"] = ("scene graphs of images and of their captions", lambda s: s.graph is not None and bool(
    s.extra.get("caption_graphs") or s.extra.get("partial_graphs")))
NEEDS["swap_probe"] = NEEDS["neg_text"]
# the fields holding caption token ids in the tokenizer's context (a loader may cut them to the batch's longest)
CAPTION_TOKEN_FIELDS = ("text", "neg_text", "hard_text", "hard_neg_text", "partial_text", "entity_text", "triple_text",
                        "triple_hard", "swap_text")
TRIPLE_ELEMENT_TOKENS = 8  # token ids per triple element: start, up to 6 word pieces, end


def check_source_offers(fields: tuple[str, ...], sample: Sample, source: str) -> None:
    """Raise if the source's samples lack what the method's fields read (tested on one sample of the split)."""
    missing = sorted({what for f in fields if f in NEEDS for what, offers in [NEEDS[f]] if not offers(sample)})
    if missing:
        hint = ("caption sources parse their captions into graphs and negatives with data.options.parse=true (see "
                "README 'Parsing real captions')") if set(missing) - {NEEDS["image_facts"][0]} else (
                "graphs of images come with the shapes world and Visual Genome (its rendered captions, not "
                "region_descriptions); a parse of the captions is not one")
        raise ValueError(f"data source '{source}' offers no {' and no '.join(missing)}, which this method needs "
                         f"({sample.key}); {hint}")


@FIELDS.register("boxes")
def boxes_field(sample: Sample, caption_index: int, ctx: FieldContext) -> torch.Tensor:
    """Object boxes (x, y, w, h) as fractions of the image size, padded with -1 to (MAX_BOXES, 4)."""
    out = torch.full((MAX_BOXES, 4), -1.0)
    if sample.graph is not None:
        w, h = image_size(sample.image)  # boxes are in the file's pixels (a cached image is resized)
        for k, e in enumerate(sample.graph.objects[:MAX_BOXES]):
            if e.box is not None:
                out[k] = torch.tensor([e.box[0] / w, e.box[1] / h, e.box[2] / w, e.box[3] / h])
    return out


@FIELDS.register("partial_text")
def partial_text_field(sample: Sample, caption_index: int, ctx: FieldContext) -> torch.Tensor:
    """Token ids of one true partial caption (one object, or one relation), drawn at random."""
    text = ctx.rng.choice(sample.partial_captions) if sample.partial_captions else sample.captions[caption_index]
    return ctx.tokenize([text])[0]


@FIELDS.register("granular_text")
def granular_text_field(sample: Sample, caption_index: int, ctx: FieldContext) -> dict[str, Any]:
    """`text` and `caption` replaced by a caption of random granularity (SmartCLIP's sampler): drawn uniformly
    from the sample's partial captions and the first k sentences of the drawn caption, k = 1..n (the release
    splits on ". " and draws k uniformly). A source whose captions are one sentence each and has no partial
    captions (COCO, Flickr30k) gets methods.md's adaptation: the drawn caption followed by the image's other
    captions, as sentences, its prefixes the granularities (the 77-token context cuts the longest ones)."""
    drawn = sample.captions[caption_index]
    whole = drawn_caption_graph(sample, caption_index)  # the drawn caption's own graph, where the source has it
    sentences = drawn.replace("\n", " ").split(". ")
    if len(sentences) == 1 and not sample.partial_captions and len(sample.captions) > 1:
        others = [c for k, c in enumerate(sample.captions) if k != caption_index]
        sentences = [s.strip().rstrip(".") for s in [drawn, *others]]
        choices = [drawn] + [". ".join(sentences[:k]) + "." for k in range(2, len(sentences) + 1)]
        graphs = [whole] + [None] * (len(choices) - 1)
    else:
        choices = [". ".join(sentences[:k]) for k in range(1, len(sentences) + 1)]
        graphs = [None] * (len(choices) - 1) + [whole]  # a prefix of several sentences: its graph is not known
    partial_graphs = sample.extra.get("partial_graphs") or [None] * len(sample.partial_captions)
    choices, graphs = list(sample.partial_captions) + choices, list(partial_graphs) + graphs
    pick = ctx.rng.randrange(len(choices))  # one draw, as rng.choice(choices) makes
    text = choices[pick]
    # caption_key: the same caption drawn for two images of a batch is a true match of both (partial captions
    # repeat: about 40% of a shapes-world batch of 128 has a twin), which the loss can leave out of its negatives;
    # caption_facts: what the drawn caption claims, to find the other images of the batch it is true of
    tokens = ctx.tokenize([text])[0]
    return {"text": tokens, "caption": text, "caption_key": torch.tensor(token_key(tokens), dtype=torch.long),
            "caption_facts": claimed_fact_keys(graphs[pick])}


@FIELDS.register("caption_key")
def caption_key_field(sample: Sample, caption_index: int, ctx: FieldContext) -> dict[str, torch.Tensor]:
    """A stable id of the drawn caption's tokens (`token_key`): two images of a batch drawn with one caption (as the
    text tower reads it) are true matches of each other (SmartCLIP's `exclude_duplicates` on the data's own
    captions). The tokenizer caches, so the `text` field's tokens are not made twice."""
    tokens = ctx.tokenize([sample.captions[caption_index]])[0]
    return {"caption_key": torch.tensor(token_key(tokens), dtype=torch.long)}


@FIELDS.register("caption_facts")
def caption_facts_field(sample: Sample, caption_index: int, ctx: FieldContext) -> torch.Tensor:
    """What the drawn caption claims (`facts.claimed` of its own graph), as fact keys padded with -1 to
    (MAX_CLAIMED_FACTS,); all -1 where the source gives no graph of the caption (nothing is known to be true)."""
    return claimed_fact_keys(drawn_caption_graph(sample, caption_index))


@FIELDS.register("image_facts")
def image_facts_field(sample: Sample, caption_index: int, ctx: FieldContext) -> torch.Tensor:
    """What the image's scene graph makes true (`facts.held`: drawn but unmentioned objects too, where the source
    gives the whole graph as extra["image_graph"]), as fact keys padded with -1 to (MAX_HELD_FACTS,); the most
    specific facts of a graph with more are left out (its image then stays a negative of such a caption)."""
    graph = sample.extra.get("image_graph") or sample.graph
    keys = [fact_key(f) for f in facts.held(graph, sample.extra.get("converse_predicates"))][:MAX_HELD_FACTS]
    out = torch.full((MAX_HELD_FACTS,), -1, dtype=torch.long)
    out[:len(keys)] = torch.tensor(keys, dtype=torch.long)
    return out


MAX_CLAIMED_FACTS = 8
MAX_HELD_FACTS = 256
FACT_KEY_BITS = 40  # `losses.true_of` packs a fact key and an image's index into one int64


def fact_key(fact: str) -> int:
    return stable_key(fact.encode()) >> (63 - FACT_KEY_BITS)


def drawn_caption_graph(sample: Sample, caption_index: int) -> SceneGraph | None:
    """The graph of caption `caption_index` where the source gives each caption's own (not the image's)."""
    graphs = sample.extra.get("caption_graphs")
    return graphs[caption_index] if graphs else None


def claimed_fact_keys(graph: SceneGraph | None) -> torch.Tensor:
    """(MAX_CLAIMED_FACTS,) keys of what a caption of this graph claims; all -1 for no graph, or for one that
    claims more than fit (a claim cut short would be true of images the caption is false of)."""
    out = torch.full((MAX_CLAIMED_FACTS,), -1, dtype=torch.long)
    claims = facts.claimed(graph) if graph is not None else []
    if 0 < len(claims) <= MAX_CLAIMED_FACTS:
        out[:len(claims)] = torch.tensor([fact_key(f) for f in claims], dtype=torch.long)
    return out


@FIELDS.register("caption_graph")
def caption_graph_field(sample: Sample, caption_index: int, ctx: FieldContext) -> Any:
    """The scene graph of the drawn caption itself (a converse paraphrase has the converse relation)."""
    graphs = sample.extra.get("caption_graphs")
    return graphs[caption_index] if graphs else sample.graph


def phrase_key(text: str) -> int:
    """A stable 63-bit id of a phrase, the same in every process (Python's str hash is salted per process); 63
    bits, so that two phrases of a global batch never share one by chance (a 32-bit crc would, now and then)."""
    return stable_key(text.encode())


def token_key(tokens: torch.Tensor) -> int:
    """A stable id of a tokenized text: two texts the tokenizer reads as one ("A dog." and "a  dog.") share it."""
    return stable_key(tokens.to(torch.int64).numpy().tobytes())


def stable_key(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1  # >= 0: -1 pads


def crop_box(box: Box, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """A pixel box (x, y, w, h) as (x0, y0, x1, y1) fractions of the centre square crop of the shorter side:
    the frame CLIP's evaluation preprocessing (resize, centre crop) hands the model. None if none of it is left."""
    w, h = size
    side = min(w, h)
    ox, oy = (w - side) / 2, (h - side) / 2
    x0, y0 = max(0.0, (box[0] - ox) / side), max(0.0, (box[1] - oy) / side)
    x1, y1 = min(1.0, (box[0] + box[2] - ox) / side), min(1.0, (box[1] + box[3] - oy) / side)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def relation_text(s: Entity, predicate: str, o: Entity, attributes: bool) -> str:
    """'a red circle to the left of a blue square' (names only without `attributes`)."""
    name = (lambda e: e.phrase()) if attributes else (lambda e: e.name)
    return f"{indefinite(name(s))} {predicate} {indefinite(name(o))}"


@FIELDS.register("graph_texts")
def graph_texts_field(sample: Sample, caption_index: int, ctx: FieldContext) -> dict[str, Any]:
    """The drawn caption's scene graph as texts (MSG-CLIP), padded to fixed counts so that ranks gather equal
    shapes; works for any source with a graph, with or without boxes.

    Entities (E = options["max_entities"], default 4): `entity_text` (E, L) each object with its attributes
    ("a red circle"); `entity_key` (E,) a stable phrase id; `entity_valid` (E,); `entity_box` (E, 4) its box
    as (x0, y0, x1, y1) in the model input's frame (`crop_box`) and `entity_has_box` (E,) (False without a box
    or with options["use_boxes"] False, e.g. under random crops). Triples (T = options["max_triples"], default
    4): `triple_text` (T, L) "<subject> <predicate> <object>" with attributes (names only with
    options["triple_attributes"] False), the predicate as the source's captions say it
    (extra["predicate_phrases"]); `triple_hard` (T, 2, L) the swapped triple (subject and object exchanged) and
    the corrupted one (their attributes exchanged), `triple_hard_valid` (T, 2) (False where one reads like the
    triple itself); `triple_key`, `triple_valid` (T,); `triple_args` (T, 2) subject and object entity slots.

    With options["regions"] (K = options["max_regions"], default 8): `region_box` (K, 4) and `region_valid` (K,),
    the image's regions with no label, as a segmenter would give them: the boxes of every object of the image's
    graph (not only the caption's), largest first, in the model input's frame. Nothing ties a region to an entity.
    Boxes, where known (use_boxes or regions), also drop an entity that lies wholly outside the model's crop."""
    e_max, t_max = ctx.options.get("max_entities", 4), ctx.options.get("max_triples", 4)
    attributes, use_boxes = ctx.options.get("triple_attributes", True), ctx.options.get("use_boxes", True)
    regions = ctx.options.get("regions", False)
    words, held_out = sample.extra.get("predicate_phrases", {}), sample.extra.get("held_out", ())
    graph = caption_graph_field(sample, caption_index, ctx) or SceneGraph()
    objects = graph.objects[:e_max]
    boxed = use_boxes or regions
    boxes = [crop_box(e.box, image_size(sample.image)) if boxed and e.box is not None else None for e in objects]
    # an object whose box lies wholly outside the model's crop is not in the image the model sees: no entity, and
    # no triple of it (else text-driven pooling would find it somewhere)
    shown = [not (boxed and e.box is not None and b is None) for e, b in zip(objects, boxes)]
    entities = [indefinite(e.phrase()) for e in objects]
    triples, hard, hard_valid, args = [], [], [], []
    for r in [r for r in graph.relations if r.subject < e_max and r.object < e_max
              and shown[r.subject] and shown[r.object]][:t_max]:
        s, o, p = objects[r.subject], objects[r.object], words.get(r.predicate, r.predicate)
        text = relation_text(s, p, o, attributes)
        swapped = relation_text(o, p, s, attributes)
        corrupt = relation_text(Entity(s.name, o.attributes), p, Entity(o.name, s.attributes), attributes)
        triples.append(text)
        hard += [swapped, corrupt]
        # a symmetric predicate's swap is still true of the image ("a dog next to a cat"): no negative
        hard_valid.append([swapped != text and not symmetric(r.predicate) and not symmetric(p),
                           corrupt != text and not mentions(corrupt, held_out)])
        args.append([r.subject, r.object])
    pad = lambda texts, n: texts + [""] * (n - len(texts))  # noqa: E731
    n_e, n_t = len(entities), len(triples)
    boxes = boxes if use_boxes else [None] * len(boxes)
    return {
        "entity_text": ctx.tokenize(pad(entities, e_max)),
        "entity_key": torch.tensor([phrase_key(t) for t in entities] + [-1] * (e_max - n_e), dtype=torch.long),
        "entity_valid": torch.tensor(shown + [False] * (e_max - n_e)),
        "entity_box": torch.tensor([list(b) if b else [0.0] * 4 for b in boxes] + [[0.0] * 4] * (e_max - n_e)),
        "entity_has_box": torch.tensor([b is not None for b in boxes] + [False] * (e_max - n_e)),
        **(image_regions(sample, ctx.options.get("max_regions", 8)) if regions else {}),
        "triple_text": ctx.tokenize(pad(triples, t_max)),
        "triple_hard": ctx.tokenize(pad(hard, 2 * t_max)).view(t_max, 2, -1),
        "triple_hard_valid": torch.tensor(hard_valid + [[False, False]] * (t_max - n_t), dtype=torch.bool),
        "triple_key": torch.tensor([phrase_key(t) for t in triples] + [-1] * (t_max - n_t), dtype=torch.long),
        "triple_valid": torch.arange(t_max) < n_t,
        "triple_args": torch.tensor(args + [[0, 0]] * (t_max - n_t), dtype=torch.long).view(t_max, 2),
    }


def image_regions(sample: Sample, k_max: int) -> dict[str, torch.Tensor]:
    """The image's unlabelled regions for MSG-CLIP's `pooling: regions` (see graph_texts_field): every object box of
    the image's graph inside the model's crop, the k_max largest, largest first (ties in graph order)."""
    graph = sample.graph or SceneGraph()
    size = image_size(sample.image)
    found = [b for b in (crop_box(e.box, size) for e in graph.objects if e.box is not None) if b is not None]
    found = sorted(found, key=lambda b: -round((b[2] - b[0]) * (b[3] - b[1]), 9))[:k_max]  # equal sizes: graph order
    return {"region_box": torch.tensor([list(b) for b in found] + [[0.0] * 4] * (k_max - len(found))).view(k_max, 4),
            "region_valid": torch.arange(k_max) < len(found)}


# the rows of the graph-text table, in order: each (B, ..., L) field flattened to (N_i, L)
GRAPH_TEXT_ROWS = ("text", "entity_text", "triple_text", "triple_hard")


def graph_text_table(batch: dict[str, Any]) -> dict[str, Any]:
    """What MSG-CLIP's step needs to encode each distinct text of a batch once (a batch of the shapes world holds
    17 texts per image, mostly repeats): `graph_unique` (U, L) the distinct rows of the GRAPH_TEXT_ROWS fields
    stacked in that order, `graph_inverse` (N,) the row of `graph_unique` that each stacked text is, and
    `entity_unboxed`, a Python bool (it stays on the host): whether any real entity of the batch lacks a box, and
    with regions `image_regionless`, whether any image has none. Made on the host where the batch is collated (the
    loader's workers), after any caption cut: on the device, `torch.unique` and the box test would each make the
    host wait for the device to learn their answer."""
    tokens = torch.cat([batch[k].flatten(0, -2) for k in GRAPH_TEXT_ROWS])  # (N, L)
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)  # (U, L), (N,)
    unboxed = bool((batch["entity_valid"] & ~batch["entity_has_box"]).any())
    table = {"graph_unique": unique, "graph_inverse": inverse, "entity_unboxed": unboxed}
    if "region_valid" in batch:
        table["image_regionless"] = bool((~batch["region_valid"].any(-1)).any())
    return table


# a key of a collated batch -> what the batch gains from it, computed over the whole batch after any caption cut
BATCH_TABLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"entity_text": graph_text_table}


def triple_tokens(graphs: Sequence[SceneGraph | None], tokenize: Callable, max_triples: int) -> dict[str, torch.Tensor]:
    """Each graph's first `max_triples` triples (relations, then attributes) as token ids, for Structure-CLIP's
    knowledge encoder: `triple_ids` (N, T, 3, TRIPLE_ELEMENT_TOKENS), padded with empty elements (all-zero ids),
    and `triple_mask` (N, T), True where a triple exists. Built on the host (in DataLoader workers for training),
    so the training step gets tensors and never waits on a copy."""
    n, t = len(graphs), max_triples
    mask = torch.zeros(n, t, dtype=torch.bool)
    elements: list[str] = []
    for i, graph in enumerate(graphs):
        triples = graph.triples(t) if graph is not None else []
        mask[i, : len(triples)] = True
        elements += [e for triple in triples + [("", "", "")] * (t - len(triples)) for e in triple]
    ids = tokenize(elements, context_length=TRIPLE_ELEMENT_TOKENS)  # (N*T*3, L)
    return {"triple_ids": ids.view(n, t, 3, TRIPLE_ELEMENT_TOKENS), "triple_mask": mask}  # (N, T, 3, L), (N, T)


@FIELDS.register("caption_triples")
def caption_triples_field(sample: Sample, caption_index: int, ctx: FieldContext) -> dict[str, torch.Tensor]:
    """The drawn caption's graph as triple token ids (`triple_tokens`; options["max_triples"], default 6).
    options["triple_forms"] "written": a parsed caption's graph in the caption's own words (`ParsedCaption.written`,
    the forms of Structure-CLIP's released triples); "parser" (the default): its lemmatised graph. Graphs that are
    not parsed (the shapes world's, Visual Genome's) are the same either way."""
    written = sample.extra.get("caption_graphs_written")
    if ctx.options.get("triple_forms", "parser") == "written" and written:
        graph = written[caption_index]
    else:
        graph = caption_graph_field(sample, caption_index, ctx)
    out = triple_tokens([graph], ctx.tokenize, ctx.options.get("max_triples", 6))
    return {k: v[0] for k, v in out.items()}  # (T, 3, L), (T,)


def negative_caption(sample: Sample, caption_index: int, ctx: FieldContext) -> str | None:
    """One caption false of the image, of a kind the method allows (options["negative_kinds"]), or None.
    A source offers `extra["negative_captions"](caption_index) -> {kind: caption or list of captions}`."""
    make = sample.extra.get("negative_captions")
    if make is None:
        return None
    kinds = ctx.options.get("negative_kinds", ())
    found = {k: v for k, v in make(caption_index).items() if k in kinds and v}
    if found:  # a candidate the tokenizer reads as one of the image's true captions is none ("a cat on A bed .")
        false = not_true(sample, ctx)
        found = {k: [c for c in v if false(c)] if isinstance(v, list) else v for k, v in found.items()}
        found = {k: v for k, v in found.items() if v and (isinstance(v, list) or false(v))}
    if not found:
        return None
    chosen = found[ctx.rng.choice(sorted(found))]
    return ctx.rng.choice(chosen) if isinstance(chosen, list) else chosen  # a source may offer several of a kind


def not_true(sample: Sample, ctx: FieldContext) -> Callable[[str], bool]:
    """Whether a candidate negative is a caption at all and not one of the sample's true captions as the model
    reads them (the same token ids: the tokenizer lowercases and splits punctuation off)."""
    true = {tuple(t.tolist()) for t in ctx.tokenize(list(sample.captions))}
    return lambda text: bool(text.strip()) and tuple(ctx.tokenize([text])[0].tolist()) not in true


@FIELDS.register("neg_text")
def neg_text_field(sample: Sample, caption_index: int, ctx: FieldContext) -> dict[str, Any]:
    """`neg_text`: token ids of a hard negative caption; `has_neg`: whether there is one (else the ids are the
    positive's, and the loss must mask them)."""
    neg = negative_caption(sample, caption_index, ctx)
    text = neg if neg is not None else sample.captions[caption_index]
    return {"neg_text": ctx.tokenize([text])[0], "has_neg": neg is not None}


# the swaps of a held-out caption that validation scores against it (`swap_probe`), as val/<kind>_swap_acc
PROBE_KINDS = ("relation", "attribute")


@FIELDS.register("swap_probe")
def swap_probe_field(sample: Sample, caption_index: int, ctx: FieldContext) -> dict[str, torch.Tensor]:
    """The drawn caption's relation swap and attribute swap, for validation to ask each epoch whether the image
    scores its caption above them (Syn-Relation and Syn-Attribution on the validation split): `swap_text`
    (len(PROBE_KINDS), L) token ids, and `swap_valid` (len(PROBE_KINDS),), False where the source offers no such
    swap (the ids are then the caption's own). The first offered caption of a kind, so every epoch asks the same."""
    make = sample.extra.get("negative_captions")
    offered = make(caption_index) if make is not None else {}
    caption, texts, valid = sample.captions[caption_index], [], []
    false = not_true(sample, ctx) if offered else None
    for kind in PROBE_KINDS:
        swap = offered.get(kind)
        swap = (swap[0] if swap else None) if isinstance(swap, list) else swap
        ok = bool(swap) and false(swap)
        texts.append(swap if ok else caption)
        valid.append(ok)
    return {"swap_text": ctx.tokenize(texts), "swap_valid": torch.tensor(valid)}


@FIELDS.register("hard_image")
def hard_image_field(sample: Sample, caption_index: int, ctx: FieldContext) -> dict[str, Any]:
    """A neighbour image (options["neighbours"][index], one drawn at random) with one of its captions and a
    hard negative of that caption: NegCLIP's hard-negative image."""
    table = ctx.options.get("neighbours")
    if table is None:
        raise KeyError("the 'hard_image' field needs options['neighbours'] (a (N, k) table of neighbour indices)")
    row = table[ctx.index]
    j = int(ctx.rng.choice(row.tolist() if hasattr(row, "tolist") else list(row)))
    other = ctx.source[j]
    k = ctx.rng.randrange(len(other.captions))
    neg = negative_caption(other, k, ctx)
    return {
        "hard_image": ctx.transform(other.image),
        "hard_text": ctx.tokenize([other.captions[k]])[0],
        "hard_neg_text": ctx.tokenize([neg if neg is not None else other.captions[k]])[0],
        "hard_has_neg": neg is not None,
    }

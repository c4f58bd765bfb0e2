"""Per-sample fields a method can ask the DataModule for, by name (its `extra_fields`).

A builder gets the sample, the index of the caption drawn for it, and a `FieldContext`; it returns one
value (a tensor is stacked in the batch, anything else listed) or a dict of several named values.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from configs.registry import Registry
from datamodules.graph import SceneGraph
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
TRIPLE_ELEMENT_TOKENS = 8  # token ids per triple element: start, up to 6 word pieces, end


def check_source_offers(fields: tuple[str, ...], sample: Sample, source: str) -> None:
    """Raise if the source's samples lack what the method's fields read (tested on one sample of the split)."""
    missing = sorted({what for f in fields if f in NEEDS for what, offers in [NEEDS[f]] if not offers(sample)})
    if missing:
        raise ValueError(f"data source '{source}' offers no {' and no '.join(missing)}, which this method needs "
                         f"({sample.key}); caption sources parse their captions into graphs and negatives with "
                         f"data.options.parse=true (see README 'Parsing real captions')")


@FIELDS.register("boxes")
def boxes_field(sample: Sample, caption_index: int, ctx: FieldContext) -> torch.Tensor:
    """Object boxes (x, y, w, h) as fractions of the image size, padded with -1 to (MAX_BOXES, 4)."""
    out = torch.full((MAX_BOXES, 4), -1.0)
    if sample.graph is not None:
        w, h = sample.image.size
        for k, e in enumerate(sample.graph.objects[:MAX_BOXES]):
            if e.box is not None:
                out[k] = torch.tensor([e.box[0] / w, e.box[1] / h, e.box[2] / w, e.box[3] / h])
    return out


@FIELDS.register("partial_text")
def partial_text_field(sample: Sample, caption_index: int, ctx: FieldContext) -> torch.Tensor:
    """Token ids of one true partial caption (one object, or one relation), drawn at random."""
    text = ctx.rng.choice(sample.partial_captions) if sample.partial_captions else sample.captions[caption_index]
    return ctx.tokenize([text])[0]



@FIELDS.register("caption_graph")
def caption_graph_field(sample: Sample, caption_index: int, ctx: FieldContext) -> Any:
    """The scene graph of the drawn caption itself (a converse paraphrase has the converse relation)."""
    graphs = sample.extra.get("caption_graphs")
    return graphs[caption_index] if graphs else sample.graph


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
    """The drawn caption's graph as triple token ids (`triple_tokens`; options["max_triples"], default 6)."""
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
    if not found:
        return None
    chosen = found[ctx.rng.choice(sorted(found))]
    return ctx.rng.choice(chosen) if isinstance(chosen, list) else chosen  # a source may offer several of a kind


@FIELDS.register("neg_text")
def neg_text_field(sample: Sample, caption_index: int, ctx: FieldContext) -> dict[str, Any]:
    """`neg_text`: token ids of a hard negative caption; `has_neg`: whether there is one (else the ids are the
    positive's, and the loss must mask them)."""
    neg = negative_caption(sample, caption_index, ctx)
    text = neg if neg is not None else sample.captions[caption_index]
    return {"neg_text": ctx.tokenize([text])[0], "has_neg": neg is not None}


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

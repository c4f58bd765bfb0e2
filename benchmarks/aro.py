"""ARO (Yuksekgonul et al., ICLR 2023) as its reference code computes it (mertyg/vision-language-models-are-bows:
dataset_zoo/aro_datasets.py, model_zoo/clip_models.py and the VG replication notebook).

- VG-Relation: each record's image cropped to its box, options [false caption, true caption]; correct iff the
  true caption (option 1) scores strictly higher (ARO's argmax: a tie picks option 0, so ties are wrong).
  Accuracy per `relation_name`; the table number is the macro mean over relations minus the 157 the notebook
  excludes (benchmarks/data/aro_vgr_excluded_relations.json); `vg_relation/all_relations` keeps them all.
- VG-Attribution: the same per record, grouped by `f"{attributes[0]}_{attributes[1]}"`; groups with fewer than
  25 records are dropped; the macro mean over the rest.
- COCO-Order, Flickr30k-Order: one case per caption of the Karpathy test file; options [original, ARO's four
  shuffles of it]: nouns and adjectives among themselves, everything else, within trigrams, trigrams. ARO
  tags and shuffles the raw caption and then applies `pre_caption(max_words=30)` to every option, the
  original included; so does this. The two trigram shuffles split the caption with NLTK's `word_tokenize`, as
  ARO's do (it keeps "black-and-white" whole and writes quotes as `` and ''); the first two shuffle the lab
  parser's words by its Penn tags, where ARO takes spaCy's `en_core_web_sm` (not on the package index, so
  not used here; CoNLL-U from any tagger can stand in, `<data_root>/parses/`). Correct iff the original scores at
  least as high as every shuffle (ties right). The shuffles are seeded (bench.seed, 1 as in ARO) and drawn in
  file order from one generator (ARO draws from numpy's and Python's global ones), so they are ARO's in
  distribution, not draw for draw.
Each record's caption options carry their own scene graph where the record has `true_triples`/`false_triples`
(Structure-CLIP's augmented copies), for methods that read graphs at test time.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from benchmarks.base import BENCHMARKS, BenchContext, BenchResult
from benchmarks.formats import VGCase, pre_caption, read_vg, require
from benchmarks.real import (ImageRef, bad_records, data_root, encode_refs, karpathy, nonempty, notes_for, usable,
                             use_amp)
from benchmarks.scoring import choice_correct, encode_unique_texts, score_options, tie_right_chance
from datamodules.images import BadInput, BadRecords
from datamodules.negatives import order_negatives

FAMILY = "aro"
MIN_ATTRIBUTE_COUNT = 25  # ARO's VG_Attribution.evaluate_scores drops attribute pairs with fewer records
ORDER_MAX_WORDS = 30
EXCLUDED_RELATIONS_FILE = Path(__file__).resolve().parent / "data" / "aro_vgr_excluded_relations.json"

Tagger = Callable[[list[str]], list[list[tuple[str, str]]]]  # captions -> (word, Penn xpos) per token


def excluded_relations() -> frozenset[str]:
    """The 157 relations ARO's notebook leaves out of the VG-Relation macro accuracy (symmetric ones and more)."""
    return frozenset(json.loads(EXCLUDED_RELATIONS_FILE.read_text()))


def vg_scores(ctx: BenchContext, kind: str, what: str) -> tuple[list[VGCase], torch.Tensor, BadRecords, list[str]]:
    """The usable VG cases of `kind` ("relation" | "attribution") and whether each was answered right."""
    root = data_root(ctx) / "aro"
    bad = bad_records(ctx)
    path = root / f"visual_genome_{kind}.json"
    cases = read_vg(path, kind, bad)
    images = require(root / "images", "ARO image folder", "aro_images")
    refs = [ImageRef(str(images / c.image), c.box) for c in cases]
    encoded = encode_refs(ctx, refs, [c.where for c in cases], what)
    kept, image_feats = usable(refs, encoded, bad)  # (N, D)
    cases = [cases[k] for k in kept]
    nonempty(cases, what, path)
    # ARO's option order: [false, true]; the true caption is option 1
    texts = [t for c in cases for t in (c.false_caption, c.true_caption)]
    with_graphs = any(c.true_graph is not None for c in cases)
    graphs = [g for c in cases for g in (c.false_graph, c.true_graph)] if with_graphs else None
    text = encode_unique_texts(ctx.model, texts, graphs, batch_size=ctx.spec.batch_size, amp=use_amp(ctx))
    scores = score_options(image_feats, text.view(len(cases), 2, -1))  # (2N, D) -> (N, 2, D); scores (N, 2)
    correct = choice_correct(scores, 1, ties="wrong")
    return cases, correct, bad, notes_for(what, bad, encoded)


def group_accuracy(groups: Sequence[str], correct: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Accuracy and count per group, groups in sorted order (ARO iterates np.unique)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for g, c in zip(groups, correct.tolist()):
        hits[g].append(c)
    return {g: (sum(hits[g]) / len(hits[g]), len(hits[g])) for g in sorted(hits)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@BENCHMARKS.register("vg_relation")
def vg_relation(ctx: BenchContext) -> BenchResult:
    cases, correct, bad, notes = vg_scores(ctx, "relation", "VG-Relation")
    per = group_accuracy([c.group for c in cases], correct)
    excluded = excluded_relations()
    kept = [acc for rel, (acc, _) in per.items() if rel not in excluded]
    details = [{"relation": rel, "accuracy": acc, "count": n, "excluded_symmetric": rel in excluded}
               for rel, (acc, n) in per.items()]
    metrics = {"vg_relation": _mean(kept), "vg_relation/all_relations": _mean([a for a, _ in per.values()])}
    notes.append(f"VG-Relation: {len(cases)} cases; macro accuracy over the {len(kept)} relations left after ARO's "
                 f"{len(excluded)} excluded (symmetric) relations (ARO's table); vg_relation/all_relations: over all "
                 f"{len(per)}; a tie counts as wrong; chance 0.5")
    return BenchResult(metrics, FAMILY, details=details, notes=notes, chance=dict.fromkeys(metrics, 0.5))


@BENCHMARKS.register("vg_attribution")
def vg_attribution(ctx: BenchContext) -> BenchResult:
    cases, correct, bad, notes = vg_scores(ctx, "attribution", "VG-Attribution")
    per = group_accuracy([c.group for c in cases], correct)
    details = [{"attributes": pair, "accuracy": acc, "count": n, "kept": n >= MIN_ATTRIBUTE_COUNT}
               for pair, (acc, n) in per.items()]
    kept = [d["accuracy"] for d in details if d["kept"]]
    notes.append(f"VG-Attribution: {len(cases)} cases; macro accuracy over the {len(kept)} of {len(per)} attribute "
                 f"pairs with at least {MIN_ATTRIBUTE_COUNT} cases (ARO's filter); a tie counts as wrong; chance 0.5")
    return BenchResult({"vg_attribution": _mean(kept)}, FAMILY, details=details, notes=notes,
                       chance={"vg_attribution": 0.5})


def default_tagger(ctx: BenchContext) -> Tagger:
    """The lab's caption parser (datamodules.parse), reading every `<data_root>/parses/*.conllu` first, so that
    captions parsed before need no Stanza model; `bench.parser` holds its other options."""
    try:
        from datamodules.parse import CaptionParser, ParserConfig
    except ImportError as e:
        raise ImportError(f"COCO-Order and Flickr30k-Order tag captions with the lab's caption parser "
                          f"(datamodules.parse), which cannot be imported: {e}") from None
    options = OmegaConf.to_container(ctx.spec.parser, resolve=True) if ctx.spec.get("parser") else {}
    conllu = sorted(str(p) for p in (data_root(ctx) / "parses").glob("*.conllu"))
    options["conllu"] = conllu + list(options.get("conllu") or [])
    valid = [f.name for f in dataclasses.fields(ParserConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"bench.parser: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    return CaptionParser(ParserConfig(**options)).tag


def tagger(ctx: BenchContext) -> Tagger:
    """The part-of-speech tagger of this bench call (built once; a test may put its own in ctx.cache)."""
    return ctx.cached("order_tagger", lambda: default_tagger(ctx))


def word_tokenizer() -> tuple[Callable[[str], list[str]], bool]:
    """NLTK's `word_tokenize`, which ARO's trigram shuffles call, and whether it splits sentences first as ARO's
    does: that needs NLTK's punkt data (`python -m nltk.downloader punkt_tab`); without it each caption is
    tokenized as one sentence (NLTK's `preserve_line`), which differs only where a caption has more than one."""
    try:
        import nltk
    except ImportError as e:
        raise ImportError(f"COCO-Order and Flickr30k-Order split captions for the trigram shuffles with NLTK, as "
                          f"ARO does; it cannot be imported ({e}): pip install nltk") from None
    try:
        nltk.word_tokenize("A dog. A cat.")
        return nltk.word_tokenize, True
    except LookupError:  # punkt_tab is not installed
        return (lambda text: nltk.word_tokenize(text, preserve_line=True)), False


MANY_SENTENCES = re.compile(r"[.!?][\"')\]]*\s+\S")  # a sentence end followed by more text


def tag_one(tag: Tagger, caption: str, where: str) -> list[tuple[str, str]]:
    try:
        return tag([caption.strip()])[0]
    except (LookupError, ValueError) as e:
        raise BadInput(f"{where}: {e.args[0] if len(e.args) == 1 else e}") from None


def order_options(captions: Sequence[str], wheres: Sequence[str], tag: Tagger, rng: np.random.Generator,
                  bad: BadRecords, max_words: int = ORDER_MAX_WORDS,
                  tokenize: Callable[[str], list[str]] | None = None) -> list[list[str] | None]:
    """Per raw caption, [original, 4 shuffles], each through pre_caption; None for a caption skipped as bad.
    The tagger sees the raw caption stripped of surrounding whitespace (ARO tags the raw caption too);
    `tokenize` splits the raw caption for the trigram shuffles (ARO: NLTK's word_tokenize; None: the tagger's
    words)."""
    try:
        tagged: list = tag([c.strip() for c in captions])
    except (LookupError, ValueError):  # a caption the parser cannot read: tag one by one to name (or skip) it
        tagged = [bad.guard(lambda c=c, w=w: tag_one(tag, c, w)) for c, w in zip(captions, wheres)]
    if len(tagged) != len(captions):
        raise RuntimeError(f"the tagger returned {len(tagged)} results for {len(captions)} captions")

    def options(caption: str, tokens: list[tuple[str, str]] | None, where: str) -> list[str] | None:
        if tokens is None:  # skipped when it was tagged
            return None
        if not tokens:
            raise BadInput(f"{where}: the parser found no words in caption {caption!r}")
        words, tags = [w for w, _ in tokens], [t for _, t in tokens]
        trigram_words = None if tokenize is None else tokenize(caption)
        return [pre_caption(o, max_words) for o in (caption, *order_negatives(words, tags, rng, trigram_words))]

    return [bad.guard(lambda c=c, t=t, w=w: options(c, t, w)) for c, t, w in zip(captions, tagged, wheres)]


def order_benchmark(ctx: BenchContext, dataset: str, name: str, what: str) -> BenchResult:
    bad = bad_records(ctx)
    path, entries, refs = karpathy(ctx, dataset, bad)
    encoded = encode_refs(ctx, refs, [e.where for e in entries], what)
    kept, image_feats = usable(refs, encoded, bad)  # (N_img, D)
    entries = [entries[k] for k in kept]
    captions = [(i, c, f"{e.where} caption {j}") for i, e in enumerate(entries) for j, c in enumerate(e.captions)]
    rng = np.random.default_rng(ctx.spec.seed)
    tokenize, sentences = word_tokenizer()
    rows = order_options([c for _, c, _ in captions], [w for _, _, w in captions], tagger(ctx), rng, bad,
                         tokenize=tokenize)
    cases = [(i, row) for (i, _, _), row in zip(captions, rows) if row is not None]
    nonempty(cases, what, path)
    k = len(cases[0][1])
    text = encode_unique_texts(ctx.model, [o for _, row in cases for o in row], batch_size=ctx.spec.batch_size,
                               amp=use_amp(ctx))
    image_of = torch.tensor([i for i, _ in cases])
    scores = score_options(image_feats[image_of], text.view(len(cases), k, -1))  # (N, D), (N, 5, D) -> (N, 5)
    correct = choice_correct(scores, 0, ties="right")
    chance = tie_right_chance([row for _, row in cases])  # a shuffle may equal the original
    notes = notes_for(what, bad, encoded)
    notes.append(f"{what}: {len(cases)} captions of {len(entries)} images; the original against ARO's 4 shuffles "
                 f"(seed {ctx.spec.seed}; the trigram ones on NLTK's word_tokenize"
                 f"{'' if sentences else ', one sentence per caption (no punkt data)'}), all through ARO's "
                 f"pre_caption(max_words={ORDER_MAX_WORDS}); a tie counts as right; chance {chance:.3f} (a shuffle "
                 f"may equal the original)")
    several = sum(bool(MANY_SENTENCES.search(c.strip())) for (_, c, _), row in zip(captions, rows) if row is not None)
    if several and not sentences:
        notes.append(f"{what}: {several} captions have a sentence end inside ('.', '!' or '?' then more text); "
                     f"without NLTK's punkt data each was tokenized for the trigram shuffles as one sentence, where "
                     f"ARO's word_tokenize splits sentences first (python -m nltk.downloader punkt_tab)")
    return BenchResult({name: correct.float().mean().item()}, FAMILY, notes=notes, chance={name: chance})


@BENCHMARKS.register("coco_order")
def coco_order(ctx: BenchContext) -> BenchResult:
    return order_benchmark(ctx, "coco", "coco_order", "COCO-Order")


@BENCHMARKS.register("flickr30k_order")
def flickr30k_order(ctx: BenchContext) -> BenchResult:
    return order_benchmark(ctx, "flickr30k", "flickr30k_order", "Flickr30k-Order")

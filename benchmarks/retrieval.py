"""Image-text retrieval on COCO (Karpathy 5k test) and Flickr30k (1k test), as CLIP_benchmark defines it
(LAION-AI/CLIP_benchmark clip_benchmark/metrics/zeroshot_retrieval.py).

Every caption of an image is a query for text->image retrieval (t2i, CLIP_benchmark's
`image_retrieval_recall@k`, averaged over captions); every image is a query for image->text retrieval (i2t,
`text_retrieval_recall@k`, averaged over images, a hit when any of its captions is in the top k). Captions
are used as the file has them (CLIP_benchmark does not preprocess them; the model's tokenizer does).
Images come from BLIP's Karpathy files, the ones ARO's Order benchmarks read, so COCO-Order and COCO
retrieval in one bench call share their image encodings.
"""
from __future__ import annotations

import torch

from benchmarks.base import BENCHMARKS, BenchContext, BenchResult
from benchmarks.real import bad_records, encode_refs, karpathy, nonempty, notes_for, usable, use_amp
from benchmarks.scoring import encode_unique_texts, retrieval_metrics

FAMILY = "retrieval_{}"  # one chart per dataset: their metrics share tick labels (i2t_R@1, ...)
KS = (1, 5, 10)


def retrieval_benchmark(ctx: BenchContext, dataset: str, name: str, what: str) -> BenchResult:
    bad = bad_records(ctx)
    path, entries, refs = karpathy(ctx, dataset, bad)
    encoded = encode_refs(ctx, refs, [e.where for e in entries], what)
    kept, image_feats = usable(refs, encoded, bad)  # (N_img, D)
    entries = [entries[k] for k in kept]
    nonempty(entries, what, path)
    captions = [c for e in entries for c in e.captions]
    image_of = torch.tensor([i for i, e in enumerate(entries) for _ in e.captions])  # (N_text,)
    text = encode_unique_texts(ctx.model, captions, batch_size=ctx.spec.batch_size, amp=use_amp(ctx))
    m = retrieval_metrics(image_feats, text, image_of, ks=KS)
    metrics = {f"{name}/i2t_R@{k}": m[f"text_retrieval_recall@{k}"] for k in KS}
    metrics |= {f"{name}/t2i_R@{k}": m[f"image_retrieval_recall@{k}"] for k in KS}
    notes = notes_for(what, bad, encoded)
    notes.append(f"{what}: {len(entries)} images, {len(captions)} captions ({ctx.spec.split} split); Recall@k as "
                 "CLIP_benchmark (i2t: any of the image's captions in the top k, averaged over images; t2i: "
                 "averaged over captions)")
    return BenchResult(metrics, FAMILY.format(dataset), notes=notes)


@BENCHMARKS.register("coco_retrieval")
def coco_retrieval(ctx: BenchContext) -> BenchResult:
    return retrieval_benchmark(ctx, "coco", "coco_retrieval", "COCO retrieval")


@BENCHMARKS.register("flickr30k_retrieval")
def flickr30k_retrieval(ctx: BenchContext) -> BenchResult:
    return retrieval_benchmark(ctx, "flickr30k", "flickr30k_retrieval", "Flickr30k retrieval")

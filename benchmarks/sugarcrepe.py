"""SugarCrepe (Hsieh et al., NeurIPS 2023) as its `main_eval.py` computes it (RAIVNLab/sugar-crepe).

Seven subsets of COCO val2017 images, each case an image with its caption and one hard negative caption;
correct iff the caption scores strictly higher (`pos_score > neg_score`: a tie is wrong). The authors report
per-subset accuracy; the paper's figures also average within REPLACE (obj, att, rel), SWAP (obj, att) and
ADD (obj, att). Reported here: the seven subsets, those three group means (macro within a group), and
`sugarcrepe/overall`, the micro accuracy over every case of the seven files (7,511 on the release).
Every distinct image is encoded once for all seven subsets.
"""
from __future__ import annotations

import torch

from benchmarks.base import BENCHMARKS, BenchContext, BenchResult
from benchmarks.formats import read_sugarcrepe, require
from benchmarks.real import ImageRef, bad_records, data_root, encode_refs, nonempty, notes_for, usable, use_amp
from benchmarks.scoring import choice_correct, encode_unique_texts, score_options

FAMILY = "sugarcrepe"
GROUPS = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}
SUBSETS = tuple(s for subsets in GROUPS.values() for s in subsets)


@BENCHMARKS.register("sugarcrepe")
def sugarcrepe(ctx: BenchContext) -> BenchResult:
    root = data_root(ctx)
    bad = bad_records(ctx)
    subsets = {s: read_sugarcrepe(root / "sugarcrepe" / f"{s}.json", bad) for s in SUBSETS}
    images = require(root / "coco" / "val2017", "COCO val2017 image folder", "coco_val2017")
    cases = [(s, c) for s in SUBSETS for c in subsets[s]]
    refs = [ImageRef(str(images / c.image)) for _, c in cases]
    # float32 unless bench.amp says otherwise, as SugarCrepe's main_eval.py: its ties and close margins count
    encoded = encode_refs(ctx, refs, [c.where for _, c in cases], "SugarCrepe", reference_float32=True)
    kept, image_feats = usable(refs, encoded, bad)  # (N, D)
    cases = [cases[k] for k in kept]
    nonempty(cases, "SugarCrepe", root / "sugarcrepe")
    texts = [t for _, c in cases for t in (c.caption, c.negative_caption)]
    text = encode_unique_texts(ctx.model, texts, batch_size=ctx.spec.batch_size, amp=use_amp(ctx, True))
    scores = score_options(image_feats, text.view(len(cases), 2, -1))  # (2N, D) -> (N, 2, D); scores (N, 2)
    correct = choice_correct(scores, 0, ties="wrong")
    subset_of = [s for s, _ in cases]
    per, details = {}, []
    for s in SUBSETS:
        mask = torch.tensor([x == s for x in subset_of])
        n = int(mask.sum())
        per[s] = correct[mask].float().mean().item() if n else float("nan")
        details.append({"subset": s, "accuracy": per[s], "count": n})
    metrics = {f"sugarcrepe/{s}": per[s] for s in SUBSETS}
    metrics |= {f"sugarcrepe/{g}": sum(per[s] for s in members) / len(members) for g, members in GROUPS.items()}
    metrics["sugarcrepe/overall"] = correct.float().mean().item()
    notes = notes_for("SugarCrepe", bad, encoded)
    notes.append(f"SugarCrepe: {len(cases)} cases in 7 subsets; a tie counts as wrong; chance 0.5; replace/swap/add "
                 "are the means of their subsets (the paper's groups); overall is the micro accuracy over all cases")
    return BenchResult(metrics, FAMILY, details=details, notes=notes, chance=dict.fromkeys(metrics, 0.5))

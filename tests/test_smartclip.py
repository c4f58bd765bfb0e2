"""SmartCLIP: hard 0/1 masks of the embedding's width with straight-through gradients to the mask network,
the masked contrastive terms against a direct computation (and over ranks), the mask network's own
optimiser group, captions of several granularities, and plain towers at inference."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from datamodules.datamodule import collate
from datamodules.fields import FieldContext, granular_text_field
from datamodules.source import Sample
from methods.base import lr_lambda
from methods.losses import masked_logits, smart_alignment_losses
from methods.train import build


def smart(make_cfg, *argv: str):
    module, dm = build(make_cfg("method=smartclip", *argv))
    random.seed(0)
    ds = dm.dataset("train")
    return module, ds, collate([ds[i] for i in range(8)])


def test_masks_are_hard_with_straight_through_gradients(make_cfg):
    module, _, batch = smart(make_cfg)
    feats = module.encode(batch)
    mask, dim = feats["mask"], module.model.text_projection.shape[1]
    assert mask.shape == (8, dim) and set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.detach().mean() < 1
    (mask * torch.randn_like(mask)).sum().backward()  # the hard step has no gradient; the estimator passes one on
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.mask_net.parameters())
    assert module.model.token_embedding.weight.grad is None  # the mask network reads detached text states
    soft, _, batch = smart(make_cfg, "method.soft_mask=true")
    values = soft.encode(batch)["mask"].detach()
    assert ((values > 0) & (values < 1)).all()


def test_masked_logits_and_terms_by_hand_and_over_ranks():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(4, 6, generator=g, dtype=torch.float64)  # unnormalised, as the method passes them
    txt = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1)
    mask = (torch.rand(4, 6, generator=g) > 0.5).double()
    mask[2] = 0  # an all-zero mask scores 0, never NaN
    direct = torch.stack([torch.stack([100 * F.normalize(img[i] * mask[j], dim=0) @ txt[j] for j in range(4)])
                          for i in range(4)])  # (4, 4): image i under caption j's mask
    torch.testing.assert_close(masked_logits(img, mask, txt, 100.0), direct)

    def ce(row, target):
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))
    sidm = sum(ce(direct[i].tolist(), i) for i in range(4)) / 4  # image i, every caption with its own mask
    dism = sum(ce(direct[:, i].tolist(), i) for i in range(4)) / 4  # caption i's mask over every image
    got = smart_alignment_losses(img, mask, txt, img, mask, txt, 100.0)
    assert math.isclose(got[0].item(), sidm, rel_tol=1e-9) and math.isclose(got[1].item(), dism, rel_tol=1e-9)
    halves = [smart_alignment_losses(img[r * 2:r * 2 + 2], mask[r * 2:r * 2 + 2], txt[r * 2:r * 2 + 2], img, mask,
                                     txt, 100.0, rank=r) for r in range(2)]
    assert math.isclose(sum(h[0].item() for h in halves) / 2, sidm, rel_tol=1e-9)
    assert math.isclose(sum(h[1].item() for h in halves) / 2, dism, rel_tol=1e-9)


def test_loss_terms_and_frozen_scale(make_cfg):
    module, _, batch = smart(make_cfg)
    feats = module.encode(batch)
    terms = module.loss_terms(batch, feats)
    sidm, dism = smart_alignment_losses(feats["image_raw"], feats["mask"], feats["text_features"], feats["image_raw"],
                                        feats["mask"], feats["text_features"], 100.0)
    torch.testing.assert_close(terms["sidm_loss"], 10 * sidm)
    torch.testing.assert_close(terms["dism_loss"], 10 * dism)
    torch.testing.assert_close(terms["sparsity_loss"], 2 * feats["mask"].abs().mean())
    assert not module.model.logit_scale.requires_grad
    off, _, _ = smart(make_cfg, "method.sparsity_weight=0")
    assert "sparsity_loss" not in off.loss_terms(batch, off.encode(batch))
    plain, _, _ = smart(make_cfg, "method.masked=false")  # the captions without the mask: CLIP's InfoNCE
    assert plain.mask_net is None and plain.own_param_groups() == {} and plain.model.logit_scale.requires_grad
    assert set(plain.loss_terms(batch, plain.encode(batch))) == {"contrastive_loss"}


def test_mask_network_has_its_own_optimiser_group(make_cfg):
    module, _, _ = smart(make_cfg)
    groups = module.param_groups()
    (own,) = [g for g in groups if g.get("name") == "mask_net"]
    assert own["lr"] == 1e-3 and own["weight_decay"] == 0.0 and own["warmup_steps"] == 0
    ids = lambda gs: {id(p) for g in gs for p in g["params"]}  # noqa: E731
    assert ids([own]) == {id(p) for p in module.mask_net.parameters()}
    shared = [g for g in groups if g is not own]
    assert not ids(shared) & ids([own])
    assert ids(groups) == {id(p) for p in module.parameters() if p.requires_grad}
    # no warmup for the mask network while the backbone warms up (the release's two schedulers)
    assert lr_lambda("cosine", own["warmup_steps"], 100, 0.0)(0) == 1.0
    assert lr_lambda("cosine", module.cfg.optim.warmup_steps, 100, 0.0)(0) < 1.0


def test_granular_captions():
    ctx = FieldContext(lambda texts: torch.zeros(len(texts), 3), random.Random(0), "train", [], None, 0, {})
    sample = Sample(None, ["A dog runs. It is brown. The sky is blue"], partial_captions=["a dog"])
    drawn = {granular_text_field(sample, 0, ctx)["caption"] for _ in range(200)}
    assert drawn == {"a dog", "A dog runs", "A dog runs. It is brown", "A dog runs. It is brown. The sky is blue"}
    # COCO: one-sentence captions, no partial ones: the drawn caption, then it with the image's other captions
    coco = Sample(None, ["A man riding a horse on the beach.", "A brown horse carries a rider.", "Waves behind them"])
    drawn = {granular_text_field(coco, 1, ctx)["caption"] for _ in range(200)}
    assert drawn == {"A brown horse carries a rider.",
                     "A brown horse carries a rider. A man riding a horse on the beach.",
                     "A brown horse carries a rider. A man riding a horse on the beach. Waves behind them."}
    single = Sample(None, ["A man riding a horse."])
    assert {granular_text_field(single, 0, ctx)["caption"] for _ in range(20)} == {"A man riding a horse."}


def test_shapes_batch_mixes_granularities_and_inference_is_plain_clip(make_cfg):
    module, ds, _ = smart(make_cfg)
    random.seed(1)
    captions = [ds[i]["caption"] for i in range(32)]
    partial = [c for i, c in enumerate(captions) if c in ds.source[i].partial_captions]
    full = [c for i, c in enumerate(captions) if c in ds.source[i].captions]
    assert partial and full and len(partial) + len(full) == 32
    module.eval()
    texts = ["a red circle", "a circle to the left of a square"]
    torch.testing.assert_close(module.encode_captions(texts),
                               module.model.encode_text(module.tokenizer(texts), normalize=True))

"""SmartCLIP: hard 0/1 masks of the embedding's width with straight-through gradients to the mask network,
the masked contrastive terms against a direct computation (and over ranks), the mask network's own
optimiser group, captions of several granularities, and plain towers at inference."""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from datamodules.datamodule import collate
from datamodules.fields import FieldContext, granular_text_field, token_key
from datamodules.source import Sample
from methods.base import lr_lambda
from methods.losses import contrastive_loss, masked_logits, smart_alignment_losses
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
                                        feats["mask"], feats["text_features"], 100.0, same=module.same_captions(batch))
    torch.testing.assert_close(terms["sidm_loss"], 10 * sidm)
    torch.testing.assert_close(terms["dism_loss"], 10 * dism)
    torch.testing.assert_close(terms["sparsity_loss"], 2 * feats["mask"].abs().mean())
    assert not module.model.logit_scale.requires_grad
    off, _, _ = smart(make_cfg, "method.sparsity_weight=0")
    assert "sparsity_loss" not in off.loss_terms(batch, off.encode(batch))
    plain, _, _ = smart(make_cfg, "method.masked=false")  # the captions without the mask: CLIP's InfoNCE
    assert plain.mask_net is None and plain.own_param_groups() == {} and plain.model.logit_scale.requires_grad
    assert set(plain.loss_terms(batch, plain.encode(batch))) == {"contrastive_loss"}


def ce_without(row: list[float], target: int, left_out: set[int]) -> float:
    kept = [v for j, v in enumerate(row) if j == target or j not in left_out]
    return -(row[target] - math.log(sum(math.exp(v) for v in kept)))


def test_a_caption_drawn_twice_is_a_negative_of_neither():
    """Items 0 and 2 drew one caption: each is left out of the other's softmaxes (both SmartCLIP terms and the
    masked=false InfoNCE), by hand and over two ranks; the positive itself always stays."""
    g = torch.Generator().manual_seed(1)
    img = torch.randn(4, 6, generator=g, dtype=torch.float64)
    txt = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1)
    mask = (torch.rand(4, 6, generator=g) > 0.4).double()
    key = torch.tensor([7, 8, 7, 9])
    same = key[:, None] == key[None, :]
    twin = {0: {2}, 1: set(), 2: {0}, 3: set()}
    direct = masked_logits(img, mask, txt, 100.0).tolist()  # [i][j]: image i under caption j's mask
    sidm = sum(ce_without(direct[i], i, twin[i]) for i in range(4)) / 4
    dism = sum(ce_without([direct[k][i] for k in range(4)], i, twin[i]) for i in range(4)) / 4
    got = smart_alignment_losses(img, mask, txt, img, mask, txt, 100.0, same=same)
    assert math.isclose(got[0].item(), sidm, rel_tol=1e-9) and math.isclose(got[1].item(), dism, rel_tol=1e-9)
    plain = smart_alignment_losses(img, mask, txt, img, mask, txt, 100.0)
    assert plain[0].item() > got[0].item() + 1e-6  # the twin was a negative before
    halves = [smart_alignment_losses(img[r * 2:r * 2 + 2], mask[r * 2:r * 2 + 2], txt[r * 2:r * 2 + 2], img, mask,
                                     txt, 100.0, rank=r, same=same[r * 2:r * 2 + 2]) for r in range(2)]
    assert math.isclose(sum(h[0].item() for h in halves) / 2, sidm, rel_tol=1e-9)
    assert math.isclose(sum(h[1].item() for h in halves) / 2, dism, rel_tol=1e-9)

    feats = F.normalize(img, dim=-1)
    scores = (10.0 * feats @ txt.T).tolist()  # [i][j]: image i, caption j
    i2t = sum(ce_without(scores[i], i, twin[i]) for i in range(4)) / 4
    t2i = sum(ce_without([scores[k][i] for k in range(4)], i, twin[i]) for i in range(4)) / 4
    scale = torch.tensor(10.0, dtype=torch.float64)
    got = contrastive_loss(feats, txt, feats, txt, scale, same=same)
    assert math.isclose(got.item(), (i2t + t2i) / 2, rel_tol=1e-9)
    halves = [contrastive_loss(feats[r * 2:r * 2 + 2], txt[r * 2:r * 2 + 2], feats, txt, scale, rank=r,
                               same=same[r * 2:r * 2 + 2]) for r in range(2)]
    assert math.isclose(sum(h.item() for h in halves) / 2, (i2t + t2i) / 2, rel_tol=1e-9)


def test_the_method_leaves_out_duplicate_captions_unless_told(make_cfg):
    module, ds, batch = smart(make_cfg)
    assert batch["caption_key"].tolist() == [token_key(t) for t in module.tokenizer(batch["caption"])]
    a, b, c = module.tokenizer(["A red circle.", "a  red circle.", "a red square."])
    assert token_key(a) == token_key(b) != token_key(c)  # one caption as the text tower reads it, one key
    batch["caption_key"][3] = batch["caption_key"][0]  # items 0 and 3 drew one caption
    same = module.same_captions(batch)
    assert same[0, 3] and same[3, 0] and same.diagonal().all()
    feats = module.encode(batch)
    terms = module.loss_terms(batch, feats)
    sidm, _ = smart_alignment_losses(feats["image_raw"], feats["mask"], feats["text_features"], feats["image_raw"],
                                     feats["mask"], feats["text_features"], 100.0, same=same)
    torch.testing.assert_close(terms["sidm_loss"], 10 * sidm)
    released, _, _ = smart(make_cfg, "method.exclude_duplicates=false")
    assert released.same_captions(batch) is None
    own, _, own_batch = smart(make_cfg, "method.granularity=false")  # the data's own captions have keys too
    assert own_batch["caption_key"].tolist() == [token_key(t) for t in own.tokenizer(own_batch["caption"])]
    assert own.same_captions(own_batch) is not None
    plain, _, _ = smart(make_cfg, "method.masked=false")
    pf = plain.encode(batch)
    torch.testing.assert_close(plain.loss_terms(batch, pf)["contrastive_loss"], contrastive_loss(
        pf["image_features"], pf["text_features"], pf["image_features"], pf["text_features"], pf["logit_scale"],
        same=same))


def test_hard_mask_reads_the_logit_sign():
    """A bf16 sigmoid of a logit just below 0 rounds to 0.5; the mask is on only for a logit >= 0."""
    from methods.smartclip import SmartCLIP

    class Fixed(torch.nn.Module):
        def forward(self, states):
            return torch.tensor([[-1e-3, 0.0, 1e-3]], dtype=torch.bfloat16)

    assert torch.sigmoid(torch.tensor(-1e-3, dtype=torch.bfloat16)).item() == 0.5
    holder = torch.nn.Module()
    holder.mask_net, holder.mcfg = Fixed(), SmartCLIP.Config()
    assert SmartCLIP.masks(holder, torch.zeros(1, 2, 3)).tolist() == [[0.0, 1.0, 1.0]]


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


def test_smartclip_paper_optimiser(make_cfg):
    """The release's backbone AdamW (torch's betas and eps, decay on every parameter, lr 1e-6, wd 0.01, 200 warm-up
    steps then a cosine to 0); the mask network keeps its own lr, no decay and no warm-up."""
    module, _, _ = smart(make_cfg, "optim=smartclip_paper")
    o = module.cfg.optim
    assert (o.beta1, o.beta2, o.eps, o.lr, o.weight_decay, o.schedule, o.min_lr_ratio) == (
        0.9, 0.999, 1e-8, 1e-6, 0.01, "cosine", 0.0)
    assert OmegaConf.load(Path(__file__).parents[1] / "configs/optim/smartclip_paper.yaml").warmup_steps == 200
    groups = module.param_groups()
    (own,) = [g for g in groups if g.get("name") == "mask_net"]
    assert (own["lr"], own["weight_decay"], own["warmup_steps"]) == (1e-3, 0.0, 0)
    shared = [g for g in groups if g is not own and g["params"]]
    assert all(g["weight_decay"] == 0.01 for g in shared) and sum(len(g["params"]) for g in shared) == sum(
        1 for p in module.parameters() if p.requires_grad) - len(own["params"])


def test_an_all_zero_mask_scores_zero_and_passes_no_gradient():
    """A straight-through mask whose every logit is below 0 keeps no dimension: its caption scores 0 and the mask
    logits get no gradient (divided by the clamped norm it was ~1e13, finite, and reached AdamW)."""
    from methods.losses import masked_logits, smart_alignment_losses

    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(3, 16, generator=g), F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    logits = torch.randn(3, 16, generator=g).requires_grad_()
    low = torch.where(torch.arange(3)[:, None] == 1, -1.0 - logits.detach().abs(), torch.zeros(())) + logits
    soft = torch.sigmoid(low)
    masks = (low >= 0).float() + (soft - soft.detach())
    assert masks[1].detach().eq(0).all() and masks[0].detach().gt(0).any()
    scores = masked_logits(images, masks, texts, 100.0)
    assert scores[:, 1].eq(0).all() and scores[:, 0].ne(0).all()
    sidm, dism = smart_alignment_losses(images, masks, texts, images, masks, texts, 100.0)
    (sidm + dism).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().max() == 0 and logits.grad[0].abs().max() > 0

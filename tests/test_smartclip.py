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


# -- captions true of other images (`exclude_entailed`) -------------------------------------------------------------

def test_what_a_graph_claims_and_what_it_holds():
    from datamodules.facts import claimed, held
    from datamodules.graph import Entity, Relation, SceneGraph

    g = SceneGraph((Entity("circle", ("red",)), Entity("Square", ("small", "blue"))), (Relation(0, "left of", 1),))
    assert claimed(g) == ["o:circle[red]", "o:square[blue,small]", "r:circle[red] left of square[blue,small]"]
    h = set(held(g, {"left of": "right of"}))
    # every attribute subset of an object; a relation's ends bare or fully named, and its converse
    assert {"o:circle[]", "o:circle[red]", "o:square[]", "o:square[blue]", "o:square[small]",
            "o:square[blue,small]"} <= h
    assert {"r:circle[] left of square[]", "r:square[blue,small] right of circle[red]",
            "r:circle[red] left of square[]"} <= h
    assert "r:square[] left of circle[]" not in h and "r:circle[] left of square[blue]" not in h  # partial end: unknown
    assert not set(claimed(SceneGraph((Entity("circle", ("blue",)),)))) <= h  # a blue circle is not there
    assert held(g)[:2] == ["o:circle[]", "o:square[]"]  # least specific first (a cut keeps them)
    near = SceneGraph((Entity("dog"), Entity("man")), (Relation(0, "next to", 1),))
    assert "r:man[] next to dog[]" in held(near)  # a symmetric predicate holds both ways
    assert "r:man[] on dog[]" not in held(SceneGraph((Entity("dog"), Entity("man")), (Relation(0, "on", 1),)))
    many = Entity("car", ("red", "old", "big", "shiny"))  # more than 3 attributes: bare, each alone, all
    assert len([f for f in held(SceneGraph((many,))) if f.startswith("o:")]) == 1 + 4 + 1


def test_true_of_against_sets():
    from methods.losses import true_of

    g = torch.Generator().manual_seed(3)
    held = torch.randint(0, 12, (7, 5), generator=g)
    held[held > 9] = -1  # padding
    claims = torch.randint(0, 12, (6, 3), generator=g)
    claims[claims > 8] = -1
    claims[0] = -1  # claims nothing known: true of no image
    held[2, 0] = 5
    claims[1] = torch.tensor([5, -1, -1])
    got = true_of(claims, held)
    for r in range(6):
        want = {int(v) for v in claims[r] if v >= 0}
        for c in range(7):
            assert bool(got[r, c]) == (bool(want) and want <= {int(v) for v in held[c] if v >= 0}), (r, c)
    assert got[1, 2] and not got[0].any()
    big = torch.tensor([[(1 << 40) - 1]])  # the largest fact key
    assert true_of(big, big).item() and not true_of(big, big - 1).item()
    # the packing: 1,100 images (more than 2**10), keys that differ only in their highest bit, or in the lowest
    n, high = 1100, 1 << 39
    held = torch.stack([torch.arange(n) * 2 + high, torch.arange(n) * 2 + 1], dim=1)  # image j: 2j + 2**39, 2j + 1
    claims = torch.stack([torch.arange(n) * 2 + high, torch.arange(n) * 2], dim=1)[:, :1]  # caption j: 2j + 2**39
    assert torch.equal(true_of(claims, held), torch.eye(n, dtype=torch.bool))
    assert not true_of(claims - high, held).any()  # 2j without the high bit: held by no image
    assert not true_of(held[:, 1:] + 1, held).any()  # 2j + 2: never held (2(j+1) + 2**39 differs in the high bit)


def test_each_direction_leaves_out_its_own_true_matches_by_hand_and_over_ranks():
    """Caption 1 ("a red circle") is true of image 3 too, and caption 2 of image 0: out of the text->image rows
    of those captions, and out of the image->text rows of those images; nothing else moves."""
    g = torch.Generator().manual_seed(2)
    img = torch.randn(4, 6, generator=g, dtype=torch.float64)
    txt = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1)
    mask = (torch.rand(4, 6, generator=g) > 0.4).double()
    t2i = torch.eye(4, dtype=torch.bool)
    t2i[1, 3] = t2i[2, 0] = True  # caption i is true of image j
    i2t = t2i.T.clone()  # image i: caption j is true of it
    left_t2i = {0: set(), 1: {3}, 2: {0}, 3: set()}
    left_i2t = {0: {2}, 1: set(), 2: set(), 3: {1}}
    direct = masked_logits(img, mask, txt, 100.0).tolist()  # [i][j]: image i under caption j's mask
    sidm = sum(ce_without(direct[i], i, left_i2t[i]) for i in range(4)) / 4
    dism = sum(ce_without([direct[k][i] for k in range(4)], i, left_t2i[i]) for i in range(4)) / 4
    got = smart_alignment_losses(img, mask, txt, img, mask, txt, 100.0, same=(i2t, t2i))
    assert math.isclose(got[0].item(), sidm, rel_tol=1e-9) and math.isclose(got[1].item(), dism, rel_tol=1e-9)
    halves = [smart_alignment_losses(img[r * 2:r * 2 + 2], mask[r * 2:r * 2 + 2], txt[r * 2:r * 2 + 2], img, mask,
                                     txt, 100.0, rank=r, same=(i2t[r * 2:r * 2 + 2], t2i[r * 2:r * 2 + 2]))
              for r in range(2)]
    assert math.isclose(sum(h[0].item() for h in halves) / 2, sidm, rel_tol=1e-9)
    assert math.isclose(sum(h[1].item() for h in halves) / 2, dism, rel_tol=1e-9)
    feats = F.normalize(img, dim=-1)
    scores = (10.0 * feats @ txt.T).tolist()
    want = (sum(ce_without(scores[i], i, left_i2t[i]) for i in range(4))
            + sum(ce_without([scores[k][i] for k in range(4)], i, left_t2i[i]) for i in range(4))) / 8
    got = contrastive_loss(feats, txt, feats, txt, torch.tensor(10.0, dtype=torch.float64), same=(i2t, t2i))
    assert math.isclose(got.item(), want, rel_tol=1e-9)


def shapes_truth(caption: str, sample: Sample) -> bool | None:
    """Is a shapes-world partial caption true of a sample's scene, read off the words and the objects' colours,
    shapes and boxes (not its graph's facts); None for a full caption."""
    from datamodules.shapes import COLOURS, PREDICATES

    words = caption.split()
    objects = sample.extra["image_graph"].objects
    if len(words) == 3:  # "a red circle"
        return any(words[1] in e.attributes and e.name == words[2] for e in objects)
    for pred, (text, _, axis, sign) in PREDICATES.items():
        if f" {text} " in f" {caption} " and all(w not in COLOURS for w in words):  # "a circle above a square"
            a_name, b_name = words[1], words[-1]
            for a in objects:
                for b in objects:
                    if a is not b and a.name == a_name and b.name == b_name:
                        a0, a1 = a.box[axis], a.box[axis] + a.box[axis + 2]
                        b0, b1 = b.box[axis], b.box[axis] + b.box[axis + 2]
                        if (a1 < b0) if sign < 0 else (a0 > b1):
                            return True
            return False
    return None


def test_on_the_shapes_world_a_partial_caption_is_left_out_of_exactly_the_images_it_is_true_of(make_cfg):
    """The masks of `exclude_entailed` against the scenes themselves: an object prompt is true of an image with an
    object of that colour and shape, a bare relation of one whose two shapes lie that way (boxes, not graphs)."""
    module, ds, _ = smart(make_cfg, "method.exclude_entailed=true", "data.options.train_size=256")
    assert "image_facts" in module.fields()
    random.seed(4)
    items = [ds[i] for i in range(64)]
    batch = collate(items)
    i2t, t2i = module.same_captions(batch)
    assert torch.equal(i2t, t2i.T) and t2i.diagonal().all()  # one process: the two directions are each other's
    twins = batch["caption_key"][:, None] == batch["caption_key"][None, :]
    assert (t2i >= twins).all()  # twins stay left out
    samples = [ds.source[i] for i in range(64)]
    checked = 0
    for i, caption in enumerate(batch["caption"]):
        for j in range(64):
            truth = shapes_truth(caption, samples[j])
            if truth is not None:
                assert bool(t2i[i, j]) == truth, (caption, samples[j].key, samples[j].extra["image_graph"])
                checked += 1
    found = int((t2i & ~torch.eye(64, dtype=torch.bool) & ~twins).sum())
    assert checked > 64 * 20 and found > 20, (checked, found)  # most draws are partial; many true matches besides twins
    off, _, off_batch = smart(make_cfg, "method.exclude_entailed=false")
    assert "image_facts" not in off_batch and isinstance(off.same_captions(off_batch), torch.Tensor)

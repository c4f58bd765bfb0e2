"""The contrastive loss against a direct computation; optimizer groups and the LR schedule."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.base import lr_lambda
from methods.clip import CLIP
from methods.losses import caption_margin_loss, contrastive_loss
import configs


def direct_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    """-log softmax of each positive, row by row, averaged over both directions (no matrix code)."""
    n = len(img)
    total = 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
        col = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -(col[i] - math.log(sum(math.exp(c) for c in col)))
    return total / (2 * n)


def features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1))


def test_loss_matches_direct_computation():
    img, txt = features(6, 5, 0)
    scale = torch.tensor(7.5, dtype=torch.float64)
    got = contrastive_loss(img, txt, img, txt, scale).item()
    assert math.isclose(got, direct_loss(img, txt, 7.5), rel_tol=1e-10)


def test_rank_losses_average_to_the_global_loss():
    """Rank r's local loss uses its rows against all columns, positives offset by r*B."""
    img, txt = features(8, 4, 1)
    scale = torch.tensor(3.0, dtype=torch.float64)
    b = 4
    per_rank = [contrastive_loss(img[r * b:(r + 1) * b], txt[r * b:(r + 1) * b], img, txt, scale, rank=r)
                for r in range(2)]
    assert math.isclose(sum(per_rank).item() / 2, direct_loss(img, txt, 3.0), rel_tol=1e-10)
    # with the wrong rank the positives point at another rank's pairs, and the loss changes
    wrong = contrastive_loss(img[b:], txt[b:], img, txt, scale, rank=0)
    assert not math.isclose(wrong.item(), per_rank[1].item(), rel_tol=1e-3)


def test_no_decay_on_gains_biases_and_logit_scale(make_cfg):
    module = CLIP(configs.to_plain(make_cfg()))
    decay, no_decay = module.param_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.logit_scale" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("bias") for n in no_decay_names) and any(".ln_" in n or "ln_final" in n for n in no_decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for p in module.parameters() if p.requires_grad)


def test_structureclip_paper_optimiser_decays_every_parameter_with_torchs_adamw_defaults(make_cfg):
    cfg = make_cfg("method=structureclip", "optim=structureclip_paper")
    o = cfg.optim
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.lr, o.schedule) == (0.9, 0.999, 1e-8, 0.1, 5e-6, "constant")
    module = CLIP(configs.to_plain(make_cfg("optim.decay_all=true")))
    decay, no_decay = module.param_groups()
    assert not no_decay["params"] and decay["weight_decay"] > 0
    assert len(decay["params"]) == sum(1 for p in module.parameters() if p.requires_grad)


def test_warmup_then_cosine():
    f = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert f(0) == 0.1 and math.isclose(f(9), 1.0)
    assert math.isclose(f(10), 1.0) and math.isclose(f(60), 0.1 + 0.9 * 0.5) and math.isclose(f(110), 0.1)
    c = lr_lambda("constant", warmup=4, total=100, min_ratio=0.0)
    assert c(1) == 0.5 and c(50) == 1.0


def test_caption_margin_loss_averaged_over_ranks_is_the_global_batch_mean():
    """Items without a negative spread unevenly over ranks: the per-rank losses, each divided by the global
    count of valid items over the world size, average to the loss on the whole batch."""
    g = torch.Generator().manual_seed(3)
    img, txt, neg = (F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    valid = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float64)
    whole = caption_margin_loss(img, txt, neg, valid, margin=0.5)
    denominator = valid.sum() / 2
    shards = [slice(0, 4), slice(4, 8)]
    per_rank = [caption_margin_loss(img[s], txt[s], neg[s], valid[s], 0.5, denominator) for s in shards]
    assert math.isclose((sum(per_rank) / 2).item(), whole.item(), rel_tol=1e-12)
    # each rank's own mean would weigh rank 0's single item as much as rank 1's four
    own = [caption_margin_loss(img[s], txt[s], neg[s], valid[s], 0.5) for s in shards]
    assert not math.isclose((sum(own) / 2).item(), whole.item(), rel_tol=1e-3)

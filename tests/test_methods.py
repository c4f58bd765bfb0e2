"""Every registered method takes a finite step on the tiny model and moves what it should; the methods'
loss terms match direct computations on hand-made batches; their negatives are false of the scene."""
from __future__ import annotations

import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from datamodules.datamodule import collate
import configs
from methods import METHODS
from methods.clip import CLIP
from methods.losses import caption_margin_loss, contrastive_loss, max_violation_hinge
from methods.train import build

SMALL = {"structureclip": ["method.kee_layers=2"]}


def batch_of(make_cfg, method: str, *argv: str, n: int = 8):
    cfg = make_cfg(f"method={method}", *SMALL.get(method, []), *argv)
    module, dm = build(cfg)
    random.seed(0)
    ds = dm.dataset("train")
    return module, collate([ds[i] for i in range(n)])


@pytest.mark.parametrize("method", METHODS.names())
def test_no_step_adds_gradients_with_a_racing_kernel(make_cfg, method, tmp_path):
    """A seed gives one run: no step (forward and backward) adds floats onto repeated places with
    `index_put(accumulate=True)`, the backward of indexing a tensor with a tensor. On a CPU with more than one
    thread its kernel adds with atomics in parallel, so where an index repeats, the sum's order (and its rounding)
    changes from run to run: MSG-CLIP's runs at one seed differed from the third step on until its text rows were
    gathered with index_select, whose backward adds in index order. An index that never repeats is harmless
    (open_clip pools each caption at one position so)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    module, batch = batch_of(make_cfg, method, f"cache_dir={tmp_path}", n=16)
    racing: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "index_put" in func.overloadpacket.__name__:
                accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
                if accumulate and args[0].is_floating_point():
                    index = torch.stack(torch.broadcast_tensors(*[i for i in args[1] if i is not None])).flatten(1)
                    if index.unique(dim=1).shape[1] < index.shape[1]:  # some place gets two or more additions
                        racing.append(f"{func} onto {tuple(args[0].shape)}")
            return func(*args, **kwargs)

    with Watch():
        loss, _ = module.training_loss(batch)
        loss.backward()
    assert not racing, racing


@pytest.mark.parametrize("method", METHODS.names())
def test_one_finite_step_moves_every_trainable_parameter(make_cfg, method, tmp_path):
    module, batch = batch_of(make_cfg, method, f"cache_dir={tmp_path}")
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss, terms = module.training_loss(batch)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert any(k.endswith("_loss") for k in terms)
    loss.backward()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    no_grad = {n for n, p in module.named_parameters() if p.requires_grad and p.grad is None}
    assert not no_grad, f"trainable parameters no loss term reaches (DDP would stall on them): {sorted(no_grad)}"
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable
    assert any(n.startswith("model.visual") for n in moved) and any(n.startswith("model.transformer") for n in moved)
    if method == "structureclip":
        assert any(n.startswith("kee.layers") for n in moved) and "model.logit_scale" not in moved


def test_negclip_batch_is_2b_images_against_4b_texts(make_cfg, tmp_path):
    module, batch = batch_of(make_cfg, "negclip", f"cache_dir={tmp_path}")
    feats = module.encode(batch)
    assert feats["image_features"].shape[0] == 16 and feats["text_features"].shape[0] == 16
    assert feats["neg_text_features"].shape[0] == 16 and feats["neg_valid"].all()
    # the second half of the images are the items' neighbours, with their own captions
    assert not torch.equal(batch["hard_image"], batch["image"]) and batch["hard_text"].shape == batch["text"].shape


@torch.no_grad()
def test_negclip_loss_puts_the_hard_negative_captions_in_the_image_to_text_logits(make_cfg, tmp_path):
    """On a real batch, NegCLIP's contrastive term is the pure loss over the 2B images (items, then their
    neighbours) and their 2B captions, with the 2B hard negative captions (the items', then the neighbours')
    as extra image->text columns, masked where a negative is missing; it is not plain CLIP's loss."""
    module, batch = batch_of(make_cfg, "negclip", f"cache_dir={tmp_path}")
    module.eval()  # no dropout: the test's own encoding gives the module's features
    b = batch["image"].shape[0]
    feats = module.encode(batch)
    # the features, encoded here from the batch itself (not read off NegCLIP.encode's layout)
    img = module.encode_image_tensor(torch.cat([batch["image"], batch["hard_image"]]))  # (2B, D)
    txt = module.encode_text_tokens(torch.cat([batch["text"], batch["hard_text"]]))  # (2B, D)
    neg = module.encode_text_tokens(torch.cat([batch["neg_text"], batch["hard_neg_text"]]))  # (2B, D)
    valid = torch.cat([batch["has_neg"], batch["hard_has_neg"]]).bool()  # (2B,)
    scale = module.model.logit_scale.exp()
    assert img.shape[0] == txt.shape[0] == neg.shape[0] == 2 * b
    for key, mine in [("image_features", img), ("text_features", txt), ("neg_text_features", neg)]:
        torch.testing.assert_close(feats[key], mine, rtol=1e-4, atol=1e-5)
    assert torch.equal(feats["neg_valid"], valid)

    def expected(neg_valid):
        return contrastive_loss(img, txt, img, txt, scale, all_extra_text=neg, all_extra_valid=neg_valid)

    plain = contrastive_loss(img, txt, img, txt, scale)
    got = module.loss_terms(batch, feats)["contrastive_loss"]
    torch.testing.assert_close(got, expected(valid), rtol=1e-4, atol=1e-5)
    assert got - plain > 1e-2, "the hard negative captions do not enter the loss"
    # a negative marked missing leaves the softmax: the module follows neg_valid, not the ids it holds
    some = valid.clone()
    some[::2] = False
    masked = module.loss_terms(batch, dict(feats, neg_valid=some))["contrastive_loss"]
    torch.testing.assert_close(masked, expected(some), rtol=1e-4, atol=1e-5)
    assert got - masked > 1e-3 and masked - plain > 1e-3


def test_negclip_hard_image_is_a_neighbour_with_its_own_captions(make_cfg, tmp_path):
    """Each item's hard image is the transformed image of one of its rows of the neighbour table, and its
    hard caption is a caption of that neighbour (its hard negative a negative of that caption)."""
    module, dm = build(make_cfg("method=negclip", f"cache_dir={tmp_path}"))
    table = dm.field_options["neighbours"]
    ds = dm.dataset("train")
    kinds = set(module.mcfg.negative_kinds)
    tok = lambda t: module.tokenizer([t])[0]  # noqa: E731
    picked = set()
    for i in range(16):
        item = ds[i]
        row = table[i].tolist()
        assert i not in row
        images = {j: ds.transform(ds.source[j].image) for j in row}
        hits = [j for j in row if torch.equal(item["hard_image"], images[j])]
        assert hits, f"item {i}: the hard image is none of its neighbours {row}"
        assert not torch.equal(item["hard_image"], item["image"])
        ok = False
        for j in hits:
            other = ds.source[j]
            for k, caption in enumerate(other.captions):
                if not torch.equal(item["hard_text"], tok(caption)):
                    continue
                negs = {n for kind, v in other.extra["negative_captions"](k).items() if kind in kinds and v
                        for n in (v if isinstance(v, list) else [v])}
                if item["hard_has_neg"]:
                    ok |= any(torch.equal(item["hard_neg_text"], tok(n)) for n in negs)
                else:
                    ok |= not negs and torch.equal(item["hard_neg_text"], item["hard_text"])
            picked.add(row.index(j))
        assert ok, f"item {i}: hard_text/hard_neg_text are not a caption of neighbour {hits} and its negative"
    assert len(picked) > 1  # drawn among the neighbours, not always the same column


def test_negclip_neighbours_are_nearest_and_cached(make_cfg, tmp_path):
    cfg = make_cfg("method=negclip", f"cache_dir={tmp_path}")
    module, dm = build(cfg)
    table = dm.field_options["neighbours"]
    ds = dm.dataset("train")
    assert table.shape == (len(ds), 3) and not (table == torch.arange(len(ds))[:, None]).any()
    with torch.no_grad():
        feats = module.encode_image_tensor(torch.stack([ds.transform(ds.source[i].image) for i in range(len(ds))]))
    sims = feats @ feats.T
    sims.fill_diagonal_(-2)
    torch.testing.assert_close(sims.topk(3, dim=1).values, sims.gather(1, table))
    assert len(list(tmp_path.glob("neighbours-*.pt"))) == 1
    assert torch.equal(module.neighbour_table(ds), table)  # read back from the cache


def test_negclip_neighbours_ignore_augmentation_and_follow_the_weights_file(make_cfg, tmp_path):
    """The table is of the starting model's evaluation view (data.augment's random crops do not change it), and a
    weights file rewritten under the same name gives a new table, not the cached one."""
    torch.manual_seed(0)  # the same starting weights for both
    ref, dm = build(make_cfg("method=negclip", f"cache_dir={tmp_path / 'a'}"))
    torch.manual_seed(0)
    augmented, dm_aug = build(make_cfg("method=negclip", "data.augment=true", f"cache_dir={tmp_path / 'b'}"))
    assert torch.equal(dm_aug.field_options["neighbours"], dm.field_options["neighbours"])
    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    torch.save(CLIP(configs.to_plain(make_cfg())).model.state_dict(), weights)
    first = build(make_cfg("method=negclip", f"model.pretrained={weights}", f"cache_dir={tmp_path / 'c'}"))[1]
    torch.manual_seed(2)
    torch.save(CLIP(configs.to_plain(make_cfg())).model.state_dict(), weights)
    second = build(make_cfg("method=negclip", f"model.pretrained={weights}", f"cache_dir={tmp_path / 'c'}"))[1]
    assert not torch.equal(first.field_options["neighbours"], second.field_options["neighbours"])
    assert len(list((tmp_path / "c").glob("neighbours-*.pt"))) == 2


def test_negclip_loss_is_the_reference_2b_by_4b_loss():
    """NegCLIP's reference: logits 2B x 4B; CE over all texts for images, over the first 2B for texts."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1)  # 2B = 4
    txt = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)  # 4B = 8
    s = 5.0
    logits = s * img @ txt.T  # (4, 8)
    labels = torch.arange(4)
    reference = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T[:4], labels)) / 2
    got = contrastive_loss(img, txt[:4], img, txt[:4], torch.tensor(s, dtype=torch.float64), all_extra_text=txt[4:])
    torch.testing.assert_close(got, reference)
    # a missing negative drops out of the softmax
    valid = torch.tensor([True, False, True, True])
    masked = contrastive_loss(img, txt[:4], img, txt[:4], torch.tensor(s, dtype=torch.float64),
                              all_extra_text=txt[4:], all_extra_valid=valid)
    keep = [0, 1, 2, 3, 4, 6, 7]
    ref2 = (F.cross_entropy(logits[:, keep], labels) + F.cross_entropy(logits.T[:4], labels)) / 2
    torch.testing.assert_close(masked, ref2)


def test_hinge_and_margin_losses_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    s = img @ txt.T  # s[i, j] = image i with caption j
    expected = 0.0
    for i in range(3):
        hardest_caption = max(s[i, j] for j in range(3) if j != i)
        hardest_image = max(s[j, i] for j in range(3) if j != i)
        expected += max(0.0, 0.2 + hardest_caption - s[i, i]) + max(0.0, 0.2 + hardest_image - s[i, i])
    got = max_violation_hinge(img, txt, img, txt, margin=0.2)
    assert math.isclose(got.item(), expected / 3, rel_tol=1e-6)
    warm = sum(max(0.0, 0.2 + max(s[i, j] for j in range(3) if j != i) - s[i, i])
               + max(0.0, 0.2 + float(s[:, i].mean()) - s[i, i]) for i in range(3))
    assert math.isclose(max_violation_hinge(img, txt, img, txt, margin=0.2, mean_images=True).item(), warm / 3,
                        rel_tol=1e-6)
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    pos_scores, neg_scores = (img * txt).sum(1), (img * neg).sum(1)
    by_hand = [max(0.0, 0.1 - (p - n)) for p, n in zip(pos_scores.tolist(), neg_scores.tolist())]
    assert math.isclose(caption_margin_loss(img, txt, neg).item(), sum(by_hand) / 3, rel_tol=1e-6)
    valid = torch.tensor([1.0, 0.0, 1.0])
    assert math.isclose(caption_margin_loss(img, txt, neg, valid).item(), (by_hand[0] + by_hand[2]) / 2, rel_tol=1e-6)


@pytest.mark.parametrize("method,kinds", [("negclip", ["relation", "attribute", "noun"]),  # no ARO shuffle by default
                                          ("structureclip", ["relation", "attribute"])])
def test_negative_captions_are_false_and_of_the_allowed_kinds(make_cfg, tmp_path, method, kinds):
    cfg = make_cfg(f"method={method}", *SMALL.get(method, []), f"cache_dir={tmp_path}", "data.caption_sampling=first")
    module, dm = build(cfg)
    ds = dm.dataset("train")
    random.seed(1)
    for i in range(16):
        item, sample = ds[i], ds.source[i]
        allowed = {v for k, v in sample.extra["negative_captions"](0).items() if k in kinds}
        (neg,) = [t for t in allowed if torch.equal(module.tokenizer([t])[0], item["neg_text"])]
        assert neg not in sample.captions and item["has_neg"]


def test_structureclip_knowledge_encoder_shapes_and_test_time_switch(make_cfg):
    module, batch = batch_of(make_cfg, "structureclip")
    graphs = list(batch["graph"])  # the shapes world's canonical captions: each caption's graph is the scene's
    k = module.kee.encode_graphs(graphs + [None])
    assert k.shape == (9, module.model.text_projection.shape[1])
    torch.testing.assert_close(k[:8].norm(dim=-1), torch.ones(8))
    assert torch.equal(k[8], torch.zeros_like(k[8]))  # a caption without a graph gets no knowledge vector
    module.eval()
    with_kee = module.encode_captions(batch["caption"], graphs)
    module.set_eval_variant(kee_at_test=False)
    plain = module.encode_captions(batch["caption"], graphs)
    torch.testing.assert_close(with_kee - plain, 0.2 * module.kee.encode_graphs(graphs))
    assert set(module.eval_variants()) == {"", "plain"}


def test_structureclip_batch_brings_each_captions_triples_as_token_ids(make_cfg):
    """The triples travel with the batch as token ids (built in the workers), from the drawn caption's own graph."""
    cfg = make_cfg("method=structureclip", *SMALL["structureclip"])
    module, dm = build(cfg)
    ds = dm.dataset("train")
    random.seed(0)
    batch = collate([ds[i] for i in range(8)])
    assert batch["triple_ids"].shape == (8, 6, 3, 8) and batch["triple_mask"].shape == (8, 6)
    for i in range(8):
        sample = ds.source[i]
        graph = sample.extra["caption_graphs"][sample.captions.index(batch["caption"][i])]
        triples = graph.triples(6)
        assert int(batch["triple_mask"][i].sum()) == len(triples) >= 1
        expected = module.tokenizer([e for t in triples for e in t], context_length=8).view(len(triples), 3, 8)
        assert torch.equal(batch["triple_ids"][i, : len(triples)], expected)
        empty = module.tokenizer([""], context_length=8)[0]  # an empty slot holds the tokens of "" (masked out)
        assert all(torch.equal(e, empty) for e in batch["triple_ids"][i, len(triples):].flatten(0, 1))
    module.eval()
    graphs = [ds.source[i].extra["caption_graphs"][ds.source[i].captions.index(c)] for i, c in enumerate(batch["caption"])]
    torch.testing.assert_close(module.kee(batch["triple_ids"], batch["triple_mask"]), module.kee.encode_graphs(graphs))


def test_unknown_negative_kind_is_rejected(make_cfg):
    with pytest.raises(ValueError, match="unknown negative kinds.*available"):
        build(make_cfg("method=negclip", "method.negative_kinds=[colour]"))


@pytest.mark.parametrize("method", METHODS.names())
def test_loss_terms_run_in_float32_under_bf16_autocast(make_cfg, method):
    """The towers run in bf16 under autocast; the loss terms get float32 features and compute in float32, so
    a logit is not rounded to bf16 (spacing 0.5 near a scale of 100): the loss equals a float64 computation
    on the same features."""
    module, batch = batch_of(make_cfg, method)
    module.train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = module.training_loss(batch)
        torch.manual_seed(0)
        feats = module.encode(batch)  # the same features (the same dropout draws)
    assert any(v.dtype == torch.bfloat16 for v in feats.values() if torch.is_tensor(v))  # the towers ran in bf16
    wide = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in feats.items()}
    module.double()
    reference = sum(v for k, v in module.loss_terms(batch, wide).items() if k.endswith("_loss"))
    module.float()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)


def test_a_benchmark_that_gives_no_scene_graphs_says_so_for_the_knowledge_encoders_row(make_cfg, tmp_path):
    """Structure-CLIP's row with the KEE equals its plain row wherever the captions come without a graph (Syn-Order's
    shuffles; ARO files without Structure-CLIP's triples): the report says so instead of implying the KEE ran."""
    from benchmarks.run import bench_module

    cfg = make_cfg("method=structureclip", "method.kee_layers=1", "data.options.test_size=20")
    module, _ = build(cfg)
    module.eval()
    bench = configs.compose("bench", ["bench.benchmarks=[syn_order,syn_relation]", "bench.batch_size=64"])
    rows, _, notes = bench_module(module, cfg, bench, "run", "run")
    assert [r["method"] for r in rows] == ["structureclip", "structureclip/plain"]
    assert any(re.match(r"structureclip on syn_order: (\d+) of \1 captions had no scene graph", n) and
               "equals the plain variant's" in n for n in notes)  # every distinct option of the 20 cases
    assert not any("structureclip on syn_relation" in n for n in notes)  # its captions carry their graphs
    assert not any(n.startswith("structureclip/plain on") for n in notes)


def test_structureclip_hinge_warm_up_is_the_first_steps_of_the_first_epoch(make_cfg, monkeypatch):
    """As released (`epoch == 0 and i < 100`): at 64 batches an epoch, epoch 1's first step takes the hardest image,
    not the mean over images."""
    module, batch = batch_of(make_cfg, "structureclip", *SMALL["structureclip"])
    at = {"current_epoch": 0, "global_step": 0}
    for name in at:
        monkeypatch.setattr(type(module), name, property(lambda self, n=name: at[n]))
    with torch.no_grad():
        feats = module.encode(batch)

        def hinge(epoch: int, step: int) -> torch.Tensor:
            at.update(current_epoch=epoch, global_step=step)
            return module.loss_terms(batch, feats)["hinge_loss"]

        warm, hard = hinge(0, 50), hinge(0, 100)
        assert not torch.equal(warm, hard)
        torch.testing.assert_close(hinge(1, 64), hard)


def test_steptime_times_each_method_on_its_loaders_batches(monkeypatch):
    """methods.steptime: a median per method, on the batch the method's loader would make (tokens cut)."""
    from methods import steptime
    from tests_support import TINY_ARGS

    seen = []
    original = steptime.build

    def spy(cfg):
        module, dm = original(cfg)
        seen.append(dm.collate_fn().keywords["trim_text"])
        return module, dm

    monkeypatch.setattr(steptime, "build", spy)
    medians = steptime.time_steps(["clip", "msgclip"], [*TINY_ARGS, "data.batch_size=8"], steps=1, rounds=2)
    assert set(medians) == {"clip", "msgclip"} and all(t > 0 for t in medians.values())
    assert seen and all(t > 0 for t in seen)

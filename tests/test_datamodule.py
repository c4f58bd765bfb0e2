"""DataModule batches have the promised fields, shapes and contents, for any requested extra field."""
from __future__ import annotations

import pytest
import torch

from datamodules import FIELDS
from datamodules.datamodule import HostList
from datamodules.graph import SceneGraph
from methods.train import build


@pytest.fixture
def built(make_cfg):
    cfg = make_cfg()
    module, dm = build(cfg)
    return cfg, module, dm


def test_train_batch_fields_and_shapes(built):
    cfg, module, dm = built
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b, size, ctx = cfg.data.batch_size, cfg.model.arch.vision_cfg.image_size, cfg.model.arch.text_cfg.context_length
    assert batch["image"].shape == (b, 3, size, size) and batch["image"].dtype == torch.float32
    full = module.tokenizer(batch["caption"])  # (b, ctx)
    longest = int((full != 0).sum(dim=1).max())  # start, words, end
    keep = min(ctx, -(-longest // cfg.data.trim_text) * cfg.data.trim_text)
    assert keep < ctx and batch["text"].shape == (b, keep) and batch["text"].dtype == torch.long
    assert len(batch["caption"]) == b and all(isinstance(c, str) for c in batch["caption"])
    assert isinstance(batch["graph"], HostList) and all(isinstance(g, SceneGraph) for g in batch["graph"])
    assert batch["index"].shape == (b,)
    # the text is the model's tokenization of the caption cut after the longest caption (only padding cut), the
    # image the model's preprocessing of the sample
    torch.testing.assert_close(batch["text"], full[:, :keep])
    assert (full[:, keep:] == 0).all()
    src = dm.dataset("train").source
    i = int(batch["index"][0])
    assert batch["caption"][0] in src[i].captions
    torch.testing.assert_close(batch["image"][0], module.preprocess_val(src[i].image))


def test_training_drops_the_last_partial_batch(make_cfg):
    cfg = make_cfg("data.options.train_size=20", "data.batch_size=8")
    _, dm = build(cfg)
    dm.setup("fit")
    sizes = [len(b["index"]) for b in dm.train_dataloader()]
    assert sizes == [8, 8]
    assert sum(len(b["index"]) for b in dm.val_dataloader()) == cfg.data.options.val_size


def test_extra_fields_on_request(make_cfg):
    cfg = make_cfg()
    module, _ = build(cfg)
    from datamodules import CaptionDataModule

    dm = CaptionDataModule(cfg.data, preprocess_train=module.preprocess_train, preprocess_val=module.preprocess_val,
                           tokenizer=module.tokenizer, extra_fields=("boxes", "partial_text"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b = cfg.data.batch_size
    assert batch["boxes"].shape == (b, 8, 4) and batch["partial_text"].shape == batch["text"].shape
    # boxes are the graph's boxes as fractions of the image; padding is -1
    g, box = batch["graph"][0], batch["boxes"][0]
    size = cfg.data.options.image_size
    torch.testing.assert_close(box[0], torch.tensor(g.objects[0].box) / size)
    assert (box[len(g.objects):] == -1).all()


def test_unknown_field_lists_the_known_ones(make_cfg):
    cfg = make_cfg()
    module, _ = build(cfg)
    from datamodules import CaptionDataModule

    with pytest.raises(KeyError, match="unknown batch field 'nosuch'; available: " + ", ".join(FIELDS.names())):
        CaptionDataModule(cfg.data, preprocess_train=module.preprocess_train, preprocess_val=module.preprocess_val,
                          tokenizer=module.tokenizer, extra_fields=("nosuch",))


@pytest.mark.parametrize("method", ["clip", "negclip"])
def test_images_cross_as_bytes_and_are_normalised_on_the_device_to_the_bit(make_cfg, tmp_path, method):
    """normalize_on_device: the workers stop before ToTensor (uint8 images, a method's hard images too), the
    batch hook finishes them, and the result equals the model transform run in the workers, bit for bit."""
    import random

    from datamodules.datamodule import collate

    _, dm = build(make_cfg(f"method={method}", "data.normalize_on_device=true", f"cache_dir={tmp_path}"))
    dm.setup("fit")
    loader = dm.train_dataloader()  # the loader decides: images leave the workers as uint8
    ds = dm.dataset("train")
    random.seed(0)
    items = [ds[i] for i in range(4)]
    assert items[0]["image"].dtype == torch.uint8
    random.seed(0)
    ds.host_transform = None
    full = collate([ds[i] for i in range(4)])
    finished = dm.on_after_batch_transfer(collate(items), 0)
    for key in ("image", "hard_image") if method == "negclip" else ("image",):
        assert finished[key].dtype == torch.float32 and torch.equal(finished[key], full[key]), key
    assert loader.prefetch_factor is None  # no workers in the tests: no prefetching either


def test_a_run_with_images_normalised_in_the_batch_hook_trains(make_cfg):
    """The Trainer calls the DataModule's hook: a uint8 image would fail in the model's first convolution."""
    from methods.train import train

    run = train(make_cfg("data.normalize_on_device=true", "trainer.limit_train_batches=2", "trainer.max_epochs=1"))
    assert (run / "done.json").is_file()


@pytest.mark.parametrize("method", ["clip", "negclip", "structureclip", "msgclip"])
def test_cut_caption_tokens_leave_every_text_feature_unchanged(make_cfg, method):
    """The loader cuts caption tokens after the batch's longest caption; each caption field keeps one common
    length, and the text features of the cut batch equal those of the full context (causal tower, end-token
    pooling)."""
    from datamodules.fields import CAPTION_TOKEN_FIELDS

    cfg = make_cfg(f"method={method}")
    module, dm = build(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ctx = cfg.model.arch.text_cfg.context_length
    fields = [k for k in CAPTION_TOKEN_FIELDS if k in batch]
    lengths = {batch[k].shape[-1] for k in fields}
    assert len(lengths) == 1 and lengths.pop() < ctx and len(fields) >= 1
    module.eval()
    with torch.no_grad():
        for k in fields:
            cut = batch[k].flatten(0, -2)
            full = torch.nn.functional.pad(cut, (0, ctx - cut.shape[1]))
            torch.testing.assert_close(module.encode_text_tokens(cut), module.encode_text_tokens(full))
            torch.testing.assert_close(module.encode_text_tokens(full), module.model.encode_text(full, normalize=True))


def test_smartclip_and_trim_zero_keep_the_full_context(make_cfg):
    """SmartCLIP's mask network reads every position, so its captions are never cut; trim_text=0 cuts nothing."""
    for args in (("method=smartclip",), ("data.trim_text=0",)):
        cfg = make_cfg(*args)
        module, dm = build(cfg)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["text"].shape[-1] == cfg.model.arch.text_cfg.context_length, args


def test_validation_asks_each_caption_against_its_relation_and_attribute_swap(make_cfg):
    """Each validation item brings its canonical caption's relation swap (subject and object exchanged) and its
    attribute swap (the two objects' attributes exchanged), both read here with our own parse of the template;
    training and test items do not."""
    from tests_support import CLAUSE

    article = lambda phrase: ("an" if phrase[0] in "aeiou" else "a") + " " + phrase  # noqa: E731
    module, dm = build(make_cfg())
    dm.setup("fit")
    val = dm.dataset("val")
    for i in range(8):
        item, caption = val[i], val.source[i].captions[0]
        m = CLAUSE[0].match(caption)
        (*attrs_s, name_s), (*attrs_o, name_o) = m["s"].split(), m["o"].split()
        relation_swap = f"{article(m['o'])} {m['p']} {article(m['s'])}"
        attribute_swap = f"{article(' '.join(attrs_o + [name_s]))} {m['p']} {article(' '.join(attrs_s + [name_o]))}"
        assert item["swap_valid"].tolist() == [True, attrs_s != attrs_o]
        assert torch.equal(item["swap_text"][0], module.tokenizer([relation_swap])[0])
        assert torch.equal(item["swap_text"][1], module.tokenizer([attribute_swap if attrs_s != attrs_o else caption])[0])
    assert "swap_text" not in dm.dataset("train")[0]
    dm.setup("test")
    assert "swap_text" not in dm.dataset("test")[0]


def test_validation_swap_accuracy_counts_every_item_once_and_ties_as_wrong(make_cfg, tmp_path):
    """val/relation_swap_acc and val/attribute_swap_acc over batches of unequal size equal the fraction of
    validation images that score their caption strictly above its swap, computed here item by item."""
    import lightning as L

    cfg = make_cfg("data.options.val_size=30", "data.eval_batch_size=12")  # batches of 12, 12 and 6
    module, dm = build(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    metrics = trainer.validate(module, dm, verbose=False)[0]
    val = dm.dataset("val")
    module.eval()
    right = torch.zeros(2)
    with torch.no_grad():
        for i in range(len(val)):
            item = val[i]
            img = module.encode_image_tensor(item["image"][None])[0]
            texts = module.encode_text_tokens(torch.cat([item["text"][None], item["swap_text"]]))
            scores = texts @ img
            right += (scores[1:] < scores[0]).float()
    assert metrics["val/relation_swap_acc"] == pytest.approx(right[0].item() / len(val), abs=1e-6)
    assert metrics["val/attribute_swap_acc"] == pytest.approx(right[1].item() / len(val), abs=1e-6)

    # a text tower that cannot tell a caption from its swaps ties every one: all wrong
    module.encode_text_tokens = lambda tokens: torch.nn.functional.normalize(
        torch.ones(len(tokens), module.model.text_projection.shape[1]), dim=-1)
    metrics = trainer.validate(module, dm, verbose=False)[0]
    assert metrics["val/relation_swap_acc"] == 0.0 and metrics["val/attribute_swap_acc"] == 0.0


def test_under_ddp_each_rank_validates_every_wth_item_once():
    """Lightning's DistributedSampler pads the split to even the ranks out (an item counted twice); the lab's
    Shard gives each item to one rank, in order."""
    from datamodules.datamodule import Shard

    shards = [list(Shard(range(9), r, 2)) for r in range(2)]
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7]] and [len(Shard(range(9), r, 2)) for r in range(2)] == [5, 4]
    with pytest.raises(ValueError, match="validation split has 1 items for 2 processes"):
        Shard(range(1), 0, 2)


def test_swap_accuracies_on_two_processes_equal_one_process(tmp_path):
    """The validation swap probes count every held-out item once under DDP (9 items on 2 ranks: 5 and 4), so
    the accuracies equal one process's on the same weights."""
    import lightning as L

    from methods.train import build, compose_train

    def validate(devices):
        torch.manual_seed(0)
        cfg = compose_train(["data.num_workers=0", "data.options.val_size=9", "data.eval_batch_size=4",
                             f"cache_dir={tmp_path}"])
        module, dm = build(cfg)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        return trainer.validate(module, datamodule=dm, verbose=False)[0]

    one, two = validate(1), validate(2)
    for key in ("val/relation_swap_acc", "val/attribute_swap_acc"):
        assert float(two[key]) == pytest.approx(float(one[key]), abs=1e-6), key

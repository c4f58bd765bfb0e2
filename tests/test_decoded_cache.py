"""The decoded-image cache gives the tensors the JPEG path gives, decodes each file once, and survives a torn
cache file; boxes keep the file's pixel frame."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from datamodules import decoded
from datamodules.decoded import DecodedCache, image_size, leading_resize
from datamodules.fields import crop_box
from datamodules.images import BadInput
from fixtures.make_train_data import make_coco
from methods.train import build, compose_train


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.create_model_and_transforms("ViT-B-32")[2]  # Resize(224, bicubic), CenterCrop, Normalize


def photo(path, size=(320, 240), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def test_cached_images_give_the_same_tensors_and_decode_once(tmp_path, preprocess, monkeypatch):
    files = [photo(tmp_path / f"{k}.jpg", size, k) for k, size in enumerate([(320, 240), (240, 320), (300, 300)])]
    cache = DecodedCache(tmp_path / "cache", leading_resize(preprocess))
    first = [cache.get(f, f"f{k}") for k, f in enumerate(files)]
    assert cache.misses == 3 and cache.hits == 0
    decodes = []
    monkeypatch.setattr(decoded, "load_image", lambda *a: decodes.append(a))  # a second pass must not decode
    again = [cache.get(f, f"f{k}") for k, f in enumerate(files)]
    assert cache.hits == 3 and not decodes
    for f, a, b in zip(files, first, again):
        with Image.open(f) as im:
            original = im.convert("RGB")
        expected = preprocess(original)
        torch.testing.assert_close(preprocess(a), expected, rtol=0, atol=0)
        torch.testing.assert_close(preprocess(b), expected, rtol=0, atol=0)
        assert image_size(b) == original.size and min(b.size) == 224
        box = (30.0, 40.0, 100.0, 80.0)
        assert crop_box(box, image_size(b)) == crop_box(box, original.size)


def test_a_changed_or_torn_file_is_decoded_again_and_a_missing_one_is_named(tmp_path, preprocess):
    f = photo(tmp_path / "a.jpg")
    cache = DecodedCache(tmp_path / "cache", leading_resize(preprocess))
    cache.get(f, "a")
    cache.path_of(f).write_bytes(b"torn")
    torch.testing.assert_close(preprocess(cache.get(f, "a")), preprocess(Image.open(f).convert("RGB")))
    assert cache.misses == 2
    whole = cache.path_of(f).read_bytes()
    for torn in (whole[: len(whole) // 2], b""):  # cut short (not a zip any more), or empty
        cache.path_of(f).write_bytes(torn)
        torch.testing.assert_close(preprocess(cache.get(f, "a")), preprocess(Image.open(f).convert("RGB")))
    assert cache.misses == 4
    photo(f, (200, 260), seed=3)  # a new file under the same name: a new key
    assert cache.get(f, "a").info["original_size"] == (200, 260)
    with pytest.raises(BadInput, match="rec 7: image not found"):
        cache.get(tmp_path / "nope.jpg", "rec 7")


def test_datamodule_batches_are_the_same_with_the_cache(tmp_path):
    make_coco(tmp_path / "coco", counts={"train": 8, "restval": 0, "val": 2, "test": 2})
    batches = []
    for cached in (False, True, True):  # off; on (filling); on (reading)
        cfg = compose_train([f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "data=coco",
                             f"data.options.root={tmp_path / 'coco'}", "data.batch_size=4", "data.num_workers=0",
                             "trainer=debug", f"data.image_cache={str(cached).lower()}"])
        _, dm = build(cfg)
        dm.prepare_data()
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
        if cached:
            assert dm.dataset("train").source.decoded is not None
    for b in batches[1:]:
        torch.testing.assert_close(b["image"], batches[0]["image"], rtol=0, atol=0)
    assert any((tmp_path / "cache" / "decoded").rglob("*.npz"))


def test_the_cache_refuses_random_crops(tmp_path):
    make_coco(tmp_path / "coco")
    cfg = compose_train([f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "data=coco",
                         f"data.options.root={tmp_path / 'coco'}", "data.image_cache=true", "data.augment=true"])
    _, dm = build(cfg)
    dm.prepare_data()
    with pytest.raises(ValueError, match="data.augment=true crops the original pixels"):
        dm.dataset("train")

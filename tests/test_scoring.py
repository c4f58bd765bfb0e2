"""The scoring core against hand computations: tie rules, option scores, Recall@k in both directions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.scoring import (choice_accuracy, choice_correct, encode_image_dataset, encode_unique_texts,
                                recall_at_k, retrieval_metrics, score_options)

SCORES = torch.tensor([
    [0.9, 0.1, 0.2],  # option 0 wins
    [0.5, 0.5, 0.1],  # options 0 and 1 tie
    [0.2, 0.7, 0.3],  # option 1 wins
    [0.4, 0.4, 0.4],  # three-way tie
])


def test_tie_rules_by_hand():
    assert choice_correct(SCORES, 0, ties="wrong").tolist() == [True, False, False, False]
    assert choice_correct(SCORES, 0, ties="right").tolist() == [True, True, False, True]
    assert choice_correct(SCORES, 1, ties="wrong").tolist() == [False, False, True, False]
    assert choice_correct(SCORES, 1, ties="right").tolist() == [False, True, True, True]
    per_row = torch.tensor([0, 1, 2, 2])
    assert choice_correct(SCORES, per_row, ties="wrong").tolist() == [True, False, False, False]
    assert choice_correct(SCORES, per_row, ties="right").tolist() == [True, True, False, True]
    assert choice_accuracy(SCORES, 0, ties="right") == 0.75


def test_bad_arguments():
    with pytest.raises(ValueError, match="ties must be"):
        choice_correct(SCORES, 0, ties="half")
    with pytest.raises(TypeError):
        choice_correct(SCORES, 0)  # the tie rule has no default on purpose
    with pytest.raises(ValueError, match="true_index"):
        choice_correct(SCORES, 3, ties="wrong")


def test_score_options_is_a_dot_product_per_option():
    g = torch.Generator().manual_seed(0)
    img, opts = torch.randn(5, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    expected = torch.tensor([[float(img[n] @ opts[n, k]) for k in range(3)] for n in range(5)])
    torch.testing.assert_close(score_options(img, opts), expected)


def test_recall_with_five_captions_per_image_by_hand():
    """3 images, 5 captions each (caption t belongs to image t // 5); scores set by hand (rows = captions):
    rows 0-4 (image 0) [0.9, 0.5, 0.1], but row 0 is [0.99, 0.95, 0.1]; rows 5-9 (image 1) [0.2, 0.8, 0.9];
    rows 10-12 (image 2) [0.1, 0.2, 0.7]; rows 13-14 (image 2) [0.6, 0.5, 0.3].
    text->image: image 0's captions all hit at 1; image 1's rank image 2 first, their own second; image 2's
    hit at 1 for 3 captions and only at 3 for 2. So R@1 = (5+0+3)/15, R@2 = (5+5+3)/15, R@3 = 1.
    image->text (columns): image 0's top caption is row 0, its own (hit at 1). Image 1's top is row 0 (0.95,
    image 0's), then rows 5-9 (0.8, its own): hit at 2. Image 2's top five are rows 5-9 (0.9, image 1's),
    then rows 10-12 (0.7, its own): hit at 6. So R@1 = 1/3, R@2 = R@5 = 2/3, R@6 = 1."""
    s = torch.full((15, 3), 0.0)
    s[0:5] = torch.tensor([0.9, 0.5, 0.1])
    s[0] = torch.tensor([0.99, 0.95, 0.1])
    s[5:10] = torch.tensor([0.2, 0.8, 0.9])
    s[10:13] = torch.tensor([0.1, 0.2, 0.7])
    s[13:15] = torch.tensor([0.6, 0.5, 0.3])
    pos = torch.zeros(15, 3, dtype=torch.bool)
    pos[torch.arange(15), torch.arange(15) // 5] = True
    t2i = recall_at_k(s, pos, ks=(1, 2, 3))
    assert t2i == pytest.approx({1: 8 / 15, 2: 13 / 15, 3: 1.0})
    i2t = recall_at_k(s.T, pos.T, ks=(1, 2, 5, 6, 99))
    assert i2t == pytest.approx({1: 1 / 3, 2: 2 / 3, 5: 2 / 3, 6: 1.0, 99: 1.0})
    m = retrieval_metrics(torch.eye(3), torch.eye(3), positives=pos, ks=(1,))  # the named-direction wrapper
    assert set(m) == {"image_retrieval_recall@1", "text_retrieval_recall@1"}


def test_retrieval_metrics_names_and_directions():
    """Features built so the score matrix is known: each caption points at its image, except caption 2
    (an image-1 caption that looks like image 0) and caption 4 (an image-2 caption that looks like image 1)."""
    img = torch.eye(3)  # (3, 3)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    txt = F.one_hot(owner, 3).float()
    txt[2] = torch.tensor([0.9, 0.2, 0.0])
    txt[4] = torch.tensor([0.0, 0.9, 0.3])
    m = retrieval_metrics(img, txt, owner, ks=(1, 2))
    # text->image: captions 2 and 4 miss at 1 and hit at 2 (their image has the second-best score)
    assert m["image_retrieval_recall@1"] == pytest.approx(4 / 6)
    assert m["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image->text: every image's best caption is its own (image 0: captions 0 and 1 score 1.0, caption 2 only
    # 0.9; image 1: caption 3 scores 1.0, caption 4 0.9; image 2: caption 5 scores 1.0, caption 4 0.3)
    assert m["text_retrieval_recall@1"] == pytest.approx(1.0)
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2)}
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))


class CountingEncoder:
    """A stub model: features are one-hot by a fixed vocabulary; it records what it was asked to encode."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.images = 0

    def encode_captions(self, texts, graphs=None):
        self.texts += texts
        return torch.stack([torch.tensor([len(t), t.count("a"), 1.0]) for t in texts])

    def encode_images(self, images):
        self.images += len(images)
        return images.flatten(1)[:, :3]


def test_each_distinct_caption_is_encoded_once_and_order_is_kept():
    enc = CountingEncoder()
    texts = ["a cat", "dog", "a cat", "banana", "dog", "a cat"]
    feats = encode_unique_texts(enc, texts, batch_size=2)
    assert sorted(enc.texts) == ["a cat", "banana", "dog"]
    for t, f in zip(texts, feats):
        torch.testing.assert_close(f, torch.tensor([len(t), t.count("a"), 1.0]))


def test_each_image_is_encoded_once_in_order():
    enc = CountingEncoder()
    images = [torch.full((3, 2, 2), float(i)) for i in range(7)]
    feats = encode_image_dataset(enc, images, batch_size=3)
    assert enc.images == 7 and feats[:, 0].tolist() == [float(i) for i in range(7)]

"""The scoring core against hand computations: tie rules, option scores, Recall@k in both directions, and
encoding each image and each distinct caption exactly once."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from benchmarks.scoring import (choice_accuracy, choice_correct, encode_image_dataset, encode_unique_texts,
                                recall_at_k, retrieval_metrics, score_options)

SCORES = torch.tensor([
    [0.9, 0.1, 0.2],  # option 0 wins
    [0.5, 0.5, 0.1],  # options 0 and 1 tie for the top
    [0.2, 0.7, 0.3],  # option 1 wins
    [0.4, 0.4, 0.4],  # three-way tie
    [0.3, 0.6, 0.6],  # options 1 and 2 tie for the top, option 0 loses
])


def test_tie_rules_by_hand():
    assert choice_correct(SCORES, 0, ties="wrong").tolist() == [True, False, False, False, False]
    assert choice_correct(SCORES, 0, ties="right").tolist() == [True, True, False, True, False]
    assert choice_correct(SCORES, 1, ties="wrong").tolist() == [False, False, True, False, False]
    assert choice_correct(SCORES, 1, ties="right").tolist() == [False, True, True, True, True]
    per_row = torch.tensor([0, 1, 2, 2, 2])
    assert choice_correct(SCORES, per_row, ties="wrong").tolist() == [True, False, False, False, False]
    assert choice_correct(SCORES, per_row, ties="right").tolist() == [True, True, False, True, True]
    assert choice_accuracy(SCORES, 0, ties="right") == pytest.approx(3 / 5)
    assert choice_accuracy(SCORES, 1, ties="wrong") == pytest.approx(1 / 5)
    # a float64 matrix and an int64 one give the same verdicts
    assert choice_correct(SCORES.double(), 1, ties="right").tolist() == [False, True, True, True, True]
    assert choice_correct(torch.tensor([[2, 2], [1, 3]]), 0, ties="right").tolist() == [True, False]


def test_bad_arguments():
    with pytest.raises(ValueError, match="ties must be one of"):
        choice_correct(SCORES, 0, ties="half")
    with pytest.raises(TypeError):
        choice_correct(SCORES, 0)  # the tie rule has no default on purpose
    with pytest.raises(TypeError):
        choice_correct(SCORES, 0, "wrong")  # and is keyword-only
    with pytest.raises(ValueError, match="true_index"):
        choice_correct(SCORES, 3, ties="wrong")
    with pytest.raises(ValueError, match="true_index"):
        choice_correct(SCORES, torch.tensor([0, 1]), ties="wrong")  # one per row, or one for all
    with pytest.raises(ValueError, match="at least 2 options"):
        choice_correct(SCORES[:, :1], 0, ties="wrong")


def test_score_options_is_a_dot_product_per_option():
    g = torch.Generator().manual_seed(0)
    img, opts = torch.randn(5, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    expected = torch.tensor([[float(img[n] @ opts[n, k]) for k in range(3)] for n in range(5)])
    torch.testing.assert_close(score_options(img, opts), expected)
    with pytest.raises(ValueError, match="expected"):
        score_options(img, opts[:4])


# 3 images, 5 captions each: caption t belongs to image t // 5. With image features = I (3x3) and these rows as
# text features, text_features @ image_features.T is exactly this matrix (rows = captions, columns = images).
# Within each row and within each column the values that decide a rank are distinct, so no tie order matters.
S = torch.tensor([
    [0.90, 0.95, 0.80],  # image 0's captions: rows 0 and 1 prefer image 1 (own image at rank 2)
    [0.89, 0.94, 0.79],
    [0.88, 0.00, 0.78],  # rows 2-4 rank their own image 0 first
    [0.87, 0.00, 0.77],
    [0.86, 0.00, 0.76],
    [0.00, 0.70, 0.75],  # image 1's captions: rows 5 and 6 prefer image 2 (own at rank 2)
    [0.00, 0.69, 0.74],
    [0.00, 0.68, 0.10],  # rows 7-9 rank image 1 first
    [0.00, 0.67, 0.10],
    [0.00, 0.66, 0.10],
    [0.00, 0.00, 0.60],  # image 2's captions: rows 10-13 rank image 2 first
    [0.00, 0.00, 0.59],
    [0.00, 0.00, 0.58],
    [0.00, 0.00, 0.57],
    [0.65, 0.62, 0.56],  # row 14 ranks its own image 2 last, at rank 3
])
OWNER = torch.arange(15) // 5
# text->image (rows): misses at 1 are rows 0, 1, 5, 6 (own at rank 2) and 14 (own at rank 3): R@1 = 10/15 = 2/3;
# at 2 only row 14 misses: R@2 = 14/15; k = 3, 5, 10 cover all 3 images: 1.
T2I = {1: 10 / 15, 2: 14 / 15, 3: 1.0, 5: 1.0, 10: 1.0}
# image->text (columns): image 0's best caption is row 0, its own: hit at 1.
# Image 1's column ranks rows 0 (0.95) and 1 (0.94), image 0's, above its own row 5 (0.70): first own at rank 3.
# Image 2's column ranks rows 0-4 (0.80..0.76, image 0's) and 5-6 (0.75, 0.74, image 1's) above its own row 10
# (0.60): first own at rank 8. So R@1 = 1/3; R@3 = R@5 = R@7 = 2/3; R@8 = R@10 = 1.
I2T = {1: 1 / 3, 3: 2 / 3, 5: 2 / 3, 7: 2 / 3, 8: 1.0, 10: 1.0}


def test_recall_at_k_by_hand_both_directions():
    pos = torch.zeros(15, 3, dtype=torch.bool)
    pos[torch.arange(15), OWNER] = True
    assert recall_at_k(S, pos, ks=tuple(T2I)) == pytest.approx(T2I)
    assert recall_at_k(S.T, pos.T, ks=tuple(I2T)) == pytest.approx(I2T)
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


def test_retrieval_metrics_by_hand_named_as_clip_benchmark():
    expected = {"image_retrieval_recall@1": 2 / 3, "image_retrieval_recall@5": 1.0, "image_retrieval_recall@10": 1.0,
                "text_retrieval_recall@1": 1 / 3, "text_retrieval_recall@5": 2 / 3, "text_retrieval_recall@10": 1.0}
    assert retrieval_metrics(torch.eye(3), S, OWNER) == pytest.approx(expected)
    # chunks of a few query rows, and the positives given as a matrix, change nothing
    pos = OWNER[:, None] == torch.arange(3)[None, :]  # (15, 3)
    assert retrieval_metrics(torch.eye(3), S, positives=pos, chunk=2) == pytest.approx(expected)
    assert retrieval_metrics(torch.eye(3), S, OWNER, ks=(2,), chunk=4) == pytest.approx(
        {"image_retrieval_recall@2": 14 / 15, "text_retrieval_recall@2": 1 / 3})


def test_retrieval_metrics_refuses_bad_pairs():
    with pytest.raises(ValueError, match="text_image_index"):
        retrieval_metrics(torch.eye(3), S, torch.full((15,), 3))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.eye(3), S, torch.zeros(15, dtype=torch.long))  # images 1 and 2 have no caption
    with pytest.raises(ValueError, match="exactly one"):
        retrieval_metrics(torch.eye(3), S)


@dataclass(frozen=True)
class Graph:
    """Stands in for a scene graph: frozen, hence hashable."""

    relation: str


class CountingEncoder:
    """A stub model that records what it was asked to encode; a caption's feature is (length, count of 'a', 1)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.graphs: list = []
        self.calls = 0
        self.images = 0

    def encode_captions(self, texts, graphs=None):
        self.calls += 1
        self.texts += texts
        self.graphs += graphs or []
        return torch.stack([torch.tensor([len(t), t.count("a"), 1.0], dtype=torch.float64) for t in texts])

    def encode_images(self, images):
        self.images += len(images)
        return images.flatten(1)[:, :3].to(torch.bfloat16)


def test_each_distinct_caption_is_encoded_once_and_order_is_kept():
    enc = CountingEncoder()
    texts = ["a cat", "dog", "a cat", "banana", "dog", "a cat"]
    feats = encode_unique_texts(enc, texts, batch_size=2)
    assert sorted(enc.texts) == ["a cat", "banana", "dog"] and enc.calls == 2  # 3 distinct, batches of 2
    assert feats.shape == (6, 3) and feats.dtype == torch.float32
    for t, f in zip(texts, feats):
        torch.testing.assert_close(f, torch.tensor([len(t), t.count("a"), 1.0]))


def test_captions_with_graphs_are_distinct_by_caption_and_graph():
    enc = CountingEncoder()
    texts = ["a cat", "a cat", "a cat", "dog"]
    graphs = [Graph("on"), Graph("under"), Graph("on"), Graph("on")]
    feats = encode_unique_texts(enc, texts, graphs)
    assert list(zip(enc.texts, enc.graphs)) == [("a cat", Graph("on")), ("a cat", Graph("under")), ("dog", Graph("on"))]
    assert feats.shape == (4, 3) and feats[3, 0] == 3.0
    with pytest.raises(ValueError, match="one graph per caption"):
        encode_unique_texts(enc, texts, graphs[:3])


class GraphEncoder(CountingEncoder):
    """A caption's feature depends on its graph too: (length, count of 'a', length of the graph's relation)."""

    def encode_captions(self, texts, graphs=None):
        super().encode_captions(texts, graphs)
        return torch.stack([self.feature(t, g) for t, g in zip(texts, graphs)])

    @staticmethod
    def feature(text, graph):
        return torch.tensor([len(text), text.count("a"), len(graph.relation)], dtype=torch.float64)


def test_each_row_gets_the_features_of_its_own_caption_and_graph():
    texts = ["a cat", "a cat", "dog", "a cat", "dog", "a cat"]
    graphs = [Graph("on"), Graph("under"), Graph("beside"), Graph("on"), Graph("on"), Graph("under")]
    for batch_size in (256, 2):  # one batch, and the distinct pairs spread over batches
        enc = GraphEncoder()
        feats = encode_unique_texts(enc, texts, graphs, batch_size=batch_size)
        assert len(enc.texts) == 4  # the distinct (caption, graph) pairs, once each
        assert feats.shape == (6, 3)
        for t, g, f in zip(texts, graphs, feats):
            torch.testing.assert_close(f, GraphEncoder.feature(t, g).float())
        assert not torch.equal(feats[0], feats[1]) and not torch.equal(feats[2], feats[4])  # same text, other graph
        assert torch.equal(feats[0], feats[3]) and torch.equal(feats[1], feats[5])  # same (text, graph)


class Images(torch.utils.data.Dataset):
    """Seven 'preprocessed images'; image i is filled with the value i. Counts how often each is loaded."""

    def __init__(self) -> None:
        self.loads = [0] * 7

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loads[i] += 1
        return torch.full((3, 2, 2), float(i))


def test_each_image_is_encoded_once_in_order():
    enc, data = CountingEncoder(), Images()
    feats = encode_image_dataset(enc, data, batch_size=3)
    assert enc.images == 7 and data.loads == [1] * 7
    assert feats.dtype == torch.float32 and feats[:, 0].tolist() == [float(i) for i in range(7)]
    feats = encode_image_dataset(enc, [torch.full((3, 2, 2), float(i)) for i in range(4)], batch_size=256)  # a list
    assert feats[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


class LinearEncoder(torch.nn.Module):
    """A model with parameters: inputs must arrive on its device; bf16 autocast makes its matmul bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(12, 4)

    def encode_images(self, images):
        assert images.device == self.proj.weight.device
        return torch.nn.functional.normalize(self.proj(images.flatten(1)), dim=-1)


def test_amp_and_model_device():
    model = LinearEncoder()
    images = [torch.randn(3, 2, 2) for _ in range(5)]
    full = encode_image_dataset(model, images, batch_size=2)
    for dtype, atol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        half = encode_image_dataset(model, images, batch_size=2, amp=dtype)
        assert full.dtype == half.dtype == torch.float32 and half.device.type == "cpu"
        torch.testing.assert_close(half, full, atol=atol, rtol=0)  # close, not equal
        assert not torch.equal(half, full)

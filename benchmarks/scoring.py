"""The one scoring core: encode each image and each distinct caption once, score caption options, count
correct choices under an explicit tie rule, and compute retrieval recall as CLIP_benchmark defines it."""
from __future__ import annotations

import contextlib
from typing import Literal, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

Ties = Literal["wrong", "right"]


class Encoder(Protocol):
    """What a benchmark sees of a model: L2-normalised features of preprocessed images and of raw captions."""

    def encode_images(self, images: Tensor) -> Tensor: ...

    def encode_captions(self, texts: list[str], graphs: list | None = None) -> Tensor: ...


def _device(model: Encoder) -> torch.device:
    params = getattr(model, "parameters", None)
    return next(params()).device if params else torch.device("cpu")


def _autocast(model: Encoder, amp: bool):
    dev = _device(model)
    return torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def encode_image_dataset(model: Encoder, images: Dataset | Sequence[Tensor], *, batch_size: int = 256,
                         num_workers: int = 0, amp: bool = False, desc: str = "images") -> Tensor:
    """Features (N, D) of every image, each encoded exactly once, in order; float32 on the CPU."""
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    with torch.no_grad(), _autocast(model, amp):
        for batch in tqdm(loader, desc=desc, disable=len(loader) < 2, leave=False):
            out.append(model.encode_images(batch.to(_device(model))).float().cpu())
    return torch.cat(out)  # (N, D)


def encode_unique_texts(model: Encoder, texts: Sequence[str], graphs: Sequence | None = None, *,
                        batch_size: int = 256, amp: bool = False, desc: str = "captions") -> Tensor:
    """Features (M, D) for `texts` in order, encoding each distinct caption (and graph, when given) once."""
    keys = list(zip(texts, graphs)) if graphs is not None else list(texts)
    unique = list(dict.fromkeys(keys))
    where = {k: i for i, k in enumerate(unique)}
    chunks = []
    with torch.no_grad(), _autocast(model, amp):
        for start in tqdm(range(0, len(unique), batch_size), desc=desc, disable=len(unique) <= batch_size, leave=False):
            part = unique[start:start + batch_size]
            if graphs is not None:
                feats = model.encode_captions([t for t, _ in part], [g for _, g in part])
            else:
                feats = model.encode_captions(list(part))
            chunks.append(feats.float().cpu())
    feats = torch.cat(chunks)  # (U, D)
    return feats[torch.tensor([where[k] for k in keys])]  # (M, D)


def score_options(image_features: Tensor, option_features: Tensor) -> Tensor:
    """Cosine score of each image with each of its K caption options: (N, D), (N, K, D) -> (N, K)."""
    return torch.einsum("nd,nkd->nk", image_features, option_features)


def choice_correct(scores: Tensor, true_index: int | Tensor, *, ties: Ties) -> Tensor:
    """Per item (N,), whether the true option wins: strictly (ties="wrong", as ARO's VG benchmarks and
    SugarCrepe count) or with ties allowed (ties="right", as ARO's COCO/Flickr-Order count)."""
    if ties not in ("wrong", "right"):
        raise ValueError(f"ties must be 'wrong' or 'right', got {ties!r}")
    n, k = scores.shape
    if k < 2:
        raise ValueError(f"a choice needs at least 2 options, got {k}")
    idx = torch.as_tensor(true_index, dtype=torch.long).expand(n)
    if (idx < 0).any() or (idx >= k).any():
        raise ValueError(f"true_index must be in 0..{k - 1}")
    true = scores.gather(1, idx[:, None]).squeeze(1)  # (N,)
    others = scores.scatter(1, idx[:, None], float("-inf")).max(dim=1).values  # (N,)
    return true > others if ties == "wrong" else true >= others


def choice_accuracy(scores: Tensor, true_index: int | Tensor, *, ties: Ties) -> float:
    return choice_correct(scores, true_index, ties=ties).float().mean().item()


def recall_at_k(scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries (rows) with at least one positive among their top-k candidates (CLIP_benchmark's R@k)."""
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive")
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (Nq, k)
        out[k] = positives.gather(1, top).any(dim=1).float().mean().item()
    return out


def retrieval_metrics(image_features: Tensor, text_features: Tensor, text_image_index: Tensor | None = None, *,
                      positives: Tensor | None = None, ks: Sequence[int] = (1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Recall@k both ways, named as CLIP_benchmark names them: `image_retrieval_recall@k` is text->image
    (averaged over captions), `text_retrieval_recall@k` is image->text (averaged over images; a hit if any
    of the image's captions is in the top k). Several captions per image are allowed. The pairs that match
    are given either as each caption's image index, or as a (N_text, N_image) boolean matrix."""
    if positives is None:
        if text_image_index is None:
            raise ValueError("give text_image_index or positives")
        positives = torch.zeros(len(text_features), len(image_features), dtype=torch.bool)
        positives[torch.arange(len(text_features)), text_image_index] = True  # (Nt, Ni)
    directions = {"image_retrieval": (text_features, image_features, positives),
                  "text_retrieval": (image_features, text_features, positives.T)}
    out = {}
    for name, (queries, candidates, pos) in directions.items():
        hits = {k: 0.0 for k in ks}
        for s in range(0, len(queries), chunk):
            scores = queries[s:s + chunk] @ candidates.T  # (chunk, N_candidates)
            for k, r in recall_at_k(scores, pos[s:s + chunk], ks).items():
                hits[k] += r * len(scores)
        out.update({f"{name}_recall@{k}": hits[k] / len(queries) for k in ks})
    return out

"""The one scoring core: encode each image and each distinct caption once, score caption options, count
correct choices under an explicit tie rule, and compute retrieval recall as CLIP_benchmark defines it."""
from __future__ import annotations

import contextlib
from typing import Any, Literal, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.images import BadInput

Ties = Literal["wrong", "right"]
TIE_RULES = ("wrong", "right")


class Encoder(Protocol):
    """What a benchmark sees of a model: L2-normalised features of preprocessed images and of raw captions."""

    def encode_images(self, images: Tensor) -> Tensor:
        """A preprocessed batch (B, 3, H, W) -> L2-normalised features (B, D)."""
        ...

    def encode_captions(self, texts: list[str], graphs: list | None = None) -> Tensor:
        """Raw captions -> L2-normalised features (B, D); `graphs`, one scene graph per text, for methods using them."""
        ...


def _device(model: Any) -> torch.device:
    """Where the model's weights live (inputs go there); the CPU for a model without parameters."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def _precision(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `amp` (torch.float16 or torch.bfloat16) when given, full precision otherwise."""
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _checked(feats: Tensor, rows: int, what: str) -> Tensor:
    """The encoder's (rows, D) output as float32 on the CPU; a wrong row count is a model bug, caught here."""
    if feats.dim() != 2 or feats.shape[0] != rows:
        raise RuntimeError(f"{what}: the encoder returned shape {tuple(feats.shape)} for {rows} inputs, "
                           f"expected ({rows}, D)")
    return feats.float().cpu()


class _Guarded(Dataset):
    """Items of `dataset` as (item, None), or (None, message) when building one raises BadInput: a bad image read
    in a worker process comes back as its own message, not as a wrapped worker traceback."""

    def __init__(self, dataset: Dataset | Sequence[Tensor]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor | None, str | None]:
        try:
            return self.dataset[i], None
        except BadInput as e:
            return None, str(e)


def _collate_guarded(batch: list[tuple[Tensor | None, str | None]]) -> tuple[Tensor | None, list[str | None]]:
    good = [x for x, err in batch if err is None]
    return (torch.stack(good) if good else None), [err for _, err in batch]  # (b_ok, 3, H, W), b messages


def encode_images_guarded(model: Encoder, images: Dataset | Sequence[Tensor], batch_size: int = 256,
                          num_workers: int = 0, desc: str = "images", amp: torch.dtype | None = None
                          ) -> tuple[Tensor, list[str | None]]:
    """Features (N, D) of every image, each encoded exactly once and in order, as float32 on the CPU, and per
    image None or the BadInput message raised while reading it (its feature row is then zeros). Callers decide
    whether a bad image stops the run or skips its records (datamodules.images.BadRecords)."""
    n = len(images)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("no images to encode")
    device = _device(model)
    loader = DataLoader(_Guarded(images), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_guarded, pin_memory=device.type == "cuda")
    feats, errors = None, []
    with torch.no_grad(), _precision(device, amp):
        for batch, errs in tqdm(loader, desc=desc, disable=len(loader) < 2, leave=False):
            rows = torch.tensor([len(errors) + i for i, e in enumerate(errs) if e is None], dtype=torch.long)
            errors += errs
            if batch is None:
                continue
            out = _checked(model.encode_images(batch.to(device, non_blocking=True)), len(batch), desc)  # (b_ok, D)
            if feats is None:
                feats = torch.zeros(n, out.shape[1])
            feats[rows] = out  # (b_ok, D) into (N, D)
    return (feats if feats is not None else torch.zeros(n, 0)), errors


def encode_image_dataset(model: Encoder, images: Dataset | Sequence[Tensor], batch_size: int = 256,
                         num_workers: int = 0, desc: str = "images", amp: torch.dtype | None = None) -> Tensor:
    """Features (N, D) of every image, each encoded exactly once and in order, as float32 on the CPU; an image
    that cannot be read stops the run with its BadInput message."""
    feats, errors = encode_images_guarded(model, images, batch_size, num_workers, desc, amp)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise BadInput(first)
    return feats  # (N, D)


def encode_unique_texts(model: Encoder, texts: Sequence[str], graphs: Sequence | None = None, batch_size: int = 256,
                        desc: str = "captions", amp: torch.dtype | None = None) -> Tensor:
    """Features (M, D) for `texts` in order, encoding each distinct caption (or (caption, graph) pair) only once."""
    if len(texts) == 0:
        raise ValueError("no captions to encode")
    if graphs is not None and len(graphs) != len(texts):
        raise ValueError(f"{len(graphs)} graphs for {len(texts)} captions; give one graph per caption")
    keys = list(zip(texts, graphs)) if graphs is not None else list(texts)
    unique = list(dict.fromkeys(keys))  # first-seen order; graphs are frozen dataclasses, hence hashable
    where = {key: i for i, key in enumerate(unique)}
    device, chunks = _device(model), []
    with torch.no_grad(), _precision(device, amp):
        for start in tqdm(range(0, len(unique), batch_size), desc=desc, disable=len(unique) <= batch_size, leave=False):
            part = unique[start:start + batch_size]
            if graphs is None:
                feats = model.encode_captions(list(part))
            else:
                feats = model.encode_captions([t for t, _ in part], [g for _, g in part])
            chunks.append(_checked(feats, len(part), desc))  # (b, D)
    feats = torch.cat(chunks)  # (U, D), U distinct captions
    return feats[torch.tensor([where[key] for key in keys])]  # (U, D) -> (M, D)


def score_options(image_features: Tensor, option_features: Tensor) -> Tensor:
    """Cosine score of each image with each of its K caption options (features are already L2-normalised)."""
    if image_features.dim() != 2 or option_features.dim() != 3 or \
            image_features.shape[0] != option_features.shape[0] or image_features.shape[1] != option_features.shape[2]:
        raise ValueError(f"expected (N, D) and (N, K, D), got {tuple(image_features.shape)} and "
                         f"{tuple(option_features.shape)}")
    return torch.einsum("nd,nkd->nk", image_features, option_features)  # (N, D) x (N, K, D) -> (N, K)


def tie_right_chance(options: Sequence[Sequence[str]]) -> float:
    """A random scorer's accuracy on choices whose ties count as right (ARO's Order rule): an option equal to the
    true one ties with it, so each case's chance is 1 / (its distinct options), not 1 / (its options)."""
    return sum(1 / len(set(row)) for row in options) / len(options)


def choice_correct(scores: Tensor, true_index: int | Tensor, *, ties: Ties) -> Tensor:
    """Per item (N,), whether the true option wins: strictly (ties="wrong", as ARO's VG-Relation/Attribution and
    SugarCrepe count) or with ties allowed (ties="right", as ARO's COCO/Flickr-Order count). No default: choose."""
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N, K), got shape {tuple(scores.shape)}")
    n, k = scores.shape
    if k < 2:
        raise ValueError(f"a choice needs at least 2 options, got K={k}")
    idx = torch.as_tensor(true_index, dtype=torch.long, device=scores.device)
    if idx.dim() > 1 or (idx.dim() == 1 and len(idx) != n):
        raise ValueError(f"true_index must be an int or an (N,)=({n},) tensor, got shape {tuple(idx.shape)}")
    idx = idx.expand(n)  # (N,)
    if ((idx < 0) | (idx >= k)).any():
        raise ValueError(f"true_index must be in 0..{k - 1}, got {idx.unique().tolist()}")
    scores = scores if scores.is_floating_point() else scores.float()
    true_mask = torch.nn.functional.one_hot(idx, k).bool()  # (N, K)
    true = scores[true_mask]  # (N,)
    best_other = scores.masked_fill(true_mask, float("-inf")).amax(dim=1)  # (N, K) -> (N,)
    return true > best_other if ties == "wrong" else true >= best_other


def choice_accuracy(scores: Tensor, true_index: int | Tensor, *, ties: Ties) -> float:
    """Share of items whose true option wins under the given tie rule (see choice_correct)."""
    return choice_correct(scores, true_index, ties=ties).float().mean().item()


def _hit_counts(scores: Tensor, positives: Tensor, ks: Sequence[int]) -> dict[int, int]:
    """Per k, how many query rows have at least one positive among their top-k candidates."""
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores and positives must both be (N_query, N_candidate), got {tuple(scores.shape)} and "
                         f"{tuple(positives.shape)}")
    positives = positives.to(device=scores.device, dtype=torch.bool)
    missing = (~positives.any(dim=1)).sum().item()
    if missing:
        raise ValueError(f"every query needs at least one positive; {missing} of {len(scores)} have none")
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (Nq, Nc) -> (Nq, k)
        out[k] = int(positives.gather(1, top).any(dim=1).sum().item())  # (Nq, k) -> (Nq,) -> count
    return out


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")


def recall_at_k(scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries (rows) with at least one positive among their top-k candidates: CLIP_benchmark's R@k
    (k above the number of candidates counts as all of them)."""
    _check_ks(ks)
    if len(scores) == 0:
        raise ValueError("no queries")
    return {k: hits / len(scores) for k, hits in _hit_counts(scores, positives, ks).items()}


def retrieval_metrics(image_features: Tensor, text_features: Tensor, text_image_index: Tensor | None = None,
                      ks: Sequence[int] = (1, 5, 10), *, positives: Tensor | None = None,
                      chunk: int = 4096) -> dict[str, float]:
    """Recall@k both ways, named as CLIP_benchmark names them: `image_retrieval_recall@k` is text->image
    (averaged over captions), `text_retrieval_recall@k` is image->text (averaged over images; a hit if any of the
    image's captions is in the top k). Several captions per image are allowed. Which pairs match is given either
    as each caption's image index (Nt,) or as a boolean (Nt, Ni) matrix `positives` (a caption may fit several
    images). Scores are computed `chunk` query rows at a time, so 25k captions x 5k images fit in memory."""
    _check_ks(ks)
    n_img, n_txt = len(image_features), len(text_features)
    if (text_image_index is None) == (positives is None):
        raise ValueError("give exactly one of text_image_index and positives")
    if positives is None:
        index = torch.as_tensor(text_image_index, dtype=torch.long)
        if index.shape != (n_txt,) or ((index < 0) | (index >= n_img)).any():
            raise ValueError(f"text_image_index must be ({n_txt},) with values in 0..{n_img - 1}")
        positives = torch.zeros(n_txt, n_img, dtype=torch.bool)
        positives[torch.arange(n_txt), index] = True  # (Nt, Ni)
    if positives.shape != (n_txt, n_img):
        raise ValueError(f"positives must be (N_text, N_image)=({n_txt}, {n_img}), got {tuple(positives.shape)}")
    if not positives.any(dim=0).all():
        raise ValueError(f"{int((~positives.any(dim=0)).sum())} images have no caption; text retrieval needs one each")
    directions = {"image_retrieval": (text_features, image_features, positives),  # queries: texts (Nt, D)
                  "text_retrieval": (image_features, text_features, positives.T)}  # queries: images (Ni, D)
    out = {}
    for name, (queries, candidates, pos) in directions.items():
        hits = dict.fromkeys(ks, 0)
        rows = max(1, min(chunk, 2**26 // max(1, len(candidates))))  # at most ~256 MB of float32 scores at once
        for s in range(0, len(queries), rows):
            scores = queries[s:s + rows] @ candidates.T  # (rows, D) @ (D, Nc) -> (rows, Nc)
            for k, h in _hit_counts(scores, pos[s:s + rows], ks).items():
                hits[k] += h
        out.update({f"{name}_recall@{k}": hits[k] / len(queries) for k in ks})
    return out

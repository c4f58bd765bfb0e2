"""Training order and per-sample randomness that do not depend on where a run was resumed or on its workers.

The order of an epoch is a pure function of (seed, epoch); every item draws its random choices (which
caption, which negative, which neighbour) from a generator seeded by (seed, epoch, index). So a run
resumed in the middle of an epoch sees exactly the batches, and exactly the draws, that an uninterrupted
run sees, with any number of DataLoader workers.

Lightning resumes a loader mid-epoch when the loader has `state_dict`/`load_state_dict` (its
`_Stateful` protocol): the state is saved in every checkpoint and handed back before the loader is
iterated again. The state is the training position of the saved weights (epoch and batches consumed),
read from the trainer when the checkpoint is written, not a count of batches the workers fetched ahead.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts ("order", seed, epoch, ...), the same in every process and Python run."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Draw(NamedTuple):
    """A training key: which item, drawn in which epoch (the epoch seeds the item's random choices).
    It travels to the workers with the index, so persistent workers need no epoch of their own."""

    index: int
    epoch: int


class EpochSampler(DistributedSampler):
    """Training order for one rank: epoch `e`'s global order is a permutation drawn from (seed, e); rank r of
    W takes every W-th index of it (DistributedSampler's shard, so the W ranks' batches at a step together hold
    the same items as one process with a W times larger batch). Yields `Draw` keys, starting `start` batches
    into the epoch. A DistributedSampler, so Lightning does not wrap it in one of its own under DDP."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < batch_size * world_size:
            raise ValueError(f"{size} training samples are fewer than one global batch "
                             f"({batch_size} x {world_size} ranks): lower data.batch_size")
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.size, self.batch_size = size, batch_size
        self.batches = self.num_samples // batch_size  # full batches per epoch on every rank
        self.start = 0  # batches of the current epoch already consumed (set when resuming)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order (the global permutation, truncated to W equal shards)."""
        g = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
        perm = torch.randperm(self.size, generator=g)[: self.total_size]  # (W * num_samples,)
        return perm[self.rank:: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[Draw]:
        epoch = self.epoch
        indices = self.order(epoch)[self.start * self.batch_size: self.batches * self.batch_size]
        return iter([Draw(i, epoch) for i in indices])

    def __len__(self) -> int:
        # the whole epoch, even when starting mid-way: Lightning counts the consumed batches itself
        return self.batches * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch; a new epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def seek(self, epoch: int, batches: int) -> None:
        """Continue `batches` batches into `epoch`."""
        self.epoch, self.start = epoch, batches


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch by Lightning (it has `state_dict`/`load_state_dict`).

    `position()` says where the training loop is when a checkpoint is written: {"epoch", "batches" consumed
    in it, "batches_per_epoch" the loop runs}; without one (the loader used by hand) the sampler's own start
    is reported."""

    def __init__(self, *args: Any, position: Callable[[], dict[str, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    @property
    def epoch_sampler(self) -> EpochSampler:
        return self.batch_sampler.sampler  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, int]:
        s = self.epoch_sampler
        where = self.position() if self.position is not None else {
            "epoch": s.epoch, "batches": s.start, "batches_per_epoch": s.batches}
        return {"seed": s.seed, "world_size": s.num_replicas, **{k: int(v) for k, v in where.items()}}

    def load_state_dict(self, state: dict[str, int]) -> None:
        s = self.epoch_sampler
        now = {"seed": s.seed, "world_size": s.num_replicas}
        differ = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if state["batches_per_epoch"] > s.batches:
            differ["batches_per_epoch"] = (state["batches_per_epoch"], s.batches)
        if differ:
            raise ValueError("the checkpoint's data position does not fit this run's data ("
                             + ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in differ.items())
                             + "); resume with the run's own config and device count")
        epoch, batches = state["epoch"], state["batches"]
        if batches >= state["batches_per_epoch"]:  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        s.seek(epoch, batches)

"""Skipping non-finite training steps without a host-device sync.

The old guard asked the host `bool(all gradients finite)` every step, which makes the CPU wait for the GPU
to finish the backward pass before it may queue the next step. Here the decision stays on the device: the
fused AdamW step takes a `found_inf` tensor (the input `torch.amp.GradScaler` uses) and leaves every
weight and moment as it was when it is 1. The host learns the count of bad steps in a row one step late,
from a non-blocking copy, which is soon enough to stop a run that keeps failing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class LaggedRead:
    """A small device tensor read on the host one step late: each `push` starts a non-blocking copy into pinned
    memory and returns the value pushed the time before (None the first time). The host waits only for the
    previous step's copy, so it may run at most one step ahead of the device, never less. On the CPU there
    is nothing to wait for: `push` returns the value just pushed."""

    def __init__(self) -> None:
        self._pending: tuple[Tensor, torch.cuda.Event] | None = None

    def push(self, x: Tensor) -> float | None:
        if not x.is_cuda:
            return float(x)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        previous, self._pending = self._pending, (host, event)
        if previous is None:
            return None
        previous[1].synchronize()  # the previous step's copy: long done unless the host is a step ahead
        return float(previous[0])


class NonFiniteSteps:
    """Per step, on the device: whether any gradient holds a NaN or an infinity, the number of such steps in all
    and in a row. `check` hands the verdict to the optimizer, which skips the update on the device."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.in_a_row: Tensor | None = None
        self.restored = (0.0, 0.0)  # (in a row, in all) from a checkpoint, until the first check
        self.read = LaggedRead()

    def state(self) -> list[float]:
        """[bad steps in a row, bad steps in all], for a checkpoint (a sync, at checkpoint time only)."""
        if self.total is None:
            return list(self.restored)
        return [float(self.in_a_row), float(self.total)]

    def load(self, state: list[float]) -> None:
        self.total = self.in_a_row = None
        self.restored = (float(state[0]), float(state[1]))

    def check(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
              loss_finite: Tensor | None = None) -> tuple[Tensor | None, float | None]:
        """(bad steps so far, on the device; bad steps in a row as of the previous step on a GPU, this step on a
        CPU, or None when not known yet). A step is bad when a gradient or the loss (`loss_finite`, a () bool
        tensor) is not finite on any rank. A fused optimizer skips this step on the device if it is bad; any
        other optimizer is told through its gradients (dropped), which needs the host to know, so it syncs."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return self.total, None
        # one norm per tensor in a few multi-tensor kernels; a NaN or inf anywhere makes the sum non-finite
        # (a gradient beyond float range, ~1e19 per element, counts as non-finite too)
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())  # () on the device
        if loss_finite is not None:
            bad = bad | ~loss_finite.to(bad.device)
        bad = bad.float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # a collective on the device: every rank gets one verdict
        if self.total is None:
            self.in_a_row, self.total = (torch.full_like(bad, v) for v in self.restored)
        self.total = self.total + bad
        self.in_a_row = (self.in_a_row + 1) * bad  # back to 0 after a good step
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad  # type: ignore[attr-defined]  # read by the fused AdamW kernel
        elif bool(bad):  # a host sync, only for optimizers that cannot skip on the device
            for p in params:
                p.grad = None
        return self.total, self.read.push(self.in_a_row)

"""`model.compile=true`: the towers compile in place and a compiled step gives the eager loss and gradients.

Always run: every registered method traced with the `aot_eager` backend (dynamo and AOTAutograd, no code
generation: a few seconds each here), with no graph break in the compiled modules (the towers and the method's
own: Structure-CLIP's knowledge encoder, SmartCLIP's mask network). Every registered method, alone and under
2-process DDP (the gather included), with the real `inductor` backend: only with CLIPCOMP_COMPILE_TESTS=1
(inductor compiles for minutes on a small CPU); CLIPCOMP_COMPILE_BACKEND picks another backend for that run.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from datamodules.datamodule import collate
from methods import METHODS
from methods.train import build

SMALL = {"structureclip": ["method.kee_layers=2", "method.kee_dropout=0"]}  # dropout draws differ between runs
OWN_MODULES = {"structureclip": "kee", "smartclip": "mask_net"}  # a method's own modules, compiled with the towers
FULL = os.environ.get("CLIPCOMP_COMPILE_TESTS") == "1"
BACKEND = os.environ.get("CLIPCOMP_COMPILE_BACKEND", "inductor")
full_only = pytest.mark.skipif(not FULL, reason="compiles for minutes on a CPU: set CLIPCOMP_COMPILE_TESTS=1")


def loss_and_grads(make_cfg, method: str, *argv: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    from test_ddp_equivalence import FLOAT64

    torch.manual_seed(0)
    module, dm = build(make_cfg(f"method={method}", *SMALL.get(method, []), *argv))
    random.seed(0)
    ds = dm.dataset("train")
    batch = collate([ds[i] for i in range(8)])
    if method in FLOAT64:  # as in the DDP check: SmartCLIP's fixed scale amplifies float32 rounding
        module.double()
        batch["image"] = batch["image"].double()
    loss, _ = module.training_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, module


def check_compiled_equals_eager(make_cfg, method: str, backend: str, tmp_path) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cache = f"cache_dir={tmp_path}"
    eager_loss, eager_grads, _ = loss_and_grads(make_cfg, method, cache)
    loss, grads, module = loss_and_grads(make_cfg, method, cache, "model.compile=true",
                                         f"model.compile_backend={backend}")
    assert module.model.visual._compiled_call_impl is not None and module.model.transformer._compiled_call_impl is not None
    if method in OWN_MODULES:
        assert getattr(module, OWN_MODULES[method])._compiled_call_impl is not None
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] >= 2  # the towers did go through the compiler
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", METHODS.names())
def test_compiled_step_equals_eager_traced(make_cfg, method, tmp_path):
    check_compiled_equals_eager(make_cfg, method, "aot_eager", tmp_path)


@full_only
@pytest.mark.parametrize("method", METHODS.names())
def test_compiled_step_equals_eager(make_cfg, method, tmp_path):
    check_compiled_equals_eager(make_cfg, method, BACKEND, tmp_path)


@full_only
@pytest.mark.parametrize("method", METHODS.names())
def test_compiled_ddp_equals_one_eager_process(method):
    """Compiled towers under DDP, features gathered across ranks with gradients: the loss and gradients of one
    eager process on the concatenated batch."""
    from test_ddp_equivalence import check_ddp_equivalence

    check_ddp_equivalence(method, ("model.compile=true", f"model.compile_backend={BACKEND}"), rtol=1e-3)

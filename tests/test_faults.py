"""Faults while training: non-finite losses and gradients are skipped and counted, too many in a row stop the run
with the last good state; the same seed gives the same run twice; a full disk mid-checkpoint leaves the previous
checkpoint whole; a 2-process DDP run where one rank fails ends with the error instead of hanging."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from methods import train as train_mod
from methods.checkpoints import read_checkpoint
from tests_support import FullDisk

from tests_support import ROOT


class Inject(L.Callback):
    """Faults at chosen global steps: NaN images, an infinite loss, a NaN gradient, or an error on one rank."""

    def __init__(self, nan_images=(), inf_loss=(), nan_grad=(), fail_rank: int | None = None, fail_at: int = -1):
        self.nan_images, self.inf_loss, self.nan_grad = set(nan_images), set(inf_loss), set(nan_grad)
        self.fail_rank, self.fail_at = fail_rank, fail_at
        self.good: dict[str, torch.Tensor] | None = None  # the weights before the first fault

    def on_fit_start(self, trainer, module):
        if self.inf_loss:  # the loss alone: its gradients stay finite, so only the loss check sees it
            real = module.training_loss

            def training_loss(batch):
                loss, terms = real(batch)
                return (loss + float("inf") if trainer.global_step in self.inf_loss else loss), terms

            module.training_loss = training_loss

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = trainer.global_step
        if trainer.global_rank == self.fail_rank and step == self.fail_at:
            raise RuntimeError(f"rank {self.fail_rank} fails at step {step} (injected)")
        if step in self.nan_images | self.inf_loss | self.nan_grad and self.good is None:
            self.good = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if step in self.nan_images:
            batch["image"].fill_(float("nan"))

    def on_after_backward(self, trainer, module):
        if trainer.global_step in self.nan_grad:
            next(p for p in module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


@pytest.fixture
def inject(monkeypatch):
    """Adds an Inject callback (holder["cb"]) to the trainer that methods.train builds."""
    holder = {}
    real = L.Trainer

    def trainer(*args, callbacks=(), **kwargs):
        return real(*args, callbacks=[*callbacks, holder["cb"]], **kwargs)

    monkeypatch.setattr(train_mod.L, "Trainer", trainer)
    return holder


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_nan_images_inf_loss_and_nan_gradients_are_skipped_and_counted(make_cfg, inject):
    inject["cb"] = Inject(nan_images={1}, inf_loss={2}, nan_grad={3})
    run = train_mod.train(make_cfg("trainer.limit_train_batches=5"))
    skipped = [float(r["train/skipped_steps"]) for r in rows(run) if r.get("train/skipped_steps")]
    assert skipped == [0.0, 1.0, 2.0, 3.0, 3.0]  # each kind of fault caught once, at its own step
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert (run / "done.json").is_file()


def test_too_many_bad_steps_stop_with_the_last_good_state(make_cfg, inject):
    inject["cb"] = Inject(nan_images=set(range(2, 100)))
    cfg = make_cfg("trainer.limit_train_batches=8", "optim.max_bad_steps=3")
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss or gradient.*last-good.ckpt"):
        train_mod.train(cfg)
    (run,) = list(Path(cfg.runs_dir).glob("clip/*"))
    saved = read_checkpoint(run / "checkpoints" / "last-good.ckpt")["state_dict"]
    for k, v in inject["cb"].good.items():  # the weights before the first poisoned step, which no step changed
        torch.testing.assert_close(saved[k], v, msg=k)
    assert not (run / "done.json").exists()


def test_same_seed_same_weights_and_metrics_twice(make_cfg):
    a, b = train_mod.train(make_cfg()), train_mod.train(make_cfg())
    sa = read_checkpoint(a / "checkpoints" / "last.ckpt")["state_dict"]
    sb = read_checkpoint(b / "checkpoints" / "last.ckpt")["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    keys = ("step", "train/loss", "train/logit_scale", "val/loss", "val/i2t_acc")
    assert [[r.get(k) for k in keys] for r in rows(a)] == [[r.get(k) for k in keys] for r in rows(b)]
    assert any(r.get("val/loss") for r in rows(a))
    # the seed is what made them equal: another seed (its own initialisation, data order and draws) ends elsewhere
    c = train_mod.train(make_cfg("seed=1"))
    assert c not in (a, b)
    sc = read_checkpoint(c / "checkpoints" / "last.ckpt")["state_dict"]
    assert sc.keys() == sa.keys()
    differ = [k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], sc[k])]
    assert len(differ) > len(sa) // 2, f"seed=1 changed only {differ}"
    assert [r.get("train/loss") for r in rows(c)] != [r.get("train/loss") for r in rows(a)]


def test_a_full_disk_mid_checkpoint_keeps_the_previous_one(make_cfg, monkeypatch):
    import configs.files

    real_open, state = open, {"saved": 0}

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "step.ckpt" in str(path) and "w" in mode:
            state["saved"] += 1
            # the second periodic checkpoint hits a disk that fills after 3 MB (the tiny model's is about 86 MB)
            return FullDisk(f, budget=3_000_000) if state["saved"] >= 2 else f
        return f

    monkeypatch.setattr(configs.files, "open", fake_open, raising=False)
    cfg = make_cfg("trainer.limit_train_batches=6", "trainer.checkpoint_every_n_steps=2")
    with pytest.raises(OSError, match=r"No space left on device: writing .*step.ckpt \(nothing replaced"):
        train_mod.train(cfg)
    (run,) = list(Path(cfg.runs_dir).glob("clip/*"))
    assert read_checkpoint(run / "checkpoints" / "step.ckpt")["global_step"] == 2  # the previous one, whole
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_two_process_ddp_run_finishes_and_a_failing_rank_ends_one(tmp_path):
    script = f"""
import sys
sys.path[:0] = {[str(ROOT), str(ROOT / "tests")]!r}
import lightning as L
from methods import train as T
from tests_support import TINY_ARGS
from test_faults import Inject

if __name__ == "__main__":
    args = TINY_ARGS + ["trainer=ddp_cpu2", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
                        "trainer.checkpoint_every_n_steps=1", "trainer.enable_progress_bar=false"]
    print("finished:", T.train(T.compose_train(args + ["runs_dir={tmp_path / 'ok'}"])), flush=True)
    real = L.Trainer
    T.L.Trainer = lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, Inject(fail_rank=1, fail_at=2)], **k)
    T.train(T.compose_train(args + ["runs_dir={tmp_path / 'runs'}"]))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    (ok,) = list((tmp_path / "ok").glob("clip/*"))
    assert f"finished: {ok}" in out.stdout and (ok / "done.json").is_file()  # the launcher got the weights back
    assert read_checkpoint(ok / "checkpoints" / "last.ckpt")["global_step"] == 4
    # the validation swap accuracy counts both ranks' halves of the split: one process validating the same
    # weights on the whole split gets the same fraction
    with open(ok / "metrics.csv") as f:
        (logged,) = [float(r["val/relation_swap_acc"]) for r in csv.DictReader(f) if r.get("val/relation_swap_acc")]
    module, dm = train_mod.build(train_mod.saved_config(ok))
    module.load_state_dict(read_checkpoint(ok / "checkpoints" / "last.ckpt")["state_dict"])
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_val_batches=2,
                    default_root_dir=tmp_path / "one").validate(module, dm, verbose=False)[0]
    assert one["val/relation_swap_acc"] == pytest.approx(logged, abs=1e-6)
    assert out.returncode != 0 and "rank 1 fails at step 2 (injected)" in out.stderr
    (run,) = list((tmp_path / "runs").glob("clip/*"))
    ckpts = {p.name: read_checkpoint(p)["global_step"] for p in (run / "checkpoints").glob("*.ckpt")}
    assert ckpts.get("step.ckpt") == 2 and all(step > 0 for step in ckpts.values())  # nothing from the launcher
    assert not (run / "done.json").exists()


def test_bad_steps_to_the_limit_at_the_very_end_stop_the_run_when_the_count_is_read_late(make_cfg, inject,
                                                                                         monkeypatch):
    """On a GPU the count of bad steps in a row is read one step late (no sync in the step): the last three of
    five steps bad, limit 3, would finish as a success; the run's end reads the count once more."""
    from methods import guard

    def lagged_push(self, x):  # the GPU's behaviour on the CPU: the previous step's value
        previous, self._pending = getattr(self, "_pending", None), x.clone()
        return None if previous is None else float(previous)

    monkeypatch.setattr(guard.LaggedRead, "push", lagged_push)
    inject["cb"] = Inject(nan_images={2, 3, 4})
    cfg = make_cfg("trainer.limit_train_batches=5", "trainer.max_epochs=1", "optim.max_bad_steps=3")
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss or gradient .*step 5"):
        train_mod.train(cfg)
    (run,) = list(Path(cfg.runs_dir).glob("clip/*"))
    assert (run / "checkpoints" / "last-good.ckpt").is_file() and not (run / "done.json").exists()


def test_gradient_clipping_under_bf16_mixed_with_fused_adamw(make_cfg):
    """Lightning's own clipping refuses fused AdamW under bf16-mixed; the lab clips on the device itself."""
    run = train_mod.train(make_cfg("trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.5",
                                   "trainer.limit_train_batches=3", "trainer.max_epochs=1"))
    assert (run / "done.json").is_file()
    module, _ = train_mod.build(make_cfg())
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    optimizer = torch.optim.AdamW(params, fused=True)
    module.configure_gradient_clipping(optimizer, 0.5, "norm")
    total = torch.stack([p.grad.norm() for p in params]).norm()
    assert total == pytest.approx(0.5, rel=1e-2)  # (float32 sums over a million elements)
    module.configure_gradient_clipping(optimizer, 0.01, "value")
    assert all(p.grad.abs().max() <= 0.01 for p in params)


def test_float16_mixed_precision_is_refused_with_the_reason(make_cfg):
    import configs

    with pytest.raises(configs.ConfigError, match="gradient scaler would override the non-finite guard"):
        configs.validate(make_cfg("trainer.precision=16-mixed"))


def test_a_run_that_fails_before_its_first_checkpoint_is_set_aside(make_cfg, monkeypatch, tmp_path, capsys):
    """Nothing to continue from: its folder (config, environment, logs) is kept as <run>.failed-1, not left among
    the runs make bench offers to resume; a run_dir the user named stays where it is."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("broken before the first step")

    monkeypatch.setattr(L.Trainer, "fit", broken)
    with pytest.raises(RuntimeError, match="broken before"):
        train_mod.train(make_cfg())
    (aside,) = (tmp_path / "runs" / "clip").iterdir()
    assert aside.name.endswith(".failed-1") and (aside / "config.yaml").is_file()
    assert "failed before its first checkpoint; kept as" in capsys.readouterr().err
    named = tmp_path / "mine"
    with pytest.raises(RuntimeError, match="broken before"):
        train_mod.train(make_cfg(f"run_dir={named}"))
    assert (named / "config.yaml").is_file()

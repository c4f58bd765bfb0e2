"""Faults: non-finite steps are skipped and counted, too many in a row stop the run with the last good state."""
from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from methods import train as train_mod


class PoisonBatches(L.Callback):
    """Turns the images of the chosen global steps into NaN (a corrupt batch, an overflow)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.good: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step in self.steps:
            if self.good is None:
                self.good = {k: v.detach().clone() for k, v in module.state_dict().items()}
            batch["image"].fill_(float("nan"))


@pytest.fixture
def poison(monkeypatch):
    """Adds a PoisonBatches callback to the trainer that methods.train builds."""
    holder = {}
    real = L.Trainer

    def trainer(*args, callbacks=(), **kwargs):
        return real(*args, callbacks=[*callbacks, holder["cb"]], **kwargs)

    monkeypatch.setattr(train_mod.L, "Trainer", trainer)
    return holder


def test_a_nan_step_is_skipped_and_counted(make_cfg, poison):
    poison["cb"] = PoisonBatches({2})
    run = train_mod.train(make_cfg("trainer.limit_train_batches=5"))
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert max(float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")) == 1.0
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert (run / "done.json").is_file()


def test_too_many_bad_steps_stop_with_the_last_good_state(make_cfg, poison):
    poison["cb"] = PoisonBatches(set(range(2, 100)))
    cfg = make_cfg("trainer.limit_train_batches=8", "optim.max_bad_steps=3")
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss or gradient.*last-good.ckpt"):
        train_mod.train(cfg)
    (run,) = list(Path(cfg.runs_dir).glob("clip/*"))
    saved = torch.load(run / "checkpoints" / "last-good.ckpt", weights_only=True)["state_dict"]
    good = poison["cb"].good  # the weights before the first poisoned step, which no step changed
    for k, v in good.items():
        torch.testing.assert_close(saved[k], v, msg=k)
    assert not (run / "done.json").exists()


def test_same_seed_same_weights_twice(make_cfg):
    a = torch.load(train_mod.train(make_cfg()) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(train_mod.train(make_cfg()) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_and_foreign_checkpoints_are_named_not_unpickled(make_cfg, tmp_path, capsys):
    from benchmarks.run import main as bench_main

    run = train_mod.train(make_cfg())
    ckpt = run / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a half-written file
    assert bench_main([f"runs=[{run}]", "ckpt=last", f"out_dir={tmp_path / 'r'}"]) == 2
    assert f"{ckpt}: not a readable checkpoint" in capsys.readouterr().err

    class Evil:  # an object whose unpickling would run code
        def __reduce__(self):
            return (print, ("unpickled!",))

    import pickle
    ckpt.write_bytes(pickle.dumps({"state_dict": Evil()}))
    assert bench_main([f"runs=[{run}]", "ckpt=last", f"out_dir={tmp_path / 'r2'}"]) == 2
    captured = capsys.readouterr()
    assert "unpickled!" not in captured.out and "not a readable checkpoint" in captured.err


def test_a_full_disk_never_leaves_half_a_file(tmp_path, monkeypatch):
    import errno

    from configs.files import write_atomic

    target = tmp_path / "result.json"
    write_atomic(target, '{"ok": 1}')
    real = Path.write_text

    def full(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)  # part of it got out, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, '{"ok": 2, "more": "data"}')
    assert target.read_text() == '{"ok": 1}'  # the old result is intact

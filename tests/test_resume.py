"""Exact resume: a run stopped mid-epoch by SIGTERM and then by SIGKILL, continued each time, ends with the
weights, optimizer state and metrics of an uninterrupted run of the same seed; the data order and every
per-sample draw are functions of (seed, epoch, index), so neither the resume point nor the workers matter."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
import torch

from methods.checkpoints import read_checkpoint
from methods.train import main as train_main
from tests_support import TINY_ARGS

from tests_support import ROOT
PER_EPOCH = 10  # steps an epoch: 80 samples, batches of 8
ARGS = TINY_ARGS + ["trainer.max_epochs=2", "trainer.limit_train_batches=1.0", "trainer.checkpoint_every_n_steps=3",
                    f"data.options.train_size={8 * PER_EPOCH}", "trainer.enable_progress_bar=false"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # every process of the comparison computes with one thread


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def start(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "methods.train", f"run_dir={run}", *ARGS, *extra], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, ckpt: Path, step: int, timeout: float = 400) -> None:
    """Until `ckpt` holds at least `step` optimizer steps (it is replaced atomically, so it is always whole)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-3000:]}"
        if ckpt.is_file() and read_checkpoint(ckpt, mmap=True)["global_step"] >= step:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {step} in {timeout} s")


def losses(run: Path, key: str = "train/loss", by: str = "step") -> dict[int, float]:
    """step (or epoch) -> a logged value over every metrics file of a run (a continued run's rows replace the
    earlier ones)."""
    out = {}
    for path in sorted(run.glob("metrics.part*.csv")) + [run / "metrics.csv"]:
        with open(path) as f:
            out |= {int(r[by]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}
    return out


def val_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]


# how far apart each tensor of an AdamW state entry may be; every one is compared, whatever its name
STATE_TOLERANCE = {"exp_avg": {"rtol": 1e-5, "atol": 1e-9}, "exp_avg_sq": {"rtol": 1e-5, "atol": 1e-12}}


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    """Checkpoint b's optimizers hold the state of checkpoint a's: as many optimizers, the same parameter entries,
    and in each entry the same tensors (exp_avg, exp_avg_sq, step), all of them compared."""
    oa, ob = a["optimizer_states"], b["optimizer_states"]
    assert len(oa) == len(ob) >= 1
    for opt_a, opt_b in zip(oa, ob, strict=True):
        sa, sb = opt_a["state"], opt_b["state"]
        na, nb = len(sa), len(sb)  # zip would stop silently at the shorter one
        assert na == nb > 0, f"{na} parameter states in the reference, {nb} after resume"
        assert sorted(sa) == sorted(sb)
        for pid in sa:
            assert sorted(sa[pid]) == sorted(sb[pid]), pid
            assert {"exp_avg", "exp_avg_sq", "step"} <= set(sa[pid]), sorted(sa[pid])
            for name, va in sa[pid].items():
                vb = sb[pid][name]
                if name == "step":  # a count of steps: exactly equal
                    assert float(vb) == float(va) > 0, (pid, float(va), float(vb))
                else:
                    torch.testing.assert_close(vb, va, **STATE_TOLERANCE.get(name, {"rtol": 1e-5, "atol": 1e-9}),
                                               msg=lambda m, pid=pid, name=name: f"state[{pid}][{name}]: {m}")
        assert len(opt_a["param_groups"]) == len(opt_b["param_groups"])
        for ga, gb in zip(opt_a["param_groups"], opt_b["param_groups"], strict=True):
            assert sorted(ga) == sorted(gb)
            for key, va in ga.items():  # lr (the schedule's position), betas, weight decay, the parameter ids
                same = gb[key] == pytest.approx(va, rel=1e-6) if isinstance(va, float) else gb[key] == va
                assert same, (key, va, gb[key])


def test_killed_mid_epoch_twice_resumes_to_the_uninterrupted_result(tmp_path, one_thread):
    ref = tmp_path / "ref"
    assert train_main([f"run_dir={ref}", *ARGS]) == 0  # uninterrupted, no workers
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"

    # a preemption (SIGTERM) in epoch 0, with a worker process: the step in flight ends, a checkpoint is written
    proc = start(run, "data.num_workers=1")
    wait_for_step(proc, ckpts / "step.ckpt", 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM and f"resume={run}" in proc.stderr.read()
    stopped = read_checkpoint(ckpts / "interrupted.ckpt")["global_step"]
    assert 3 <= stopped < PER_EPOCH, "not stopped mid-epoch; make the epoch longer"

    # the same command again continues the run in its folder; then SIGKILL in epoch 1 (nothing is written)
    proc = start(run, "data.num_workers=1")
    wait_for_step(proc, ckpts / "step.ckpt", PER_EPOCH + 2)
    proc.kill()
    proc.wait(timeout=60)
    killed = read_checkpoint(ckpts / "step.ckpt")["global_step"]
    assert PER_EPOCH < killed < 2 * PER_EPOCH and not (run / "done.json").exists()

    assert train_main([f"resume={run}"]) == 0
    a, b = read_checkpoint(ref / "checkpoints" / "last.ckpt"), read_checkpoint(ckpts / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2 * PER_EPOCH
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
    assert_same_optimizer_state(a, b)
    la, lb = losses(ref), losses(run)
    assert sorted(la) == sorted(lb) == list(range(2 * PER_EPOCH))  # every step logged once, under its own number
    assert all(abs(la[s] - lb[s]) <= 1e-5 for s in la), {s: (la[s], lb[s]) for s in la if la[s] != lb[s]}
    assert val_losses(run) == pytest.approx(val_losses(ref)[-1:], rel=1e-6)
    assert (run / "metrics.part2.csv").is_file() and len(list(tmp_path.iterdir())) == 2  # no other folder
    assert len(json.loads((run / "environment.json").read_text())) == 3  # started, continued, resumed


def test_a_sigterm_during_validation_finishes_it_and_the_resumed_run_keeps_every_epochs_val_loss(
        tmp_path, one_thread, monkeypatch):
    """A preemption while the first epoch validates: that validation completes (its val/loss is logged and best.ckpt
    sees it), the run stops at the epoch's end, and the resumed run ends as the uninterrupted one."""
    from methods.base import ContrastiveMethod

    ref = tmp_path / "ref"
    assert train_main([f"run_dir={ref}", *ARGS, "trainer.checkpoint_every_n_steps=0"]) == 0
    step = ContrastiveMethod.validation_step

    def signalled(self, batch, batch_idx):
        if self.trainer.current_epoch == 0 and batch_idx == 0 and not self.trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it; the batch goes on
        return step(self, batch, batch_idx)

    run = tmp_path / "run"
    monkeypatch.setattr(ContrastiveMethod, "validation_step", signalled)
    assert train_main([f"run_dir={run}", *ARGS, "trainer.checkpoint_every_n_steps=0"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(ContrastiveMethod, "validation_step", step)
    assert read_checkpoint(run / "checkpoints" / "interrupted.ckpt")["global_step"] == PER_EPOCH
    assert train_main([f"resume={run}"]) == 0
    val_run, val_ref = (losses(r, "val/loss", by="epoch") for r in (run, ref))
    assert sorted(val_run) == sorted(val_ref) == [0, 1]  # no epoch's validation is lost
    assert val_run == pytest.approx(val_ref, rel=1e-5)
    best = [read_checkpoint(r / "checkpoints" / "best.ckpt")["global_step"] for r in (ref, run)]
    assert best[0] == best[1]
    # throughput.json: the continued attempt's figures, its own first steps left out, and the stopped attempt's kept
    speed = json.loads((run / "throughput.json").read_text())
    (first,) = speed["earlier_attempts"]
    assert first["measured_steps"] == PER_EPOCH - 5 - 1 and speed["measured_steps"] == PER_EPOCH - 5 - 1


def test_a_finished_run_is_not_continued_and_a_changed_config_is_refused(tmp_path, make_cfg, capsys):
    import configs

    run = tmp_path / "exp"
    cfg = make_cfg(f"run_dir={run}")
    run.mkdir()
    configs.save(cfg, run / "config.yaml")  # an unfinished run that saved no checkpoint yet
    assert train_main([f"run_dir={run}", *TINY_ARGS, "optim.lr=0.5", f"runs_dir={cfg.runs_dir}"]) == 2
    assert "another config (optim.lr: 0.001 -> 0.5)" in capsys.readouterr().err
    # where it writes and how often it reports are not the run: continued (a sweep folder moved, another log rate)
    assert train_main([f"run_dir={run}", *TINY_ARGS, "trainer.log_every_n_steps=2", "runs_dir=/elsewhere"]) == 0
    err = capsys.readouterr().err
    assert "continued with runs_dir: " in err and "trainer.log_every_n_steps: 1 -> 2" in err
    assert (run / "done.json").is_file()
    assert configs.load_yaml(run / "config.yaml").trainer.log_every_n_steps == cfg.trainer.log_every_n_steps
    (run / "done.json").write_text("{}")
    assert train_main([f"run_dir={run}", *TINY_ARGS, f"runs_dir={cfg.runs_dir}"]) == 2
    assert "the run finished" in capsys.readouterr().err
    assert train_main([f"resume={run}"]) == 2 and "finished" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert train_main([f"run_dir={tmp_path / 'other'}", *TINY_ARGS]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("data", ["coco", "coco2017", "flickr30k", "vg", "negclip_coco", "shapes_forward"])
def test_a_run_on_any_data_source_reads_its_own_config_back(tmp_path, data):
    """resume=, run_dir= and make bench read a run's config.yaml over today's schema: the data slot must take the
    run's own source's options (a COCO run's `root`), not the default shapes world's."""
    import configs
    from methods.train import compose_train, config_differences, saved_config

    cfg = compose_train([f"data={data}", f"runs_dir={tmp_path}", "method=negclip"])
    run = tmp_path / "run"
    run.mkdir()
    configs.save(cfg, run / "config.yaml")
    again = saved_config(run)
    assert again.data.source == cfg.data.source and config_differences(again, cfg) == []


@pytest.mark.parametrize("method, key, before, now", [("smartclip", "exclude_duplicates", False, True),
                                                     ("structureclip", "triple_forms", "parser", "written")])
def test_a_method_key_added_after_a_run_reads_back_as_the_behaviour_before_it(tmp_path, method, key, before, now):
    """A run's config saved before a method key existed resumes (and benchmarks) with the behaviour it trained with:
    the key takes the method's dataclass default, not today's YAML, which turns the new behaviour on."""
    import configs
    from methods.train import compose_train, config_differences, saved_config

    cfg = compose_train([f"method={method}", f"runs_dir={tmp_path}"])
    assert cfg.method[key] == now
    run = tmp_path / "run"
    run.mkdir()
    plain = configs.to_plain(cfg)
    del plain["method"][key]
    configs.save(OmegaConf.create(plain), run / "config.yaml")
    again = saved_config(run)
    assert again.method[key] == before
    assert config_differences(again, cfg) == [f"method.{key}: {before!r} -> {now!r}"]


def test_resume_passes_over_damaged_checkpoints_and_never_unpickles(tmp_path, make_cfg, capsys):
    import pickle

    import configs
    from methods.checkpoints import resume_checkpoint

    run = tmp_path / "exp"
    (run / "checkpoints").mkdir(parents=True)
    configs.save(make_cfg(), run / "config.yaml")
    torch.save({"state_dict": {}, "global_step": 6}, run / "checkpoints" / "last.ckpt")
    torch.save({"state_dict": {}, "global_step": 9}, run / "checkpoints" / "step.ckpt")
    data = (run / "checkpoints" / "step.ckpt").read_bytes()
    (run / "checkpoints" / "step.ckpt").write_bytes(data[: len(data) // 2])  # cut short by a crash of the disk

    class Evil:  # unpickling this would run code
        def __reduce__(self):
            return (print, ("unpickled!",))

    (run / "checkpoints" / "interrupted.ckpt").write_bytes(pickle.dumps({"state_dict": Evil(), "global_step": 99}))
    assert resume_checkpoint(run) == run / "checkpoints" / "last.ckpt"  # the furthest readable one
    captured = capsys.readouterr()
    assert "unpickled!" not in captured.out
    assert f"passing over {run / 'checkpoints' / 'step.ckpt'}: not a readable checkpoint" in captured.err
    assert "interrupted.ckpt: not a readable checkpoint" in captured.err
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert train_main([f"resume={run}"]) == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint to resume from" in err and "last.ckpt" in err and "step.ckpt" in err


def test_the_order_is_a_function_of_seed_and_epoch_and_ranks_share_it():
    from datamodules.sampling import EpochSampler

    def idx(sampler):
        return [d.index for d in sampler]

    s = EpochSampler(40, 4, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert {d.epoch for d in e0} == {0} and {d.epoch for d in e1} == {1}  # the epoch travels with each key
    assert sorted(idx(e0)) == list(range(40)) and idx(e0) != idx(e1)
    assert idx(EpochSampler(40, 4, seed=3)) == idx(e0) and idx(EpochSampler(40, 4, seed=4)) != idx(e0)
    s.seek(1, 3)
    assert list(s) == e1[12:]
    s.set_epoch(1)  # Lightning sets the epoch again when it continues: the start stays
    assert list(s) == e1[12:] and len(s) == 40
    s.set_epoch(2)
    assert len(list(s)) == 40
    # two ranks: at every step their batches together are the batch of one process with twice the batch size
    r0, r1, one = idx(EpochSampler(40, 4, 3, 0, 2)), idx(EpochSampler(40, 4, 3, 1, 2)), idx(EpochSampler(40, 8, 3))
    assert all(sorted(r0[4 * k: 4 * k + 4] + r1[4 * k: 4 * k + 4]) == sorted(one[8 * k: 8 * k + 8]) for k in range(5))


def test_the_loader_state_continues_mid_epoch_and_rolls_over_at_its_end():
    from torch.utils.data import Dataset

    from datamodules.sampling import EpochSampler, ResumableLoader

    class Keys(Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, key):
            return key.index

    def loader(seed=3, position=None):
        return ResumableLoader(Keys(), batch_size=4, sampler=EpochSampler(40, 4, seed), drop_last=True,
                               position=position)

    full = loader()
    full.epoch_sampler.set_epoch(1)
    epoch1 = [b.tolist() for b in full]
    saved = loader(position=lambda: {"epoch": 1, "batches": 3, "batches_per_epoch": 10}).state_dict()
    resumed = loader()
    resumed.load_state_dict(saved)
    assert [b.tolist() for b in resumed] == epoch1[3:]
    at_end = loader()
    at_end.load_state_dict(saved | {"batches": 10})  # written at the end of epoch 1: epoch 2 from its start
    assert (at_end.epoch_sampler.epoch, at_end.epoch_sampler.start) == (2, 0)
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        loader(seed=4).load_state_dict(saved)


def test_an_item_depends_on_seed_epoch_and_index_only(make_cfg):
    from datamodules import CaptionDataModule
    from datamodules.sampling import Draw
    from methods.train import build

    module, _ = build(make_cfg())

    def dataset(seed):
        dm = CaptionDataModule(make_cfg().data, preprocess_train=module.preprocess_train, seed=seed,
                               preprocess_val=module.preprocess_val, tokenizer=module.tokenizer,
                               extra_fields=("neg_text", "partial_text"),
                               field_options={"negative_kinds": ["relation", "attribute", "noun", "shuffle"]})
        return dm.dataset("train")

    def draw(ds, key):
        item = ds[key]
        return item["caption"], item["neg_text"].tolist(), item["partial_text"].tolist()

    ds, keys = dataset(0), [Draw(i, e) for e in (0, 1) for i in range(12)]
    forward = [draw(ds, k) for k in keys]
    assert [draw(ds, k) for k in reversed(keys)] == forward[::-1]  # the order of drawing does not matter
    assert [draw(dataset(0), k) for k in keys] == forward  # nor the process history
    assert draw(ds, 5) == draw(ds, Draw(5, 0))
    assert forward[:12] != forward[12:]  # another epoch draws other captions and negatives
    assert [draw(dataset(1), k) for k in keys] != forward  # and so does another seed

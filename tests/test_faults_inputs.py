"""Faults in what the lab reads and writes: a full disk never leaves half a file; corrupt and foreign checkpoints
are named, never unpickled; a corrupt image stops training with its file and record named (also from a worker);
a damaged result.json or config.yaml is named instead of crashing deep inside a parser."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import configs.files
from benchmarks.run import main as bench_main
from benchmarks.sweep import read_result
from datamodules.images import BadInput
from methods import train as train_mod
from test_negclip_tsv import write_fixture
from tests_support import FullDisk

from tests_support import ROOT


def test_a_full_disk_never_leaves_half_a_file(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    configs.files.write_atomic(target, '{"ok": 1}')
    real_open = open

    monkeypatch.setattr(configs.files, "open", lambda *a, **k: FullDisk(real_open(*a, **k), budget=5), raising=False)
    with pytest.raises(OSError, match=r"No space left on device: writing .*result.json \(nothing replaced"):
        configs.files.write_atomic(target, '{"ok": 2, "more": "data"}')
    assert target.read_text() == '{"ok": 1}' and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_two_writers_of_one_file_both_finish(tmp_path):
    # DDP ranks that fill one cache file (NegCLIP's neighbour table) at the same moment: the outer writer's
    # temporary file must survive the inner one's rename
    target = tmp_path / "neighbours.pt"
    with configs.files.atomic_open(target, "wb") as first:
        with configs.files.atomic_open(target, "wb") as second:
            torch.save(torch.arange(3), second)
        torch.save(torch.arange(3), first)
    assert torch.equal(torch.load(target, weights_only=True), torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["neighbours.pt"]


def test_corrupt_and_foreign_checkpoints_are_named_not_unpickled(make_cfg, tmp_path, capsys):
    run = train_mod.train(make_cfg("trainer.limit_train_batches=2", "trainer.limit_val_batches=1"))
    ckpt = run / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a half-written file
    assert bench_main([f"runs=[{run}]", "ckpt=last", f"out_dir={tmp_path / 'r'}"]) == 2
    assert f"{ckpt}: not a readable checkpoint" in capsys.readouterr().err

    class Evil:  # an object whose unpickling would run code
        def __reduce__(self):
            return (print, ("unpickled!",))

    ckpt.write_bytes(pickle.dumps({"state_dict": Evil()}))
    assert bench_main([f"runs=[{run}]", "ckpt=last", f"out_dir={tmp_path / 'r2'}"]) == 2
    captured = capsys.readouterr()
    assert "unpickled!" not in captured.out and "not a readable checkpoint" in captured.err

    config = run / "config.yaml"
    config.write_text(config.read_text()[:-40] + "\n  batch: [8,\n")  # cut short mid-value
    assert bench_main([f"runs=[{run}]", f"out_dir={tmp_path / 'r3'}"]) == 2
    assert f"{config}: not readable YAML at line" in capsys.readouterr().err
    config.write_text("seed: 0\nmethod:\n  name: clip\n")  # cut short at a line end: sections missing
    (run / "done.json").unlink()
    assert train_mod.main([f"resume={run}"]) == 2
    assert f"{config}: a run's config without model, data, trainer, optim (truncated?)" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_stops_training_naming_file_and_record(tmp_path, workers):
    path = write_fixture(tmp_path)
    image = tmp_path / "coco" / "val2014" / "COCO_val2014_000000000005.jpg"
    image.write_bytes(image.read_bytes()[:60])  # a truncated JPEG
    cfg = train_mod.compose_train([
        "data=negclip_coco", f"data.options.train_file={path}", f"data.options.val_file={path}",
        f"data.options.image_root={tmp_path / 'coco'}", "data.batch_size=4", "data.eval_batch_size=4",
        f"data.num_workers={workers}", f"runs_dir={tmp_path / 'runs'}", "trainer=debug"])
    with pytest.raises(BadInput, match=r"train.csv:7: cannot read image .*COCO_val2014_000000000005.jpg"):
        train_mod.train(cfg)


def test_a_damaged_sweep_result_is_named_kept_and_redone(tmp_path, capsys):
    cell = tmp_path / "cell"
    cell.mkdir()
    assert read_result(cell) is None  # not run yet
    configs.files.write_atomic(cell / "result.json", '{"rows": [{"method": "clip", "syn_relation": 0.5}]}')
    assert read_result(cell)["rows"][0]["method"] == "clip"
    (cell / "result.json").write_text('{"rows": [{"method": "cl')  # truncated by something outside the lab
    assert read_result(cell) is None
    err = capsys.readouterr().err
    assert f"{cell / 'result.json'}: damaged result (JSONDecodeError" in err and "result.damaged-1.json" in err
    assert (cell / "result.damaged-1.json").read_text() == '{"rows": [{"method": "cl'  # kept, not lost
    assert not (cell / "result.json").exists()


def test_checkpoint_io_round_trips_what_lightning_hands_it(tmp_path):
    from methods.checkpoints import AtomicCheckpointIO

    io, weights = AtomicCheckpointIO(), {"w": torch.arange(6.0).reshape(2, 3)}
    io.save_checkpoint(weights, tmp_path / "sub" / "weights.ckpt")  # ddp_spawn returns bare weights this way
    assert torch.equal(io.load_checkpoint(tmp_path / "sub" / "weights.ckpt")["w"], weights["w"])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["weights.ckpt"]  # no temporary file left


def test_a_damaged_environment_record_is_kept_aside_and_started_again(tmp_path, capsys):
    import json

    (tmp_path / "environment.json").write_text('[{"torch": "2.')  # torn mid-write by another tool
    train_mod.record_environment(tmp_path)
    assert (tmp_path / "environment.damaged-1.json").read_text() == '[{"torch": "2.'
    assert "environment.json: damaged (JSONDecodeError" in capsys.readouterr().err
    (start,) = json.loads((tmp_path / "environment.json").read_text())
    assert start["torch"] == torch.__version__ and "started" in start
    train_mod.record_environment(tmp_path)  # a continued run adds its own start
    assert len(json.loads((tmp_path / "environment.json").read_text())) == 2
    (tmp_path / "environment.json").write_text('{"torch": "2.14"}')  # not a list; the earlier copy stays
    train_mod.record_environment(tmp_path)
    assert (tmp_path / "environment.damaged-1.json").read_text() == '[{"torch": "2.'
    assert (tmp_path / "environment.damaged-2.json").read_text() == '{"torch": "2.14"}'


def test_the_cpu_is_named_by_model_vendor_and_numbers_and_reports_say_so(tmp_path, monkeypatch):
    from benchmarks.run import trained_on

    info = tmp_path / "cpuinfo"
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {}\nmodel name\t: AMD EPYC\n"
    info.write_text(block.format(0, 17) + "\n" + block.format(1, 99))  # the first processor's block is read
    assert train_mod.cpu_model(info) == "AMD EPYC (AuthenticAMD family 25 model 17)"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n")  # aarch64 has no model name
    monkeypatch.setattr(train_mod.platform, "processor", lambda: "aarch64")
    assert train_mod.cpu_model(info) == "aarch64" and train_mod.cpu_model(tmp_path / "missing") == "aarch64"

    start = {"gpu": "NVIDIA H200", "cpu": "AMD EPYC (AuthenticAMD family 25 model 17)", "cpu_capability": "AVX2"}
    assert trained_on(start, on_cpu=False) == ", on NVIDIA H200"
    assert trained_on(start, on_cpu=True) == ", on CPU (AMD EPYC (AuthenticAMD family 25 model 17), AVX2)"
    assert trained_on({"cpu_capability": "AVX512"}, on_cpu=True) == ", on CPU (AVX512)"
    assert trained_on({"cpu": "AMD EPYC"}, on_cpu=True) == ""  # a start from before the field says nothing


def test_portable_cpu_kernels_are_read_from_their_file_named_in_reports_and_set_by_make(tmp_path):
    from benchmarks.run import trained_on

    env_file = tmp_path / "portable.env"
    env_file.write_text("# comment\n\nA_ISA=default\nB_CBWR=COMPATIBLE\n")
    portable = train_mod.portable_cpu_env(env_file)
    assert portable == {"A_ISA": "default", "B_CBWR": "COMPATIBLE"}
    assert train_mod.cpu_kernels({"A_ISA": "DEFAULT", "B_CBWR": "compatible", "OTHER": "1"}, portable) == "portable"
    assert train_mod.cpu_kernels({"OTHER": "1"}, portable) == "native"
    assert train_mod.cpu_kernels({"A_ISA": "avx2", "B_CBWR": "COMPATIBLE"}, portable) == "A_ISA=avx2 B_CBWR=COMPATIBLE"
    for bad_line in ("B_CBWR", "B_CBWR = COMPATIBLE", "b_cbwr=COMPATIBLE"):
        env_file.write_text(f"A_ISA=default\n{bad_line}\n")
        with pytest.raises(ValueError, match=rf"portable.env:2: not KEY=VALUE \(capitals, no spaces\): '{bad_line}'"):
            train_mod.portable_cpu_env(env_file)

    start = {"cpu": "AMD EPYC", "cpu_capability": "DEFAULT", "cpu_kernels": "portable"}
    assert trained_on(start, on_cpu=True) == ", on CPU (AMD EPYC, DEFAULT, portable kernels)"
    assert trained_on(start | {"cpu_kernels": "native"}, on_cpu=True) == ", on CPU (AMD EPYC, DEFAULT)"

    # make's CPU_KERNELS=portable puts the file's variables in front of every Python command; a wrong value stops it
    venv = f"VENV={Path(sys.executable).parents[1]}"
    def train_command(*args: str) -> str:  # the recipe line (-n: printed, not run; a stale venv adds install lines)
        out = subprocess.run(["make", "-s", "-n", "train", *args, venv], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True).stdout
        (line,) = [x for x in out.splitlines() if "-m methods.train" in x]
        return line

    pairs = " ".join(f"{k}={v}" for k, v in train_mod.portable_cpu_env().items())
    assert train_command("CPU_KERNELS=portable").startswith(f"env {pairs} ")
    assert not train_command().startswith("env ")
    bad = subprocess.run(["make", "-s", "-n", "train", "CPU_KERNELS=fast", venv], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "CPU_KERNELS must be native or portable, not 'fast'" in bad.stderr

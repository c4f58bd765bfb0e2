"""Every config file composes; unknown names, keys and wrongly typed values fail at once and say why."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import configs
from methods import METHODS
from methods.train import compose_train, main

from tests_support import ROOT


@pytest.mark.parametrize("group", ["method", "model", "data", "trainer", "optim"])
def test_every_group_file_composes(group):
    names = configs.group_names(group)
    assert names, f"configs/{group}/ is empty"
    for name in names:
        cfg = compose_train([f"{group}={name}"])
        assert cfg[group] is not None


def test_method_files_match_the_registry():
    assert configs.group_names("method") == METHODS.names()


def test_every_bench_file_composes():
    for name in configs.group_names("bench"):
        cfg = configs.compose("bench", [f"bench={name}"])
        assert cfg.bench.name == name and cfg.bench.benchmarks


def test_every_sweep_file_composes():
    from benchmarks.sweep import cells, load_spec

    files = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))
    assert files
    for path in files:
        spec = load_spec(path, [])
        assert path.stem == spec.name, f"{path.name}: the sweep's name is '{spec.name}'"
        for _, point, overrides in cells(spec):
            if point["seed"] == spec.seeds[0]:  # a seed never makes a config invalid
                compose_train(overrides)


def test_unknown_method_lists_the_available_ones(capsys):
    assert main(["method=nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and all(name in err for name in METHODS.names())


def test_unknown_key_is_rejected_with_the_valid_keys():
    with pytest.raises(configs.ConfigError, match=r"optim\.nosuch.*valid keys under 'optim'.*lr"):
        compose_train(["optim.nosuch=1"])
    with pytest.raises(configs.ConfigError, match=r"data\.options\.colour.*num_objects"):
        compose_train(["data.options.colour=red"])
    with pytest.raises(configs.ConfigError, match="unknown config key 'nosuch'"):
        compose_train(["nosuch=1"])
    with pytest.raises(configs.ConfigError) as e:  # every mistake of one command line at once
        compose_train(["optim.nosuch=1", "seed=3", "data.bogus=2", "optim.lr=fast"])
    assert e.value.args[0].splitlines() == [
        "command line: 3 problems:",
        "  unknown config key 'optim.nosuch'; " + configs._valid_keys(compose_train([]), "optim.nosuch"),
        "  unknown config key 'data.bogus'; " + configs._valid_keys(compose_train([]), "data.bogus"),
        "  Value 'fast' of type 'str' could not be converted to Float (key 'optim.lr')"]


def test_unknown_model_arch_key_lists_open_clips_keys_and_leaves_no_run_folder(tmp_path, capsys):
    assert main(["model=tiny", "model.arch.vision_cfg.bogus=1", f"runs_dir={tmp_path / 'runs'}", "trainer=debug"]) == 2
    err = capsys.readouterr().err
    assert "model.arch.vision_cfg: unknown key(s) bogus" in err and "patch_size" in err
    assert not (tmp_path / "runs").exists()  # refused before a folder is made
    assert main(["model=tiny", "model.arch.depth=3", f"runs_dir={tmp_path / 'runs'}", "trainer=debug"]) == 2
    assert "model.arch: unknown key(s) depth" in capsys.readouterr().err


def test_a_list_item_set_after_its_list_keeps_the_command_lines_meaning():
    cfg = compose_train(["method=negclip", "method.negative_kinds=[relation,noun]", "method.negative_kinds.1=attribute"])
    assert list(cfg.method.negative_kinds) == ["relation", "attribute"]
    assert compose_train(["optim.lr=abc", "optim.lr=0.1"]).optim.lr == 0.1  # the last value of a key is the one


def test_wrong_type_is_rejected():
    with pytest.raises(configs.ConfigError, match="optim.lr"):
        compose_train(["optim.lr=fast"])
    with pytest.raises(configs.ConfigError, match="data.options.num_objects"):
        compose_train(["data.options.num_objects=two"])


def test_unknown_group_file_lists_the_files():
    with pytest.raises(configs.ConfigError, match="unknown trainer 'tpu'.*cpu"):
        compose_train(["trainer=tpu"])


def test_overrides_reach_the_config():
    cfg = compose_train(["optim.lr=0.5", "data.options.num_objects=3", "seed=7"])
    assert cfg.optim.lr == 0.5 and cfg.data.options.num_objects == 3 and cfg.seed == 7
    assert cfg.method.name == "clip"


def test_make_train_with_an_unknown_method_fails_at_once():
    out = subprocess.run(["make", "-s", "train", "METHOD=nosuch", f"VENV={Path(sys.executable).parents[1]}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown method 'nosuch'; available: " + ", ".join(METHODS.names()) in out.stderr


def test_impossible_values_are_all_named_before_anything_runs(tmp_path, capsys):
    argv = ["data.batch_size=0", "optim.lr=-1", "trainer.max_epochs=0", "optim.warmup_steps=-5", "trainer.precision=17",
            "trainer.accelerator=tpux", "trainer.limit_train_batches=2.5", f"runs_dir={tmp_path / 'runs'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in ("data.batch_size=0: must be >= 1", "optim.lr=-1.0: must be > 0", "trainer.max_epochs=0: must be >= 1",
                 "optim.warmup_steps=-5: must be >= 0", "trainer.precision='17': must be one of 32-true",
                 "trainer.accelerator='tpux': unknown accelerator; valid: auto, cpu",
                 "trainer.limit_train_batches=2.5: above 1 it is a count of batches and must be whole"):
        assert text in err, text
    assert not (tmp_path / "runs").exists()  # no run folder was made


def test_a_missing_data_file_is_named_before_anything_runs(tmp_path, capsys):
    argv = ["data=negclip_coco", f"data.options.train_file={tmp_path / 'nope.csv'}", f"runs_dir={tmp_path / 'runs'}",
            f"data.options.image_root={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"data.options.train_file='{tmp_path / 'nope.csv'}': file not found" in err
    assert "data.options.val_file=" in err and "data.options.image_root" not in err  # the folder is there
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, expected", [
    (["data=coco"], "data (coco_karpathy): {root}/dataset_coco.json: file not found (set data.options.annotations, or "
                    "data.options.root)"),
    (["data=coco2017"], "data (coco2017): {root}/annotations/captions_train2017.json: file not found"),
    (["data=vg"], "data (visual_genome): {root}/image_data.json: file not found (set data.options.image_data"),
    (["data.options.num_objects=7"], "data (shapes): shapes world: num_objects must be 2..4, got 7"),
    (["trainer=gpu"], "trainer.accelerator=gpu but no CUDA device is visible here"),
    (["method=negclip", "data=coco"], "data (coco_karpathy): {root}/dataset_coco.json: file not found"),
    (["method=negclip", "trainer=gpu"], "trainer.accelerator=gpu but no CUDA device is visible here"),
])
def test_data_files_source_options_and_the_device_are_checked_before_a_run_folder(tmp_path, capsys, monkeypatch,
                                                                                   argv, expected):
    """What the data module or the trainer would only find once fitting began is named before a folder is made,
    and before a method's fields do any work on the data (NegCLIP's neighbour table encodes every image)."""
    import torch

    from methods.negclip import NegCLIP

    def too_soon(self, dm):
        raise AssertionError("NegCLIP's neighbour table was started before the checks")

    monkeypatch.setattr(NegCLIP, "prepare_fields", too_soon)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    root = tmp_path / "nothing-here"
    data = any(a.startswith("data=") for a in argv)
    assert main([*argv, f"data.options.root={root}" if data else "seed=0", "model=tiny",
                 f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert expected.format(root=root) in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_world_the_model_cannot_see_whole_is_warned_about(caplog):
    """data=shapes_hard on the tiny model: its captions are cut at the model's context and its images shrink to
    the model's input; with the model the data file asks for, or on the default world, nothing is said."""
    import logging

    from methods.train import build

    def warnings_for(*argv):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="datamodules.datamodule"):
            build(compose_train(list(argv)))  # which checks the data module
        return [r.getMessage() for r in caplog.records if r.name == "datamodules.datamodule"]

    cut, small = warnings_for("data=shapes_hard")
    assert "captions of the first 256 training scenes reach the end of the model's text context of 24 tokens" in cut
    assert "images are drawn at 64 px and resized to the model's 32 px input" in small
    assert warnings_for("data=shapes_hard", "model.arch.vision_cfg.image_size=64",
                        "model.arch.text_cfg.context_length=40") == []
    assert warnings_for() == []

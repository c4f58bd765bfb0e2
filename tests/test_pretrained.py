"""Pretrained weights: local files in every format load the same weights without unpickling objects,
`local-dir:` folders load, and a tag offline either comes from the local cache or fails at once."""
from __future__ import annotations

import json
import pickle

import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from datamodules.hub import HubUnavailable
from methods.backbone import create_backbone
from methods.train import compose_train


def model_cfg(*overrides: str):
    return compose_train(list(overrides)).model


def random_tiny(seed: int, quick_gelu: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = model_cfg(f"model.force_quick_gelu={str(quick_gelu).lower()}")
    return create_backbone(cfg)[0]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_and_state_dict_files_load_identical_weights(tmp_path):
    source = random_tiny(seed=1)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(source.state_dict(), tmp_path / "w.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "open_clip_epoch_3.pt")  # an open_clip training checkpoint (DDP prefix)
    assert not same_weights(random_tiny(seed=2), source)
    for name in ("w.safetensors", "w.pt", "open_clip_epoch_3.pt"):
        loaded = create_backbone(model_cfg(f"model.pretrained={tmp_path / name}"))[0]
        assert same_weights(loaded, source), name


def test_a_lab_runs_checkpoint_starts_another_method_from_its_towers(tmp_path):
    """A NegCLIP run can fine-tune the CLIP a lab run trained: the checkpoint's `model.` entries, nothing else."""
    from methods.train import build

    torch.manual_seed(4)
    trained, _ = build(compose_train(["method=structureclip", f"cache_dir={tmp_path}"]))
    ckpt = tmp_path / "best.ckpt"
    torch.save({"epoch": 9, "state_dict": trained.state_dict(), "optimizer_states": []}, ckpt)
    loaded = create_backbone(model_cfg(f"model.pretrained={ckpt}"))[0]
    assert same_weights(loaded, trained.model) and not same_weights(random_tiny(seed=5), trained.model)
    with pytest.raises(ValueError, match=r"best.ckpt: a lab checkpoint of another model: .*config.yaml"):
        create_backbone(model_cfg(f"model.pretrained={ckpt}", "model.arch.embed_dim=64"))
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(ckpt.read_bytes()[:4096])
    with pytest.raises(ValueError, match="torn.ckpt: not a readable checkpoint"):
        create_backbone(model_cfg(f"model.pretrained={torn}"))


def test_openai_torchscript_archive_loads_without_running_it(tmp_path):
    source = random_tiny(seed=3, quick_gelu=True).eval()
    archive = torch.jit.trace(source, (torch.randn(1, 3, 32, 32), torch.randint(0, 99, (1, 24))), check_trace=False)
    archive.save(str(tmp_path / "ViT-tiny.pt"))
    cfg = model_cfg(f"model.pretrained={tmp_path / 'ViT-tiny.pt'}", "model.force_quick_gelu=true")
    loaded = create_backbone(cfg)[0]
    assert same_weights(loaded, source)
    with pytest.raises(ValueError, match="QuickGELU mismatch"):  # OpenAI's weights into a GELU model
        create_backbone(model_cfg(f"model.pretrained={tmp_path / 'ViT-tiny.pt'}"))
    # into a model with fewer layers (the archive's extra layers are not dropped silently) or other widths
    for other in ("model.arch.text_cfg.layers=2", "model.arch.vision_cfg.mlp_ratio=1.0"):
        with pytest.raises(ValueError, match="ViT-tiny.pt: not weights of this model"):
            create_backbone(model_cfg(f"model.pretrained={tmp_path / 'ViT-tiny.pt'}", "model.force_quick_gelu=true",
                                      other))


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_files_with_python_objects_are_refused(tmp_path, capsys):
    sd = random_tiny(seed=4).state_dict()
    torch.save({"state_dict": sd, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: holds Python objects besides tensors; it is not unpickled"):
        create_backbone(model_cfg(f"model.pretrained={tmp_path / 'evil.pt'}"))
    assert "unpickled!" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="model.pretrained=/no/such/ViT-B-32.pt: file not found"):
        create_backbone(model_cfg("model.pretrained=/no/such/ViT-B-32.pt"))


def test_local_dir_folder(tmp_path):
    source = random_tiny(seed=5)
    arch = OmegaConf.to_container(model_cfg().arch)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch, "preprocess_cfg": {}}))
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(weights, tmp_path / "w" / "open_clip_model.safetensors")
    for override in (f"model.pretrained=local-dir:{tmp_path / 'w'}", f"model.name=local-dir:{tmp_path / 'w'}"):
        model, _, preprocess, tokenizer = create_backbone(model_cfg(override))
        assert same_weights(model, source) and tokenizer(["a red circle"]).shape == (1, 24)
    (tmp_path / "w" / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights .* next to open_clip_config.json"):
        create_backbone(model_cfg(f"model.pretrained=local-dir:{tmp_path / 'w'}"))


def quick_gelu_folder(tmp_path, quick_gelu: bool = True):
    """A local-dir folder whose config declares its activation and its own normalisation (as OpenAI-derived
    open_clip folders do), with the weights of a random model of that architecture."""
    arch = OmegaConf.to_container(model_cfg().arch) | {"quick_gelu": quick_gelu}
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": arch, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    torch.manual_seed(7)
    source = open_clip.model.CLIP(**arch)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def test_bench_rebuilds_a_run_as_it_was_trained_from_a_local_dir_folder(tmp_path):
    """make bench never reads the starting weights again, but builds what they shaped: the folder's activation and
    preprocessing (with pretrained=None it built GELU and OpenAI's mean/std, and scored other features)."""
    import configs
    from benchmarks.run import load_run
    from methods.pretrained import uses_quick_gelu
    from methods.train import build

    folder = quick_gelu_folder(tmp_path)
    cfg = compose_train([f"model.pretrained=local-dir:{folder}", f"runs_dir={tmp_path}", f"cache_dir={tmp_path}/c"])
    trained, _ = build(cfg)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    configs.save(cfg, run / "config.yaml")
    torch.save({"state_dict": trained.state_dict(), "global_step": 1}, run / "checkpoints" / "last.ckpt")
    (folder / "open_clip_model.safetensors").unlink()  # the starting weights are not read again
    bench, _ = load_run(run, "last", torch.device("cpu"))
    assert uses_quick_gelu(trained.model) and uses_quick_gelu(bench.model)
    assert repr(bench.preprocess_val) == repr(trained.preprocess_val) and "0.5" in repr(bench.preprocess_val)
    trained.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bench.model.encode_image(x), trained.model.encode_image(x))


def test_force_quick_gelu_against_a_local_dir_folders_activation_is_refused(tmp_path):
    folder = quick_gelu_folder(tmp_path, quick_gelu=False)
    with pytest.raises(ValueError, match="QuickGELU mismatch: its open_clip_config.json declares GELU"):
        create_backbone(model_cfg(f"model.pretrained=local-dir:{folder}", "model.force_quick_gelu=true"))
    assert create_backbone(model_cfg(f"model.pretrained=local-dir:{folder}"))[0] is not None


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and empty caches: the Hugging Face cache and open_clip's URL cache under tmp_path."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_a_tag_offline_without_its_file_fails_at_once(offline):
    cfg = model_cfg("model=vitb32_quickgelu")  # pretrained: openai
    with pytest.raises(HubUnavailable, match=r"model.pretrained='openai' needs to download the ViT-B-32-quickgelu "
                                             r"weights, but HF_HUB_OFFLINE is set .* "
                                             r"model.pretrained=/path/to/weights"):
        create_backbone(cfg)
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag of ViT-B-32-quickgelu .*openai"):
        create_backbone(model_cfg("model=vitb32_quickgelu", "model.pretrained=no_such_tag"))


def test_a_tag_offline_loads_from_the_local_cache(offline, monkeypatch):
    source = random_tiny(seed=6)
    pretrained = open_clip.pretrained._PRETRAINED  # a tag for the tiny model whose file sits in the HF cache
    monkeypatch.setitem(pretrained, "clipcomp-tiny", {"cached": open_clip.pretrained._pcfg(hf_hub="lab/tiny-weights/")})
    snapshot = offline / "models--lab--tiny-weights" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (offline / "models--lab--tiny-weights" / "refs").mkdir()
    (offline / "models--lab--tiny-weights" / "refs" / "main").write_text("0" * 40)
    torch.save(source.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    assert same_weights(create_backbone(model_cfg("model.pretrained=cached"))[0], source)
    monkeypatch.setitem(pretrained, "clipcomp-tiny", {"fake": open_clip.pretrained._pcfg(hf_hub="lab/other/")})
    with pytest.raises(HubUnavailable, match="'fake' needs to download the clipcomp-tiny weights"):
        create_backbone(model_cfg("model.pretrained=fake"))


def test_without_loading_a_tag_gives_its_preprocessing_and_needs_no_file(offline, monkeypatch):
    """model.load_weights=false (how make bench rebuilds a run): a tag's own preprocessing, no download, no cache."""
    pretrained = open_clip.pretrained._PRETRAINED
    monkeypatch.setitem(pretrained, "clipcomp-tiny", {"halves": open_clip.pretrained._pcfg(
        hf_hub="lab/not-cached/", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))})
    with pytest.raises(HubUnavailable):
        create_backbone(model_cfg("model.pretrained=halves"))
    _, _, preprocess, _ = create_backbone(model_cfg("model.pretrained=halves", "model.load_weights=false"))
    assert "mean=(0.5, 0.5, 0.5)" in repr(preprocess)
    _, _, plain, _ = create_backbone(model_cfg())
    assert "mean=(0.5, 0.5, 0.5)" not in repr(plain)


def test_the_archive_reader_refuses_foreign_globals():
    """The TorchScript reader builds stand-ins for the archive's own classes; any other global is refused."""
    from methods.pretrained import _TensorsOnly

    data = pickle.dumps(Payload())
    with pytest.raises(pickle.UnpicklingError, match="refuses to unpickle builtins.print"):
        _TensorsOnly(data, None, "", "x.pt").load()

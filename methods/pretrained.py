"""Where a model's pretrained weights come from, decided before anything is built or downloaded.

`model.pretrained` is one of:
- an open_clip tag ("openai"): open_clip downloads it through the Hugging Face hub. Offline (HF_HUB_OFFLINE=1,
  or no answer from the hub within 2 s) a tag whose file is in the local cache loads from there; otherwise the
  run stops at once with what to pass instead, rather than retrying downloads for most of a minute.
- a local file: `.safetensors` (no pickle at all); `.pt` / `.pth` / `.bin` state dicts and open_clip training
  checkpoints through open_clip's loader with `torch.load(weights_only=True)` (tensors and plain containers
  only); OpenAI's original TorchScript archive (`ViT-B-32.pt`), which open_clip 3.3.0 rejects under
  weights_only and would otherwise need `torch.jit.load` (running the archive's code): its tensors are read
  here by an unpickler that builds nothing but tensors and inert stand-ins for the archive's modules.
- `local-dir:/path` (also accepted as `model.name`): open_clip's folder layout, open_clip_config.json plus
  the weights, loaded by open_clip (weights_only / safetensors).
- a lab run's checkpoint (`runs/clip/<time>/checkpoints/best.ckpt`, weights_only): its CLIP towers (the
  `model.` entries), so any method can fine-tune a model the lab trained, e.g. NegCLIP on a CLIP pre-trained on
  the shapes world (the papers' pipeline: pre-train with CLIP's loss, then fine-tune); a method's own modules
  (Structure-CLIP's knowledge encoder) start afresh.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch

from datamodules.hub import HubUnavailable, offline_reason

LOCAL_DIR = "local-dir:"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's archive, not weights


@dataclass
class WeightsPlan:
    """What to hand open_clip (`name`, `tag`) and what to load afterwards (`file`), with the tag's preprocessing."""

    name: str
    tag: str | None = None
    file: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)  # image_mean, image_std, ... of a cached tag
    quick_gelu: bool | None = None  # the activation the weights were trained with, where known


def plan_weights(name: str, pretrained: str | None, load: bool = True) -> WeightsPlan:
    """Resolve `model.name` / `model.pretrained`; offline with a tag that is not cached, fail now. With `load`
    False, only what shapes the model and its preprocessing: a `local-dir:` folder's config, a tag's
    preprocessing, nothing to read or fetch (a weights file gives the model nothing but its weights)."""
    if pretrained and pretrained.startswith(LOCAL_DIR):
        name, pretrained = pretrained, None
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{name}: needs a folder with open_clip_config.json and the weights file")
        if load and not any(p.suffix in (".safetensors", ".bin", ".pth") for p in folder.iterdir()):
            raise FileNotFoundError(f"{name}: no weights (.safetensors, .bin or .pth) next to open_clip_config.json")
        return WeightsPlan(name=f"{LOCAL_DIR}{folder}", quick_gelu=folder_quick_gelu(folder))
    if not pretrained:
        return WeightsPlan(name=name)
    if os.path.isfile(pretrained) or os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        if not load:
            return WeightsPlan(name=name)
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"model.pretrained={pretrained}: file not found")
        return WeightsPlan(name=name, file=pretrained)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(f"model.pretrained='{pretrained}' is neither a file nor an open_clip tag of {name} "
                         f"(its tags: {tags})")
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
            "resize_mode": "image_resize_mode"}
    preprocess = {v: cfg[k] for k, v in keys.items() if k in cfg}
    if not load:  # the tag's preprocessing, as open_clip applies it when it loads the tag
        return WeightsPlan(name=name, preprocess=preprocess, quick_gelu=bool(cfg.get("quick_gelu", False)))
    reason = offline_reason()
    if reason is None:
        return WeightsPlan(name=name, tag=pretrained)  # online: open_clip downloads (or reuses its cache)
    cached = cached_file(cfg)
    if cached is None:
        raise HubUnavailable(
            f"model.pretrained='{pretrained}' needs to download the {name} weights, but {reason} and they are not "
            f"in the local cache. Pass a local file instead: model.pretrained=/path/to/weights (OpenAI's "
            f"ViT-B-32.pt archive, an open_clip .bin/.pt state dict or .safetensors), or model.pretrained="
            f"local-dir:/path (open_clip_config.json + weights). On a machine with network, "
            f"python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\" puts the "
            f"file in ~/.cache/huggingface/hub, which can be copied here.")
    return WeightsPlan(name=name, file=cached, preprocess=preprocess, quick_gelu=bool(cfg.get("quick_gelu", False)))


def folder_quick_gelu(folder: Path) -> bool | None:
    """The activation a `local-dir:` folder's open_clip_config.json declares (`model_cfg.quick_gelu`), or None."""
    try:
        model_cfg = json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg", {})
    except (OSError, ValueError, AttributeError):
        return None
    return bool(model_cfg.get("quick_gelu", False)) if isinstance(model_cfg, dict) else None


def cached_file(cfg: dict[str, Any]) -> str | None:
    """The local copy of a tag's weights (Hugging Face cache, or open_clip's URL cache), or None."""
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" names the default file, as open_clip reads it
        filename = filename or open_clip.constants.HF_WEIGHTS_NAME
        names = [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []
        if filename == open_clip.constants.HF_WEIGHTS_NAME:
            names = [open_clip.constants.HF_SAFE_WEIGHTS_NAME]
        for candidate in [*names, filename]:
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    return None


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


def load_weights(model: torch.nn.Module, path: str, quick_gelu: bool | None = None) -> None:
    """Load a weights file into the built model (see the module docstring for the formats)."""
    if is_torchscript(path):
        quick_gelu = True  # OpenAI's archives: every one was trained with QuickGELU
    if quick_gelu is not None and quick_gelu != uses_quick_gelu(model):
        trained = "QuickGELU" if quick_gelu else "GELU"
        raise ValueError(f"{path}: QuickGELU mismatch: the weights were trained with {trained} "
                         f"and the model uses the other; use the -quickgelu model name (model=vitb32_quickgelu) or "
                         f"model.force_quick_gelu={str(quick_gelu).lower()}")
    if not is_torchscript(path):
        towers = lab_towers(path)
        if towers is not None:
            try:
                model.load_state_dict(towers, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{path}: a lab checkpoint of another model: {str(e).splitlines()[1].strip()} "
                                 f"(its run's config.yaml names the model)") from None
            return
        try:
            open_clip.load_checkpoint(model, path, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: holds Python objects besides tensors; it is not unpickled (weights_only). "
                             f"Save its state_dict (or safetensors) instead. ({str(e).splitlines()[0]})") from None
        return
    # the archive's ints (resolution, context, vocabulary) and the causal masks a traced archive keeps are not weights
    state = {k: v for k, v in read_torchscript_tensors(path).items()
             if k not in OPENAI_METADATA and not k.endswith("attn_mask")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: not weights of this model ({len(missing)} missing, e.g. {missing[:3]}; "
                         f"{len(unexpected)} not in the model, e.g. {unexpected[:3]})")
    # only a one-element tensor may change shape (OpenAI's logit_scale is 0-d, open_clip's too; kept general)
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape and not (state[k].numel() == v.numel() == 1)]
    if wrong:
        raise ValueError(f"{path}: not weights of this model ({len(wrong)} shapes differ, e.g. {wrong[:2]})")
    model.load_state_dict({k: state[k].reshape(expected[k].shape) for k in expected}, strict=True)


def lab_towers(path: str) -> dict[str, torch.Tensor] | None:
    """The CLIP weights of a lab run's checkpoint (a Lightning checkpoint whose state_dict holds the method
    module's `model.` entries), or None for any other file."""
    if not path.endswith(".ckpt"):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None  # open_clip's loader names it
    except (RuntimeError, EOFError) as e:  # a torn or truncated file
        raise ValueError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("model.") for k in state):
        return None
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


class _Inert:
    """Stands in for an object of a TorchScript archive (a module): keeps its attributes, runs nothing."""

    def __init__(self, *args: Any) -> None:
        self.state: Any = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TensorsOnly(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl: tensors and their storages, plain containers, and inert
    stand-ins for the archive's own classes (`__torch__.*`); any other global is refused."""

    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
               ("collections", "OrderedDict"), *(("torch.jit._pickle", n) for n in (
                   "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag"))}

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return self.stand_ins.setdefault(f"{module}.{name}", type(name, (_Inert,), {}))
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if (module, name) in self.ALLOWED:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{self.path}: refuses to unpickle {module}.{name} (not a tensor)")

    def persistent_load(self, saved_id: Any) -> Any:
        _, storage_type, key, _, _ = saved_id
        with warnings.catch_warnings():  # the legacy storage classes an archive names warn when asked their dtype
            warnings.simplefilter("ignore", UserWarning)
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        raw = torch.frombuffer(bytearray(self.archive.read(f"{self.prefix}data/{key}")), dtype=torch.uint8)
        return torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=dtype, _internal=True)


def read_torchscript_tensors(path: str) -> dict[str, torch.Tensor]:
    """name -> tensor of every tensor attribute in a TorchScript archive, named by the module path."""
    with zipfile.ZipFile(path) as z:
        data_pkl = next(n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1)
        root = _TensorsOnly(z.read(data_pkl), z, data_pkl[: -len("data.pkl")], path).load()
    out: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str) -> None:
        state = obj.state if isinstance(obj, _Inert) else obj
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    out[prefix + k] = v
                elif isinstance(v, (_Inert, dict)):
                    walk(v, f"{prefix}{k}.")

    walk(root, "")
    return out

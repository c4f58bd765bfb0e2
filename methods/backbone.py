"""Builds the open_clip model, its two transforms and its tokenizer from a model config."""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from omegaconf import DictConfig, OmegaConf

from methods.pretrained import LOCAL_DIR, load_weights, plan_weights, uses_quick_gelu


def register_arch(name: str, arch: dict[str, Any]) -> None:
    """Make a custom architecture known to open_clip under `name`. Its registry only reads JSON files, and
    keeps what it read, so the file lives only for the call."""
    with tempfile.TemporaryDirectory(prefix="clipcomp-arch-") as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(arch))
        open_clip.add_model_config(path)


def check_arch(arch: dict[str, Any]) -> None:
    """Raise ConfigError naming a key of `model.arch` that open_clip's CLIP does not take, with the valid ones (open_clip
    itself stops with a TypeError from deep inside its constructors)."""
    import dataclasses
    import inspect

    from configs import ConfigError
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    valid = {"": set(inspect.signature(CLIP.__init__).parameters) - {"self"} | {"custom_text", "multimodal_cfg"},
             "vision_cfg": {f.name for f in dataclasses.fields(CLIPVisionCfg)},
             "text_cfg": {f.name for f in dataclasses.fields(CLIPTextCfg)}}
    for part, keys in valid.items():
        node = arch if not part else arch.get(part) or {}
        unknown = sorted(set(node) - keys)
        if unknown:
            where = f"model.arch.{part}" if part else "model.arch"
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(keys))}")


def create_backbone(cfg: DictConfig) -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """(model, preprocess_train, preprocess_val, tokenizer) for an open_clip name with a tag, a file, a
    `local-dir:` folder or nothing (methods/pretrained.py says which, before anything is built)."""
    plan = plan_weights(cfg.name, cfg.pretrained, load=cfg.get("load_weights", True))
    if cfg.arch is not None and not plan.name.startswith(LOCAL_DIR):  # a local-dir folder brings its own
        arch = OmegaConf.to_container(cfg.arch, resolve=True)
        check_arch(arch)
        register_arch(cfg.name, arch)
    with warnings.catch_warnings():
        # open_clip only warns when OpenAI weights meet a GELU model; results silently change, so fail instead
        warnings.filterwarnings("error", message=".*QuickGELU mismatch.*")
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            plan.name, pretrained=plan.tag, load_weights=cfg.get("load_weights", True),
            force_quick_gelu=cfg.force_quick_gelu, **plan.preprocess,
        )
    if plan.file is not None:
        load_weights(model, plan.file, quick_gelu=plan.quick_gelu)
    if plan.name.startswith(LOCAL_DIR) and plan.quick_gelu is not None and plan.quick_gelu != uses_quick_gelu(model):
        trained = "QuickGELU" if plan.quick_gelu else "GELU"  # model.force_quick_gelu against the folder's config
        raise ValueError(f"{plan.name}: QuickGELU mismatch: its open_clip_config.json declares {trained} and the model "
                         f"uses the other; set model.force_quick_gelu={str(plan.quick_gelu).lower()}")
    tokenizer = open_clip.get_tokenizer(plan.name)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, preprocess_train, preprocess_val, tokenizer


def compile_towers(model: torch.nn.Module, backend: str = "inductor") -> list[str]:
    """Compile the towers in place (`nn.Module.compile`): the whole vision tower, its transformer stack and the
    text transformer stack. Every path through them runs compiled code: `encode_image` / `encode_text`, and a
    method's own token-level path that calls `visual.transformer` or `transformer` directly (the stack alone
    is compiled on its first direct call). Parameter names and checkpoints do not change. Returns what was
    compiled."""
    done = []
    for name in ("visual", "visual.transformer", "transformer"):
        module = model.get_submodule(name) if _has(model, name) else None
        if isinstance(module, torch.nn.Module):
            module.compile(backend=backend)
            done.append(name)
    return done


def _has(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False

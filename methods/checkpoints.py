"""Checkpoints that are written atomically, read without unpickling, and chosen for a resume by how far they got.

Lightning's own save writes the file through an fsspec transaction whose temporary file lives in the
system temp folder: where that is another file system than the run folder, the final move is a copy,
and a kill during it leaves half a checkpoint over a good one. `AtomicCheckpointIO` writes beside the
target and renames. Every load goes through `read_checkpoint` (`torch.load(weights_only=True)`), which
names a file that is truncated or not a checkpoint instead of failing deep inside torch.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from configs.files import atomic_open

# What a resume may continue from: the periodic and end-of-epoch checkpoints, and the one an error or a
# preemption signal writes. (last-good.ckpt, written when non-finite steps stop a run, is for inspection.)
RESUMABLE = ("last.ckpt", "step.ckpt", "interrupted.ckpt")


def load_weights_only(path: str | Path, mmap: bool = False) -> Any:
    """torch.load with weights_only=True; a truncated or foreign file is named, not unpickled. `mmap` maps the
    tensors instead of reading them (for a quick look at the counters)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError or EOFError depending on the damage
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                         ) from None


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint's contents (see `load_weights_only`), or a ValueError naming a file that is not one."""
    state = load_weights_only(path, mmap)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written with write-then-rename beside the target and read with weights_only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # serialized first (as Lightning does): a disk error then surfaces as an OSError
        torch.save(checkpoint, buffer)
        with atomic_open(path, "wb") as f:
            f.write(buffer.getbuffer())

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        # never unpickles, whatever the caller asked; not always a full checkpoint (ddp_spawn hands the trained
        # weights back to its launching process as a bare state_dict through here)
        return load_weights_only(path)


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The resumable checkpoint of a run that got furthest (most optimizer steps), or None if the run saved
    none. A damaged one is named on stderr and passed over; if every one is damaged, that is an error."""
    found, damaged = [], []
    for path in (run_dir / "checkpoints" / name for name in RESUMABLE):
        if not path.is_file():
            continue
        try:
            found.append((int(read_checkpoint(path, mmap=True)["global_step"]), path))
        except (ValueError, KeyError) as e:
            damaged.append(str(e) if isinstance(e, ValueError) else f"{path}: no global_step")
            print(f"warning: passing over {damaged[-1]}", file=sys.stderr)
    if not found and damaged:
        raise ValueError("no readable checkpoint to resume from: " + "; ".join(damaged))
    return max(found)[1] if found else None

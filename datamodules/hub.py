"""The Hugging Face hub, only where a config asks for it: is it reachable now, and loading a `datasets` id.

Offline (an offline variable set, or no answer from the hub within a couple of seconds) nothing waits on
retries: callers get `HubUnavailable` at once, with what to do instead (local files, a saved folder, the
variable that lets `datasets` use its cache).
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from typing import Any

HUB_HOST = "huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class HubUnavailable(RuntimeError):
    """Something needs the Hugging Face hub and cannot have it (offline, or not in the local cache)."""


def offline_variable() -> str | None:
    """The offline variable that is set (HF_HUB_OFFLINE=1, ...), or None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


@functools.lru_cache(maxsize=1)
def _hub_answers(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (DNS included: run in a thread,
    because a name lookup does not honour socket timeouts)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def offline_reason() -> str | None:
    """Why the hub cannot be used now ("HF_HUB_OFFLINE is set", "huggingface.co does not answer"), or None."""
    variable = offline_variable()
    if variable:
        return f"{variable} is set"
    if not _hub_answers():
        return f"{HUB_HOST} does not answer (no network)"
    return None


def load_hf_dataset(hf_id: str, config: str, split: str, what: str) -> Any:
    """One split of a `datasets` id, or of a folder written by `Dataset.save_to_disk` (no network needed).
    `split` may join several with "+" ("train+restval"); `what` names the option for error messages."""
    import datasets

    if Path(hf_id).is_dir():
        loaded = datasets.load_from_disk(hf_id)
        if isinstance(loaded, datasets.Dataset):
            return loaded
        parts = split.split("+")
        missing = [p for p in parts if p not in loaded]
        if missing:
            raise KeyError(f"{what}: {hf_id} has the splits {', '.join(loaded)}; not {', '.join(missing)}")
        return datasets.concatenate_datasets([loaded[p] for p in parts]) if len(parts) > 1 else loaded[parts[0]]
    reason = offline_reason()
    if reason and not offline_variable():
        raise HubUnavailable(
            f"{what}: the Hugging Face dataset '{hf_id}' needs the network and {reason}. Use local files instead "
            f"(leave hf_id empty and set data.options.root=/path), point hf_id at a folder written by "
            f"Dataset.save_to_disk, or set HF_DATASETS_OFFLINE=1 to use a copy in the local datasets cache.")
    try:
        return datasets.load_dataset(hf_id, config or None, split=split)
    except Exception as e:  # datasets raises many types; offline they all mean "not in the cache"
        if reason:
            raise HubUnavailable(
                f"{what}: '{hf_id}' ({config or 'default'} config, split {split}) is not in the local datasets cache "
                f"and {reason} ({e.__class__.__name__}). Use local files (data.options.root=/path) or a "
                f"save_to_disk folder as hf_id.") from None
        raise

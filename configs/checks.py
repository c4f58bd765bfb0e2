"""Value checks for the typed schemas: a schema dataclass lists `RULES = {field: rule}`; `validate` applies every
rule of every node of a composed config before anything runs and names each bad value at once.

The schema already rejects unknown keys and wrong types while composing; these rules reject values of the
right type that cannot work (a batch of 0, a negative learning rate, an unknown precision, a data file that
is not there). A rule returns what is wrong with a value, or None.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

Rule = Callable[[Any], "str | None"]


def above(bound: float) -> Rule:
    return lambda v: None if v > bound else f"must be > {bound}"


def at_least(bound: float) -> Rule:
    return lambda v: None if v >= bound else f"must be >= {bound}"


def within(lo: float, hi: float, hi_open: bool = False) -> Rule:
    """lo <= v <= hi (or < hi)."""
    return lambda v: None if lo <= v and (v < hi if hi_open else v <= hi) else \
        f"must be in [{lo}, {hi}{')' if hi_open else ']'}"


def one_of(*names: str) -> Rule:
    return lambda v: None if v in names else f"must be one of {', '.join(names)}"


def optional(rule: Rule) -> Rule:
    """None is allowed (off); anything else must pass `rule`."""
    return lambda v: None if v is None else rule(v)


def steps_or_off(v: int) -> str | None:
    """-1 (no limit) or a positive count."""
    return None if v == -1 or v >= 1 else "must be -1 (no limit) or >= 1"


def existing_file(v: str) -> str | None:
    return None if Path(v).is_file() else "file not found"


def existing_dir(v: str) -> str | None:
    return None if Path(v).is_dir() else "folder not found"


def registered(kind: str, names: Callable[[], list[str]], extra: tuple[str, ...] = ()) -> Rule:
    """A name in a registry that is read when the rule runs (e.g. Lightning's strategies)."""
    def rule(v: str) -> str | None:
        valid = sorted(set(names()) | set(extra))
        return None if v in valid else f"unknown {kind}; valid: {', '.join(valid)}"

    return rule


def _problems(obj: Any, where: str) -> list[str]:
    """Every rule failure in a dataclass instance and the dataclasses inside it, as 'key=value: what is wrong'."""
    if not dataclasses.is_dataclass(obj):
        return []
    out = []
    rules = getattr(type(obj), "RULES", {})
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{where}{f.name}"
        if f.name in rules and (problem := rules[f.name](value)):
            out.append(f"{key}={value!r}: {problem}")
        out += _problems(value, key + ".")
    return out


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every value that breaks its schema's rules."""
    from configs import ConfigError

    problems = _problems(OmegaConf.to_object(cfg), "")
    if problems:
        raise ConfigError("impossible config values:\n  " + "\n  ".join(problems))

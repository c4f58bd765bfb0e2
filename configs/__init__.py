"""Config composition: a root YAML, one file per group chosen by name, then `key=value` overrides.

    compose("train", ["method=negclip", "optim.lr=1e-4"], schemas={...})

A dotless `group=name` selects `configs/<group>/<name>.yaml` (an unknown name lists the files); every
other token is an OmegaConf dotlist override. Each group is merged into its typed schema, so an unknown
key or a value of the wrong type fails before anything runs, naming the key and the valid ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from configs.checks import validate
from configs.schema import BenchConfig, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent
ROOTS = {"train": TrainConfig, "bench": BenchConfig}
# A group schema gets the selected file name and its loaded YAML, and returns the typed node to merge into.
GroupSchema = Callable[[str, DictConfig], DictConfig]


class ConfigError(ValueError):
    """A config that cannot run: unknown group file, unknown key, wrong type, impossible value."""


def group_names(group: str) -> list[str]:
    """The names a group offers: the YAML file stems in configs/<group>/."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML mapping from a file; a file that is missing, damaged or not a mapping is named, with the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml's scanner and parser errors, OmegaConf's own
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not readable YAML{where} ({type(e).__name__}: "
                          f"{getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(node).__name__}")
    return node


def load_group(group: str, name: str) -> DictConfig:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {group} '{name}'; available: {', '.join(group_names(group))}")
    return load_yaml(path)


def _valid_keys(cfg: DictConfig, dotted: str) -> str:
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = sorted(node.keys()) if isinstance(node, DictConfig) else []
    return f"valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(map(str, keys))}"


def _merge(cfg: DictConfig, other: Any, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"{what}: unknown config key '{key}'; {_valid_keys(cfg, str(key))}") from None
    except (OmegaConfBaseException, TypeError) as e:  # its message's first line: the full key and types follow
        message = str(getattr(e, "msg", None) or e).splitlines()[0]
        if isinstance(e, TypeError):  # omegaconf merging a dotlist index (key.1=x) into a slot that is not a list
            raise ConfigError(f"{what}: {message}: a list item set by its index (key.1=value) needs its list first "
                              "on the command line; or set the whole list (key=[a,b])") from None
        raise ConfigError(f"{what}: {message} (key '{getattr(e, 'full_key', '?')}')") from None


def compose(root: str, argv: list[str] | tuple[str, ...] = (), schemas: Mapping[str, GroupSchema] | None = None) -> DictConfig:
    """The resolved config for `root` ("train" or "bench") with group selections and overrides from argv."""
    schemas = schemas or {}
    base = OmegaConf.load(CONFIG_DIR / f"{root}.yaml")
    defaults = dict(base.pop("defaults", {}))
    overrides = []
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep:
            raise ConfigError(f"argument '{token}' is not key=value")
        if key in defaults:
            defaults[key] = value
        else:
            overrides.append(token)
    cfg = OmegaConf.structured(ROOTS[root])
    cfg = _merge(cfg, base, f"configs/{root}.yaml")
    for group, name in defaults.items():
        if name is None:  # an optional group nobody selected (e.g. the bench job's bare `model`)
            continue
        node = load_group(group, str(name))
        typed = schemas[group](str(name), node) if group in schemas else cfg[group]
        what = f"configs/{group}/{name}.yaml"
        if group in schemas:  # the schema node replaces the untyped slot, then the file fills it
            OmegaConf.update(cfg, group, typed, merge=False)
        cfg = _merge(cfg, {group: node}, what)
    try:
        cfg = _merge(cfg, OmegaConf.from_dotlist(overrides), "command line")
    except ConfigError as first:  # again one at a time, on a copy, so that every unknown key and bad value is named
        problems, probe = [], cfg.copy()
        for token in overrides:
            try:
                probe = _merge(probe, OmegaConf.from_dotlist([token]), "command line")
            except ConfigError as e:
                problems.append(str(e.args[0]).removeprefix("command line: "))
        if len(problems) < 2:
            raise first from None
        raise ConfigError(f"command line: {len(problems)} problems:\n  " + "\n  ".join(problems)) from None
    OmegaConf.set_struct(cfg, True)
    OmegaConf.resolve(cfg)
    return cfg


HELP = ("-h", "--help", "help")


def usage(root: str, command: str, example: str, more: str = "") -> str:
    """What `command` takes: its config groups with their files (the default marked) and its top-level keys."""
    base = OmegaConf.load(CONFIG_DIR / f"{root}.yaml")
    defaults = dict(base.pop("defaults", {}))
    lines = [f"usage: {command} [group=name ...] [key=value ...]{more}", "",
             f"groups (configs/<group>/<name>.yaml; * the default of configs/{root}.yaml):"]
    for group, default in defaults.items():
        names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        lines.append(f"  {group}: " + ", ".join(n + ("*" if n == default else "") for n in names))
    keys = [str(k) for k in compose(root).keys() if k not in defaults]
    lines += ["", f"keys: {', '.join(keys)}; a group's keys as dotted paths ({example}); an unknown key is refused "
              "with the valid ones at its level"]
    return "\n".join(lines)


def save(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    from configs.files import write_atomic

    write_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def to_plain(cfg: DictConfig) -> dict:
    """Plain containers, so a checkpoint holding them loads with torch.load(weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]

"""Methods: one LightningModule per method over `base.ContrastiveMethod`, chosen by name from METHODS."""
from omegaconf import DictConfig, OmegaConf

from methods import clip, msgclip, negclip, smartclip, structureclip  # noqa: F401  (each import registers a method)
from methods.base import METHODS, ContrastiveMethod


def method_schema(name: str, node: DictConfig) -> DictConfig:
    """The typed node for a method group file: the method's own Config, named after the file."""
    return OmegaConf.structured(METHODS.get(name).Config(name=name))


__all__ = ["METHODS", "ContrastiveMethod", "method_schema"]

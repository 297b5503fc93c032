"""Model sources for the command line: ``torchvision:NAME``, ``timm:NAME``, ``file.py:factory``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fxprune.errors import ConfigError, MissingExtraError


def load_model(spec: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Build a model (random weights, nothing downloaded) and a matching example input."""
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError as e:
            raise MissingExtraError("torchvision", "vision", "torchvision models") from e
        if name not in torchvision.models.list_models():
            raise ConfigError(f"unknown torchvision model {name!r}")
        size = 299 if name == "inception_v3" else 224
        return torchvision.models.get_model(name, weights=None).eval(), torch.randn(
            1, 3, size, size
        )
    if kind == "timm":
        try:
            import timm
        except ImportError as e:
            raise MissingExtraError("timm", "vision", "timm models") from e
        m = timm.create_model(name, pretrained=False).eval()
        cfg = m.pretrained_cfg.get("input_size", (3, 224, 224))
        return m, torch.randn(1, *cfg)
    if name and kind.endswith(".py"):
        path = Path(kind)
        if not path.exists():
            raise ConfigError(f"no such file: {path}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        made = getattr(mod, name)()
        if not (isinstance(made, tuple) and len(made) == 2):
            raise ConfigError(f"{spec}: the factory must return (model, example_input)")
        return made
    raise ConfigError(f"model source {spec!r}: use torchvision:NAME, timm:NAME or file.py:factory")

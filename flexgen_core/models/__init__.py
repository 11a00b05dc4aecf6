"""Architecture registry: Hugging Face architecture name -> model module (spec builder + weight map).

A model module exports `ARCHITECTURE`, `spec_from_hf_config(cfg, name)`, `map_weight_name(spec, hf_name)`
and `builtin_spec(name)` / `BUILTIN_NAMES` for sizes usable without a config download.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_REGISTRY: dict[str, str] = {}


def register(architecture: str, module: str) -> None:
    if architecture in _REGISTRY:
        raise ValueError(f"architecture {architecture!r} is already registered")
    _REGISTRY[architecture] = module


def model_module(architecture: str) -> ModuleType:
    if architecture not in _REGISTRY:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {sorted(_REGISTRY)}")
    return importlib.import_module(_REGISTRY[architecture])


def builtin_module(name: str) -> ModuleType | None:
    """The model module that knows `name` as a built-in size, or None."""
    key = name.split("/")[-1].lower()
    for module in _REGISTRY.values():
        mod = importlib.import_module(module)
        if key in getattr(mod, "BUILTIN_NAMES", ()):
            return mod
    return None


register("OPTForCausalLM", "flexgen_core.models.opt")

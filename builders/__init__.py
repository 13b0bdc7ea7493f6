"""Registry of architecture families: HF `architectures` name -> Family (config -> ModelSpec, tensors -> weights).

Family modules in this package register themselves when imported; every module here is imported on first use,
so adding an architecture is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from builder.checkpoint import Checkpoint
from builder.errors import UnsupportedModelError
from builder.spec import ModelSpec
from builder.weights import WeightMap
from builders.config import Config


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    make_spec: Callable[[Config], ModelSpec]  # HF config (text part) -> ModelSpec
    # (spec, checkpoint) -> weights; every fact about the model comes from the spec, never from the config again
    map_weights: Callable[[ModelSpec, Checkpoint], WeightMap]
    # Multimodal wrappers keep the text model's config under this key (e.g. "text_config").
    text_config_key: str | None = None
    notes: str = ""
    # Wrapper (top-level) fields that override the text config's when set (e.g. tie_word_embeddings).
    wrapper_fields: tuple[str, ...] = ()
    # Checkpoint tensors left out on purpose: (why, name prefixes). They are named in the progress output; any other
    # tensor that no layer reads is an error.
    ignored: tuple[tuple[str, tuple[str, ...]], ...] = ()


_REGISTRY: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    for arch in family.architectures:
        if arch in _REGISTRY:
            raise ValueError(f"architecture {arch} registered twice ({_REGISTRY[arch].name}, {family.name})")
        _REGISTRY[arch] = family
    return family


def _load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
            if not module.startswith("_") and module not in ("common", "config"):
                importlib.import_module(f"{__name__}.{module}")


def supported_architectures() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def families() -> list[Family]:
    _load_all()
    return sorted({id(f): f for f in _REGISTRY.values()}.values(), key=lambda f: f.name)


def family_for(architecture: str) -> Family:
    _load_all()
    family = _REGISTRY.get(architecture)
    if family is None:
        raise UnsupportedModelError(f"architecture {architecture} is not supported. Supported architectures: "
                                    f"{', '.join(supported_architectures())}.")
    return family


def text_config(family: Family, config: dict, architecture: str, where: str = "config.json") -> Config:
    """The config that describes the text decoder (the wrapper's text_config for multimodal checkpoints)."""
    top = Config(config, architecture, where)
    key = family.text_config_key
    if key and key in top:
        wrapper = {name: config[name] for name in family.wrapper_fields if config.get(name) is not None}
        return top.sub(key).updated(**wrapper)
    return top

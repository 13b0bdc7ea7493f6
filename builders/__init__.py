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


def checkpoint_family(ckpt: Checkpoint) -> tuple[Family, list[str]]:
    """The family of a checkpoint's architecture, and notes to show.

    A config with auto_map asks for the checkpoint's own modelling code (trust_remote_code), which ortbuild never
    imports or runs. Such a checkpoint is exported only when its architecture is registered here, i.e. one that
    transformers implements itself (tests check every registered name is a transformers class) and ortbuild
    computes with its own code (DeepSeek-V3 and Kimi-K2 ship auto_map for DeepseekV3ForCausalLM); anything else is
    refused, naming the custom code.
    """
    architecture = ckpt.architecture
    remote = ckpt.remote_code
    if not remote:
        return family_for(architecture), []
    _load_all()
    if architecture not in _REGISTRY:
        raise UnsupportedModelError(
            f"{ckpt.folder / 'config.json'}: architecture {architecture} is not one ortbuild implements, and the "
            f"config asks for custom code (auto_map: {remote}), i.e. trust_remote_code. ortbuild never runs "
            f"checkpoint code; supported architectures: {', '.join(supported_architectures())}.")
    return _REGISTRY[architecture], [f"config.json names custom code (auto_map: {', '.join(remote)}); it is not "
                                     f"imported: {architecture} is exported with ortbuild's own implementation of "
                                     "the transformers architecture."]


def text_config(family: Family, config: dict, architecture: str, where: str = "config.json") -> Config:
    """The config that describes the text decoder (the wrapper's text_config for multimodal checkpoints)."""
    top = Config(config, architecture, where)
    key = family.text_config_key
    if key and key in top:
        wrapper = {name: config[name] for name in family.wrapper_fields if config.get(name) is not None}
        return top.sub(key).updated(**wrapper)
    return top

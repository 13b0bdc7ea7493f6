"""Helpers shared by family modules: reading HF config fields, rope parameters (mRoPE included), name-table weight
mapping, multimodal text prefixes, tied-head copies."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from builder.checkpoint import Checkpoint
from builder.errors import CheckpointError, UnsupportedModelError
from builder.spec import RopeSpec
from builder.weights import Stored, WeightMap
from builders.config import Config


def require(config: dict, key: str, arch: str):
    if key not in config or config[key] is None:
        raise CheckpointError(f"{arch}: config.json has no '{key}', which this architecture needs.")
    return config[key]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_spec(config: dict, rotary_dim: int, *, layer_type: str | None = None,
              default_theta: float = 10000.0) -> RopeSpec:
    """RopeSpec from transformers-5 `rope_parameters` (optionally per layer type) or the older rope_theta/scaling."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if not isinstance(params, dict) or ("rope_type" not in params and "rope_theta" not in params):
        scaling = config.get("rope_scaling") or {}
        params = {**scaling, "rope_theta": config.get("rope_theta", default_theta)}
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    theta = float(params.pop("rope_theta", config.get("rope_theta", default_theta)))
    params.pop("partial_rotary_factor", None)
    hashable = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return RopeSpec(theta=theta, rotary_dim=rotary_dim, rope_type=rope_type, params=hashable,
                    max_positions=int(config.get("max_position_embeddings", 4096)))


def map_table(ckpt: Checkpoint, weights: WeightMap, table: dict[str, str], num_layers: int) -> None:
    """Map canonical names to checkpoint tensors through a name table; `{i}` expands over layers.

    Tensors absent from the checkpoint are recorded as expected, so a layer that needs one names it in its error.
    """
    for canonical, source in table.items():
        indices: Iterable[int | None] = range(num_layers) if "{i}" in canonical else (None,)
        for i in indices:
            name, hf = (canonical.format(i=i), source.format(i=i)) if i is not None else (canonical, source)
            if ckpt.has(hf):
                weights.add(name, Stored(ckpt.tensor(hf)), hf)
            else:
                weights.expect(name, hf)


def reject_unconsumed(ckpt: Checkpoint, architecture: str) -> None:
    """Fail on checkpoint tensors nobody used: silent leftovers hide wrong mappings."""
    left = ckpt.unconsumed()
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        raise CheckpointError(f"{architecture}: {len(left)} checkpoint tensor(s) were not used by the export: {shown}. "
                              "The checkpoint has parts this exporter does not understand (or a mapping is wrong); "
                              "refusing to write a model that silently drops weights.")


def reject_fields(config: dict, arch: str, fields: dict[str, object]) -> None:
    """Refuse config fields that change the maths when set to anything but the value we implement."""
    for key, supported in fields.items():
        value = config.get(key, supported)
        if value not in (supported, None):
            raise UnsupportedModelError(f"{arch}: config field {key}={value!r} is not supported (only {supported!r}).")


def projection_table(dst: str, src: str, projections: Iterable[str], *, bias: bool) -> dict[str, str]:
    """{dst.p.weight: src.p_proj.weight} for each projection p, and the .bias pairs when `bias`.

    projection_table("layers.{i}.attn", "model.layers.{i}.self_attn", "qkvo", bias=True). Biases are mapped only
    when the spec reads them, so a bias tensor the config does not announce is left unconsumed and refused.
    """
    kinds = ("weight", "bias") if bias else ("weight",)
    return {f"{dst}.{p}.{kind}": f"{src}.{p}_proj.{kind}" for p in projections for kind in kinds}


def checked_rope_spec(cfg: Config, rotary_dim: int, *, layer_type: str | None = None,
                      default_theta: float = 10000.0) -> RopeSpec:
    """rope_spec read through a Config, refusing (exit 3, naming the field) a rope type not computed here."""
    from builder.layers.rotary import SUPPORTED_ROPE_TYPES

    params = cfg.sub("rope_parameters", None)
    if params is not None and layer_type is not None and layer_type in params:
        params = params.sub(layer_type)
    if params is not None and ("rope_type" in params or "rope_theta" in params):
        params.str("rope_type", "default", choices=SUPPORTED_ROPE_TYPES)
    else:
        scaling = cfg.sub("rope_scaling", None)
        if scaling is not None:
            scaling.str("rope_type" if "rope_type" in scaling else "type", "default", choices=SUPPORTED_ROPE_TYPES)
        cfg.float("rope_theta", default_theta)
    return rope_spec(cfg.data, rotary_dim, layer_type=layer_type, default_theta=default_theta)


# -- typed helpers (builders.config.Config) shared by the Phi-3, SmolLM3, HunYuan and multimodal-text families -------

def rope_settings(cfg: Config) -> Config:
    """The rope settings as one Config: transformers-5 `rope_parameters`, else the older `rope_scaling` with the
    top-level rope_theta (errors name whichever field the value came from)."""
    params = cfg.dict("rope_parameters", None)
    if params is not None and ("rope_type" in params or "rope_theta" in params or "type" in params):
        return cfg.sub("rope_parameters")
    merged = {**cfg.dict("rope_scaling", {})}
    if "rope_theta" in cfg:
        merged.setdefault("rope_theta", cfg.float("rope_theta"))
    return Config(merged, cfg.architecture, cfg.where, "rope_scaling.")


def rope_type(rope: Config, supported: tuple[str, ...], aliases: dict[str, str] | None = None) -> str:
    """rope_type (or the legacy `type`) through `aliases`, refused with exit 3 unless in `supported`."""
    key = "rope_type" if "rope_type" in rope else "type"
    kind = rope.str(key, "default")
    kind = (aliases or {}).get(kind, kind)
    if kind not in supported:
        raise rope.unsupported(key, kind, ", ".join(map(repr, supported)))
    return kind


# mRoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): each frequency pair j of the rotary half is driven by one of three
# position streams (temporal, height, width): pairs are grouped in `mrope_section` sizes, in order (t, h, w, t, ...
# per section) or interleaved (mrope_interleaved: Qwen3-VL). For text tokens the three streams are equal (the
# processor gives text position p as (p, p, p)), so every pair reads the same angle p * inv_freq[j] whatever its
# stream: mRoPE is plain rope with the same inverse frequencies. A text-only export therefore uses a default rope;
# the section fields are only checked (they must cover the rotary half, as transformers' split requires).
MROPE_FIELDS = ("mrope_section", "mrope_interleaved")


def text_positions_mrope(rope: Config, rotary_dim: int) -> bool:
    """Check the mRoPE fields of a rope (if any); returns whether the rope is an mRoPE. See MROPE_FIELDS."""
    section = rope.list("mrope_section", None, of=int)
    rope.bool("mrope_interleaved", False)
    if section is None:
        return False
    if len(section) != 3 or sum(section) != rotary_dim // 2 or min(section) < 0:
        raise rope.bad("mrope_section", section, f"3 non-negative sizes summing to rotary_dim / 2 = {rotary_dim // 2}")
    return True


def rope_from(rope: Config, kind: str, rotary_dim: int, max_positions: int, *, default_theta: float = 10000.0,
              drop: tuple[str, ...] = (), overrides: dict | None = None) -> RopeSpec:
    """RopeSpec of type `kind` from rope settings; `drop` names fields read elsewhere (e.g. MROPE_FIELDS),
    `overrides` sets parameters the family resolved itself."""
    theta = rope.float("rope_theta", default_theta)
    skip = {"rope_type", "type", "rope_theta", "partial_rotary_factor", *drop}
    params = {k: v for k, v in rope.data.items() if k not in skip and v is not None}
    params.update(overrides or {})
    hashable = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return RopeSpec(theta=theta, rotary_dim=rotary_dim, rope_type=kind, params=hashable, max_positions=max_positions)


def layer_windows(cfg: Config, default_types: list[str], window: int | None) -> list[int | None]:
    """Per-layer sliding window from config.layer_types (else `default_types`, transformers' derivation)."""
    types = cfg.list("layer_types", None, of=str, length=len(default_types)) or default_types
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise cfg.unsupported("layer_types", unknown, "'full_attention', 'sliding_attention'")
    if "sliding_attention" in types and window is None:
        raise cfg.bad("sliding_window", None, "a window size (with use_sliding_window), since layer_types has "
                      "sliding_attention layers")
    return [window if t == "sliding_attention" else None for t in types]


def text_decoder_prefix(ckpt: Checkpoint, arch: str, prefixes: tuple[str, ...], skipped: tuple[str, ...]) -> str:
    """The prefix of a multimodal checkpoint's text decoder (the first of `prefixes` holding embed_tokens); tensors
    under `skipped` (vision towers, projectors) are marked as deliberately not exported."""
    for prefix in prefixes:
        if ckpt.has(f"{prefix}embed_tokens.weight"):
            ckpt.ignore(*(n for n in ckpt.names() if n.startswith(skipped)))
            return prefix
    raise CheckpointError(f"{arch}: no token embedding found (looked for "
                          f"{', '.join(p + 'embed_tokens.weight' for p in prefixes)}). The checkpoint does not hold "
                          "the text decoder this architecture names.")


def tied_head_copy(ckpt: Checkpoint, arch: str, head: str, embed: str) -> None:
    """With tie_word_embeddings the lm_head reads the embedding; a stored lm_head equal to it is a copy and ignored.
    A different one means transformers would not tie them (it keeps both when they differ): refuse, rather than drop
    weights, and say how to fix the config. Only the first and last rows are compared (a trained head differs
    everywhere)."""
    if not ckpt.has(head):
        return
    a, b = ckpt.tensor(head), ckpt.tensor(embed)
    rows = a.shape[0] if a.shape else 0
    same = a.shape == b.shape and a.dtype == b.dtype and all(
        np.array_equal(a.read(i, i + 1), b.read(i, i + 1)) for i in {0, max(rows - 1, 0)})
    if not same:
        raise CheckpointError(f"{arch}: config.json sets tie_word_embeddings=true but the checkpoint stores an lm_head "
                              f"({head}) that differs from the embedding ({embed}); transformers would use the stored "
                              "head. Set tie_word_embeddings to false in config.json to export it.")

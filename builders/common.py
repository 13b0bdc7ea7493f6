"""Helpers shared by family modules: reading HF config fields, rope parameters, name-table weight mapping."""

from __future__ import annotations

from typing import Iterable

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

"""Gemma 4 text decoder (Gemma4ForCausalLM and the text part of Gemma4ForConditionalGeneration), dense and MoE.

Differences from Gemma 3, all expressed as spec data (graph variants live in builder/layers):
  - RMSNorm weights apply as w (no 1 + w); q/k norms plus a weightless v norm; attention scale 1.0.
  - per-layer geometry: full-attention layers use their own head_dim (and kv heads) from `per_layer_config`, or
    from the released spelling global_head_dim / num_global_key_value_heads (the latter only with attention_k_eq_v,
    as transformers does); attention_k_eq_v full layers take v from the k projection (mapped as v = k weights).
  - rope per layer type; "proportional" rope on full layers rotates a partial_rotary_factor share of the pairs.
  - per-layer input embeddings (hidden_size_per_layer_input), a learned per-layer output scale (layer_scalar).
  - KV sharing: the last num_kv_shared_layers layers reuse the keys/values of the last earlier layer of their type.
  - enable_moe_block: a dense MLP and GeGLU experts side by side (DenseMoeSpec). The router's input scale
    (router.scale / sqrt(hidden)) is folded into the router weight and router.per_expert_scale into each expert's
    down projection, which leaves the standard softmax -> top-k -> renormalise routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from builder.checkpoint import Checkpoint
from builder.errors import CheckpointError, UnsupportedModelError
from builder.spec import AttentionSpec, DenseMoeSpec, LayerSpec, MlpSpec, ModelSpec, MoeSpec, RopeSpec
from builder.weights import Constant, RowMap, Stored, Weight, WeightMap
from builders import Family, register
from builders.common import map_table, require
from builders.gemma import activation, attention_table, map_common, mlp_table, norm_table, text_prefix

LAYER_OVERRIDES = ("head_dim", "num_key_value_heads")  # per_layer_config keys that we honour
ROPE_TYPES = ("default", "proportional", "linear")
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def layer_types(config: dict) -> list[str]:
    """As transformers: the given layer_types (or 5 sliding : 1 full), the last layer always full attention."""
    types = list(config.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                               for i in range(config["num_hidden_layers"])])
    types[-1] = "full_attention"
    return types


def layer_overrides(config: dict, types: list[str], arch: str) -> list[dict]:
    """Per-layer head_dim / num_key_value_heads overrides."""
    given = config.get("per_layer_config")
    if given is None:
        override = {"head_dim": config.get("global_head_dim", 512)}
        if config.get("attention_k_eq_v", False) and config.get("num_global_key_value_heads") is not None:
            override["num_key_value_heads"] = config["num_global_key_value_heads"]
        return [dict(override) if kind == "full_attention" else {} for kind in types]
    out = []
    for i in range(len(types)):
        values = dict(given.get(str(i)) or given.get(i) or {})
        unknown = sorted(set(values) - set(LAYER_OVERRIDES))
        if unknown:
            raise UnsupportedModelError(f"{arch}: per_layer_config[{i}] overrides {unknown}, which this exporter "
                                        f"does not support (only {', '.join(LAYER_OVERRIDES)}).")
        out.append(values)
    return out


def kv_sources(config: dict, types: list[str], arch: str) -> list[int | None]:
    """For each layer, the layer whose keys/values it reuses (None: its own), as transformers' kv_sharing_modes."""
    shared = config.get("num_kv_shared_layers") or 0
    first = len(types) - shared
    sources: list[int | None] = [None] * len(types)
    for i in range(first, len(types)):
        owners = [j for j in range(first) if types[j] == types[i]]
        if not owners:
            raise UnsupportedModelError(f"{arch}: num_kv_shared_layers={shared} makes layer {i} ({types[i]}) reuse "
                                        "the cache of an earlier layer of its type, but there is none.")
        sources[i] = owners[-1]
    return sources


def rope_for(config: dict, kind: str, dim: int, arch: str) -> RopeSpec:
    params = dict((config.get("rope_parameters") or {}).get(kind) or {})
    rope_type = params.pop("rope_type", "default")
    theta = float(params.pop("rope_theta", DEFAULT_THETA[kind]))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"{arch}: rope_parameters[{kind!r}].rope_type={rope_type!r} is not supported "
                                    f"(supported: {', '.join(ROPE_TYPES)}).")
    partial = params.get("partial_rotary_factor", 1.0)
    if rope_type == "linear" and partial != 1.0:
        raise UnsupportedModelError(f"{arch}: rope_parameters[{kind!r}] combines linear rope with "
                                    f"partial_rotary_factor={partial}; only proportional rope may be partial.")
    if rope_type == "default":
        params = {}  # transformers' default rope rotates the whole head and ignores the other fields
    hashable = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return RopeSpec(theta=theta, rotary_dim=dim, rope_type=rope_type, params=hashable,
                    max_positions=int(config.get("max_position_embeddings", 4096)))


def make_spec(config: dict) -> ModelSpec:
    arch = config["architectures"][0]
    if config.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError(f"{arch}: config field use_bidirectional_attention='all' is not supported (only "
                                    "causal decoders export; 'vision' is fine, it only affects image tokens).")
    act = activation(config, arch, "hidden_activation")
    types = layer_types(config)
    unknown = sorted(set(types) - set(DEFAULT_THETA))
    if unknown:
        raise UnsupportedModelError(f"{arch}: layer_types {unknown} are not supported (only full_attention and "
                                    "sliding_attention).")
    overrides = layer_overrides(config, types, arch)
    sources = kv_sources(config, types, arch)
    heads, bias, window = config["num_attention_heads"], bool(config.get("attention_bias", False)), config.get(
        "sliding_window")
    moe = None
    if config.get("enable_moe_block"):
        moe = MoeSpec(num_experts=require(config, "num_experts", arch), top_k=require(config, "top_k_experts", arch),
                      intermediate_size=require(config, "moe_intermediate_size", arch), activation=act)
    layers = []
    for i, kind in enumerate(types):
        dim = overrides[i].get("head_dim", config["head_dim"])
        attn = AttentionSpec(
            num_heads=heads, num_kv_heads=overrides[i].get("num_key_value_heads", config["num_key_value_heads"]),
            head_dim=dim, rope=rope_for(config, kind, dim, arch), qkv_bias=bias, o_bias=bias, qk_norm=True,
            v_norm=True, scale=1.0, sliding_window=window if kind == "sliding_attention" and window else None,
            kv_source=sources[i])
        wide = 2 if config.get("use_double_wide_mlp") and sources[i] is not None else 1
        mlp = MlpSpec(intermediate_size=config["intermediate_size"] * wide, activation=act)
        layers.append(LayerSpec(attention=attn, ffn=DenseMoeSpec(mlp, moe) if moe else mlp, norm_scheme="sandwich",
                                output_scale=True))
    per_layer = config.get("hidden_size_per_layer_input") or 0
    return ModelSpec(architecture=arch, model_type=config["model_type"], vocab_size=config["vocab_size"],
                     hidden_size=config["hidden_size"], layers=tuple(layers),
                     context_length=config.get("max_position_embeddings", 131072),
                     norm_eps=config.get("rms_norm_eps", 1e-6), norm_weight_offset=0.0,
                     embedding_scale=math.sqrt(config["hidden_size"]),
                     tie_embeddings=bool(config.get("tie_word_embeddings", True)),
                     final_softcap=float(config.get("final_logit_softcapping") or 0.0),
                     per_layer_input_size=per_layer,
                     per_layer_vocab_size=config.get("vocab_size_per_layer_input", config["vocab_size"]) if per_layer else 0,
                     per_layer_activation=act)


@dataclass(frozen=True)
class ScaledExperts:
    """[E, N, K] expert weights with expert e multiplied by scale[e] (Gemma 4 router.per_expert_scale)."""

    source: Weight
    scale: Weight

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.source.rows(start, stop) * self.scale.rows(start, stop)[:, None, None]


@dataclass(frozen=True)
class GateUpInterleaved:
    """transformers' experts.gate_up_proj [E, 2I, H] (all gate rows, then all up rows) as the canonical fc1
    [E, 2I, H] with rows g0, u0, g1, u1, ... (read once per block of experts)."""

    source: Weight

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        both = self.source.rows(start, stop)
        half = both.shape[1] // 2
        out = np.empty_like(both)
        out[:, 0::2], out[:, 1::2] = both[:, :half], both[:, half:]
        return out


def _stored(ckpt: Checkpoint, name: str, arch: str) -> Stored:
    if not ckpt.has(name):
        raise CheckpointError(f"{arch}: tensor {name} missing from the checkpoint (enable_moe_block needs it). "
                              "The checkpoint is incomplete or does not match its config.")
    return Stored(ckpt.tensor(name))


def _map_moe(spec: ModelSpec, ckpt: Checkpoint, weights: WeightMap, prefix: str, i: int) -> None:
    arch, hidden = spec.architecture, spec.hidden_size
    moe = spec.layers[i].ffn.moe
    src = f"{prefix}layers.{i}"
    map_table(ckpt, weights, {f"layers.{i}.mlp.post_norm.weight": f"{src}.post_feedforward_layernorm_1.weight",
                              f"layers.{i}.moe.pre_norm.weight": f"{src}.pre_feedforward_layernorm_2.weight",
                              f"layers.{i}.moe.post_norm.weight": f"{src}.post_feedforward_layernorm_2.weight"}, 0)
    proj, scale = _stored(ckpt, f"{src}.router.proj.weight", arch), _stored(ckpt, f"{src}.router.scale", arch)
    weights.add(f"layers.{i}.moe.router.weight",
                RowMap(proj, lambda rows: rows * (scale.rows() * np.float32(hidden ** -0.5)), proj.shape),
                f"{src}.router.proj.weight")
    gate_up = _stored(ckpt, f"{src}.experts.gate_up_proj", arch)
    e, two_i, _ = gate_up.shape
    weights.add(f"layers.{i}.moe.fc1.weight", GateUpInterleaved(gate_up), f"{src}.experts.gate_up_proj")
    down = _stored(ckpt, f"{src}.experts.down_proj", arch)
    weights.add(f"layers.{i}.moe.fc2.weight",
                ScaledExperts(down, _stored(ckpt, f"{src}.router.per_expert_scale", arch)),
                f"{src}.experts.down_proj")
    if (e, two_i) != (moe.num_experts, 2 * moe.intermediate_size):
        raise CheckpointError(f"{arch}: tensor {src}.experts.gate_up_proj has shape {list(gate_up.shape)} but the "
                              f"config implies [{moe.num_experts}, {2 * moe.intermediate_size}, {hidden}].")


def map_weights(spec: ModelSpec, ckpt: Checkpoint, config: dict) -> WeightMap:
    weights = WeightMap(spec.architecture)
    prefix = text_prefix(ckpt, spec.architecture)
    types = layer_types(config)
    for i, layer in enumerate(spec.layers):
        table = {**norm_table(prefix, True, str(i)), **mlp_table(prefix, str(i)),
                 f"layers.{i}.layer_scalar": f"{prefix}layers.{i}.layer_scalar"}
        attn = attention_table(prefix, str(i))
        if layer.attention.kv_source is not None:  # consumers have no k/v; transformers ignores stored copies too
            dropped = {k: v for k, v in attn.items() if any(f".attn.{p}" in k for p in ("k.", "v.", "k_norm"))}
            ckpt.ignore(*dropped.values())
            attn = {k: v for k, v in attn.items() if k not in dropped}
        map_table(ckpt, weights, {**table, **attn}, 0)
        if config.get("attention_k_eq_v") and types[i] == "full_attention":
            for kind in ("weight", "bias"):  # v comes from the k projection: v = v_norm(k_proj(x))
                if f"layers.{i}.attn.k.{kind}" in weights:
                    weights.add(f"layers.{i}.attn.v.{kind}", weights.get(f"layers.{i}.attn.k.{kind}"),
                                f"{prefix}layers.{i}.self_attn.k_proj.{kind}")
        if f"layers.{i}.layer_scalar" not in weights:  # a buffer; transformers initialises it to 1 when absent
            weights.add(f"layers.{i}.layer_scalar", Constant(np.ones(1, np.float32)))
        if isinstance(layer.ffn, DenseMoeSpec):
            _map_moe(spec, ckpt, weights, prefix, i)
    if spec.per_layer_input_size:
        map_table(ckpt, weights, {
            "per_layer.embed.weight": f"{prefix}embed_tokens_per_layer.weight",
            "per_layer.projection.weight": f"{prefix}per_layer_model_projection.weight",
            "per_layer.projection_norm.weight": f"{prefix}per_layer_projection_norm.weight",
            "layers.{i}.per_layer.gate.weight": f"{prefix}layers.{{i}}.per_layer_input_gate.weight",
            "layers.{i}.per_layer.projection.weight": f"{prefix}layers.{{i}}.per_layer_projection.weight",
            "layers.{i}.per_layer.norm.weight": f"{prefix}layers.{{i}}.post_per_layer_input_norm.weight"},
            spec.num_layers)
    map_common(spec, ckpt, weights, prefix)
    return weights


register(Family("gemma4", ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"), make_spec, map_weights,
                text_config_key="text_config",
                notes="Gemma 4 text (per-layer head_dim, proportional rope, per-layer inputs, KV sharing, k=v "
                      "attention, dense + GeGLU-expert MoE)"))

"""Gemma 4 text decoder (Gemma4ForCausalLM and the text part of Gemma4ForConditionalGeneration), dense and MoE.

Differences from Gemma 3, all expressed as spec data (graph variants live in builder/layers):
  - RMSNorm weights apply as w (no 1 + w); q/k norms plus a weightless v norm; attention scale 1.0.
  - per-layer geometry: full-attention layers use their own head_dim (and kv heads) from `per_layer_config`, or
    from the released spelling global_head_dim / num_global_key_value_heads (the latter only with attention_k_eq_v,
    as transformers does); attention_k_eq_v full layers take v from the k projection (AttentionSpec.k_eq_v).
  - rope per layer type; "proportional" rope on full layers rotates a partial_rotary_factor share of the pairs.
  - per-layer input embeddings (hidden_size_per_layer_input), a learned per-layer output scale (layer_scalar).
  - KV sharing: the last num_kv_shared_layers layers reuse the keys/values of the last earlier layer of their type.
  - enable_moe_block: a dense MLP and GeGLU experts side by side (DenseMoeSpec), whose fc1 stays as stored
    ([gate; up] per expert: the layout the per-expert MatMuls read). The router's input scale
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
from builders.common import map_table, rope_spec
from builders.config import Config
from builders.gemma import NON_TEXT, activation, attention_table, bidirectional, map_common, mlp_table, norm_table, \
    text_prefix

LAYER_OVERRIDES = ("head_dim", "num_key_value_heads")  # per_layer_config keys that we honour
ROPE_TYPES = ("default", "proportional", "linear")
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
KV_SHARED = "k/v projections and norms of KV-sharing layers (they reuse an earlier layer's cache, as in transformers)"


def layer_types(cfg: Config) -> list[str]:
    """As transformers: the given layer_types (or 5 sliding : 1 full), the last layer always full attention."""
    n = cfg.int("num_hidden_layers", minimum=1)
    types = cfg.list("layer_types", None, of=str, length=n) or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    types[-1] = "full_attention"
    for kind in types:
        if kind not in DEFAULT_THETA:
            raise cfg.unsupported("layer_types", kind, ", ".join(DEFAULT_THETA))
    return types


def layer_overrides(cfg: Config, types: list[str]) -> list[dict]:
    """Per-layer head_dim / num_key_value_heads overrides."""
    given = cfg.sub("per_layer_config", None)
    if given is None:
        override = {"head_dim": cfg.int("global_head_dim", 512, minimum=1)}
        global_kv = cfg.int("num_global_key_value_heads", None, minimum=1)
        if cfg.bool("attention_k_eq_v", False) and global_kv is not None:
            override["num_key_value_heads"] = global_kv
        return [dict(override) if kind == "full_attention" else {} for kind in types]
    out = []
    for i in range(len(types)):
        layer = given.sub(str(i), None)
        values = {} if layer is None else {key: layer.int(key, minimum=1) for key in layer.keys()
                                           if key in LAYER_OVERRIDES}
        unknown = sorted(set(layer.keys() if layer is not None else ()) - set(LAYER_OVERRIDES))
        if unknown:
            raise UnsupportedModelError(f"{cfg.architecture}: per_layer_config[{i}] overrides {unknown}, which this "
                                        f"exporter does not support (only {', '.join(LAYER_OVERRIDES)}).")
        out.append(values)
    return out


def kv_sources(cfg: Config, types: list[str]) -> list[int | None]:
    """For each layer, the layer whose keys/values it reuses (None: its own), as transformers' kv_sharing_modes."""
    shared = cfg.int("num_kv_shared_layers", 0, minimum=0)
    if shared >= len(types):
        raise cfg.bad("num_kv_shared_layers", shared, f"fewer than num_hidden_layers={len(types)}")
    first = len(types) - shared
    sources: list[int | None] = [None] * len(types)
    for i in range(first, len(types)):
        owners = [j for j in range(first) if types[j] == types[i]]
        if not owners:
            raise UnsupportedModelError(f"{cfg.architecture}: num_kv_shared_layers={shared} makes layer {i} "
                                        f"({types[i]}) reuse the cache of an earlier layer of its type, but there "
                                        "is none.")
        sources[i] = owners[-1]
    return sources


def rope_for(cfg: Config, kind: str, dim: int) -> RopeSpec:
    # Gemma 4's default rope rotates the whole head whatever partial_rotary_factor says (as transformers computes it)
    return rope_spec(cfg, dim, layer_type=kind, default_theta=DEFAULT_THETA[kind], types=ROPE_TYPES,
                     partial=("default",))


def make_spec(cfg: Config) -> ModelSpec:
    if cfg.str("use_bidirectional_attention", None) == "all":  # "vision" only affects image tokens: fine
        raise bidirectional(cfg, "all", "'vision' is fine, it only affects image tokens")
    act = activation(cfg, "hidden_activation")
    types = layer_types(cfg)
    overrides = layer_overrides(cfg, types)
    sources = kv_sources(cfg, types)
    heads, bias = cfg.int("num_attention_heads", minimum=1), cfg.bool("attention_bias", False)
    window = cfg.int("sliding_window", None, minimum=0) or None
    k_eq_v = cfg.bool("attention_k_eq_v", False)
    moe = None
    if cfg.bool("enable_moe_block", False):
        moe = MoeSpec(num_experts=cfg.int("num_experts", minimum=1), top_k=cfg.int("top_k_experts", minimum=1),
                      intermediate_size=cfg.int("moe_intermediate_size", minimum=1), activation=act)
        if moe.top_k > moe.num_experts:
            raise cfg.bad("top_k_experts", moe.top_k, f"at most num_experts={moe.num_experts}")
    dim, kv, intermediate = cfg.int("head_dim", minimum=1), cfg.int("num_key_value_heads", minimum=1), cfg.int(
        "intermediate_size", minimum=1)
    double_wide = cfg.bool("use_double_wide_mlp", False)
    layers = []
    for i, kind in enumerate(types):
        layer_dim = overrides[i].get("head_dim", dim)
        attn = AttentionSpec(
            num_heads=heads, num_kv_heads=overrides[i].get("num_key_value_heads", kv), head_dim=layer_dim,
            rope=rope_for(cfg, kind, layer_dim), qkv_bias=bias, o_bias=bias, qk_norm=True, v_norm=True, scale=1.0,
            sliding_window=window if kind == "sliding_attention" else None, kv_source=sources[i],
            k_eq_v=k_eq_v and kind == "full_attention" and sources[i] is None)
        wide = 2 if double_wide and sources[i] is not None else 1
        mlp = MlpSpec(intermediate_size=intermediate * wide, activation=act)
        layers.append(LayerSpec(attention=attn, ffn=DenseMoeSpec(mlp, moe) if moe else mlp, norm_scheme="sandwich",
                                output_scale=True))
    vocab, hidden = cfg.int("vocab_size", minimum=1), cfg.int("hidden_size", minimum=1)
    per_layer = cfg.int("hidden_size_per_layer_input", 0, minimum=0)
    return ModelSpec(architecture=cfg.architecture, model_type=cfg.str("model_type"), vocab_size=vocab,
                     hidden_size=hidden, layers=tuple(layers),
                     context_length=cfg.int("max_position_embeddings", 131072, minimum=1),
                     norm_eps=cfg.float("rms_norm_eps", 1e-6), norm_weight_offset=0.0,
                     embedding_scale=math.sqrt(hidden), tie_embeddings=cfg.bool("tie_word_embeddings", True),
                     final_softcap=cfg.float("final_logit_softcapping", None) or 0.0,
                     per_layer_input_size=per_layer,
                     per_layer_vocab_size=cfg.int("vocab_size_per_layer_input", vocab, minimum=1) if per_layer else 0,
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
    # [E, 2I, H] as stored ([gate; up] per expert): what each per-expert MatMul reads, so nothing is interleaved
    weights.add(f"layers.{i}.moe.fc1.weight", gate_up, f"{src}.experts.gate_up_proj")
    down = _stored(ckpt, f"{src}.experts.down_proj", arch)
    weights.add(f"layers.{i}.moe.fc2.weight",
                ScaledExperts(down, _stored(ckpt, f"{src}.router.per_expert_scale", arch)),
                f"{src}.experts.down_proj")
    if (e, two_i) != (moe.num_experts, 2 * moe.intermediate_size):
        raise CheckpointError(f"{arch}: tensor {src}.experts.gate_up_proj has shape {list(gate_up.shape)} but the "
                              f"config implies [{moe.num_experts}, {2 * moe.intermediate_size}, {hidden}].")


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    prefix = text_prefix(ckpt, spec.architecture)
    for i, layer in enumerate(spec.layers):
        table = {**norm_table(prefix, True, str(i)), **mlp_table(prefix, str(i)),
                 f"layers.{i}.layer_scalar": f"{prefix}layers.{i}.layer_scalar"}
        attn = attention_table(prefix, str(i))
        if layer.attention.kv_source is not None:  # consumers have no k/v; transformers ignores stored copies too
            dropped = {k: v for k, v in attn.items() if any(f".attn.{p}" in k for p in ("k.", "v.", "k_norm"))}
            ckpt.ignore(*dropped.values(), reason=KV_SHARED)
            attn = {k: v for k, v in attn.items() if k not in dropped}
        map_table(ckpt, weights, {**table, **attn}, 0)
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
                text_config_key="text_config", ignored=NON_TEXT,
                notes="Gemma 4 text (per-layer head_dim, proportional rope, per-layer inputs, KV sharing, k=v "
                      "attention, dense + GeGLU-expert MoE)"))

"""Gemma, Gemma 2 and Gemma 3 (text decoder of Gemma3ForCausalLM and Gemma3ForConditionalGeneration).

What the family shares, as data: embeddings scaled by sqrt(hidden), RMSNorm weights applied as (1 + w), GeGLU
(gelu-tanh) MLPs, tied lm_head. Gemma 2 adds sandwich norms (post-attention / post-feed-forward), attention and
final logit softcapping, query_pre_attn_scalar and alternating sliding-window layers; Gemma 3 adds per-head q/k
norms and a rope per layer type (local base on sliding layers, scaled global base on full layers). The multimodal
Gemma 3 checkpoint keeps the same text weights under another prefix; its vision tower is ignored explicitly.
Helpers here (text_prefix, activation, layer_types, sandwich_table) are shared with builders/gemma4.py.
"""

from __future__ import annotations

import math

from builder.checkpoint import Checkpoint
from builder.errors import CheckpointError, UnsupportedModelError
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec, RopeSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import head_dim, map_table, rope_spec

# HF activation name -> ours. "gelu" is the erf GELU except in Gemma 1 configs, where it is a legacy spelling of
# the tanh approximation (transformers' GemmaConfig rewrites it the same way).
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "silu": "silu"}

# Where the text decoder's tensors live: text-only checkpoints, legacy multimodal, transformers-5 multimodal.
TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
# Tensors of the other modalities in multimodal checkpoints, ignored knowingly when exporting the text decoder.
NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
                     "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")


def activation(config: dict, arch: str, key: str, legacy_gelu_is_tanh: bool = False) -> str:
    name = config.get(key) or "gelu_pytorch_tanh"
    if legacy_gelu_is_tanh and name == "gelu":
        return "gelu_tanh"
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{arch}: config field {key}={name!r} is not supported "
                                    f"(supported: {', '.join(sorted(ACTIVATIONS))}).")
    return ACTIVATIONS[name]


def layer_types(config: dict, default_pattern: int) -> list[str]:
    """config.layer_types, or transformers' default: every `default_pattern`-th layer full, the others sliding."""
    types = config.get("layer_types")
    if types:
        return list(types)
    pattern = config.get("sliding_window_pattern") or default_pattern
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(config["num_hidden_layers"])]


def text_prefix(ckpt: Checkpoint, arch: str) -> str:
    """The prefix of the decoder's tensors; tensors of other modalities are marked as knowingly unused."""
    for prefix in TEXT_PREFIXES:
        if ckpt.has(f"{prefix}embed_tokens.weight"):
            ckpt.ignore(*(n for n in ckpt.names() if n.startswith(NON_TEXT_PREFIXES)))
            return prefix
    raise CheckpointError(f"{arch}: no token embedding found (looked for "
                          f"{', '.join(p + 'embed_tokens.weight' for p in TEXT_PREFIXES)}). The checkpoint does not "
                          "hold a Gemma text decoder.")


def lm_head_name(prefix: str) -> str:
    return "language_model.lm_head.weight" if prefix == "language_model.model." else "lm_head.weight"


def attention_table(prefix: str, layer: str = "{i}") -> dict[str, str]:
    src = f"{prefix}layers.{layer}.self_attn"
    table = {f"layers.{layer}.attn.{p}.{kind}": f"{src}.{p}_proj.{kind}" for p in "qkvo" for kind in ("weight", "bias")}
    table.update({f"layers.{layer}.attn.{n}.weight": f"{src}.{n}.weight" for n in ("q_norm", "k_norm")})
    return table


def mlp_table(prefix: str, layer: str = "{i}") -> dict[str, str]:
    return {f"layers.{layer}.mlp.{p}.weight": f"{prefix}layers.{layer}.mlp.{p}_proj.weight"
            for p in ("gate", "up", "down")}


def norm_table(prefix: str, sandwich: bool, layer: str = "{i}") -> dict[str, str]:
    src = f"{prefix}layers.{layer}"
    if not sandwich:
        return {f"layers.{layer}.attn_norm.weight": f"{src}.input_layernorm.weight",
                f"layers.{layer}.ffn_norm.weight": f"{src}.post_attention_layernorm.weight"}
    return {f"layers.{layer}.attn_norm.weight": f"{src}.input_layernorm.weight",
            f"layers.{layer}.post_attn_norm.weight": f"{src}.post_attention_layernorm.weight",
            f"layers.{layer}.ffn_norm.weight": f"{src}.pre_feedforward_layernorm.weight",
            f"layers.{layer}.post_ffn_norm.weight": f"{src}.post_feedforward_layernorm.weight"}


def map_common(spec: ModelSpec, ckpt: Checkpoint, weights: WeightMap, prefix: str) -> None:
    """Embedding, final norm and lm_head (a stored copy of a tied head is ignored)."""
    map_table(ckpt, weights, {"embed.weight": f"{prefix}embed_tokens.weight", "final_norm.weight": f"{prefix}norm.weight",
                              "lm_head.weight": lm_head_name(prefix)}, spec.num_layers)
    if spec.tie_embeddings:
        ckpt.ignore(lm_head_name(prefix))


def _gemma3_ropes(config: dict, dim: int) -> dict[str, RopeSpec]:
    """Rope per layer type: transformers-5 `rope_parameters` {full_attention: ..., sliding_attention: ...}, or the
    older spelling (rope_theta + rope_scaling for global layers, rope_local_base_freq for sliding ones)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        return {"full_attention": rope_spec(config, dim, layer_type="full_attention", default_theta=1_000_000.0),
                "sliding_attention": rope_spec(config, dim, layer_type="sliding_attention", default_theta=10_000.0)}
    local = {"rope_theta": config.get("rope_local_base_freq", 10_000.0),
             "max_position_embeddings": config.get("max_position_embeddings", 4096)}
    return {"full_attention": rope_spec({**config, "rope_parameters": None}, dim, default_theta=1_000_000.0),
            "sliding_attention": rope_spec(local, dim)}


def make_spec(config: dict) -> ModelSpec:
    arch = config["architectures"][0]
    version = ARCHITECTURES[arch]
    if config.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{arch}: config field use_bidirectional_attention="
                                    f"{config['use_bidirectional_attention']!r} is not supported (only causal "
                                    "decoders export; this is an embedding model).")
    dim = head_dim(config)
    bias = bool(config.get("attention_bias", False))
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if version == 1:
        act = activation(config, arch, "hidden_act", legacy_gelu_is_tanh=True)
        types, scale, softcap, final_softcap = ["full_attention"] * config["num_hidden_layers"], None, 0.0, 0.0
        ropes = {"full_attention": rope_spec(config, dim)}
    else:
        act = activation(config, arch, "hidden_activation")
        types = layer_types(config, default_pattern=2 if version == 2 else 6)
        scale = float(config.get("query_pre_attn_scalar") or dim) ** -0.5
        # Gemma 3 keeps attn_logit_softcapping in its config but transformers never applies it; neither do we.
        softcap = float(config.get("attn_logit_softcapping") or 0.0) if version == 2 else 0.0
        final_softcap = float(config.get("final_logit_softcapping") or 0.0)
        ropes = (_gemma3_ropes(config, dim) if version == 3
                 else {t: rope_spec(config, dim) for t in ("full_attention", "sliding_attention")})
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModelError(f"{arch}: layer_types {unknown} are not supported (only full_attention and "
                                    "sliding_attention).")
    window = config.get("sliding_window")
    layers = tuple(
        LayerSpec(
            attention=AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, rope=ropes[kind],
                                    qkv_bias=bias, o_bias=bias, qk_norm=version == 3, scale=scale, softcap=softcap,
                                    sliding_window=window if kind == "sliding_attention" and window else None),
            ffn=MlpSpec(intermediate_size=config["intermediate_size"], activation=act),
            norm_scheme="pre" if version == 1 else "sandwich")
        for kind in types)
    return ModelSpec(architecture=arch, model_type=config["model_type"], vocab_size=config["vocab_size"],
                     hidden_size=config["hidden_size"], layers=layers,
                     context_length=config.get("max_position_embeddings", 8192),
                     norm_eps=config.get("rms_norm_eps", 1e-6), norm_weight_offset=1.0,
                     embedding_scale=math.sqrt(config["hidden_size"]),
                     tie_embeddings=bool(config.get("tie_word_embeddings", True)), final_softcap=final_softcap)


def map_weights(spec: ModelSpec, ckpt: Checkpoint, config: dict) -> WeightMap:
    weights = WeightMap(spec.architecture)
    prefix = text_prefix(ckpt, spec.architecture)
    sandwich = spec.layers[0].norm_scheme == "sandwich"
    map_table(ckpt, weights, {**attention_table(prefix), **mlp_table(prefix), **norm_table(prefix, sandwich)},
              spec.num_layers)
    map_common(spec, ckpt, weights, prefix)
    return weights


ARCHITECTURES = {"GemmaForCausalLM": 1, "Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 3,
                 "Gemma3ForConditionalGeneration": 3}

register(Family("gemma", tuple(ARCHITECTURES), make_spec, map_weights, text_config_key="text_config",
                notes="Gemma (GeGLU, 1+w norms, scaled embeddings), Gemma 2 (sandwich norms, softcaps, alternating "
                      "sliding window), Gemma 3 text and the text decoder of Gemma 3 multimodal checkpoints "
                      "(q/k norm, local/global rope)"))

"""Gemma, Gemma 2 and Gemma 3 (text decoder of Gemma3ForCausalLM and Gemma3ForConditionalGeneration).

What the family shares, as data: embeddings scaled by sqrt(hidden), RMSNorm weights applied as (1 + w), GeGLU
(gelu-tanh) MLPs, tied lm_head. Gemma 2 adds sandwich norms (post-attention / post-feed-forward), attention and
final logit softcapping, query_pre_attn_scalar and alternating sliding-window layers; Gemma 3 adds per-head q/k
norms and a rope per layer type (local base on sliding layers, scaled global base on full layers). The multimodal
Gemma 3 checkpoint keeps the same text weights under another prefix; its vision tower is left out by
declaration (Family.ignored), which the progress output names.
Helpers here (text_prefix, activation, bidirectional, the name tables) are shared with builders/gemma4.py.
"""

from __future__ import annotations

import math

from builder.checkpoint import Checkpoint
from builder.errors import CheckpointError, UnsupportedModelError
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec, RopeSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import head_dim, kv_heads, map_table, rope_spec
from builders.config import Config

# HF activation name -> ours. "gelu" is the erf GELU except in Gemma 1 configs, where it is a legacy spelling of
# the tanh approximation (transformers' GemmaConfig rewrites it the same way).
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "silu": "silu"}
LAYER_TYPES = ("full_attention", "sliding_attention")

# Where the text decoder's tensors live: text-only checkpoints, legacy multimodal, transformers-5 multimodal.
TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
# Tensors of the other modalities in multimodal checkpoints, left out knowingly when exporting the text decoder.
NON_TEXT = (("the vision/audio towers and their projectors (only the text decoder is exported)",
             ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
              "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")),)


def activation(cfg: Config, key: str, legacy_gelu_is_tanh: bool = False) -> str:
    name = cfg.str(key, "gelu_pytorch_tanh", choices=sorted(ACTIVATIONS))
    if legacy_gelu_is_tanh and name == "gelu":
        return "gelu_tanh"
    return ACTIVATIONS[name]


def layer_types(cfg: Config, default_pattern: int) -> list[str]:
    """config.layer_types, or transformers' default: every `default_pattern`-th layer full, the others sliding."""
    n = cfg.int("num_hidden_layers", minimum=1)
    types = cfg.list("layer_types", None, of=str, length=n)
    if not types:
        pattern = cfg.int("sliding_window_pattern", None, minimum=1) or default_pattern
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    for kind in types:
        if kind not in LAYER_TYPES:
            raise cfg.unsupported("layer_types", kind, ", ".join(LAYER_TYPES))
    return types


def bidirectional(cfg: Config, value, why: str) -> UnsupportedModelError:
    """The error for a bidirectional (embedding-model) variant of the decoder."""
    return cfg.unsupported("use_bidirectional_attention", value, why=f"only causal decoders export; {why}")


def text_prefix(ckpt: Checkpoint, arch: str) -> str:
    """The prefix of the decoder's tensors."""
    for prefix in TEXT_PREFIXES:
        if ckpt.has(f"{prefix}embed_tokens.weight"):
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
    """Embedding, final norm and lm_head (a stored head of a tied model is settled by resolve_tied_head)."""
    map_table(ckpt, weights, {"embed.weight": f"{prefix}embed_tokens.weight", "final_norm.weight": f"{prefix}norm.weight",
                              "lm_head.weight": lm_head_name(prefix)}, spec.num_layers)


def _gemma3_ropes(cfg: Config, dim: int) -> dict[str, RopeSpec]:
    """Rope per layer type: transformers-5 `rope_parameters` {full_attention: ..., sliding_attention: ...}, or the
    older spelling (rope_theta + rope_scaling for global layers, rope_local_base_freq for sliding ones)."""
    params = cfg.sub("rope_parameters", None)
    if params is not None and ("full_attention" in params or "sliding_attention" in params):
        return {"full_attention": rope_spec(cfg, dim, layer_type="full_attention", default_theta=1_000_000.0),
                "sliding_attention": rope_spec(cfg, dim, layer_type="sliding_attention", default_theta=10_000.0)}
    local = Config({"rope_theta": cfg.float("rope_local_base_freq", 10_000.0),
                    "max_position_embeddings": cfg.int("max_position_embeddings", 4096, minimum=1)},
                   cfg.architecture, cfg.where, cfg.path)
    return {"full_attention": rope_spec(cfg.updated(rope_parameters=None), dim, default_theta=1_000_000.0),
            "sliding_attention": rope_spec(local, dim)}


def make_spec(cfg: Config) -> ModelSpec:
    version = ARCHITECTURES[cfg.architecture]
    if cfg.bool("use_bidirectional_attention", False):
        raise bidirectional(cfg, True, "this is an embedding model")
    dim = head_dim(cfg)
    bias = cfg.bool("attention_bias", False)
    heads, kv = cfg.int("num_attention_heads", minimum=1), kv_heads(cfg)
    n = cfg.int("num_hidden_layers", minimum=1)
    if version == 1:
        act = activation(cfg, "hidden_act", legacy_gelu_is_tanh=True)
        types, scale, softcap, final_softcap = ["full_attention"] * n, None, 0.0, 0.0
        ropes = {"full_attention": rope_spec(cfg, dim)}
    else:
        act = activation(cfg, "hidden_activation")
        types = layer_types(cfg, default_pattern=2 if version == 2 else 6)
        scale = float(cfg.float("query_pre_attn_scalar", None) or dim) ** -0.5
        # Gemma 3 keeps attn_logit_softcapping in its config but transformers never applies it; neither do we.
        softcap = (cfg.float("attn_logit_softcapping", None) or 0.0) if version == 2 else 0.0
        final_softcap = cfg.float("final_logit_softcapping", None) or 0.0
        ropes = (_gemma3_ropes(cfg, dim) if version == 3
                 else {t: rope_spec(cfg, dim) for t in ("full_attention", "sliding_attention")})
    window = cfg.int("sliding_window", None, minimum=0) or None
    intermediate = cfg.int("intermediate_size", minimum=1)
    layers = tuple(
        LayerSpec(
            attention=AttentionSpec(num_heads=heads, num_kv_heads=kv, head_dim=dim, rope=ropes[kind],
                                    qkv_bias=bias, o_bias=bias, qk_norm=version == 3, scale=scale, softcap=softcap,
                                    sliding_window=window if kind == "sliding_attention" else None),
            ffn=MlpSpec(intermediate_size=intermediate, activation=act),
            norm_scheme="pre" if version == 1 else "sandwich")
        for kind in types)
    hidden = cfg.int("hidden_size", minimum=1)
    return ModelSpec(architecture=cfg.architecture, model_type=cfg.str("model_type"),
                     vocab_size=cfg.int("vocab_size", minimum=1), hidden_size=hidden, layers=layers,
                     context_length=cfg.int("max_position_embeddings", 8192, minimum=1),
                     norm_eps=cfg.float("rms_norm_eps", 1e-6), norm_weight_offset=1.0,
                     embedding_scale=math.sqrt(hidden),
                     tie_embeddings=cfg.bool("tie_word_embeddings", True), final_softcap=final_softcap)


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
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
                ignored=NON_TEXT,
                notes="Gemma (GeGLU, 1+w norms, scaled embeddings), Gemma 2 (sandwich norms, softcaps, alternating "
                      "sliding window), Gemma 3 text and the text decoder of Gemma 3 multimodal checkpoints "
                      "(q/k norm, local/global rope)"))

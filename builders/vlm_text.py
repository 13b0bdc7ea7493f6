"""The text decoders inside Mistral 3 and Qwen2.5-VL / Qwen3-VL checkpoints (vision towers deliberately skipped).

Each wrapper holds a Llama-layout decoder: Mistral 3 a Mistral (text_config.model_type "mistral") or a Ministral 3
("ministral3": YaRN, and queries scaled by 1 + beta * ln(1 + floor(position / original context)), the
query_position_scale variant), Qwen2.5-VL a Qwen2 (q/k/v biases), Qwen3-VL a Qwen3 (per-head q/k norm). The export
is the text decoder alone, fed token ids:
- positions are text-only, so Qwen's mRoPE is plain rope (builders/common.py, MROPE_ALIASES, says why); its section
  fields are checked, not used;
- the decoder's tensors are found under whichever prefix the checkpoint uses (transformers 5 "model.language_model.",
  llava-style "language_model.model.", Qwen2.5-VL's flat "model."); the vision tower and projector tensors are
  marked as deliberately not exported, so anything else left over is still an error;
- tie_word_embeddings is the wrapper's (top-level) setting when given, else the text config's, else false: released
  Mistral 3 configs omit it and store their own lm_head, which transformers keeps because it differs.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import (layer_windows, map_table, rope_settings, rope_spec, text_decoder_prefix,
                             text_decoder_table)
from builders.config import Config

# The text decoder's prefix, most specific first (each is tried for "<prefix>embed_tokens.weight").
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
SKIPPED = {  # tensors of the other modalities, per wrapper
    "Mistral3ForConditionalGeneration": ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                         "model.multi_modal_projector."),
    "Qwen2_5_VLForConditionalGeneration": ("visual.", "model.visual."),
    "Qwen3VLForConditionalGeneration": ("visual.", "model.visual."),
}
# text model types each wrapper may hold; bias: "qkv" (fixed q/k/v biases), "config" (attention_bias, all four) or
# None; theta: the text config class's default rope_theta; mrope: the rope is mRoPE (read for text positions)
VARIANTS = {
    "Mistral3ForConditionalGeneration": dict(text_types=("mistral", "ministral3"), qk_norm=False, bias=None,
                                             theta=10_000.0, mrope=False),
    "Qwen2_5_VLForConditionalGeneration": dict(text_types=("qwen2_5_vl_text", "qwen2_5_vl"), qk_norm=False,
                                               bias="qkv", theta=1_000_000.0, mrope=True),
    "Qwen3VLForConditionalGeneration": dict(text_types=("qwen3_vl_text", "qwen3_vl"), qk_norm=True, bias="config",
                                            theta=500_000.0, mrope=True),
}


def _windows(cfg: Config, arch: str, num_layers: int) -> list[int | None]:
    if arch == "Mistral3ForConditionalGeneration":  # Mistral / Ministral3Config: one window on every layer when set
        return [cfg.int("sliding_window", None, minimum=1)] * num_layers
    if arch == "Qwen3VLForConditionalGeneration":  # no sliding attention
        return [None] * num_layers
    # Qwen2.5-VL text: sliding_window only with use_sliding_window, on layers >= max_window_layers by default
    window = cfg.int("sliding_window", None, minimum=1) if cfg.bool("use_sliding_window", False) else None
    first = cfg.int("max_window_layers", num_layers)
    return layer_windows(cfg, ["sliding_attention" if window and i >= first else "full_attention"
                               for i in range(num_layers)], window)


def make_spec(cfg: Config) -> ModelSpec:
    arch = cfg.architecture
    variant = VARIANTS[arch]
    text_type = cfg.str("model_type", choices=variant["text_types"])
    cfg.str("hidden_act", "silu", choices=("silu",))
    hidden, heads = cfg.int("hidden_size", minimum=1), cfg.int("num_attention_heads", minimum=1)
    head_dim = cfg.int("head_dim", None, minimum=1) or hidden // heads
    if variant["bias"] == "qkv" and head_dim * heads != hidden:  # Qwen2.5-VL's attention uses hidden / heads
        raise cfg.bad("head_dim", head_dim, f"hidden_size / num_attention_heads = {hidden // heads}")
    num_layers, context = cfg.int("num_hidden_layers", minimum=1), cfg.int("max_position_embeddings", minimum=1)
    rope = rope_spec(cfg, head_dim, default_theta=variant["theta"], mrope=variant["mrope"])
    settings = rope_settings(cfg)
    query_scale = None
    if text_type == "ministral3":  # transformers requires the beta; 0 leaves queries unscaled
        beta = settings.float("llama_4_scaling_beta")
        period = settings.int("original_max_position_embeddings", context, minimum=1)
        query_scale = (beta, period) if beta else None
    bias = {"qkv": (True, False), "config": (cfg.bool("attention_bias", False),) * 2, None: (False, False)}
    qkv_bias, o_bias = bias[variant["bias"]]
    mlp = MlpSpec(intermediate_size=cfg.int("intermediate_size", minimum=1))
    layers = tuple(LayerSpec(attention=AttentionSpec(
        num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", None) or heads, head_dim=head_dim, rope=rope,
        qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=variant["qk_norm"], sliding_window=window,
        query_position_scale=query_scale), ffn=mlp)
        for window in _windows(cfg, arch, num_layers))
    return ModelSpec(architecture=arch, model_type=text_type, vocab_size=cfg.int("vocab_size"), hidden_size=hidden,
                     layers=layers, context_length=context, norm_eps=cfg.float("rms_norm_eps", 1e-6),
                     tie_embeddings=cfg.bool("tie_word_embeddings", False))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    arch = spec.architecture
    prefix = text_decoder_prefix(ckpt, arch, TEXT_PREFIXES, SKIPPED[arch])
    src = f"{prefix}layers.{{i}}"
    table = {
        **text_decoder_table(prefix),
        **{f"layers.{{i}}.attn.{n}.weight": f"{src}.self_attn.{n}.weight" for n in ("q_norm", "k_norm")},
        **{f"layers.{{i}}.mlp.{p}.weight": f"{src}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    }
    weights = WeightMap(arch)
    map_table(ckpt, weights, table, spec.num_layers)
    return weights


register(Family("vlm-text", tuple(VARIANTS), make_spec, map_weights, text_config_key="text_config",
                wrapper_fields=("tie_word_embeddings",),
                notes="text decoders of Mistral 3 (Mistral, Ministral 3) and Qwen2.5-VL / Qwen3-VL (Qwen2 / Qwen3; "
                      "mRoPE with text-only positions is plain rope); vision towers and projectors deliberately "
                      "skipped"))

"""Dense decoders that share the Llama layout: Llama, Mistral, Qwen2, Qwen3.

They differ only in data: q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), sliding windows (Mistral, Qwen
layer_types), rope scaling (Llama 3), tied embeddings.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import head_dim, kv_heads, map_table, rope_spec
from builders.config import Config

# Embedding, norms, attention and head: shared by every family with the Llama layout (dense and MoE).
BASE_TABLE = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.attn.q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attn.q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.attn.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.attn.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.attn.o.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "layers.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
MLP_TABLE = {
    "layers.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# Per-architecture data. fixed_bias: (q/k/v bias, o bias) regardless of config; otherwise all four follow
# config.attention_bias.
VARIANTS = {
    "LlamaForCausalLM": dict(qk_norm=False, fixed_bias=None),
    "MistralForCausalLM": dict(qk_norm=False, fixed_bias=(False, False)),
    "Qwen2ForCausalLM": dict(qk_norm=False, fixed_bias=(True, False)),
    "Qwen3ForCausalLM": dict(qk_norm=True, fixed_bias=None),
}


LAYER_TYPES = ("full_attention", "sliding_attention")


def sliding_windows(cfg: Config) -> list[int | None]:
    """Per-layer sliding window: from layer_types when present, else Mistral's global sliding_window."""
    n = cfg.int("num_hidden_layers", minimum=1)
    window = cfg.int("sliding_window", None, minimum=0) or None
    types = cfg.list("layer_types", None, of=str, length=n)
    if types:
        for kind in types:
            if kind not in LAYER_TYPES:
                raise cfg.unsupported("layer_types", kind, ", ".join(LAYER_TYPES))
        return [window if t == "sliding_attention" else None for t in types]
    if cfg.bool("use_sliding_window", None) is False:
        return [None] * n
    return [window] * n


def attention_specs(cfg: Config, *, qk_norm: bool, fixed_bias: tuple[bool, bool] | None) -> list[AttentionSpec]:
    """Per-layer attention for the Llama layout; fixed_bias overrides config.attention_bias (q/k/v, o)."""
    dim = head_dim(cfg)
    rope = rope_spec(cfg, dim)
    bias = cfg.bool("attention_bias", False)
    qkv_bias, o_bias = fixed_bias or (bias, bias)
    heads = cfg.int("num_attention_heads", minimum=1)
    return [AttentionSpec(num_heads=heads, num_kv_heads=kv_heads(cfg), head_dim=dim, rope=rope, qkv_bias=qkv_bias,
                          o_bias=o_bias, qk_norm=qk_norm, sliding_window=window)
            for window in sliding_windows(cfg)]


def model_spec(cfg: Config, layers: tuple[LayerSpec, ...]) -> ModelSpec:
    return ModelSpec(architecture=cfg.architecture, model_type=cfg.str("model_type"),
                     vocab_size=cfg.int("vocab_size", minimum=1), hidden_size=cfg.int("hidden_size", minimum=1),
                     layers=layers, context_length=cfg.int("max_position_embeddings", 4096, minimum=1),
                     norm_eps=cfg.float("rms_norm_eps", 1e-6),
                     tie_embeddings=cfg.bool("tie_word_embeddings", False))


def map_base(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    """Embedding, norms, attention and head; a stored head of a tied model is settled by resolve_tied_head."""
    weights = WeightMap(spec.architecture)
    map_table(ckpt, weights, BASE_TABLE, spec.num_layers)
    return weights


def make_spec(cfg: Config) -> ModelSpec:
    cfg.reject({"hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1})
    mlp = MlpSpec(intermediate_size=cfg.int("intermediate_size", minimum=1), activation="silu")
    attentions = attention_specs(cfg, **VARIANTS[cfg.architecture])
    return model_spec(cfg, tuple(LayerSpec(attention=a, ffn=mlp) for a in attentions))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = map_base(spec, ckpt)
    map_table(ckpt, weights, MLP_TABLE, spec.num_layers)
    return weights


register(Family("llama", tuple(VARIANTS), make_spec, map_weights,
                notes="Llama 2/3 (llama3 rope scaling), Mistral (sliding window), Qwen2 (qkv bias), "
                      "Qwen3 (q/k norm)"))

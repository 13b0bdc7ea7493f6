"""ERNIE 4.5 dense (Ernie4_5ForCausalLM): the Llama layout with interleaved rope (pairs 2j, 2j+1 rotate together,
GroupQueryAttention's rotary_interleaved) and one use_bias flag for every projection (q/k/v/o, gate/up/down).
Embeddings are tied unless the config says otherwise. ERNIE-4.5-MoE is a separate architecture (not here).
"""

from __future__ import annotations

from dataclasses import replace

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import map_table, projection_table, rope_spec
from builders.config import Config

ARCH = "Ernie4_5ForCausalLM"
LAYER = "model.layers.{i}"
NORMS = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": f"{LAYER}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": f"{LAYER}.post_attention_layernorm.weight",
    "final_norm.weight": "model.norm.weight",
}


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "silu", choices=("silu",))
    # transformers' ERNIE 4.5 reads only use_bias; the Llama-style flags would be silently ignored there
    cfg.reject({"attention_bias": False, "mlp_bias": False})
    hidden, heads = cfg.int("hidden_size", minimum=1), cfg.int("num_attention_heads", minimum=1)
    dim = cfg.int("head_dim", None) or hidden // heads
    bias = cfg.bool("use_bias", False)
    rope = rope_spec(cfg, dim, default_theta=500000.0)
    attention = AttentionSpec(num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", None) or heads,
                              head_dim=dim, rope=replace(rope, interleaved=True),
                              qkv_bias=bias, o_bias=bias)
    layer = LayerSpec(attention=attention, ffn=MlpSpec(cfg.int("intermediate_size", minimum=1), "silu", bias=bias))
    return ModelSpec(architecture=ARCH, model_type=cfg.str("model_type", "ernie4_5"),
                     vocab_size=cfg.int("vocab_size", minimum=1), hidden_size=hidden,
                     layers=(layer,) * cfg.int("num_hidden_layers", minimum=1),
                     context_length=cfg.int("max_position_embeddings", 131072),
                     norm_eps=cfg.float("rms_norm_eps", 1e-5),
                     tie_embeddings=cfg.bool("tie_word_embeddings", True))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    bias = spec.layers[0].attention.qkv_bias
    table = {**NORMS, **projection_table("layers.{i}.attn", f"{LAYER}.self_attn", "qkvo", bias=bias),
             **projection_table("layers.{i}.mlp", f"{LAYER}.mlp", ("gate", "up", "down"), bias=bias)}
    table["lm_head.weight"] = "lm_head.weight"  # a stored head of a tied model is settled by resolve_tied_head
    map_table(ckpt, weights, table, spec.num_layers)
    return weights


register(Family("ernie", (ARCH,), make_spec, map_weights,
                notes="ERNIE 4.5 dense: interleaved rope, use_bias on every projection, tied embeddings"))

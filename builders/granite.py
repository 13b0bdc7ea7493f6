"""Granite (GraniteForCausalLM): the Llama layout with four scalar multipliers, all plain spec fields.

embedding_multiplier scales the embeddings, residual_multiplier each sublayer's output before its residual add,
attention_multiplier is the softmax scale (instead of 1/sqrt(head_dim)), and the logits are divided by
logits_scaling. attention_bias puts biases on q/k/v/o, mlp_bias on gate/up/down.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import map_table, projection_table, rope_spec
from builders.config import Config

ARCH = "GraniteForCausalLM"
LAYER = "model.layers.{i}"
NORMS = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": f"{LAYER}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": f"{LAYER}.post_attention_layernorm.weight",
    "final_norm.weight": "model.norm.weight",
}


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "silu", choices=("silu",))
    hidden, heads = cfg.int("hidden_size", minimum=1), cfg.int("num_attention_heads", minimum=1)
    dim = cfg.int("head_dim", None) or hidden // heads
    bias = cfg.bool("attention_bias", False)
    attention = AttentionSpec(num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", None) or heads,
                              head_dim=dim, rope=rope_spec(cfg, dim), qkv_bias=bias, o_bias=bias,
                              scale=cfg.float("attention_multiplier", 1.0))
    layer = LayerSpec(attention=attention,
                      ffn=MlpSpec(cfg.int("intermediate_size", minimum=1), "silu", bias=cfg.bool("mlp_bias", False)),
                      residual_scale=cfg.float("residual_multiplier", 1.0))
    embedding = cfg.float("embedding_multiplier", 1.0)
    return ModelSpec(architecture=ARCH, model_type=cfg.str("model_type", "granite"),
                     vocab_size=cfg.int("vocab_size", minimum=1), hidden_size=hidden,
                     layers=(layer,) * cfg.int("num_hidden_layers", minimum=1),
                     context_length=cfg.int("max_position_embeddings", 2048),
                     norm_eps=cfg.float("rms_norm_eps", 1e-6),
                     embedding_scale=None if embedding == 1.0 else embedding,
                     tie_embeddings=cfg.bool("tie_word_embeddings", False),
                     logits_divisor=cfg.float("logits_scaling", 1.0))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    attn, mlp = spec.layers[0].attention, spec.layers[0].ffn
    table = {**NORMS, **projection_table("layers.{i}.attn", f"{LAYER}.self_attn", "qkvo", bias=attn.qkv_bias),
             **projection_table("layers.{i}.mlp", f"{LAYER}.mlp", ("gate", "up", "down"), bias=mlp.bias)}
    table["lm_head.weight"] = "lm_head.weight"  # a stored head of a tied model is settled by resolve_tied_head
    map_table(ckpt, weights, table, spec.num_layers)
    return weights


register(Family("granite", (ARCH,), make_spec, map_weights,
                notes="Granite 3.x dense: embedding / residual / attention multipliers, logits scaling, "
                      "attention and MLP biases"))

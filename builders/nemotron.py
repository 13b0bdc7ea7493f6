"""Nemotron (NemotronForCausalLM: Nemotron-4, Minitron): LayerNorm1P residual norms (LayerNorm with a bias, its
weight applied as 1 + w), a two-projection MLP with squared ReLU (down(relu(up(x))^2)), and partial rotary (the
first partial_rotary_factor share of each head rotates, halves layout). attention_bias puts biases on q/k/v/o,
mlp_bias on up/down.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import map_table, projection_table, rope_spec, rotary_width
from builders.config import Config

ARCH = "NemotronForCausalLM"
LAYER = "model.layers.{i}"
NORMS = {f"{dst}.{kind}": f"{src}.{kind}" for dst, src in (
    ("layers.{i}.attn_norm", f"{LAYER}.input_layernorm"), ("layers.{i}.ffn_norm", f"{LAYER}.post_attention_layernorm"),
    ("final_norm", "model.norm")) for kind in ("weight", "bias")}
DEFAULT_PARTIAL_ROTARY = 0.5  # transformers' NemotronConfig default


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "relu2", choices=("relu2",))
    hidden, heads = cfg.int("hidden_size", minimum=1), cfg.int("num_attention_heads", minimum=1)
    dim = cfg.int("head_dim", None) or hidden // heads
    bias = cfg.bool("attention_bias", False)
    rope = rope_spec(cfg, rotary_width(cfg, dim, default=DEFAULT_PARTIAL_ROTARY), partial=True)
    attention = AttentionSpec(num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", None) or heads,
                              head_dim=dim, rope=rope, qkv_bias=bias, o_bias=bias)
    mlp = MlpSpec(cfg.int("intermediate_size", minimum=1), "relu2", bias=cfg.bool("mlp_bias", False), gated=False)
    return ModelSpec(architecture=ARCH, model_type=cfg.str("model_type", "nemotron"),
                     vocab_size=cfg.int("vocab_size", minimum=1), hidden_size=hidden,
                     layers=(LayerSpec(attention=attention, ffn=mlp),) * cfg.int("num_hidden_layers", minimum=1),
                     context_length=cfg.int("max_position_embeddings", 4096), norm_eps=cfg.float("norm_eps", 1e-5),
                     norm_kind="layer", norm_weight_offset=1.0, tie_embeddings=cfg.bool("tie_word_embeddings", False))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    attn, mlp = spec.layers[0].attention, spec.layers[0].ffn
    table = {**NORMS, "embed.weight": "model.embed_tokens.weight",
             **projection_table("layers.{i}.attn", f"{LAYER}.self_attn", "qkvo", bias=attn.qkv_bias),
             **projection_table("layers.{i}.mlp", f"{LAYER}.mlp", ("up", "down"), bias=mlp.bias)}
    table["lm_head.weight"] = "lm_head.weight"  # a stored head of a tied model is settled by resolve_tied_head
    map_table(ckpt, weights, table, spec.num_layers)
    return weights


register(Family("nemotron", (ARCH,), make_spec, map_weights,
                notes="Nemotron-4 / Minitron: LayerNorm (1+w) with bias, squared-ReLU MLP, partial rotary"))

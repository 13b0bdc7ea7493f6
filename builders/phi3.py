"""Phi-3, Phi-3.5 and Phi-4-mini (Phi3ForCausalLM): the Llama layout with fused tensors and LongRoPE.

What differs from Llama, as data:
- qkv_proj [q + 2 kv, hidden] and gate_up_proj [2 I, hidden] (gate rows first) reach the layers as stored;
- longrope: short/long factor sets that switch on each run's sequence length at original_max_position_embeddings,
  with an attention factor folded into cos/sin (builder/layers/rotary.py; the switch: rotary_graph.py). Like
  transformers, the top-level original_max_position_embeddings wins over the one in rope_parameters, and a config
  without it means 4096 (Phi3Config's default); the legacy rope types "su" and "yarn" mean longrope;
- partial rotary (Phi-4-mini rotates 0.75 of each head), tied embeddings (Phi-4-mini), and an optional sliding window
  on every layer (Phi-3-mini-4k).
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import map_table, rope_spec, rotary_width
from builders.config import Config

ARCH = "Phi3ForCausalLM"
TABLE = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.attn.qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "layers.{i}.attn.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.mlp.gate_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
    "layers.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
PHI3_DEFAULT_ORIGINAL_CONTEXT = 4096  # Phi3Config.original_max_position_embeddings when config.json lacks it


def _rope(cfg: Config, head_dim: int):
    original = cfg.int("original_max_position_embeddings", PHI3_DEFAULT_ORIGINAL_CONTEXT, minimum=1)
    return rope_spec(cfg, rotary_width(cfg, head_dim), partial=True, types=("default", "longrope"),
                     aliases={"su": "longrope", "yarn": "longrope"},
                     overrides={"original_max_position_embeddings": original})


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "silu", choices=("silu",))
    hidden, heads = cfg.int("hidden_size", minimum=1), cfg.int("num_attention_heads", minimum=1)
    kv_heads = cfg.int("num_key_value_heads", None, minimum=1) or heads
    head_dim = cfg.int("head_dim", None, minimum=1) or hidden // heads
    context = cfg.int("max_position_embeddings", minimum=1)
    attn = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope=_rope(cfg, head_dim),
                         sliding_window=cfg.int("sliding_window", None, minimum=1))
    mlp = MlpSpec(intermediate_size=cfg.int("intermediate_size", minimum=1))
    layers = tuple(LayerSpec(attention=attn, ffn=mlp) for _ in range(cfg.int("num_hidden_layers", minimum=1)))
    return ModelSpec(architecture=ARCH, model_type=cfg.str("model_type", "phi3"), vocab_size=cfg.int("vocab_size"),
                     hidden_size=hidden, layers=layers, context_length=context,
                     norm_eps=cfg.float("rms_norm_eps", 1e-5), tie_embeddings=cfg.bool("tie_word_embeddings", False))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    map_table(ckpt, weights, TABLE, spec.num_layers)
    return weights


register(Family("phi3", (ARCH,), make_spec, map_weights,
                notes="Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv and gate_up read as stored, longrope (short/long "
                      "switch at original_max_position_embeddings), partial rotary, tied embeddings, sliding window"))

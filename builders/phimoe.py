"""PhiMoE / Phi-3.5-MoE (PhimoeForCausalLM): LayerNorm (with bias) on the residual stream, q/k/v/o and lm_head
biases (attention_bias, lm_head_bias), an optional sliding window, Mixtral-style experts (block_sparse_moe w1 / w3 /
w2) and sparsemixer routing: the top-2 logits select, and each pick's weight is a softmax over the logits within a
relative distance 2 * router_jitter_noise of it (builder/layers/routing.py computes the two weights and feeds them
to the fused op).

Rope: default, or longrope with short/long factors switching at original_max_position_embeddings and the
attention factor short_mscale (= long_mscale in the released model; different values are refused). transformers 5
keeps the short factors past that length (its PhimoeRotaryEmbedding recomputes them without the sequence length),
where the original model and transformers 4 switch to the long factors; the export follows the original model, so the
two agree up to original_max_position_embeddings (4096 for Phi-3.5-MoE).
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, ModelSpec, MoeSpec, RoutingSpec
from builder.weights import Stored, WeightMap
from builders import Family, register
from builders.common import head_dim, kv_heads, map_table, projection_table, rope_settings, rope_spec
from builders.config import Config
from builders.moe_common import map_experts, top_k

ARCH = "PhimoeForCausalLM"
LAYER = "model.layers.{i}"
NORMS = {f"{dst}.{kind}": f"{src}.{kind}" for dst, src in (
    ("layers.{i}.attn_norm", f"{LAYER}.input_layernorm"), ("layers.{i}.ffn_norm", f"{LAYER}.post_attention_layernorm"),
    ("final_norm", "model.norm")) for kind in ("weight", "bias")}


def _rope(cfg: Config, dim: int, context: int):
    kinds = dict(types=("default", "longrope"), aliases={"su": "longrope"}, max_positions=context)
    if rope_spec(cfg, dim, **kinds).rope_type == "default":
        return rope_spec(cfg, dim, **kinds)
    rope = rope_settings(cfg)
    short = rope.float("short_mscale")
    if rope.float("long_mscale") != short:
        raise rope.unsupported("long_mscale", rope.float("long_mscale"), why=f"an attention factor that differs from "
                               f"short_mscale={short} is not computed (the released Phi-3.5-MoE has them equal)")
    original = rope.int("original_max_position_embeddings", None, minimum=1) or cfg.int(
        "original_max_position_embeddings", minimum=1)
    return rope_spec(cfg, dim, **kinds, overrides={"original_max_position_embeddings": original,
                                                   "attention_factor": short})


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "silu", choices=("silu",))
    dim, context = head_dim(cfg), cfg.int("max_position_embeddings", minimum=1)
    bias = cfg.bool("attention_bias", False)
    attention = AttentionSpec(num_heads=cfg.int("num_attention_heads", minimum=1), num_kv_heads=kv_heads(cfg),
                              head_dim=dim, rope=_rope(cfg, dim, context), qkv_bias=bias, o_bias=bias,
                              sliding_window=cfg.int("sliding_window", None, minimum=1))
    experts = cfg.int("num_local_experts", minimum=1)
    k = top_k(cfg, experts)
    if k != 2:
        raise cfg.unsupported("num_experts_per_tok", k, why="sparsemixer routing picks two experts")
    moe = MoeSpec(num_experts=experts, top_k=2, intermediate_size=cfg.int("intermediate_size", minimum=1),
                  routing=RoutingSpec(scoring="sparsemixer", normalize_topk=False,
                                      sparsemixer_eps=cfg.float("router_jitter_noise", 0.01)))
    return ModelSpec(architecture=ARCH, model_type=cfg.str("model_type", "phimoe"),
                     vocab_size=cfg.int("vocab_size", minimum=1), hidden_size=cfg.int("hidden_size", minimum=1),
                     layers=(LayerSpec(attention=attention, ffn=moe),) * cfg.int("num_hidden_layers", minimum=1),
                     context_length=context, norm_eps=cfg.float("rms_norm_eps", 1e-5), norm_kind="layer",
                     tie_embeddings=cfg.bool("tie_word_embeddings", False),
                     lm_head_bias=cfg.bool("lm_head_bias", False))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    table = {**NORMS, "embed.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
             **projection_table("layers.{i}.attn", f"{LAYER}.self_attn", "qkvo", bias=spec.layers[0].attention.qkv_bias)}
    if spec.lm_head_bias:
        table["lm_head.bias"] = "lm_head.bias"
    map_table(ckpt, weights, table, spec.num_layers)
    for i, layer in enumerate(spec.layers):
        block = f"{LAYER.format(i=i)}.block_sparse_moe"
        weights.add(f"layers.{i}.moe.router.weight", Stored(ckpt.tensor(f"{block}.gate.weight")),
                    f"{block}.gate.weight")
        map_experts(ckpt, weights, i, f"{block}.experts", layer.ffn.num_experts, names=("w1", "w3", "w2"))
    return weights


register(Family("phimoe", (ARCH,), make_spec, map_weights,
                notes="PhiMoE / Phi-3.5-MoE: sparsemixer top-2 routing (weights computed in the graph), LayerNorm "
                      "with bias, attention and lm_head biases, longrope"))

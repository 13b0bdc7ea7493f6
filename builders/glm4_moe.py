"""GLM-4.5 / GLM-4.6 MoE (Glm4MoeForCausalLM): the Llama layout with partial rotary (the first
partial_rotary_factor share of each head, halves layout), q/k/v biases without an o bias, optional per-head q/k
RMSNorm (use_qk_norm), first_k_dense_replace dense layers, then MoE layers with one shared expert and the noaux_tc
router (sigmoid scores, e_score_correction_bias for selection, group-limited top-k, routed_scaling_factor).
Released checkpoints carry num_nextn_predict_layers multi-token-prediction layers after the decoder; they are left
out, as transformers leaves them out.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec, MoeSpec
from builder.weights import Stored, WeightMap
from builders import Family, register
from builders.common import head_dim, kv_heads, map_table, partial_rotary_dim, rope_spec
from builders.config import Config
from builders.llama import BASE_TABLE, MLP_TABLE, model_spec
from builders.moe_common import ignore_layers_after, map_experts, map_shared_expert, noaux_tc_routing, top_k

ARCH = "Glm4MoeForCausalLM"
BLOCK = "model.layers.{i}.mlp"


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "silu", choices=("silu",))
    dim = head_dim(cfg)
    rope = rope_spec(cfg, partial_rotary_dim(cfg, dim, default=0.5), partial=True)
    attention = AttentionSpec(num_heads=cfg.int("num_attention_heads", minimum=1), num_kv_heads=kv_heads(cfg),
                              head_dim=dim, rope=rope, qkv_bias=cfg.bool("attention_bias", False),
                              qk_norm=cfg.bool("use_qk_norm", False))
    experts = cfg.int("n_routed_experts", minimum=1)
    k = top_k(cfg, experts)
    moe = MoeSpec(num_experts=experts, top_k=k, intermediate_size=cfg.int("moe_intermediate_size", minimum=1),
                  routing=noaux_tc_routing(cfg, experts, k),
                  shared_expert_size=cfg.int("moe_intermediate_size") * cfg.int("n_shared_experts", 1, minimum=1))
    dense = MlpSpec(cfg.int("intermediate_size", minimum=1))
    first_moe = cfg.int("first_k_dense_replace", 1, minimum=0)
    layers = tuple(LayerSpec(attention=attention, ffn=dense if i < first_moe else moe)
                   for i in range(cfg.int("num_hidden_layers", minimum=1)))
    return model_spec(cfg, layers)


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    map_table(ckpt, weights, BASE_TABLE, spec.num_layers)
    ignore_layers_after(ckpt, "model.layers.", spec.num_layers,
                        "multi-token-prediction layers (num_nextn_predict_layers), not part of the decoder")
    for i, layer in enumerate(spec.layers):
        if not isinstance(layer.ffn, MoeSpec):
            map_table(ckpt, weights, {k.replace("{i}", str(i)): v.replace("{i}", str(i))
                                      for k, v in MLP_TABLE.items()}, 0)
            continue
        block = BLOCK.format(i=i)
        for canonical, source in (("router.weight", "gate.weight"),
                                  ("router.correction_bias", "gate.e_score_correction_bias")):
            weights.add(f"layers.{i}.moe.{canonical}", Stored(ckpt.tensor(f"{block}.{source}")), f"{block}.{source}")
        map_experts(ckpt, weights, i, f"{block}.experts", layer.ffn.num_experts)
        map_shared_expert(ckpt, weights, i, f"{block}.shared_experts")
    return weights


register(Family("glm4_moe", (ARCH,), make_spec, map_weights,
                notes="GLM-4.5/4.6 MoE: noaux_tc routing (sigmoid, correction bias, groups, scaling), shared "
                      "expert, dense first layers, partial rotary, optional q/k norm"))

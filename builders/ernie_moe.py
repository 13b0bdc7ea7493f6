"""ERNIE-4.5-MoE (Ernie4_5_MoeForCausalLM): ERNIE 4.5's attention (interleaved rope, use_bias on every projection
and on the lm_head, tied embeddings) with MoE layers every moe_layer_interval-th layer from moe_layer_start_index to
moe_layer_end_index, shared experts (moe_num_shared_experts * moe_intermediate_size wide, with biases) and a softmax
router whose moe_statics.e_score_correction_bias is added to the probabilities for selection only; the weights are
the selected probabilities renormalised (their sum clamped below at moe_norm_min).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from builder.checkpoint import Checkpoint
from builder.spec import LayerSpec, MlpSpec, ModelSpec, MoeSpec, RoutingSpec
from builder.weights import Stored, WeightMap, WholeMap
from builders import Family, register
from builders.common import map_table, projection_table
from builders.config import Config
from builders.ernie import LAYER, NORMS
from builders.ernie import make_spec as dense_spec
from builders.moe_common import map_experts, map_shared_expert, top_k

ARCH = "Ernie4_5_MoeForCausalLM"


def _is_moe_layer(cfg: Config, index: int, num_layers: int) -> bool:
    start = cfg.int("moe_layer_start_index", 1, minimum=0)
    end = cfg.int("moe_layer_end_index", -1)
    end = num_layers - 1 if end == -1 else end
    return (index + 1) % cfg.int("moe_layer_interval", 1, minimum=1) == 0 and start <= index <= end


def make_spec(cfg: Config) -> ModelSpec:
    dense = dense_spec(cfg)
    experts = cfg.int("moe_num_experts", minimum=1)
    k = top_k(cfg, experts, "moe_k")
    norm_min = cfg.float("moe_norm_min", 1e-12)
    if norm_min > k / experts:  # the k largest of E probabilities sum to at least k / E: the clamp never binds
        raise cfg.unsupported("moe_norm_min", norm_min, why=f"a floor above moe_k / moe_num_experts = {k / experts} "
                              "can bind, and the clamped division is not computed")
    bias = cfg.bool("use_bias", False)
    shared = cfg.int("moe_num_shared_experts", 0, minimum=0) * cfg.int("moe_intermediate_size", minimum=1)
    moe = MoeSpec(num_experts=experts, top_k=k, intermediate_size=cfg.int("moe_intermediate_size", minimum=1),
                  routing=RoutingSpec(scoring="softmax", correction_bias=True, float32_logits=True), shared_expert_size=shared,
                  shared_expert_bias=bias)
    layers = tuple(replace(layer, ffn=moe) if _is_moe_layer(cfg, i, dense.num_layers) else layer
                   for i, layer in enumerate(dense.layers))
    return replace(dense, architecture=ARCH, model_type=cfg.str("model_type", "ernie4_5_moe"), layers=layers,
                   lm_head_bias=bias)


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    bias = spec.layers[0].attention.qkv_bias
    table = {**NORMS, **projection_table("layers.{i}.attn", f"{LAYER}.self_attn", "qkvo", bias=bias),
             "lm_head.weight": "lm_head.weight"}
    if spec.lm_head_bias:
        table["lm_head.bias"] = "lm_head.bias"
    map_table(ckpt, weights, table, spec.num_layers)
    for i, layer in enumerate(spec.layers):
        block = LAYER.format(i=i) + ".mlp"
        if not isinstance(layer.ffn, MoeSpec):
            map_table(ckpt, weights, projection_table(f"layers.{i}.mlp", block, ("gate", "up", "down"),
                                                      bias=layer.ffn.bias), 0)
            continue
        moe = layer.ffn
        weights.add(f"layers.{i}.moe.router.weight", Stored(ckpt.tensor(f"{block}.gate.weight")), f"{block}.gate.weight")
        statics = f"{block}.moe_statics.e_score_correction_bias"  # [1, E]: one row per expert group (one group)
        weights.add(f"layers.{i}.moe.router.correction_bias",
                    WholeMap(Stored(ckpt.tensor(statics)), lambda a: np.asarray(a).reshape(-1), (moe.num_experts,)),
                    statics)
        map_experts(ckpt, weights, i, f"{block}.experts", moe.num_experts)
        if moe.shared_expert_size:
            map_shared_expert(ckpt, weights, i, f"{block}.shared_experts", bias=moe.shared_expert_bias)
    return weights


register(Family("ernie_moe", (ARCH,), make_spec, map_weights,
                notes="ERNIE-4.5-MoE: softmax routing with a selection bias (moe_statics), shared experts, MoE from "
                      "moe_layer_start_index every moe_layer_interval layers, interleaved rope, use_bias"))

"""DeepSeek-V2 and DeepSeek-V3 / R1 (Kimi-K2 ships as DeepseekV3ForCausalLM too): multi-head latent attention
(AttentionSpec.latent), dense MLPs in the first `first_k_dense_replace` layers, routed experts plus ungated shared
experts after them. FP8 block-scaled checkpoints (DeepSeek-V3, Kimi-K2) are dequantized as they stream
(builders.common.checkpoint_weight). The multi-token-prediction layers that released V3 checkpoints append after the
decoder (num_nextn_predict_layers) serve speculative decoding only and are left out, as transformers leaves them.

Routing, as transformers computes it:
    V3: sigmoid scores; selection adds e_score_correction_bias and keeps the topk_group best of n_group expert
        groups (ranked by their two best scores); the chosen experts' scores, renormalised when norm_topk_prob,
        times routed_scaling_factor (topk_method "noaux_tc");
    V2: softmax scores, plain top-k (topk_method "greedy"), never renormalised, times routed_scaling_factor.
"""

from __future__ import annotations

import math
from dataclasses import replace

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LatentSpec, LayerSpec, MlpSpec, ModelSpec, MoeSpec, RoutingSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import map_table, rope_settings, rope_spec
from builders.config import Config
from builders.llama import model_spec
from builders.moe_common import map_experts, map_shared_expert, noaux_tc_routing

V3, V2 = "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"
# Per-architecture routing data: the topk_method / scoring_func values transformers computes for it.
VARIANTS = {
    V3: dict(topk_methods=("noaux_tc",), scoring="sigmoid", interleave_option=True),
    V2: dict(topk_methods=("greedy",), scoring="softmax", interleave_option=False),
}

SRC = "model.layers.{i}"
TABLE = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": f"{SRC}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": f"{SRC}.post_attention_layernorm.weight",
    "layers.{i}.attn.q.weight": f"{SRC}.self_attn.q_proj.weight",
    "layers.{i}.attn.q_a.weight": f"{SRC}.self_attn.q_a_proj.weight",
    "layers.{i}.attn.q_a.bias": f"{SRC}.self_attn.q_a_proj.bias",
    "layers.{i}.attn.q_a_norm.weight": f"{SRC}.self_attn.q_a_layernorm.weight",
    "layers.{i}.attn.q_b.weight": f"{SRC}.self_attn.q_b_proj.weight",
    "layers.{i}.attn.kv_a.weight": f"{SRC}.self_attn.kv_a_proj_with_mqa.weight",
    "layers.{i}.attn.kv_a.bias": f"{SRC}.self_attn.kv_a_proj_with_mqa.bias",
    "layers.{i}.attn.kv_a_norm.weight": f"{SRC}.self_attn.kv_a_layernorm.weight",
    "layers.{i}.attn.kv_b.weight": f"{SRC}.self_attn.kv_b_proj.weight",
    "layers.{i}.attn.o.weight": f"{SRC}.self_attn.o_proj.weight",
    "layers.{i}.attn.o.bias": f"{SRC}.self_attn.o_proj.bias",
}
MLP = {part: f"{{block}}.{part}_proj.weight" for part in ("gate", "up", "down")}  # the dense layers' MLP


def _mscale(factor: float, mscale: float) -> float:
    """YaRN's attention scale for a context stretched `factor` times (transformers' yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def latent_attention_spec(cfg: Config) -> AttentionSpec:
    heads = cfg.int("num_attention_heads", minimum=1)
    kv_heads = cfg.int("num_key_value_heads", heads, minimum=1)
    if kv_heads != heads:  # transformers expands the latent to every head: a smaller count breaks its repeat_kv
        raise cfg.unsupported("num_key_value_heads", kv_heads, why=f"latent attention has one key per query head "
                                                                   f"(num_attention_heads={heads})")
    latent = LatentSpec(q_lora_rank=cfg.int("q_lora_rank", None, minimum=1),
                        kv_lora_rank=cfg.int("kv_lora_rank", minimum=1),
                        qk_nope_head_dim=cfg.int("qk_nope_head_dim", minimum=1),
                        qk_rope_head_dim=cfg.int("qk_rope_head_dim", minimum=2),
                        v_head_dim=cfg.int("v_head_dim", minimum=1))
    if latent.qk_rope_head_dim % 2:
        raise cfg.bad("qk_rope_head_dim", latent.qk_rope_head_dim, "an even number of rotated dims")
    rope = rope_spec(cfg, latent.qk_rope_head_dim)
    # DeepSeek rotates adjacent pairs; V3's rope_interleave=false (transformers only) rotates halves
    interleaved = cfg.bool("rope_interleave", True) if VARIANTS[cfg.architecture]["interleave_option"] else True
    scale = latent.qk_head_dim ** -0.5
    if rope.rope_type != "default":  # transformers' yarn_apply_mscale: the softmax scale grows with mscale_all_dim
        settings = rope_settings(cfg)
        all_dim = settings.float("mscale_all_dim", 0.0)
        if all_dim:
            scale *= _mscale(settings.float("factor"), all_dim) ** 2
    bias = cfg.bool("attention_bias", False)
    return AttentionSpec(num_heads=heads, num_kv_heads=1, head_dim=latent.cache_width,
                         rope=replace(rope, interleaved=interleaved), qkv_bias=bias, o_bias=bias, scale=scale,
                         latent=latent)


def _check_routing(cfg: Config) -> None:
    variant = VARIANTS[cfg.architecture]
    cfg.str("topk_method", variant["topk_methods"][0], choices=variant["topk_methods"])
    cfg.str("scoring_func", variant["scoring"], choices=(variant["scoring"],))
    cfg.reject({"moe_layer_freq": 1})  # transformers puts experts in every layer from first_k_dense_replace on


def routing_spec(cfg: Config, experts: int, top_k: int) -> RoutingSpec:
    """V3: the noaux_tc router (builders/moe_common.py); V2: greedy softmax, never renormalised, then scaled."""
    if cfg.architecture == V2:
        if cfg.bool("norm_topk_prob", False):  # transformers' V2 router never renormalises; the original code would
            raise cfg.unsupported("norm_topk_prob", True, why="transformers' DeepseekV2 never renormalises the "
                                                             "top-k weights, so the intended maths is ambiguous")
        return RoutingSpec(scoring="softmax", normalize_topk=False,
                           scaling_factor=cfg.float("routed_scaling_factor", 1.0), float32_logits=True)
    return noaux_tc_routing(cfg, experts, top_k)


def moe_spec(cfg: Config) -> MoeSpec:
    experts = cfg.int("n_routed_experts", minimum=1)
    top_k = cfg.int("num_experts_per_tok", minimum=1)
    if top_k > experts:
        raise cfg.bad("num_experts_per_tok", top_k, f"at most n_routed_experts={experts}")
    inter = cfg.int("moe_intermediate_size", minimum=1)
    return MoeSpec(num_experts=experts, top_k=top_k, intermediate_size=inter,
                   routing=routing_spec(cfg, experts, top_k),
                   shared_expert_size=cfg.int("n_shared_experts", 0, minimum=0) * inter)


def make_spec(cfg: Config) -> ModelSpec:
    cfg.reject({"hidden_act": "silu", "pretraining_tp": 1, "mlp_bias": False})
    _check_routing(cfg)
    layers = cfg.int("num_hidden_layers", minimum=1)
    dense_layers = cfg.int("first_k_dense_replace", 3 if cfg.architecture == V3 else 0, minimum=0)
    attention = latent_attention_spec(cfg)
    dense = MlpSpec(intermediate_size=cfg.int("intermediate_size", minimum=1))
    moe = moe_spec(cfg) if dense_layers < layers else None
    return model_spec(cfg, tuple(LayerSpec(attention=attention, ffn=dense if i < dense_layers else moe)
                                 for i in range(layers)))


def _map_mlp(ckpt: Checkpoint, weights: WeightMap, dst: str, block: str) -> None:
    table = {f"{dst}.{part}.weight": name.format(block=block) for part, name in MLP.items()}
    map_table(ckpt, weights, table, 0)


def _map_moe(ckpt: Checkpoint, weights: WeightMap, i: int, moe: MoeSpec) -> None:
    block = f"model.layers.{i}.mlp"
    map_table(ckpt, weights, {f"layers.{i}.moe.router.weight": f"{block}.gate.weight",
                              f"layers.{i}.moe.router.correction_bias": f"{block}.gate.e_score_correction_bias"}, 0)
    map_experts(ckpt, weights, i, f"{block}.experts", moe.num_experts)
    if moe.shared_expert_size:
        map_shared_expert(ckpt, weights, i, f"{block}.shared_experts")


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    map_table(ckpt, weights, TABLE, spec.num_layers)
    for i, layer in enumerate(spec.layers):
        if isinstance(layer.ffn, MoeSpec):
            _map_moe(ckpt, weights, i, layer.ffn)
        else:
            _map_mlp(ckpt, weights, f"layers.{i}.mlp", f"model.layers.{i}.mlp")
    # multi-token-prediction layers follow the decoder layers (num_nextn_predict_layers; transformers skips them)
    extra = Config(ckpt.config, spec.architecture).int("num_nextn_predict_layers", 0, minimum=0)
    mtp = tuple(f"model.layers.{spec.num_layers + j}." for j in range(extra))
    ckpt.ignore(*(n for n in ckpt.names() if n.startswith(mtp)) if mtp else (),
                reason="the multi-token-prediction layers (speculative decoding only)")
    return weights


register(Family("deepseek", (V3, V2), make_spec, map_weights,
                notes="DeepSeek-V3/R1 and Kimi-K2 (latent attention, FP8 block-scaled weights), DeepSeek-V2 "
                      "(greedy softmax routing)"))

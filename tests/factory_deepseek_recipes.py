"""Tiny DeepSeek-V2 / V3 recipes (tests/factory.py merges this module's ARCHS into its own).

Latent attention with every size distinct so a swapped dimension fails: 4 heads, q_lora_rank 24, kv_lora_rank 32,
qk_nope_head_dim 16, qk_rope_head_dim 16 (rotated inside GroupQueryAttention: half-width 8), v_head_dim 24 (not the
qk head size, 32). YaRN with mscale_all_dim != mscale, so both the rope's attention factor and the softmax scale's
mscale differ from 1; max_position_embeddings 256 over an original 64.
"""

from __future__ import annotations

from factory_recipes import ArchRecipe

_BASE = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
             intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
             tie_word_embeddings=False, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
             v_head_dim=24, moe_intermediate_size=32, n_shared_experts=1, num_experts_per_tok=2)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}

# V3 with dense layers only (first_k_dense_replace covers every layer)
DEEPSEEK_V3_DENSE = dict(_BASE, first_k_dense_replace=2, n_routed_experts=8, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, rope_parameters=YARN)
# V3 MoE layers: 8 experts in 4 groups of 2, the best 2 groups compete, top-2, renormalised, scaled by 2.5; layer 0
# dense, layers 1-2 sparse with one shared expert
DEEPSEEK_V3_MOE = dict(DEEPSEEK_V3_DENSE, num_hidden_layers=3, first_k_dense_replace=1, norm_topk_prob=True)
# V2-Lite-like: plain q projection, softmax greedy routing without renormalisation, two shared experts, default rope
DEEPSEEK_V2_LITE = dict(_BASE, q_lora_rank=None, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=2,
                        topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

ARCHS = {
    "deepseek_v3": ArchRecipe("deepseek_v3", "DeepseekV3ForCausalLM", DEEPSEEK_V3_DENSE, layout=("mtp_layer",)),
    "deepseek_v3_moe": ArchRecipe("deepseek_v3", "DeepseekV3ForCausalLM", DEEPSEEK_V3_MOE,
                                   layout=("mtp_layer", "correction_bias")),
    "deepseek_v2": ArchRecipe("deepseek_v2", "DeepseekV2ForCausalLM", DEEPSEEK_V2_LITE),
}

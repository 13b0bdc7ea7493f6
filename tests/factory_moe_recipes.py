"""Tiny recipes of the routed-MoE families (tests/factory.py merges them into ARCHS): GLM-4.5 MoE, ERNIE-4.5-MoE,
Llama 4 text (alone and inside Llama4ForConditionalGeneration) and PhiMoE. Each turns on what its family computes
differently: groups that exclude experts, selection biases that reorder them (layout "correction_bias"), dense
layers before or between MoE layers, shared experts, NoPE and chunked layers, sparsemixer routing."""

from __future__ import annotations

from factory_recipes import ArchRecipe, cfg

GLM4_MOE = dict(
    head_dim=32, num_hidden_layers=3, tie_word_embeddings=False, attention_bias=True, use_qk_norm=True,
    n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, moe_intermediate_size=32, n_shared_experts=1,
    first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5})
ERNIE4_5_MOE = dict(
    num_hidden_layers=3, tie_word_embeddings=True, use_bias=True, moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
    moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
# Llama 4: layer 1 and 3 MoE (interleave step 2), layers 1 and 3 NoPE (full attention with temperature tuning,
# floor_scale 4 so the tiny prompts cross several steps), layers 0 and 2 rope + L2 q/k norm + 8-token chunks.
LLAMA4_TEXT = dict(
    num_hidden_layers=4, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=1,
    intermediate_size=64, intermediate_size_mlp=96, interleave_moe_layer_step=2, no_rope_layer_interval=2,
    attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
PHIMOE = dict(
    num_hidden_layers=2, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
    attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


ARCHS = {
    "glm4_moe": ArchRecipe("glm4_moe", "Glm4MoeForCausalLM", cfg(**GLM4_MOE), layout=("correction_bias", "mtp_layer")),
    "ernie4_5_moe": ArchRecipe("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", cfg(**ERNIE4_5_MOE),
                               layout=("correction_bias",)),
    "llama4_text": ArchRecipe("llama4_text", "Llama4ForCausalLM", cfg(**LLAMA4_TEXT)),
    "llama4_vlm": ArchRecipe("llama4", "Llama4ForConditionalGeneration", {
        "text_config": cfg(**LLAMA4_TEXT),
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 16,
                          "vision_output_dim": 64, "projector_input_dim": 64, "projector_output_dim": 64},
        "tie_word_embeddings": False, "image_token_index": 508, "boi_token_index": 506,
        "eoi_token_index": 507}, text_config_key="text_config"),
    "phimoe": ArchRecipe("phimoe", "PhimoeForCausalLM", cfg(**PHIMOE)),
}

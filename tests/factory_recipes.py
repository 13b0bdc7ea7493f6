"""The tiny architectures tests/factory.py builds: one ArchRecipe per test architecture (HF config type, the class
real checkpoints name, the config kwargs), and shared rope settings real checkpoints use.

More recipes live in sibling modules named tests/factory_<topic>_recipes.py (e.g. factory_moe_recipes.py): each
defines its own ``ARCHS`` dict (import ArchRecipe and ``cfg`` from here); tests/factory.py merges every such module
present into ``factory.ARCHS`` and refuses a name defined twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ArchRecipe:
    """How to build one tiny architecture: the HF config type, the class real checkpoints name, the kwargs.

    ``text_config_key`` is set for multimodal configs, whose decoder settings live in a nested dict.
    """

    model_type: str
    architecture: str
    config: dict = field(default_factory=dict)
    text_config_key: str | None = None
    # on-disk layout changes from what save_pretrained writes: "fused_experts" (experts.gate_up_proj [E, 2I, H] and
    # experts.down_proj [E, H, I]), "mtp" (a multi-token-prediction head, as released checkpoints carry)
    layout: tuple[str, ...] = ()


BASE = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_hidden_layers=2, intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
             initializer_range=0.1)
SLIDING_WINDOW = 8  # a 12-token prompt crosses it

# Overrides for tests of rope variants real checkpoints use (pass as rope_parameters=...).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def cfg(**kw: Any) -> dict:
    """The base tiny decoder config with `kw` changed."""
    return {**BASE, **kw}



# Gemma 3: 5:1 local:global in real checkpoints; here [local, local, global]; linear rope scaling on global
# layers (as the 4b/12b/27b checkpoints); query_pre_attn_scalar != head_dim (as gemma-3-27b).
_GEMMA3_TEXT = cfg(
    num_hidden_layers=3, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
    sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    query_pre_attn_scalar=32, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
# Gemma 4 text: global layers use a wider head (global_head_dim) and proportional partial rope.
_GEMMA4_TEXT = cfg(
    num_hidden_layers=3, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
    sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    global_head_dim=32, hidden_size_per_layer_input=0, vocab_size_per_layer_input=512,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}})

# Phi-3.5-mini-like longrope: short/long factors switch above 32 tokens (a 40-token prompt crosses it); Phi3Config
# reads original_max_position_embeddings at the top level (it wins over rope_parameters').
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
                 "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.5 + 0.5 * i for i in range(8)]}
_PHI4_LONGROPE = {**PHI3_LONGROPE, "partial_rotary_factor": 0.75, "short_factor": [1.0 + 0.05 * i for i in range(24)],
                  "long_factor": [1.5 + 0.25 * i for i in range(24)]}
_VISION_QWEN = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
# Qwen3.5 text: Gated DeltaNet linear attention (2 key / 4 value heads, grouped) and gated full attention with
# partial rotary (64 * 0.25 = 16 wide: rotated inside GroupQueryAttention, as the real 256-wide heads); mrope sections
# as the released configs.
_QWEN35_TEXT = cfg(
    tie_word_embeddings=False, head_dim=64, num_hidden_layers=4,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                               "partial_rotary_factor": 0.25, "mrope_section": [2, 3, 3],
                                               "mrope_interleaved": True})
_QWEN35_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
_QWEN35_VLM = {"vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                 "out_hidden_size": 64, "patch_size": 4, "num_position_embeddings": 16},
               "image_token_id": 508, "video_token_id": 509, "vision_start_token_id": 506, "vision_end_token_id": 507,
               "tie_word_embeddings": False}

ARCHS: dict[str, ArchRecipe] = {
    "llama": ArchRecipe("llama", "LlamaForCausalLM", cfg(
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "mistral": ArchRecipe("mistral", "MistralForCausalLM", cfg(
        tie_word_embeddings=False, sliding_window=SLIDING_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2": ArchRecipe("qwen2", "Qwen2ForCausalLM", cfg(
        tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3": ArchRecipe("qwen3", "Qwen3ForCausalLM", cfg(
        tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen1.5/2-MoE: shared expert with a sigmoid gate, qkv bias; decoder_sparse_step=2 makes layer 0 dense.
    "qwen2_moe": ArchRecipe("qwen2_moe", "Qwen2MoeForCausalLM", cfg(
        tie_word_embeddings=False, use_sliding_window=False, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, decoder_sparse_step=2,
        norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen3-MoE: normalized top-k, q/k norm; mlp_only_layers=[0] makes layer 0 dense.
    "qwen3_moe": ArchRecipe("qwen3_moe", "Qwen3MoeForCausalLM", cfg(
        tie_word_embeddings=False, use_sliding_window=False, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, mlp_only_layers=[0], norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mixtral": ArchRecipe("mixtral", "MixtralForCausalLM", cfg(
        tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
        sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # gpt-oss: attention sinks, biases everywhere, clamped swiglu experts, alternating sliding/full, yarn.
    "gpt_oss": ArchRecipe("gpt_oss", "GptOssForCausalLM", cfg(
        tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
        attention_bias=True, sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": 64, "truncate": False})),
    "gemma": ArchRecipe("gemma", "GemmaForCausalLM", cfg(
        tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Gemma 2: softcaps, query_pre_attn_scalar != head_dim (as gemma-2-27b), alternating sliding/full.
    "gemma2": ArchRecipe("gemma2", "Gemma2ForCausalLM", cfg(
        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "phi3": ArchRecipe("phi3", "Phi3ForCausalLM", cfg(
        tie_word_embeddings=False, original_max_position_embeddings=32, rope_parameters=PHI3_LONGROPE)),
    # Phi-4-mini-like: 0.75 of each 64-wide head rotates (48 dims), tied embeddings
    "phi4_mini": ArchRecipe("phi3", "Phi3ForCausalLM", cfg(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
        original_max_position_embeddings=32, rope_parameters=_PHI4_LONGROPE)),
    # SmolLM3: every 2nd layer without rotary (no_rope_layers [1, 0]), tied embeddings
    "smollm3": ArchRecipe("smollm3", "SmolLM3ForCausalLM", cfg(
        tie_word_embeddings=True, no_rope_layer_interval=2, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 2000000.0})),
    # HunYuan dense: q/k norm after rotary; "dynamic" rope with a fixed alpha (static NTK stretch)
    "hunyuan": ArchRecipe("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM", cfg(
        tie_word_embeddings=False, rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                                    "rope_theta": 10000.0})),
    "mistral3": ArchRecipe("mistral3", "Mistral3ForConditionalGeneration", {
        "text_config": cfg(model_type="mistral", sliding_window=SLIDING_WINDOW,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e9}),
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 64, "patch_size": 16, "head_dim": 16},
        "tie_word_embeddings": False, "image_token_index": 10}, text_config_key="text_config"),
    "qwen2_5_vl": ArchRecipe("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", {
        "text_config": cfg(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        "vision_config": {**_VISION_QWEN, "fullatt_block_indexes": [0]}, "tie_word_embeddings": False},
        text_config_key="text_config"),
    "qwen3_vl": ArchRecipe("qwen3_vl", "Qwen3VLForConditionalGeneration", {
        "text_config": cfg(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                             "mrope_interleaved": True, "rope_theta": 1e6}),
        "vision_config": {**_VISION_QWEN, "deepstack_visual_indexes": [0], "num_position_embeddings": 16},
        "tie_word_embeddings": True}, text_config_key="text_config"),
    "gemma3": ArchRecipe("gemma3_text", "Gemma3ForCausalLM", _GEMMA3_TEXT),
    "gemma3_vlm": ArchRecipe("gemma3", "Gemma3ForConditionalGeneration", {
        "text_config": _GEMMA3_TEXT,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                          "vision_use_head": False},
        "mm_tokens_per_image": 4, "boi_token_index": 509, "eoi_token_index": 510, "image_token_index": 511,
        "tie_word_embeddings": True,
    }, text_config_key="text_config"),
    "gemma4": ArchRecipe("gemma4_text", "Gemma4ForCausalLM", _GEMMA4_TEXT),
    "gemma4_moe": ArchRecipe("gemma4_text", "Gemma4ForCausalLM", {
        **_GEMMA4_TEXT, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": 32}),
    "gemma4_vlm": ArchRecipe("gemma4", "Gemma4ForConditionalGeneration", {
        "text_config": _GEMMA4_TEXT,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                          "patch_size": 4, "pooling_kernel_size": 2, "position_embedding_size": 64},
        "boi_token_id": 506, "eoi_token_id": 507, "image_token_id": 508, "video_token_id": 509,
        "boa_token_id": 510, "eoa_token_index": 511, "audio_token_id": 505, "tie_word_embeddings": True,
    }, text_config_key="text_config"),
    # Granite: every multiplier away from 1 (as granite-3.x), attention and MLP biases on.
    "granite": ArchRecipe("granite", "GraniteForCausalLM", cfg(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.125, logits_scaling=2.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # OLMo 2: norms on the sublayer outputs only, q/k RMSNorm over the whole projection; biases on.
    "olmo2": ArchRecipe("olmo2", "Olmo2ForCausalLM", cfg(
        tie_word_embeddings=False, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # OLMo 3: OLMo 2 plus sliding/full layers with their own rope (yarn on full layers, as the 32k checkpoints).
    "olmo3": ArchRecipe("olmo3", "Olmo3ForCausalLM", cfg(
        tie_word_embeddings=False, sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 64, "attention_factor": 1.2}})),
    # Nemotron: LayerNorm (1+w) with bias, squared-ReLU up/down MLP, half rotary (rot/2 = 8 as ORT needs), biases.
    "nemotron": ArchRecipe("nemotron", "NemotronForCausalLM", cfg(
        tie_word_embeddings=False, head_dim=32, hidden_act="relu2", norm_eps=1e-5, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # ERNIE 4.5 dense: interleaved rope, biases on every projection (use_bias), tied embeddings.
    "ernie4_5": ArchRecipe("ernie4_5", "Ernie4_5ForCausalLM", cfg(
        tie_word_embeddings=True, use_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen3_5": ArchRecipe("qwen3_5_text", "Qwen3_5ForCausalLM", _QWEN35_TEXT),
    "qwen3_5_vlm": ArchRecipe("qwen3_5", "Qwen3_5ForConditionalGeneration", {"text_config": _QWEN35_TEXT,
                              **_QWEN35_VLM}, text_config_key="text_config", layout=("mtp",)),
    "qwen3_5_moe": ArchRecipe("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", {**_QWEN35_TEXT, **_QWEN35_MOE}),
    # the released layout: multimodal, experts fused 3-D, an mtp head; default layer_types (3 linear : 1 full)
    "qwen3_5_moe_vlm": ArchRecipe("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", {
        "text_config": {**_QWEN35_TEXT, "layer_types": None, **_QWEN35_MOE}, **_QWEN35_VLM},
        text_config_key="text_config", layout=("fused_experts", "mtp")),
    # Qwen3-Next: fused in_proj_qkvz / in_proj_ba, experts per expert, a dense layer (mlp_only_layers)
    "qwen3_next": ArchRecipe("qwen3_next", "Qwen3NextForCausalLM", {
        **_QWEN35_TEXT, "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        "mlp_only_layers": [2], **_QWEN35_MOE}),
}

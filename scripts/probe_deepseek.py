"""DeepSeek-V3-shaped probes for scripts/make_probe_checkpoint.py: tensor list, config.json and dtypes.

The layout is the released deepseek-ai/DeepSeek-V3 one: every linear weight of the decoder layers (attention, dense
MLPs, routed and shared experts) is float8_e4m3fn with a float32 `<name>_scale_inv` per 128 x 128 block; embeddings,
norms, routers (with their float32 e_score_correction_bias) and the lm_head are bf16. The first `dense_layers` layers
have a dense MLP of `dense_intermediate`, the others `experts` routed experts of `intermediate` plus a shared expert
of `shared_intermediate`. Multi-head latent attention with LatentShape's ranks and head sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP8_BLOCK = 128


@dataclass(frozen=True)
class LatentShape:
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


DEEPSEEK_V3_LATENT = LatentShape(1536, 512, 128, 64, 128)


def _linear(name: str, out: int, inp: int, fp8: bool) -> list[tuple[str, tuple[int, ...]]]:
    specs = [(name, (out, inp))]
    if fp8:
        specs.append((name + "_scale_inv", (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))))
    return specs


def deepseek_specs(s) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor of a DeepseekV3ForCausalLM probe `s` (a ProbeShape), sorted."""
    h, lat, heads, fp8 = s.hidden, s.latent, s.heads, s.fp8
    qk = lat.qk_nope_head_dim + lat.qk_rope_head_dim
    specs = [("model.embed_tokens.weight", (s.vocab, h)), ("model.norm.weight", (h,)), ("lm_head.weight", (s.vocab, h))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (a + "q_a_layernorm.weight", (lat.q_lora_rank,)), (a + "kv_a_layernorm.weight", (lat.kv_lora_rank,))]
        specs += _linear(a + "q_a_proj.weight", lat.q_lora_rank, h, fp8)
        specs += _linear(a + "q_b_proj.weight", heads * qk, lat.q_lora_rank, fp8)
        specs += _linear(a + "kv_a_proj_with_mqa.weight", lat.kv_lora_rank + lat.qk_rope_head_dim, h, fp8)
        specs += _linear(a + "kv_b_proj.weight", heads * (lat.qk_nope_head_dim + lat.v_head_dim), lat.kv_lora_rank,
                         fp8)
        specs += _linear(a + "o_proj.weight", h, heads * lat.v_head_dim, fp8)
        if i < s.dense_layers:
            mlps = [(p + "mlp.", s.dense_intermediate)]
        else:
            specs += [(p + "mlp.gate.weight", (s.experts, h)), (p + "mlp.gate.e_score_correction_bias", (s.experts,))]
            mlps = [(p + f"mlp.experts.{e}.", s.intermediate) for e in range(s.experts)]
            mlps.append((p + "mlp.shared_experts.", s.shared_intermediate))
        for prefix, width in mlps:
            specs += _linear(prefix + "gate_proj.weight", width, h, fp8) + _linear(prefix + "up_proj.weight", width, h,
                                                                                     fp8)
            specs += _linear(prefix + "down_proj.weight", h, width, fp8)
    return sorted(specs)


def deepseek_dtype(name: str, fp8: bool) -> str:
    if name.endswith(("_scale_inv", "e_score_correction_bias")):
        return "F32"
    quantized = fp8 and name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and name.startswith("model.layers.")
    return "F8_E4M3" if quantized else "BF16"


def deepseek_config(s) -> dict:
    lat = s.latent
    groups = 8 if s.experts >= 16 else max(1, s.experts // 2)  # DeepSeek-V3: 8 groups, 4 compete
    quant = {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}} if s.fp8 else {}
    return {**quant, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": s.hidden,
            "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.heads,
            "q_lora_rank": lat.q_lora_rank, "kv_lora_rank": lat.kv_lora_rank,
            "qk_nope_head_dim": lat.qk_nope_head_dim, "qk_rope_head_dim": lat.qk_rope_head_dim,
            "v_head_dim": lat.v_head_dim, "intermediate_size": s.dense_intermediate,
            "moe_intermediate_size": s.intermediate, "n_routed_experts": s.experts, "num_experts_per_tok": s.top_k,
            "n_shared_experts": s.shared_intermediate // s.intermediate, "first_k_dense_replace": s.dense_layers,
            "n_group": groups, "topk_group": max(1, groups // 2), "norm_topk_prob": True, "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_nextn_predict_layers": 0,
            "vocab_size": s.vocab, "max_position_embeddings": s.max_positions or 163840, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 3, "dtype": "bfloat16", "rope_theta": 10000,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}


def fp8_chunk(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random e4m3 bytes of magnitude 1 to 16 (exponent field 7..10, never the NaN codes 0x7f / 0xff)."""
    bits = rng.integers(0, 256, size=size, dtype=np.uint8)
    return (bits & np.uint8(0x87)) | ((np.uint8(7) + ((bits >> 3) & np.uint8(3))) << 3)


def scale_chunk(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 block scales 2^-11 .. 2^-9 (so |w| stays under ~0.03), as raw uint8 bytes."""
    return np.ldexp(np.float32(1), rng.integers(-11, -8, size=size)).astype(np.float32).view(np.uint8)

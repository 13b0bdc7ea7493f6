"""HunYuan dense (HunYuanDenseV1ForCausalLM): the Llama layout with per-head q/k RMSNorm *after* rotary.

The q/k norms (query_layernorm / key_layernorm) apply to the rotated q and k, so the layers switch on the
qk_norm_after_rope variant (rotary outside GroupQueryAttention). The released checkpoints label their rope "dynamic"
with a fixed `alpha`, which transformers computes as a static NTK stretch of the base (ntk_alpha:
theta * alpha^(d / (d - 2))), not as dynamic NTK; a "dynamic" rope without alpha is dynamic NTK, exact up to
max_position_embeddings. Fields of the original remote code that transformers' dense model does not implement
(use_cla: cross-layer KV sharing, use_mixed_mlp_moe, num_experts > 1) are refused: such a checkpoint is not this
dense model.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import map_table, rope_settings, rope_spec
from builders.config import Config
from builders.llama import MLP_TABLE

ARCH = "HunYuanDenseV1ForCausalLM"
TABLE = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"layers.{{i}}.attn.{p}.{kind}": f"model.layers.{{i}}.self_attn.{p}_proj.{kind}"
       for p in "qkvo" for kind in ("weight", "bias")},
    "layers.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.query_layernorm.weight",
    "layers.{i}.attn.k_norm.weight": "model.layers.{i}.self_attn.key_layernorm.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _rope(cfg: Config, head_dim: int):
    ntk_alpha = {"dynamic": "ntk_alpha"} if rope_settings(cfg).float("alpha", None) else {}
    return rope_spec(cfg, head_dim, aliases=ntk_alpha)


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "silu", choices=("silu",))
    cfg.reject({"use_cla": False, "use_mixed_mlp_moe": False})
    if cfg.int("num_experts", 1) != 1:
        raise cfg.unsupported("num_experts", cfg.int("num_experts"), "1 (dense); HunYuan MoE is another architecture")
    hidden, heads = cfg.int("hidden_size", minimum=1), cfg.int("num_attention_heads", minimum=1)
    head_dim = cfg.int("head_dim", None, minimum=1) or hidden // heads
    context = cfg.int("max_position_embeddings", minimum=1)
    bias = cfg.bool("attention_bias", False)
    attn = AttentionSpec(num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", None) or heads,
                         head_dim=head_dim, rope=_rope(cfg, head_dim), qkv_bias=bias, o_bias=bias,
                         qk_norm=True, qk_norm_after_rope=True)
    mlp = MlpSpec(intermediate_size=cfg.int("intermediate_size", minimum=1))
    layers = tuple(LayerSpec(attention=attn, ffn=mlp) for _ in range(cfg.int("num_hidden_layers", minimum=1)))
    return ModelSpec(architecture=ARCH, model_type=cfg.str("model_type", "hunyuan_v1_dense"),
                     vocab_size=cfg.int("vocab_size"), hidden_size=hidden, layers=layers, context_length=context,
                     norm_eps=cfg.float("rms_norm_eps", 1e-5), tie_embeddings=cfg.bool("tie_word_embeddings", False))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    map_table(ckpt, weights, {**TABLE, **MLP_TABLE}, spec.num_layers)
    return weights


register(Family("hunyuan", (ARCH,), make_spec, map_weights,
                notes="HunYuan dense: q/k norm after rotary (rotary outside GroupQueryAttention), NTK-alpha rope"))

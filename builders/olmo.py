"""OLMo 2 and OLMo 3 (Olmo2ForCausalLM, Olmo3ForCausalLM): norms on the sublayer outputs only (norm_scheme "post":
h + post_norm(f(h)), no norm before a sublayer) and q/k RMSNorm over the whole q / k projection, before the heads
are split (qk_norm_scope "projection"). attention_bias puts biases on q/k/v/o; the MLP never has one.
OLMo 3 adds sliding-window layers (layer_types, sliding_window) with a rope per layer type.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec, RopeSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import map_table, projection_table, rope_spec
from builders.config import Config

ARCHITECTURES = {"Olmo2ForCausalLM": 2, "Olmo3ForCausalLM": 3}
LAYER = "model.layers.{i}"
TABLE = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.post_attn_norm.weight": f"{LAYER}.post_attention_layernorm.weight",
    "layers.{i}.post_ffn_norm.weight": f"{LAYER}.post_feedforward_layernorm.weight",
    "layers.{i}.attn.q_norm.weight": f"{LAYER}.self_attn.q_norm.weight",
    "layers.{i}.attn.k_norm.weight": f"{LAYER}.self_attn.k_norm.weight",
    **projection_table("layers.{i}.mlp", f"{LAYER}.mlp", ("gate", "up", "down"), bias=False),
    "final_norm.weight": "model.norm.weight",
}
FULL, SLIDING = "full_attention", "sliding_attention"
OLMO3_THETA = 500000.0  # Olmo3Config.default_theta
OLMO3_WINDOW = 4096  # Olmo3Config.sliding_window default


def _olmo3_ropes(cfg: Config, dim: int) -> dict[str, RopeSpec]:
    """Rope per layer type: transformers-5 rope_parameters {full_attention: ..., sliding_attention: ...}, or the older
    rope_theta + rope_scaling. Olmo3Config gives the older spelling's rope_theta and rope_scaling to the full layers
    only; the sliding layers keep the default base (500000, which every released OLMo 3 uses for both)."""
    params = cfg.sub("rope_parameters", None)
    if params is not None and (FULL in params or SLIDING in params):
        return {t: rope_spec(cfg, dim, layer_type=t, default_theta=OLMO3_THETA) for t in (FULL, SLIDING)}
    full = rope_spec(cfg, dim, default_theta=OLMO3_THETA)
    return {FULL: full, SLIDING: RopeSpec(theta=OLMO3_THETA, rotary_dim=dim, max_positions=full.max_positions)}


def make_spec(cfg: Config) -> ModelSpec:
    arch = cfg.architecture
    version = ARCHITECTURES[arch]
    cfg.str("hidden_act", "silu", choices=("silu",))
    cfg.reject({"mlp_bias": False})  # transformers' OLMo MLP has no bias whatever the config says
    hidden, heads = cfg.int("hidden_size", minimum=1), cfg.int("num_attention_heads", minimum=1)
    n = cfg.int("num_hidden_layers", minimum=1)
    dim = cfg.int("head_dim", None) or hidden // heads
    if version == 2:
        types, ropes, window = [FULL] * n, {FULL: rope_spec(cfg, dim)}, None
    else:
        default_types = [SLIDING if (i + 1) % 4 else FULL for i in range(n)]  # Olmo3Config's default pattern
        types = cfg.list("layer_types", default_types, of=str, length=n)
        for t in types:
            if t not in (FULL, SLIDING):
                raise cfg.unsupported("layer_types", t, f"{FULL!r}, {SLIDING!r}")
        ropes, window = _olmo3_ropes(cfg, dim), OLMO3_WINDOW
        if SLIDING in types and "sliding_window" in cfg.data:  # absent: Olmo3Config's default; null: broken
            window = cfg.int("sliding_window", minimum=1)
    bias = cfg.bool("attention_bias", False)
    mlp = MlpSpec(cfg.int("intermediate_size", minimum=1), "silu")
    layers = tuple(
        LayerSpec(attention=AttentionSpec(num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", None) or heads,
                                          head_dim=dim, rope=ropes[t], qkv_bias=bias, o_bias=bias, qk_norm=True,
                                          qk_norm_scope="projection",
                                          sliding_window=window if t == SLIDING else None),
                  ffn=mlp, norm_scheme="post")
        for t in types)
    return ModelSpec(architecture=arch, model_type=cfg.str("model_type"), vocab_size=cfg.int("vocab_size", minimum=1),
                     hidden_size=hidden, layers=layers, context_length=cfg.int("max_position_embeddings", 2048),
                     norm_eps=cfg.float("rms_norm_eps", 1e-5), tie_embeddings=cfg.bool("tie_word_embeddings", False))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    bias = spec.layers[0].attention.qkv_bias
    table = {**TABLE, **projection_table("layers.{i}.attn", f"{LAYER}.self_attn", "qkvo", bias=bias)}
    table["lm_head.weight"] = "lm_head.weight"  # a stored head of a tied model is settled by resolve_tied_head
    map_table(ckpt, weights, table, spec.num_layers)
    return weights


register(Family("olmo", tuple(ARCHITECTURES), make_spec, map_weights,
                notes="OLMo 2 / OLMo 3: post-sublayer norms, q/k RMSNorm over the whole projection, OLMo 3 "
                      "sliding-window layers with a rope per layer type"))

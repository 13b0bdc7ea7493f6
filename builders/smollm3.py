"""SmolLM3 (SmolLM3ForCausalLM): the Llama layout with NoPE layers.

no_rope_layers[i] is 1 for a layer with rotary and 0 for a layer without (every no_rope_layer_interval-th layer in
the released checkpoints; transformers derives the list from the interval when config.json lacks it). A NoPE layer is
an AttentionSpec without a rope. Sliding windows follow layer_types (use_sliding_window + sliding_window); attention
and MLP biases follow attention_bias / mlp_bias.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap
from builders import Family, register
from builders.common import layer_windows, map_table, rope_spec
from builders.config import Config
from builders.llama import BASE_TABLE

ARCH = "SmolLM3ForCausalLM"
MLP_TABLE = {f"layers.{{i}}.mlp.{p}.{kind}": f"model.layers.{{i}}.mlp.{p}_proj.{kind}"
             for p in ("gate", "up", "down") for kind in ("weight", "bias")}


def rope_layers(cfg: Config, num_layers: int) -> list[bool]:
    """Per layer: whether it applies rotary (no_rope_layers, else every interval-th layer is NoPE)."""
    flags = cfg.list("no_rope_layers", None, of=int, length=num_layers)
    if flags is None:
        interval = cfg.int("no_rope_layer_interval", 4, minimum=1)
        return [(i + 1) % interval != 0 for i in range(num_layers)]
    if any(f not in (0, 1) for f in flags):
        raise cfg.bad("no_rope_layers", flags, "a list of 0 (no rotary) and 1 (rotary) per layer")
    return [bool(f) for f in flags]


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "silu", choices=("silu",))
    hidden, heads = cfg.int("hidden_size", minimum=1), cfg.int("num_attention_heads", minimum=1)
    head_dim = cfg.int("head_dim", None, minimum=1) or hidden // heads
    num_layers, context = cfg.int("num_hidden_layers", minimum=1), cfg.int("max_position_embeddings", minimum=1)
    rope = rope_spec(cfg, head_dim, default_theta=2_000_000.0)
    bias = cfg.bool("attention_bias", False)
    uses_rope = rope_layers(cfg, num_layers)
    # transformers: layer_types defaults to sliding NoPE layers when use_sliding_window and sliding_window are set;
    # a sliding layer's mask uses sliding_window either way
    window = cfg.int("sliding_window", None, minimum=1)
    sliding = window is not None and cfg.bool("use_sliding_window", False)
    windows = layer_windows(cfg, ["sliding_attention" if sliding and not r else "full_attention" for r in uses_rope],
                            window)
    mlp = MlpSpec(intermediate_size=cfg.int("intermediate_size", minimum=1), bias=cfg.bool("mlp_bias", False))
    layers = tuple(
        LayerSpec(attention=AttentionSpec(num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", None) or heads,
                                          head_dim=head_dim, rope=rope if with_rope else None, qkv_bias=bias,
                                          o_bias=bias, sliding_window=window), ffn=mlp)
        for with_rope, window in zip(uses_rope, windows))
    return ModelSpec(architecture=ARCH, model_type=cfg.str("model_type", "smollm3"), vocab_size=cfg.int("vocab_size"),
                     hidden_size=hidden, layers=layers, context_length=context,
                     norm_eps=cfg.float("rms_norm_eps", 1e-6), tie_embeddings=cfg.bool("tie_word_embeddings", True))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = WeightMap(spec.architecture)
    map_table(ckpt, weights, {**BASE_TABLE, **MLP_TABLE}, spec.num_layers)
    return weights


register(Family("smollm3", (ARCH,), make_spec, map_weights,
                notes="SmolLM3: NoPE layers (no_rope_layers / no_rope_layer_interval), attention and MLP biases"))

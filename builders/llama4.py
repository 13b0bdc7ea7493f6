"""Llama 4 text (Llama4ForCausalLM, and the text decoder of Llama4ForConditionalGeneration; the vision tower and
projector are deliberately skipped).

What differs from Llama, as data:
- rope layers rotate interleaved pairs (complex rotary) and then RMS-normalise q and k per head without a weight
  (use_qk_norm: transformers' Llama4TextL2Norm), so rotary runs before GroupQueryAttention;
- NoPE layers (no_rope_layers[i] == 0, else every no_rope_layer_interval-th layer) have no rotary and, with
  attn_temperature_tuning, scale q by 1 + attn_scale * ln(1 + floor((position + 1) / floor_scale));
- chunked attention on the layers layer_types calls "chunked_attention" (by default the rope layers, when
  attention_chunk_size is set): keys only from the query's own chunk of attention_chunk_size positions, through
  GroupQueryAttention's attention_bias (builder/layers/attention.py, chunk_bias: exact at every length);
- MoE layers (moe_layers, else every interleave_moe_layer_step-th layer) route top-1 by sigmoid of the winning logit,
  applied to the expert's input, plus a shared expert intermediate_size wide; other layers are dense MLPs
  intermediate_size_mlp wide. Experts are stored fused, input-major: gate_up_proj [E, H, 2I] (gate half, then up
  half) and down_proj [E, I, H].
"""

from __future__ import annotations

from dataclasses import replace

from builder.checkpoint import Checkpoint
from builder.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec, MoeSpec, RoutingSpec
from builder.weights import InterleavedGateUp, Stored, WeightMap, to_expert_major
from builders import Family, register
from builders.common import head_dim, kv_heads, map_table, rope_spec, text_decoder_prefix, text_decoder_table
from builders.config import Config
from builders.moe_common import top_k

ARCHS = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
SKIPPED = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")
LAYER_TYPES = ("full_attention", "chunked_attention")


def _uses_rope(cfg: Config, num_layers: int) -> list[bool]:
    """transformers' no_rope_layers: 1 = rotary, 0 = NoPE; derived from no_rope_layer_interval when absent."""
    flags = cfg.list("no_rope_layers", None, of=int, length=num_layers)
    if not flags:
        interval = cfg.int("no_rope_layer_interval", 4, minimum=1)
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    return [bool(f) for f in flags]


def _moe_layers(cfg: Config, num_layers: int) -> set[int]:
    layers = cfg.list("moe_layers", None, of=int)
    if layers is None:
        step = cfg.int("interleave_moe_layer_step", 1, minimum=1)
        layers = list(range(step - 1, num_layers, step))
    return set(layers)


def _chunks(cfg: Config, rope: list[bool]) -> list[int | None]:
    chunk = cfg.int("attention_chunk_size", None, minimum=1)
    types = cfg.list("layer_types", None, of=str, length=len(rope))
    if types is None:
        types = ["chunked_attention" if r and chunk is not None else "full_attention" for r in rope]
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise cfg.unsupported("layer_types", unknown, ", ".join(map(repr, LAYER_TYPES)))
    if "chunked_attention" in types and chunk is None:
        raise cfg.bad("attention_chunk_size", None, "a chunk size, since layer_types has chunked_attention layers")
    return [chunk if t == "chunked_attention" else None for t in types]


def make_spec(cfg: Config) -> ModelSpec:
    cfg.str("hidden_act", "silu", choices=("silu",))
    num_layers = cfg.int("num_hidden_layers", minimum=1)
    dim = head_dim(cfg)
    rope = replace(rope_spec(cfg, dim, default_theta=500000.0), interleaved=True)
    bias = cfg.bool("attention_bias", False)
    qk_norm = cfg.bool("use_qk_norm", True)
    tuning = cfg.bool("attn_temperature_tuning", True)
    temperature = (cfg.float("attn_scale", 0.1), cfg.int("floor_scale", 8192, minimum=1)) if tuning else None
    experts = cfg.int("num_local_experts", minimum=1)
    k = top_k(cfg, experts)
    if k != 1:
        raise cfg.unsupported("num_experts_per_tok", k, why="Llama 4 weights the expert input, which one fused MoE "
                              "op computes for top-1 routing only (the released models route top-1)")
    inter = cfg.int("intermediate_size", minimum=1)
    moe = MoeSpec(num_experts=experts, top_k=1, intermediate_size=inter, shared_expert_size=inter,
                  routing=RoutingSpec(scoring="sigmoid", weight_on_input=True))
    dense = MlpSpec(cfg.int("intermediate_size_mlp", minimum=1))
    moe_layers = _moe_layers(cfg, num_layers)
    layers = []
    for i, (uses_rope, chunk) in enumerate(zip(_uses_rope(cfg, num_layers), _chunks(cfg, _uses_rope(cfg, num_layers)))):
        attention = AttentionSpec(
            num_heads=cfg.int("num_attention_heads", minimum=1), num_kv_heads=kv_heads(cfg), head_dim=dim,
            rope=rope if uses_rope else None, qkv_bias=bias, o_bias=bias, qk_norm=qk_norm and uses_rope,
            qk_norm_after_rope=True, qk_norm_weightless=True, attention_chunk=chunk,
            query_position_scale=None if uses_rope else temperature, query_position_offset=1)
        layers.append(LayerSpec(attention=attention, ffn=moe if i in moe_layers else dense))
    return ModelSpec(architecture=cfg.architecture, model_type=cfg.str("model_type", "llama4_text"),
                     vocab_size=cfg.int("vocab_size", minimum=1), hidden_size=cfg.int("hidden_size", minimum=1),
                     layers=tuple(layers), context_length=cfg.int("max_position_embeddings", 4096, minimum=1),
                     norm_eps=cfg.float("rms_norm_eps", 1e-5), tie_embeddings=cfg.bool("tie_word_embeddings", False))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    prefix = text_decoder_prefix(ckpt, spec.architecture, TEXT_PREFIXES, SKIPPED)
    weights = WeightMap(spec.architecture)
    map_table(ckpt, weights, text_decoder_table(prefix), spec.num_layers)
    for i, layer in enumerate(spec.layers):
        block = f"{prefix}layers.{i}.feed_forward"
        if not isinstance(layer.ffn, MoeSpec):
            map_table(ckpt, weights, {f"layers.{i}.mlp.{p}.weight": f"{block}.{p}_proj.weight"
                                      for p in ("gate", "up", "down")}, 0)
            continue
        router, gate_up, down = f"{block}.router.weight", f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"
        weights.add(f"layers.{i}.moe.router.weight", Stored(ckpt.tensor(router)), router)
        weights.add(f"layers.{i}.moe.fc1.weight",
                    InterleavedGateUp.from_halves(to_expert_major(Stored(ckpt.tensor(gate_up)))), gate_up)
        weights.add(f"layers.{i}.moe.fc2.weight", to_expert_major(Stored(ckpt.tensor(down))), down)
        map_table(ckpt, weights, {f"layers.{i}.moe.shared.{p}.weight": f"{block}.shared_expert.{p}_proj.weight"
                                  for p in ("gate", "up", "down")}, 0)
    return weights


register(Family("llama4", ARCHS, make_spec, map_weights, text_config_key="text_config",
                wrapper_fields=("tie_word_embeddings",),
                notes="Llama 4 text: top-1 sigmoid routing on the expert input, shared expert, interleaved MoE "
                      "layers, NoPE layers with temperature tuning, chunked attention, weightless q/k norm after "
                      "interleaved rope; Llama4ForConditionalGeneration: text decoder only"))

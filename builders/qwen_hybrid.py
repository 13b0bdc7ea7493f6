"""Hybrid linear-attention decoders: Qwen3.5, Qwen3.5-MoE (text decoder of the released multimodal checkpoints and
the CausalLM layout) and Qwen3-Next.

Every layer is a Gated DeltaNet linear-attention layer or a gated full-attention layer (config.layer_types, by
default three linear for every full one), followed by a SwiGLU MLP or a shared-expert MoE. As data:
  - full attention: q_proj rows hold [q_h | gate_h] per head (de-interleaved here into q and gate), output gate
    sigmoid(gate), partial rotary (partial_rotary_factor, 0.25), per-head q/k RMSNorm. The multimodal rope sections
    (mrope_section) only differ for image/video positions; text positions are equal on every section, so text-only
    decoding is plain rope.
  - every RMSNorm applies (1 + w) except linear_attn.norm, which applies w (the layer reads it as is).
  - Qwen3-Next stores the linear-attention projections fused per key head (in_proj_qkvz: [q_h | k_h | v_h | z_h],
    in_proj_ba: [b_h | a_h]); they are regrouped here into the Qwen3.5 layout (qkv, z, a, b).
  - MoE experts are read stored per expert (experts.{e}.gate_proj ...) or fused 3-D (experts.gate_up_proj
    [E, 2I, H], experts.down_proj [E, H, I]).
The vision tower (model.visual.*) and the multi-token-prediction head (mtp.*) are not exported (a progress note says
so); any other tensor the mapping does not use is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from builder.checkpoint import Checkpoint
from builder.errors import CheckpointError
from builder.spec import (AttentionSpec, LayerSpec, LinearAttentionSpec, MlpSpec, ModelSpec, MoeSpec, RopeSpec,
                          RoutingSpec)
from builder.weights import InterleavedGateUp, Stacked, Stored, Weight, WeightMap
from builders import Family, register
from builders.common import rope_spec, rotary_width
from builders.config import Config

LAYER_TYPES = ("linear_attention", "full_attention")
DEFAULT_PARTIAL_ROTARY = 0.25  # Qwen3.5 / Qwen3-Next config default
TEXT_PREFIXES = ("model.language_model.", "model.")
# Checkpoint parts deliberately left out of the text decoder (Family.ignored: named in the progress output)
IGNORED = (("the vision tower (model.visual.*)", ("model.visual.",)),
           ("the multi-token-prediction head (mtp.*)", ("mtp.",)))
# Fields of linear-attention variants (flash-linear-attention spellings) whose other values the graph does not compute
LINEAR_ATTN_FIXED = {"update_rule": "gated_delta", "linear_update_rule": "gated_delta", "conv_bias": False,
                     "linear_conv_bias": False, "use_conv_bias": False, "use_short_conv": True,
                     "allow_neg_eigval": False, "rope_scaling": None}


@dataclass(frozen=True)
class Variant:
    moe: str | None  # None: dense MLP everywhere; "all": every layer MoE; "sparse_step": mlp_only_layers/sparse step
    fused_in_proj: bool  # Qwen3-Next's in_proj_qkvz / in_proj_ba


VARIANTS = {
    "Qwen3_5ForCausalLM": Variant(None, False),
    "Qwen3_5ForConditionalGeneration": Variant(None, False),
    "Qwen3_5MoeForCausalLM": Variant("all", False),
    "Qwen3_5MoeForConditionalGeneration": Variant("all", False),
    "Qwen3NextForCausalLM": Variant("sparse_step", True),
}


def layer_types(cfg: Config, num_layers: int) -> list[str]:
    types = cfg.list("layer_types", None, of=str)
    if types is None:  # transformers' default: every full_attention_interval-th layer is full attention
        interval = cfg.int("full_attention_interval", 4, minimum=1)
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise cfg.bad("layer_types", types, f"a list of num_hidden_layers={num_layers} entries")
    for i, kind in enumerate(types):
        if kind not in LAYER_TYPES:
            raise cfg.unsupported(f"layer_types[{i}]", kind, ", ".join(map(repr, LAYER_TYPES)))
    return types


def _rope(cfg: Config, head_dim: int, max_positions: int) -> RopeSpec:
    return rope_spec(cfg, rotary_width(cfg, head_dim, default=DEFAULT_PARTIAL_ROTARY), partial=True,
                     types=("default",), mrope=True, max_positions=max_positions)


def _linear_attention(cfg: Config) -> LinearAttentionSpec:
    cfg.reject(LINEAR_ATTN_FIXED)
    key_heads = cfg.int("linear_num_key_heads", minimum=1)
    value_heads = cfg.int("linear_num_value_heads", minimum=1)
    if value_heads % key_heads:
        raise cfg.bad("linear_num_value_heads", value_heads, f"a multiple of linear_num_key_heads={key_heads} (value "
                      "heads are grouped per key head)")
    kernel = cfg.int("linear_conv_kernel_dim", minimum=1)
    if kernel < 2:
        raise cfg.unsupported("linear_conv_kernel_dim", kernel, ">= 2 (a kernel of 1 leaves an empty conv state, "
                              "which onnxruntime-genai cannot allocate)")
    return LinearAttentionSpec(num_key_heads=key_heads, num_value_heads=value_heads,
                               key_head_dim=cfg.int("linear_key_head_dim", minimum=1),
                               value_head_dim=cfg.int("linear_value_head_dim", minimum=1), conv_kernel=kernel)


def _moe(cfg: Config, variant: Variant) -> MoeSpec:
    return MoeSpec(num_experts=cfg.int("num_experts", minimum=1), top_k=cfg.int("num_experts_per_tok", minimum=1),
                   intermediate_size=cfg.int("moe_intermediate_size", minimum=1),
                   routing=RoutingSpec(normalize_topk=cfg.bool("norm_topk_prob", True)
                                       if variant.moe == "sparse_step" else True),
                   shared_expert_size=cfg.int("shared_expert_intermediate_size", minimum=1),
                   shared_expert_gated=True)


def _is_moe_layer(cfg: Config, variant: Variant, index: int) -> bool:
    if variant.moe == "all":
        return True
    if variant.moe is None or cfg.int("num_experts", 0) == 0:
        return False
    step = cfg.int("decoder_sparse_step", 1, minimum=1)
    return index not in cfg.list("mlp_only_layers", [], of=int) and (index + 1) % step == 0


def make_spec(cfg: Config) -> ModelSpec:
    variant = VARIANTS[cfg.architecture]
    cfg.str("hidden_act", "silu", choices=("silu",))  # the MLPs' and the linear-attention conv's activation
    hidden = cfg.int("hidden_size", minimum=1)
    num_layers = cfg.int("num_hidden_layers", minimum=1)
    heads = cfg.int("num_attention_heads", minimum=1)
    head_dim = cfg.int("head_dim", None, minimum=1) or hidden // heads
    max_positions = cfg.int("max_position_embeddings", 32768, minimum=1)
    bias = cfg.bool("attention_bias", False)
    attention = AttentionSpec(num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", heads, minimum=1),
                              head_dim=head_dim, rope=_rope(cfg, head_dim, max_positions), qkv_bias=bias, o_bias=bias,
                              qk_norm=True, output_gate=True)
    types = layer_types(cfg, num_layers)
    linear = _linear_attention(cfg) if "linear_attention" in types else None
    moe = _moe(cfg, variant) if variant.moe else None
    dense = MlpSpec(cfg.int("intermediate_size", minimum=1)) if variant.moe != "all" else None
    layers = tuple(LayerSpec(attention=linear if kind == "linear_attention" else attention,
                             ffn=moe if moe and _is_moe_layer(cfg, variant, i) else dense)
                   for i, kind in enumerate(types))
    return ModelSpec(architecture=cfg.architecture, model_type=cfg.str("model_type"), vocab_size=cfg.int("vocab_size"),
                     hidden_size=hidden, layers=layers, context_length=max_positions,
                     norm_eps=cfg.float("rms_norm_eps", 1e-6), norm_weight_offset=1.0,
                     tie_embeddings=cfg.bool("tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class SelectedRows:
    """Rows `index` of a stored tensor, in that order (regrouping fused or per-head interleaved projections); read
    in contiguous runs, never whole."""

    source: Weight
    index: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.source.shape[1:])

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        index = np.asarray(self.index[start:stop], dtype=np.int64)
        out = np.empty((len(index), *self.source.shape[1:]), np.float32)
        starts = np.flatnonzero(np.diff(index, prepend=-2) != 1)  # where a contiguous run begins
        for lo, hi in zip(starts, [*starts[1:], len(index)]):
            out[lo:hi] = self.source.rows(int(index[lo]), int(index[lo]) + (hi - lo))
        return out


def group_rows(groups: int, group_size: int, offset: int, count: int) -> tuple[int, ...]:
    """Rows [offset, offset + count) of each of `groups` consecutive groups of `group_size` rows."""
    return tuple(g * group_size + offset + r for g in range(groups) for r in range(count))


class Tensors:
    """Checkpoint tensors with the shape the config implies, failing with the tensor and its file otherwise."""

    def __init__(self, ckpt: Checkpoint, arch: str):
        self.ckpt, self.arch = ckpt, arch

    def __call__(self, name: str, shape: tuple[int, ...]) -> Stored:
        if not self.ckpt.has(name):
            raise CheckpointError(f"{self.arch}: tensor {name} missing from the checkpoint (the config implies it). "
                                  "The checkpoint is incomplete or does not match its config.")
        ref = self.ckpt.tensor(name)
        if tuple(ref.shape) != tuple(shape):
            raise CheckpointError(f"{self.arch}: tensor {name} in {ref.path.name} has shape {list(ref.shape)} but "
                                  f"config.json implies {list(shape)}. The checkpoint does not match its config.")
        return Stored(ref)


def text_prefix(ckpt: Checkpoint, arch: str) -> str:
    for prefix in TEXT_PREFIXES:
        if ckpt.has(f"{prefix}embed_tokens.weight"):
            return prefix
    raise CheckpointError(f"{arch}: no token embedding found (looked for "
                          f"{', '.join(p + 'embed_tokens.weight' for p in TEXT_PREFIXES)}).")


def _map_attention(t: Tensors, weights: WeightMap, src: str, dst: str, attn: AttentionSpec, hidden: int) -> None:
    heads, dim = attn.num_heads, attn.head_dim
    q_rows, gate_rows = group_rows(heads, 2 * dim, 0, dim), group_rows(heads, 2 * dim, dim, dim)
    kinds = ("weight", "bias") if attn.qkv_bias else ("weight",)
    for kind in kinds:
        tail = (hidden,) if kind == "weight" else ()
        q_proj = t(f"{src}.q_proj.{kind}", (2 * attn.q_size, *tail))
        weights.add(f"{dst}.q.{kind}", SelectedRows(q_proj, q_rows), f"{src}.q_proj.{kind}")
        weights.add(f"{dst}.gate.{kind}", SelectedRows(q_proj, gate_rows), f"{src}.q_proj.{kind}")
        for p in "kv":
            source = f"{src}.{p}_proj.{kind}"
            weights.add(f"{dst}.{p}.{kind}", t(source, (attn.kv_size, *tail)), source)
    weights.add(f"{dst}.o.weight", t(f"{src}.o_proj.weight", (hidden, attn.q_size)), f"{src}.o_proj.weight")
    if attn.o_bias:
        weights.add(f"{dst}.o.bias", t(f"{src}.o_proj.bias", (hidden,)), f"{src}.o_proj.bias")
    for p in ("q_norm", "k_norm"):
        weights.add(f"{dst}.{p}.weight", t(f"{src}.{p}.weight", (dim,)), f"{src}.{p}.weight")


def _map_linear_attention(t: Tensors, weights: WeightMap, src: str, dst: str, spec: LinearAttentionSpec, hidden: int,
                          fused: bool) -> None:
    hk, hv, dk, dv = spec.num_key_heads, spec.num_value_heads, spec.key_head_dim, spec.value_head_dim
    if fused:  # Qwen3-Next: per key head [q_h | k_h | v_h | z_h] and [b_h | a_h], value heads grouped per key head
        per_v = hv // hk * dv
        group = 2 * dk + 2 * per_v
        qkvz = t(f"{src}.in_proj_qkvz.weight", (hk * group, hidden))
        qkv = (group_rows(hk, group, 0, dk) + group_rows(hk, group, dk, dk) + group_rows(hk, group, 2 * dk, per_v))
        weights.add(f"{dst}.qkv.weight", SelectedRows(qkvz, qkv), f"{src}.in_proj_qkvz.weight")
        weights.add(f"{dst}.z.weight", SelectedRows(qkvz, group_rows(hk, group, 2 * dk + per_v, per_v)),
                    f"{src}.in_proj_qkvz.weight")
        ba = t(f"{src}.in_proj_ba.weight", (2 * hv, hidden))
        r = hv // hk
        weights.add(f"{dst}.b.weight", SelectedRows(ba, group_rows(hk, 2 * r, 0, r)), f"{src}.in_proj_ba.weight")
        weights.add(f"{dst}.a.weight", SelectedRows(ba, group_rows(hk, 2 * r, r, r)), f"{src}.in_proj_ba.weight")
    else:
        for name, source, shape in (("qkv", "in_proj_qkv", spec.conv_channels), ("z", "in_proj_z", spec.value_size),
                                    ("a", "in_proj_a", hv), ("b", "in_proj_b", hv)):
            weights.add(f"{dst}.{name}.weight", t(f"{src}.{source}.weight", (shape, hidden)), f"{src}.{source}.weight")
    for name, source, shape in (("conv.weight", "conv1d.weight", (spec.conv_channels, 1, spec.conv_kernel)),
                                ("A_log", "A_log", (hv,)), ("dt_bias", "dt_bias", (hv,)),
                                ("norm.weight", "norm.weight", (dv,)), ("out.weight", "out_proj.weight",
                                                                        (hidden, spec.value_size))):
        weights.add(f"{dst}.{name}", t(f"{src}.{source}", shape), f"{src}.{source}")


def _map_ffn(ckpt: Checkpoint, t: Tensors, weights: WeightMap, src: str, dst: str, layer: LayerSpec,
             hidden: int) -> None:
    ffn = layer.ffn
    if isinstance(ffn, MlpSpec):
        for p, shape in (("gate", (ffn.intermediate_size, hidden)), ("up", (ffn.intermediate_size, hidden)),
                         ("down", (hidden, ffn.intermediate_size))):
            weights.add(f"{dst}.mlp.{p}.weight", t(f"{src}.mlp.{p}_proj.weight", shape), f"{src}.mlp.{p}_proj.weight")
        return
    e, inter = ffn.num_experts, ffn.intermediate_size
    weights.add(f"{dst}.moe.router.weight", t(f"{src}.mlp.gate.weight", (e, hidden)), f"{src}.mlp.gate.weight")
    experts = f"{src}.mlp.experts"
    if ckpt.has(f"{experts}.gate_up_proj"):  # fused 3-D, gate rows then up rows
        gate_up = t(f"{experts}.gate_up_proj", (e, 2 * inter, hidden))
        weights.add(f"{dst}.moe.fc1.weight", InterleavedGateUp.from_halves(gate_up), f"{experts}.gate_up_proj")
        weights.add(f"{dst}.moe.fc2.weight", t(f"{experts}.down_proj", (e, hidden, inter)), f"{experts}.down_proj")
    else:
        def stacked(name, shape):
            return Stacked(tuple(t(f"{experts}.{k}.{name}.weight", shape) for k in range(e)))

        weights.add(f"{dst}.moe.fc1.weight", InterleavedGateUp.from_gate_up(stacked("gate_proj", (inter, hidden)),
                                                                            stacked("up_proj", (inter, hidden))),
                    f"{experts}.{{e}}.gate_proj.weight")
        weights.add(f"{dst}.moe.fc2.weight", stacked("down_proj", (hidden, inter)), f"{experts}.{{e}}.down_proj.weight")
    shared = ffn.shared_expert_size
    for p, shape in (("gate", (shared, hidden)), ("up", (shared, hidden)), ("down", (hidden, shared))):
        name = f"{src}.mlp.shared_expert.{p}_proj.weight"
        weights.add(f"{dst}.moe.shared.{p}.weight", t(name, shape), name)
    weights.add(f"{dst}.moe.shared_gate.weight", t(f"{src}.mlp.shared_expert_gate.weight", (1, hidden)),
                f"{src}.mlp.shared_expert_gate.weight")


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    arch, hidden = spec.architecture, spec.hidden_size
    variant = VARIANTS[arch]
    t = Tensors(ckpt, arch)
    weights = WeightMap(arch)
    prefix = text_prefix(ckpt, arch)
    weights.add("embed.weight", t(f"{prefix}embed_tokens.weight", (spec.vocab_size, hidden)),
                f"{prefix}embed_tokens.weight")
    weights.add("final_norm.weight", t(f"{prefix}norm.weight", (hidden,)), f"{prefix}norm.weight")
    if ckpt.has("lm_head.weight"):  # a stored head of a tied model is settled by resolve_tied_head
        weights.add("lm_head.weight", t("lm_head.weight", (spec.vocab_size, hidden)), "lm_head.weight")
    else:
        weights.expect("lm_head.weight", "lm_head.weight")
    for i, layer in enumerate(spec.layers):
        src, dst = f"{prefix}layers.{i}", f"layers.{i}"
        weights.add(f"{dst}.attn_norm.weight", t(f"{src}.input_layernorm.weight", (hidden,)),
                    f"{src}.input_layernorm.weight")
        weights.add(f"{dst}.ffn_norm.weight", t(f"{src}.post_attention_layernorm.weight", (hidden,)),
                    f"{src}.post_attention_layernorm.weight")
        if isinstance(layer.attention, LinearAttentionSpec):
            _map_linear_attention(t, weights, f"{src}.linear_attn", f"{dst}.linear_attn", layer.attention, hidden,
                                  variant.fused_in_proj)
        else:
            _map_attention(t, weights, f"{src}.self_attn", f"{dst}.attn", layer.attention, hidden)
        _map_ffn(ckpt, t, weights, src, dst, layer, hidden)
    return weights


register(Family("qwen_hybrid", tuple(VARIANTS), make_spec, map_weights, text_config_key="text_config",
                ignored=IGNORED, notes="Qwen3.5 / Qwen3.5-MoE (text decoder; CausalLM and multimodal layouts), Qwen3-Next: Gated "
                      "DeltaNet linear attention + gated full attention, shared-expert MoE"))

"""Mixture-of-experts block through com.microsoft MoE (float experts) or QMoE (int4/int8 experts).

Shared by every MoE family. Canonical weights (see builder/spec.py): router [E, H] (+ bias), fc1 [E, 2I, H] with
gate/up rows interleaved (swiglu_fusion=1), fc2 [E, H, I], optional expert biases, optional shared expert. The
QuantPlan decides the experts' storage (float -> MoE; bits and block/per-channel scales -> QMoE) and the router's;
the op computes SwiGLU only, so any other MoeSpec.activation is refused while the graph is built.
Routing (MoeSpec.routing) becomes the op's router inputs in builder/layers/routing.py; a routing scaling factor is
folded into fc2.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.linear import QuantizedWeight, linear
from builder.layers.mlp import gated_mlp
from builder.layers.routing import router_feed
from builder.quant.plan import WeightFormat
from builder.spec import MlpSpec, MoeSpec
from builder.weights import RowMap, Weight

FUSED_ACTIVATIONS = ("silu", "gpt_oss")  # MoeSpec.activation values the op computes (see swiglu_attributes)

EXPERT_BLOCK_BYTES = 64 * 1024 * 1024  # experts quantized per block (the rows of an [E, N, K] weight are experts)


def _quantize_experts(rows, *, fmt: WeightFormat, name: str, prepack_arch: int | None):
    """[e, N, K] float32 experts -> packed codes (raw, or the CUDA-prepacked layout) and scales (no zero points)."""
    from builder.quant.cuda_layout import prepack_for_cuda
    from builder.quant.moe import quantize_experts

    q = quantize_experts(rows, bits=fmt.bits, block_size=fmt.block_size, name=name)
    packed = q.packed if prepack_arch is None else prepack_for_cuda(q, arch=prepack_arch)
    return SimpleNamespace(packed=packed, scales=q.scales, zero_points=None)


def expert_source(weight: Weight, fmt: WeightFormat, name: str, prepack_arch: int | None) -> QuantizedWeight:
    """The one quantization pass of an [E, N, K] expert weight, a few experts at a time."""
    return QuantizedWeight(weight, partial(_quantize_experts, fmt=fmt, name=name, prepack_arch=prepack_arch),
                           EXPERT_BLOCK_BYTES)


def prepacked_layout(ctx: LayerContext) -> bool:
    """CUDA QMoE reads an omitted weights_prepacked as "already prepacked" (ORT 1.31), so auto ships prepacked bytes."""
    return ctx.settings.ep == "cuda" and ctx.settings.qmoe_layout.prepacked != 0


def _expert_weights(ctx: LayerContext, name: str, weight: Weight,
                    fmt: WeightFormat) -> tuple[ir.Value, ir.Value | None]:
    """Float initializer, or (packed, scales) for QMoE."""
    if fmt.is_float:
        return ctx.float_initializer(name, weight), None
    e, n, k = weight.shape
    prepack = ctx.settings.qmoe_layout.prepack_arch if prepacked_layout(ctx) else None
    source = expert_source(weight, fmt, name, prepack)
    # the CUTLASS layout is stored [E, K, N*bits/8], the shape ORT's own packers emit
    shape = (e, k, n * fmt.bits // 8) if prepack else (e, n, k * fmt.bits // 8)
    packed = ctx.g.streamed(f"{name}.qweight", ir.DataType.UINT8, shape, lambda: source.blocks("packed"))
    scale_shape = (e, n, k // fmt.block_size) if fmt.block_size else (e, n)
    numpy_dtype = ctx.settings.numpy_dtype
    scales = ctx.g.streamed(f"{name}.scales", ctx.settings.ir_dtype, scale_shape,
                            lambda: (block.astype(numpy_dtype, copy=False) for block in source.blocks("scales")))
    return packed, scales


def swiglu_attributes(moe: MoeSpec, index: int) -> dict:
    """The op's activation attributes for the spec's expert activation; the op computes SwiGLU only,
    g * sigmoid(alpha * g) * (u + beta) with g (and u, within +-limit) clamped when a limit is given."""
    from builder.errors import UnsupportedModelError

    plain = (moe.swiglu_alpha, moe.swiglu_beta, moe.swiglu_limit) == (1.0, 0.0, None)
    if moe.activation not in FUSED_ACTIVATIONS or (moe.activation == "silu" and not plain):
        raise UnsupportedModelError(
            f"layers.{index}.moe: the fused MoE/QMoE op computes SwiGLU only (activation 'silu' with alpha 1, beta 0 "
            f"and no limit, or 'gpt_oss' clamped SwiGLU); this spec asks for activation {moe.activation!r} (alpha "
            f"{moe.swiglu_alpha}, beta {moe.swiglu_beta}, limit {moe.swiglu_limit}). Other gated experts need the "
            "per-expert path (DenseMoeSpec).")
    return dict(activation_type="swiglu", swiglu_fusion=1,
                swiglu_limit=float(moe.swiglu_limit) if moe.swiglu_limit is not None else None,
                activation_alpha=float(moe.swiglu_alpha), activation_beta=float(moe.swiglu_beta))


def _shared_expert(ctx: LayerContext, x: ir.Value, index: int, moe: MoeSpec) -> ir.Value:
    g, w = ctx.g, ctx.weights
    prefix = f"layers.{index}.moe"
    with g.scope("shared_expert"):
        out = gated_mlp(ctx, x, f"{prefix}.shared", MlpSpec(moe.shared_expert_size, bias=moe.shared_expert_bias), index,
                        role="moe.shared")
    if moe.shared_expert_gated:
        with g.scope("shared_expert_gate"):
            gate = linear(ctx, x, f"{prefix}.shared_gate", w.get(f"{prefix}.shared_gate.weight",
                                                                     (1, ctx.spec.hidden_size)),
                          ctx.settings.plan.format_for("moe.shared_gate", index))
            out = g.op("Mul", [out, g.op("Sigmoid", [gate])])
    return out


def _check_cuda_sizes(ctx: LayerContext, index: int, moe: MoeSpec) -> None:
    from builder.errors import UnsupportedModelError

    hidden, inter = ctx.spec.hidden_size, moe.intermediate_size
    if hidden % 64 or inter % 64:
        raise UnsupportedModelError(
            f"layers.{index}.moe: CUDA QMoE needs hidden size and expert intermediate size to be multiples of 64 "
            f"(CUTLASS K tile); this model has hidden {hidden}, intermediate {inter}. Export int4/int8 for -e cpu, or "
            "use -p fp16/bf16 for cuda.")


def _scaled(weight: Weight, factor: float) -> Weight:
    """fc2 (or its bias) times the routing scaling factor: the op's output is linear in fc2, so this multiplies
    the routed output by the factor without a node."""
    if factor == 1.0:
        return weight
    return RowMap(weight, lambda rows: rows * np.float32(factor), weight.shape)


def moe_block(ctx: LayerContext, x: ir.Value, index: int, moe: MoeSpec) -> ir.Value:
    """x [B, S, H] -> [B, S, H]: routed experts (one MoE/QMoE node) plus the shared expert. The op takes the 3-D
    hidden states as they are; only the router's [B, S, E] tensors are made 2-D (builder/layers/routing.py)."""
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    prefix = f"layers.{index}.moe"
    e, inter = moe.num_experts, moe.intermediate_size
    plan = ctx.settings.plan
    fmt = plan.format_for("moe.experts", index)
    feed = router_feed(ctx, x, index, moe, quantized=not fmt.is_float)
    attrs = dict(k=moe.top_k, **swiglu_attributes(moe, index), normalize_routing_weights=int(feed.normalize))
    scale = moe.routing.scaling_factor
    fc1_w, fc1_s = _expert_weights(ctx, f"{prefix}.fc1", w.get(f"{prefix}.fc1.weight", (e, 2 * inter, hidden)), fmt)
    fc2_w, fc2_s = _expert_weights(ctx, f"{prefix}.fc2", _scaled(w.get(f"{prefix}.fc2.weight", (e, hidden, inter)),
                                                                 scale), fmt)
    fc1_b = fc2_b = None
    if moe.expert_bias:
        fc1_b = ctx.float_initializer(f"{prefix}.fc1.bias", w.get(f"{prefix}.fc1.bias", (e, 2 * inter)))
        fc2_b = ctx.float_initializer(f"{prefix}.fc2.bias", _scaled(w.get(f"{prefix}.fc2.bias", (e, hidden)), scale))
    settings = ctx.settings
    if fmt.is_float:
        if feed.weights is not None:
            raise ValueError(f"layers.{index}.moe: the MoE op has no router_weights input")
        out = g.ms("MoE", [feed.expert_input, feed.probs, fc1_w, fc1_b, fc2_w, fc2_b], **attrs)
    else:
        inputs = [feed.expert_input, feed.probs, fc1_w, fc1_s, fc1_b, fc2_w, fc2_s, fc2_b, None, None, None, None,
                  None, None, feed.weights]
        while inputs[-1] is None:
            inputs.pop()
        layout = settings.qmoe_layout
        prepacked = layout.prepacked if settings.ep == "cuda" and layout.prepacked >= 0 else None
        if settings.ep == "cuda":
            _check_cuda_sizes(ctx, index, moe)
        out = g.ms("QMoE", inputs, expert_weight_bits=fmt.bits, block_size=fmt.block_size or None,
                   weights_prepacked=prepacked, **attrs)
    if feed.output_scale is not None:
        out = g.op("Mul", [out, feed.output_scale])
    if moe.shared_expert_size:
        out = g.op("Add", [out, _shared_expert(ctx, x, index, moe)])
    return out

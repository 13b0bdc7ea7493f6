"""Mixture-of-experts block through com.microsoft MoE (float experts) or QMoE (int4/int8 experts).

Shared by every MoE family. Canonical weights (see builder/spec.py): router [E, H] (+ bias), fc1 [E, 2I, H] with
gate/up rows interleaved (swiglu_fusion=1), fc2 [E, H, I], optional expert biases, optional shared expert.
Routing is the op's: softmax over all experts, top-k, renormalise. Families without renormalisation
(Qwen2-MoE norm_topk_prob=False) feed softmax probabilities as `router_weights`, because QMoE ignores
normalize_routing_weights=0 (see shared/reference/ort-ops.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.linear import QuantizedSource, linear
from builder.layers.mlp import gated_mlp
from builder.quant.plan import FLOAT, WeightFormat
from builder.spec import MlpSpec, MoeSpec
from builder.weights import Weight

EXPERT_BLOCK_BYTES = 64 * 1024 * 1024


class ExpertQuantSource(QuantizedSource):
    """Quantizes [E, N, K] expert weights a few experts at a time (the rows here are experts).

    Same streaming contract as QuantizedSource: packed codes (raw or CUDA-prepacked) stream to disk, the scales of
    the pass are handed to the writer once and then dropped, so nothing is held across layers.
    """

    def __init__(self, weight: Weight, bits: int, block_size: int, name: str, prepack_arch: int | None):
        super().__init__(weight, WeightFormat(bits, "default", block_size))
        self.name, self.prepack_arch = name, prepack_arch

    @property
    def block_bytes(self) -> int:
        return EXPERT_BLOCK_BYTES

    def _quantize_rows(self, span: tuple[int, int]):
        from builder.quant.cuda_layout import prepack_for_cuda
        from builder.quant.moe import quantize_experts

        q = quantize_experts(self.weight.rows(*span), bits=self.fmt.bits, block_size=self.fmt.block_size,
                             name=self.name)
        packed = q.packed if self.prepack_arch is None else prepack_for_cuda(q, arch=self.prepack_arch)
        return SimpleNamespace(packed=packed, scales=q.scales, zero_points=None)


def prepacked_layout(ctx: LayerContext) -> bool:
    """CUDA QMoE reads an omitted weights_prepacked as "already prepacked" (ORT 1.31), so auto ships prepacked bytes."""
    return ctx.settings.ep == "cuda" and ctx.settings.moe.prepacked != 0


def _expert_weights(ctx: LayerContext, name: str, weight: Weight) -> tuple[ir.Value, ir.Value | None]:
    """Float initializer, or (packed, scales) for QMoE."""
    moe = ctx.settings.moe
    if moe.bits is None:
        return ctx.float_initializer(name, weight), None
    e, n, k = weight.shape
    block = moe.block_size if moe.block_size > 0 else 0
    prepack = moe.prepack_arch if prepacked_layout(ctx) else None
    source = ExpertQuantSource(weight, moe.bits, block, name, prepack)
    # the CUTLASS layout is stored [E, K, N*bits/8], the shape ORT's own packers emit
    shape = (e, k, n * moe.bits // 8) if prepack else (e, n, k * moe.bits // 8)
    packed = ctx.g.streamed(f"{name}.qweight", ir.DataType.UINT8, shape, source.packed_blocks)
    scale_shape = (e, n, k // block) if block else (e, n)
    numpy_dtype = ctx.settings.numpy_dtype
    scales = ctx.g.streamed(f"{name}.scales", ctx.settings.ir_dtype, scale_shape,
                            lambda: iter([source.scales().astype(numpy_dtype)]))
    return packed, scales


def _shared_expert(ctx: LayerContext, flat: ir.Value, index: int, moe: MoeSpec) -> ir.Value:
    g, w = ctx.g, ctx.weights
    prefix = f"layers.{index}.moe"
    with g.scope("shared_expert"):
        out = gated_mlp(ctx, flat, f"{prefix}.shared", MlpSpec(moe.shared_expert_size), index, role="moe.shared")
    if moe.shared_expert_gated:
        with g.scope("shared_expert_gate"):
            gate = linear(ctx, flat, f"{prefix}.shared_gate", w.get(f"{prefix}.shared_gate.weight",
                                                                     (1, ctx.spec.hidden_size)), FLOAT)
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


def moe_block(ctx: LayerContext, x: ir.Value, index: int, moe: MoeSpec) -> ir.Value:
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    prefix = f"layers.{index}.moe"
    e, inter = moe.num_experts, moe.intermediate_size
    flat = g.op("Reshape", [x, g.ints("shape.flat_hidden", [-1, hidden])])
    with g.scope("router"):
        router_bias = w.get(f"{prefix}.router.bias", (e,)) if moe.router_bias else None
        logits = linear(ctx, flat, f"{prefix}.router", w.get(f"{prefix}.router.weight", (e, hidden)), FLOAT,
                        router_bias)
    fc1_w, fc1_s = _expert_weights(ctx, f"{prefix}.fc1", w.get(f"{prefix}.fc1.weight", (e, 2 * inter, hidden)))
    fc2_w, fc2_s = _expert_weights(ctx, f"{prefix}.fc2", w.get(f"{prefix}.fc2.weight", (e, hidden, inter)))
    fc1_b = fc2_b = None
    if moe.expert_bias:
        fc1_b = ctx.float_initializer(f"{prefix}.fc1.bias", w.get(f"{prefix}.fc1.bias", (e, 2 * inter)))
        fc2_b = ctx.float_initializer(f"{prefix}.fc2.bias", w.get(f"{prefix}.fc2.bias", (e, hidden)))
    attrs = dict(k=moe.top_k, activation_type="swiglu", swiglu_fusion=1,
                 swiglu_limit=float(moe.swiglu_limit) if moe.swiglu_limit is not None else None,
                 activation_alpha=float(moe.swiglu_alpha), activation_beta=float(moe.swiglu_beta),
                 normalize_routing_weights=int(moe.normalize_topk))
    settings = ctx.settings
    if settings.moe.bits is None:
        out = g.ms("MoE", [flat, logits, fc1_w, fc1_b, fc2_w, fc2_b], **attrs)
    else:
        router_weights = None
        if not moe.normalize_topk:
            router_weights = g.op("Softmax", [logits], axis=-1)
        inputs = [flat, logits, fc1_w, fc1_s, fc1_b, fc2_w, fc2_s, fc2_b, None, None, None, None, None, None,
                  router_weights]
        while inputs[-1] is None:
            inputs.pop()
        prepacked = settings.moe.prepacked if settings.ep == "cuda" and settings.moe.prepacked >= 0 else None
        if settings.ep == "cuda":
            _check_cuda_sizes(ctx, index, moe)
        out = g.ms("QMoE", inputs, expert_weight_bits=settings.moe.bits,
                   block_size=settings.moe.block_size if settings.moe.block_size > 0 else None,
                   weights_prepacked=prepacked, **attrs)
    if moe.shared_expert_size:
        out = g.op("Add", [out, _shared_expert(ctx, flat, index, moe)])
    return g.op("Reshape", [out, g.op("Shape", [x])])

"""RMSNorm as SimplifiedLayerNormalization, and the residual-add + RMSNorm fusion SkipSimplifiedLayerNormalization.

The residual-stream norms follow ModelSpec.norm_kind (stream_norm / skip_stream_norm): RMSNorm, or LayerNorm with a
bias (LayerNormalization / SkipLayerNormalization, Nemotron). Per-head q/k norms are always RMSNorm.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext
from builder.weights import offset_weight


def norm_weight(ctx: LayerContext, name: str, size: int | None = None) -> ir.Value:
    """The norm's gamma in the model dtype, with the family's weight offset (Gemma: 1 + w) folded in float32."""
    size = ctx.spec.hidden_size if size is None else size
    weight = offset_weight(ctx.weights.get(name, (size,)), ctx.spec.norm_weight_offset)
    return ctx.float_initializer(name, weight)


def rms_norm(ctx: LayerContext, x: ir.Value, name: str, size: int | None = None) -> ir.Value:
    """RMSNorm over the last axis of x (size = that axis' length, hidden size by default)."""
    return ctx.g.op("SimplifiedLayerNormalization", [x, norm_weight(ctx, name, size)], axis=-1,
                    epsilon=ctx.spec.norm_eps, stash_type=1)


def weightless_rms_norm(ctx: LayerContext, x: ir.Value, size: int) -> ir.Value:
    """RMSNorm over the last axis (of length `size`) with no learned scale: a ones weight shared by every use."""
    ones = ctx.g.shared_constant(f"const.ones.{size}", np.ones(size, dtype=ctx.settings.numpy_dtype))
    return ctx.g.op("SimplifiedLayerNormalization", [x, ones], axis=-1, epsilon=ctx.spec.norm_eps, stash_type=1)


def skip_rms_norm(ctx: LayerContext, x: ir.Value, skip: ir.Value, name: str,
                  bias: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """(rms_norm(x + skip + bias), x + skip + bias): the op's bias input takes a sublayer's output bias in the same
    kernel (see residual.Biased)."""
    inputs = [x, skip, norm_weight(ctx, name)] + ([bias] if bias is not None else [])
    out = ctx.g.ms("SkipSimplifiedLayerNormalization", inputs, outputs=4, epsilon=ctx.spec.norm_eps)
    return out[0], out[3]


def _layer_norm_params(ctx: LayerContext, prefix: str) -> tuple[ir.Value, ir.Value]:
    if ctx.spec.norm_kind != "layer":
        raise ValueError(f"unknown norm kind {ctx.spec.norm_kind!r}")
    bias = ctx.float_initializer(f"{prefix}.bias", ctx.weights.get(f"{prefix}.bias", (ctx.spec.hidden_size,)))
    return norm_weight(ctx, f"{prefix}.weight"), bias


def stream_norm(ctx: LayerContext, x: ir.Value, prefix: str) -> ir.Value:
    """The model's residual-stream norm (spec.norm_kind) over the hidden axis; weights {prefix}.weight (/.bias)."""
    if ctx.spec.norm_kind == "rms":
        return rms_norm(ctx, x, f"{prefix}.weight")
    weight, bias = _layer_norm_params(ctx, prefix)
    return ctx.g.op("LayerNormalization", [x, weight, bias], axis=-1, epsilon=ctx.spec.norm_eps, stash_type=1)


def skip_stream_norm(ctx: LayerContext, x: ir.Value, skip: ir.Value, prefix: str,
                     bias: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """(stream_norm(x + skip + bias), x + skip + bias); `bias` (optional) is a sublayer's output bias."""
    if ctx.spec.norm_kind == "rms":
        return skip_rms_norm(ctx, x, skip, f"{prefix}.weight", bias)
    weight, beta = _layer_norm_params(ctx, prefix)
    inputs = [x, skip, weight, beta] + ([bias] if bias is not None else [])
    out = ctx.g.ms("SkipLayerNormalization", inputs, outputs=4, epsilon=ctx.spec.norm_eps)
    return out[0], out[3]

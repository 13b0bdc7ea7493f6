"""RMSNorm as SimplifiedLayerNormalization, and the residual-add + RMSNorm fusion SkipSimplifiedLayerNormalization."""

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


def skip_rms_norm(ctx: LayerContext, x: ir.Value, skip: ir.Value, name: str) -> tuple[ir.Value, ir.Value]:
    """(rms_norm(x + skip), x + skip)."""
    out = ctx.g.ms("SkipSimplifiedLayerNormalization", [x, skip, norm_weight(ctx, name)], outputs=4,
                   epsilon=ctx.spec.norm_eps)
    return out[0], out[3]

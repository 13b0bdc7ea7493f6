"""Token embedding lookup: float Gather, or GatherBlockQuantized over a block-quantized table.

The quantized table is stored in the MatMulNBits byte layout flattened to 2-D ([V, blocks * block_size * bits/8],
quantized along the hidden axis, K padded to whole blocks exactly as MatMulNBits pads it), so a tied lm_head can
read the very same initializer through a Reshape (see lm_head.py) and the bytes are stored once. When the hidden
size is not a multiple of the block size the gathered rows carry the padding, which a Slice drops.
The optional Gemma-style scale is applied after the lookup, in the model dtype (a tied lm_head must not see it).
"""

from __future__ import annotations

import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.linear import add_quantized_weight
from builder.quant.plan import WeightFormat

TABLE = "embed"  # initializer prefix of the quantized table: embed.qweight / embed.scales / embed.zero_points


def quantized_table(ctx: LayerContext, fmt: WeightFormat) -> tuple[ir.Value, ir.Value, ir.Value | None]:
    """(packed [V, padded_H*bits/8], scales [V, blocks], zero points or None) of the embedding, registered once."""
    g = ctx.g
    if g.has_initializer(f"{TABLE}.qweight"):
        zero_points = g.initializer(f"{TABLE}.zero_points") if g.has_initializer(f"{TABLE}.zero_points") else None
        return g.initializer(f"{TABLE}.qweight"), g.initializer(f"{TABLE}.scales"), zero_points
    spec = ctx.spec
    weight = ctx.weights.get("embed.weight", (spec.vocab_size, spec.hidden_size))
    return add_quantized_weight(ctx, TABLE, weight, fmt, flat=True)


def _padded_hidden(hidden: int, block_size: int) -> int:
    return -(-hidden // block_size) * block_size


def embedding(ctx: LayerContext, input_ids: ir.Value) -> ir.Value:
    spec, g = ctx.spec, ctx.g
    fmt = ctx.settings.plan.format_for("embed")
    with g.scope("embed_tokens"):
        if fmt.is_float:
            weight = ctx.weights.get("embed.weight", (spec.vocab_size, spec.hidden_size))
            h = g.op("Gather", [ctx.float_initializer("embed.weight", weight), input_ids], axis=0)
        else:
            packed, scales, zero_points = quantized_table(ctx, fmt)
            inputs = [packed, input_ids, scales] + ([zero_points] if zero_points is not None else [])
            h = g.ms("GatherBlockQuantized", inputs, gather_axis=0, quantize_axis=1, block_size=fmt.block_size,
                     bits=fmt.bits)
            if _padded_hidden(spec.hidden_size, fmt.block_size) != spec.hidden_size:
                h = g.op("Slice", [h, g.ints("const.0", [0]), g.ints(f"const.{spec.hidden_size}", [spec.hidden_size]),
                                   g.ints("const.axis_last", [-1])])
        if spec.embedding_scale is not None:
            h = g.op("Mul", [h, ctx.scalar("embed.scale", spec.embedding_scale)])
    return h

"""Final projection to vocabulary logits (tied or own weight), with optional logit scaling (Granite divides by
logits_scaling) and final logit softcapping.

A float lm_head is one com.microsoft FusedMatMul with transB=1 over the [vocab, hidden] weight as stored: a tied
head shares the embedding initializer, nothing is transposed in memory, and the [batch, sequence, hidden] input needs
no flattening (a Gemm would: Reshape in, then Shape/Slice/Concat/Reshape out, five more nodes every decode step).
A quantized head is MatMulNBits, which takes the 3-D input as it is. When the plan says a
tied head shares the quantized embedding (quantize_embeddings=true), its B input is the embedding's packed table
reshaped to [V, blocks, block_size*bits/8] (same bytes, stored once; ORT folds the Reshape at load) and its scales
and zero points are the embedding's own initializers. On CUDA a 4-bit head with its own table is stored in the
fpA_intB layout (ExportSettings.lm_head_prepacked, decided in builder/quant/cuda_layout.py's head_prepack_blocker).
"""

from __future__ import annotations

import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.embedding import quantized_table
from builder.layers.linear import linear, matmul_nbits, quantized_shapes


def _shared_quantized_head(ctx: LayerContext, x: ir.Value, bias: ir.Value | None) -> ir.Value:
    g, spec = ctx.g, ctx.spec
    fmt = ctx.settings.plan.format_for("embed")
    packed, scales, zero_points = quantized_table(ctx, fmt)
    b_shape, _, _ = quantized_shapes(spec.vocab_size, spec.hidden_size, fmt)
    b = g.op("Reshape", [packed, g.ints("shape.lm_head.qweight", list(b_shape))])
    return matmul_nbits(ctx, x, (b, scales, zero_points), spec.vocab_size, spec.hidden_size, fmt, bias)


def lm_head(ctx: LayerContext, x: ir.Value) -> ir.Value:
    g, spec, plan = ctx.g, ctx.spec, ctx.settings.plan
    name = "embed" if spec.tie_embeddings else "lm_head"
    weight = ctx.weights.get(f"{name}.weight", (spec.vocab_size, spec.hidden_size))
    bias = ctx.weights.get("lm_head.bias", (spec.vocab_size,)) if spec.lm_head_bias else None
    fmt = plan.format_for("lm_head")
    with g.scope("lm_head"):
        if fmt.is_float:
            table = ctx.float_initializer(f"{name}.weight", weight)
            logits = g.ms("FusedMatMul", [x, table], transB=1, alpha=1.0)
            if bias is not None:
                logits = g.op("Add", [logits, ctx.float_initializer("lm_head.bias", bias)])
        elif plan.shares_embedding and spec.tie_embeddings:
            b = ctx.float_initializer("lm_head.bias", bias) if bias is not None else None
            logits = _shared_quantized_head(ctx, x, b)
        else:
            logits = linear(ctx, x, "lm_head", weight, fmt, bias, prepacked=ctx.settings.lm_head_prepacked)
        if spec.logits_divisor != 1.0:
            logits = g.op("Div", [logits, ctx.scalar("logits_divisor", spec.logits_divisor)])
        if spec.final_softcap:
            cap = ctx.scalar("final_softcap", spec.final_softcap)
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap])]), cap])
    return logits

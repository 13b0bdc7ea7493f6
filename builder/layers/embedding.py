"""Token embedding lookup (float Gather), with the optional Gemma-style scale applied in the model dtype."""

from __future__ import annotations

import onnx_ir as ir

from builder.layers import LayerContext


def embedding(ctx: LayerContext, input_ids: ir.Value) -> ir.Value:
    spec = ctx.spec
    weight = ctx.weights.get("embed.weight", (spec.vocab_size, spec.hidden_size))
    table = ctx.float_initializer("embed.weight", weight)
    with ctx.g.scope("embed_tokens"):
        h = ctx.g.op("Gather", [table, input_ids], axis=0)
        if spec.embedding_scale is not None:
            h = ctx.g.op("Mul", [h, ctx.scalar("embed.scale", spec.embedding_scale)])
    return h

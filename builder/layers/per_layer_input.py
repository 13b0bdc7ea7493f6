"""Per-layer input embeddings (Gemma 4 "PLE", hidden_size_per_layer_input > 0).

Besides the residual stream, every decoder layer receives a small vector of its own ([B, S, P] for layer i),
computed once per step from two sources and combined:
    token part    per_layer.embed[input_ids] * sqrt(P)                      (a second, packed [V, L*P] table)
    context part  rms_norm_P(per_layer.projection(embeds) / sqrt(hidden))   (from the scaled main embeddings)
    inputs        (context + token) / sqrt(2), viewed as [B, S, L, P]
At the end of layer i (after the feed-forward residual add), the layer mixes its slice back in:
    h + norm(projection_i(act(gate_i(h)) * inputs[:, :, i])).
Scales are applied in the model dtype, as transformers does.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.linear import linear
from builder.layers.mlp import activation
from builder.layers.norm import rms_norm


def per_layer_inputs(ctx: LayerContext, input_ids: ir.Value, embeds: ir.Value) -> ir.Value:
    """[B, S, layers, P] per-layer inputs from the token ids and the (scaled) main embeddings."""
    g, spec, w = ctx.g, ctx.spec, ctx.weights
    size, layers, hidden = spec.per_layer_input_size, spec.num_layers, spec.hidden_size
    packed = layers * size
    shape = g.ints(f"shape.per_layer.{layers}.{size}", [0, 0, layers, size])
    with g.scope("per_layer_inputs"):
        if not ctx.settings.plan.format_for("per_layer.embed").is_float:
            raise ValueError("per_layer.embed: only a float table is wired (the plan keeps it float)")
        table = ctx.float_initializer("per_layer.embed.weight",
                                      w.get("per_layer.embed.weight", (spec.per_layer_vocab_size, packed)))
        with g.scope("embed"):
            tokens = g.op("Gather", [table, input_ids], axis=0)
            tokens = g.op("Mul", [tokens, ctx.scalar("per_layer.embed.scale", math.sqrt(size))])
            tokens = g.op("Reshape", [tokens, shape])
        with g.scope("projection"):
            context = linear(ctx, embeds, "per_layer.projection",
                             w.get("per_layer.projection.weight", (packed, hidden)),
                             ctx.settings.plan.format_for("per_layer.projection"))
            context = g.op("Mul", [context, ctx.scalar("per_layer.projection.scale", hidden ** -0.5)])
            context = g.op("Reshape", [context, shape])
        with g.scope("projection_norm"):
            context = rms_norm(ctx, context, "per_layer.projection_norm.weight", size=size)
        combined = g.op("Add", [context, tokens])
        return g.op("Mul", [combined, ctx.scalar("per_layer.combine.scale", 2.0 ** -0.5)])


def per_layer_block(ctx: LayerContext, hidden: ir.Value, layer: int, inputs: ir.Value) -> ir.Value:
    """The amount layer `layer` adds to `hidden` ([B, S, hidden]) from its slice of the per-layer inputs."""
    g, spec, w = ctx.g, ctx.spec, ctx.weights
    size, prefix = spec.per_layer_input_size, f"layers.{layer}.per_layer"
    plan = ctx.settings.plan
    with g.scope("gate"):
        gate = linear(ctx, hidden, f"{prefix}.gate", w.get(f"{prefix}.gate.weight", (size, spec.hidden_size)),
                      plan.format_for("per_layer.gate", layer))
    own = g.op("Gather", [inputs, g.constant(f"{prefix}.index", np.array(layer, np.int64))], axis=2)
    mixed = g.op("Mul", [activation(ctx, gate, spec.per_layer_activation), own])
    with g.scope("projection"):
        out = linear(ctx, mixed, f"{prefix}.projection",
                     w.get(f"{prefix}.projection.weight", (spec.hidden_size, size)),
                     plan.format_for("per_layer.projection", layer))
    with g.scope("norm"):
        return rms_norm(ctx, out, f"{prefix}.norm.weight")


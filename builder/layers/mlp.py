"""Gated MLP: down(act(gate(x)) * up(x)), with gate and up fused into one projection."""

from __future__ import annotations

import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.linear import linear
from builder.spec import MlpSpec
from builder.weights import Concatenated


GATED = ("silu", "gelu_tanh", "gelu")  # the activations gated MLPs compute: act(gate(x)) * up(x)


def activation(ctx: LayerContext, x: ir.Value, kind: str) -> ir.Value:
    g = ctx.g
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    if kind == "gelu_tanh":
        return g.op("Gelu", [x], approximate="tanh")
    if kind == "gelu":
        return g.op("Gelu", [x])
    from builder.errors import UnsupportedModelError

    raise UnsupportedModelError(f"activation {kind!r} is not computed by the gated MLP layer (it computes "
                                f"{', '.join(GATED)}).")


def gated_mlp(ctx: LayerContext, x: ir.Value, prefix: str, mlp: MlpSpec, layer: int | None,
              role: str = "mlp") -> ir.Value:
    """prefix is the canonical weight prefix, e.g. "layers.3.mlp" (weights .gate/.up/.down)."""
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    inter = mlp.intermediate_size
    gate = w.get(f"{prefix}.gate.weight", (inter, hidden))
    up = w.get(f"{prefix}.up.weight", (inter, hidden))
    bias = None
    if mlp.bias:
        bias = Concatenated((w.get(f"{prefix}.gate.bias", (inter,)), w.get(f"{prefix}.up.bias", (inter,))))
    plan = ctx.settings.plan
    with g.scope("gate_up_proj"):
        gate_up = linear(ctx, x, f"{prefix}.gate_up", Concatenated((gate, up)), plan.format_for(f"{role}.gate", layer),
                         bias)
    gate_out, up_out = g.op("Split", [gate_up], axis=-1, num_outputs=2, outputs=2)
    hidden_act = g.op("Mul", [activation(ctx, gate_out, mlp.activation), up_out])
    down_bias = w.get(f"{prefix}.down.bias", (hidden,)) if mlp.bias else None
    with g.scope("down_proj"):
        return linear(ctx, hidden_act, f"{prefix}.down", w.get(f"{prefix}.down.weight", (hidden, inter)),
                      plan.format_for(f"{role}.down", layer), down_bias)

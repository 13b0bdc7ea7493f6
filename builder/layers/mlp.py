"""Gated MLP: down(act(gate(x)) * up(x)), with gate and up fused into one projection (as stored when the checkpoint
stores them fused, gate rows first); or, when MlpSpec.gated is False, the plain two-projection MLP down(act(up(x)))
(Nemotron's squared ReLU)."""

from __future__ import annotations

import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.linear import linear
from builder.spec import MlpSpec
from builder.weights import Concatenated


GATED = ("silu", "gelu_tanh", "gelu")  # the activations of gated MLPs (and per-expert experts): act(gate(x)) * up(x)
ACTIVATIONS = (*GATED, "relu2")  # relu2: Nemotron's squared ReLU, plain (non-gated) MLPs


def activation(ctx: LayerContext, x: ir.Value, kind: str) -> ir.Value:
    g = ctx.g
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    if kind == "gelu_tanh":
        return g.op("Gelu", [x], approximate="tanh")
    if kind == "gelu":
        return g.op("Gelu", [x])
    if kind == "relu2":
        relu = g.op("Relu", [x])
        return g.op("Mul", [relu, relu])
    from builder.errors import UnsupportedModelError

    raise UnsupportedModelError(f"activation {kind!r} is not computed by the MLP layer (it computes "
                                f"{', '.join(ACTIVATIONS)}).")


def gated_mlp(ctx: LayerContext, x: ir.Value, prefix: str, mlp: MlpSpec, layer: int | None,
              role: str = "mlp") -> ir.Value:
    """prefix is the canonical weight prefix, e.g. "layers.3.mlp" (weights .gate/.up/.down)."""
    if not mlp.gated:
        return _plain_mlp(ctx, x, prefix, mlp, layer, role)
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    inter = mlp.intermediate_size
    if f"{prefix}.gate_up.weight" in w:  # stored fused (Phi-3): read as it is
        gate_up_weight = w.get(f"{prefix}.gate_up.weight", (2 * inter, hidden))
    else:
        gate_up_weight = Concatenated((w.get(f"{prefix}.gate.weight", (inter, hidden)),
                                       w.get(f"{prefix}.up.weight", (inter, hidden))))
    bias = None
    if mlp.bias:
        bias = Concatenated((w.get(f"{prefix}.gate.bias", (inter,)), w.get(f"{prefix}.up.bias", (inter,))))
    plan = ctx.settings.plan
    with g.scope("gate_up_proj"):
        gate_up = linear(ctx, x, f"{prefix}.gate_up", gate_up_weight, plan.format_for(f"{role}.gate", layer), bias)
    gate_out, up_out = g.op("Split", [gate_up], axis=-1, num_outputs=2, outputs=2)
    hidden_act = g.op("Mul", [activation(ctx, gate_out, mlp.activation), up_out])
    down_bias = w.get(f"{prefix}.down.bias", (hidden,)) if mlp.bias else None
    with g.scope("down_proj"):
        return linear(ctx, hidden_act, f"{prefix}.down", w.get(f"{prefix}.down.weight", (hidden, inter)),
                      plan.format_for(f"{role}.down", layer), down_bias)


def _plain_mlp(ctx: LayerContext, x: ir.Value, prefix: str, mlp: MlpSpec, layer: int | None, role: str) -> ir.Value:
    g, w, hidden, plan = ctx.g, ctx.weights, ctx.spec.hidden_size, ctx.settings.plan
    inter = mlp.intermediate_size
    with g.scope("up_proj"):
        up = linear(ctx, x, f"{prefix}.up", w.get(f"{prefix}.up.weight", (inter, hidden)),
                    plan.format_for(f"{role}.up", layer), w.get(f"{prefix}.up.bias", (inter,)) if mlp.bias else None)
    with g.scope("down_proj"):
        return linear(ctx, activation(ctx, up, mlp.activation), f"{prefix}.down",
                      w.get(f"{prefix}.down.weight", (hidden, inter)), plan.format_for(f"{role}.down", layer),
                      w.get(f"{prefix}.down.bias", (hidden,)) if mlp.bias else None)

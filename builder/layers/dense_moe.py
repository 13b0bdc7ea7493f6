"""A dense MLP and a mixture of experts side by side (Gemma 4 enable_moe_block), with experts computed per expert.

    out = mlp.post_norm(mlp(x)) + moe.post_norm(experts(moe.pre_norm(residual)))
    routing: softmax(router(rms(residual))) -> top-k -> renormalised (the family folds router input scales into the
    router weight and per-expert output scales into fc2)

Why not the fused MoE/QMoE op: Gemma 4 experts are GeGLU (gelu_tanh(gate) * up), and ONNX Runtime 1.31.1's MoE
and QMoE kernels reject activation_type="geglu" ("Unsupported MoE activation type: geglu", measured on the CPU EP
and on the CUDA EP of onnxruntime-gpu 1.31.1 on an H100); SwiGLU is the only gated activation. The op also routes
on its own input, while Gemma 4 routes on a different tensor than the experts see. So each expert is
a small subgraph over only the tokens routed to it (NonZero -> Gather -> gated MLP -> ScatterND): exact, compute
proportional to top_k, quantized through the same MatMulNBits path as every other projection.

Combining: token t's j-th pick writes its weighted expert output to row t * k + j of a [T * k, H] buffer; every
(t, j) has exactly one expert, so the scatters never collide and need no reduction, and one ReduceSum over the k
picks gives the output. (A ScatterND with reduction="add" into [T, H] would need no buffer, but ONNX Runtime's CPU
kernel has no float16/bfloat16 add reduction: "MLFloat16 data type is not supported with ScatterND opset 16 when
reduction is 'add'", onnxruntime 1.31.1 and 1.32.0.) ONNX TopK has no bfloat16 type, so a bfloat16 model's router
selects in float32, as every router does (builder/layers/routing.py COMPUTE_DTYPES).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from builder.errors import UnsupportedModelError
from builder.layers import LayerContext
from builder.layers.linear import linear
from builder.layers.mlp import GATED, activation, gated_mlp
from builder.layers.norm import rms_norm, weightless_rms_norm
from builder.layers.routing import router_compute
from builder.spec import DenseMoeSpec, MoeSpec, RoutingSpec
from builder.weights import Weight, WholeMap


@dataclass(frozen=True)
class ExpertSlice:
    """Expert `index` of a stacked [E, N, K] weight as an [N, K] weight (reads that expert only)."""

    source: Weight
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape[1:])

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.source.rows(self.index, self.index + 1)[0][start:stop]


def expert_matrix(source: Weight, index: int) -> Weight:
    """Expert `index`'s [N, K] matrix (fc1 arrives as [gate; up] rows, so one MatMul feeds a Split). WholeMap keeps
    the matrix for one scan, so a writer reading it in row blocks reads the expert once, not once per block."""
    return WholeMap(ExpertSlice(source, index), np.asarray, tuple(source.shape[1:]))


def _routing(ctx: LayerContext, router_input: ir.Value, index: int, moe: MoeSpec) -> tuple[ir.Value, ir.Value]:
    """(top-k weights [T * k], top-k expert ids [T * k]), pick j of token t at t * k + j, from softmax over all
    experts."""
    g, w = ctx.g, ctx.weights
    prefix = f"layers.{index}.moe"
    bias = w.get(f"{prefix}.router.bias", (moe.num_experts,)) if moe.router_bias else None
    logits = linear(ctx, router_input, f"{prefix}.router",
                    w.get(f"{prefix}.router.weight", (moe.num_experts, ctx.spec.hidden_size)),
                    ctx.settings.plan.format_for("moe.router", index), bias)
    c = router_compute(ctx)  # float32 for a bfloat16 model: TopK has no bfloat16 (routing.COMPUTE_DTYPES)
    probs = g.op("Softmax", [c.widen(logits)], axis=-1)
    top_w, top_i = g.op("TopK", [probs, g.ints(f"const.topk.{moe.top_k}", [moe.top_k])], axis=-1, outputs=2)
    if moe.routing.normalize_topk:
        top_w = g.op("Div", [top_w, g.op("ReduceSum", [top_w, g.ints("const.axis_last", [-1])], keepdims=1)])
    flat = g.ints("const.flat", [-1])
    return g.op("Reshape", [c.io(top_w), flat]), g.op("Reshape", [top_i, flat])


def _expert(ctx: LayerContext, x: ir.Value, picks: ir.Value, top_w: ir.Value, top_i: ir.Value, index: int,
            expert: int, moe: MoeSpec) -> ir.Value:
    """`picks` [T * k, H] with this expert's weighted output written at the picks routed to it."""
    g, w, hidden, inter = ctx.g, ctx.weights, ctx.spec.hidden_size, moe.intermediate_size
    prefix = f"layers.{index}.moe"
    fmt = ctx.settings.plan.format_for("moe.experts", index)
    expert_id = g.shared_constant(f"const.expert.{expert}", np.array(expert, np.int64))
    slots = g.op("Reshape", [g.op("NonZero", [g.op("Equal", [top_i, expert_id])]), g.ints("const.flat", [-1])])
    rows = g.op("Div", [slots, g.shared_constant(f"const.topk.{moe.top_k}.i64", np.array(moe.top_k, np.int64))])
    tokens = g.op("Gather", [x, rows], axis=0)
    fc1 = expert_matrix(w.get(f"{prefix}.fc1.weight", (moe.num_experts, 2 * inter, hidden)), expert)
    with g.scope("gate_up_proj"):
        gate_up = linear(ctx, tokens, f"{prefix}.experts.{expert}.gate_up", fc1, fmt)
    gate, up = g.op("Split", [gate_up], axis=-1, num_outputs=2, outputs=2)
    fc2 = expert_matrix(w.get(f"{prefix}.fc2.weight", (moe.num_experts, hidden, inter)), expert)
    with g.scope("down_proj"):
        y = linear(ctx, g.op("Mul", [activation(ctx, gate, moe.activation), up]),
                   f"{prefix}.experts.{expert}.down", fc2, fmt)
    axis1 = g.ints("const.axis1", [1])
    y = g.op("Mul", [y, g.op("Unsqueeze", [g.op("Gather", [top_w, slots], axis=0), axis1])])
    return g.op("ScatterND", [picks, g.op("Unsqueeze", [slots, axis1]), y])


def routed_experts(ctx: LayerContext, x: ir.Value, router_input: ir.Value, index: int, moe: MoeSpec) -> ir.Value:
    """Mixture of experts over x [B, S, H], routed on router_input [B, S, H]; returns [B, S, H]."""
    if moe.routing != RoutingSpec(normalize_topk=moe.routing.normalize_topk):
        raise UnsupportedModelError(f"layers.{index}.moe: per-expert experts route by softmax top-k only; the spec "
                                    f"asks for {moe.routing}.")
    if moe.expert_bias or moe.shared_expert_size or moe.swiglu_limit is not None or moe.activation not in GATED:
        raise UnsupportedModelError(f"layers.{index}.moe: per-expert experts compute {', '.join(GATED)} gated MLPs "
                                    "without biases, shared experts or clamping; this spec asks for more (activation "
                                    f"{moe.activation!r}). Such experts go through the fused MoE/QMoE op (MoeSpec).")
    g, hidden, k = ctx.g, ctx.spec.hidden_size, moe.top_k
    flat_shape = g.ints("shape.flat_hidden", [-1, hidden])
    flat = g.op("Reshape", [x, flat_shape])
    with g.scope("router"):
        top_w, top_i = _routing(ctx, g.op("Reshape", [router_input, flat_shape]), index, moe)
    picks = g.op("Expand", [ctx.scalar("const.zero", 0.0),
                            g.op("Concat", [g.op("Shape", [top_w]), g.ints(f"const.dim.{hidden}", [hidden])], axis=0)])
    for expert in range(moe.num_experts):
        with g.scope(f"experts.{expert}"):
            picks = _expert(ctx, flat, picks, top_w, top_i, index, expert, moe)
    per_pick = g.op("Reshape", [picks, g.ints(f"shape.picks.{k}.{hidden}", [-1, k, hidden])])
    out = g.op("ReduceSum", [per_pick, g.ints("const.axis1", [1])], keepdims=0)
    return g.op("Reshape", [out, g.op("Shape", [x])])


def dense_moe_block(ctx: LayerContext, x: ir.Value, residual: ir.Value, index: int, spec: DenseMoeSpec) -> ir.Value:
    """x = ffn_norm(residual). Returns the sum of both branches (the caller applies the layer's post-FFN norm)."""
    g = ctx.g
    with g.scope("mlp"):
        dense = gated_mlp(ctx, x, f"layers.{index}.mlp", spec.mlp, index)
    with g.scope("mlp_post_norm"):
        dense = rms_norm(ctx, dense, f"layers.{index}.mlp.post_norm.weight")
    with g.scope("moe"):
        with g.scope("pre_norm"):
            expert_input = rms_norm(ctx, residual, f"layers.{index}.moe.pre_norm.weight")
        with g.scope("router_norm"):
            router_input = weightless_rms_norm(ctx, residual, ctx.spec.hidden_size)
        experts = routed_experts(ctx, expert_input, router_input, index, spec.moe)
        with g.scope("post_norm"):
            experts = rms_norm(ctx, experts, f"layers.{index}.moe.post_norm.weight")
    return g.op("Add", [dense, experts])

"""Routing as data: a RoutingSpec turned into the router inputs of com.microsoft MoE / QMoE, so the experts of every
MoE family still run in one fused op.

What the ops do with their router inputs (measured on the CPU EP of onnxruntime 1.31.1 and 1.32.0 by
tests/test_routing_op.py; scripts/moe_routing_check.py runs the same cases on CUDA):
  MoE   router_probs [T, E] -> softmax over all experts -> top-k -> weights = those probabilities, renormalised over
        the k when normalize_routing_weights=1. It has no router_weights input.
  QMoE  router_probs selects the top-k only; with router_weights [T, E] the weights are router_weights gathered at the
        selected experts, renormalised over the k when normalize_routing_weights=1 and used as they are when 0.
        Without router_weights the weights are the softmax of the k selected router_probs (always renormalised).
  The CUDA QMoE of onnxruntime-gpu 1.31.1 (H200) honours neither router_weights nor normalize_routing_weights=0: it
  always weights by the renormalised softmax of the selected router_probs (every router_weights row failed there,
  rel. error 0.3-0.66, while the same rows pass on CPU); MoE on CUDA behaves as on CPU.
Both take a 3-D input [B, S, H] and return [B, S, H], but router_probs / router_weights must be 2-D, so the graph
keeps the hidden states 3-D and reshapes only the [B, S, E] router tensors (a Reshape to a constant shape).

So the router computes in [B, S, E] (elementwise, any rank) and hands the op:
  QMoE with router_weights (ExportSettings.qmoe_router_weights: the CPU kernel): selection scores as router_probs,
         the scores to weight with as router_weights, normalize = normalize_topk.
  MoE, and QMoE on CUDA: one tensor for both: log-weights at the k selected experts and the lowest float elsewhere;
         its softmax over the selection is w_i / sum_k w_j, exactly the renormalised weights. Without
         renormalisation the op's output is multiplied by sum_k w_j afterwards (`output_scale`).
ONNX TopK has no bfloat16 type, so a bfloat16 model's router casts its logits to float32 once, computes the selection
(and the weights) in float32 and casts the op's inputs back (COMPUTE_DTYPES); float16 and float32 models compute in
their own dtype.
The scaling factor (routed_scaling_factor) is folded into the experts' fc2 by the MoE layer (the output is linear in
fc2), so it costs no node. A top-1 router whose weight multiplies the expert input (Llama 4) scales the op's input by
it and lets the op weight the single expert by exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from builder.errors import UnsupportedModelError
from builder.layers import LayerContext
from builder.layers.linear import linear
from builder.spec import MoeSpec, RoutingSpec

SCORINGS = ("softmax", "sigmoid", "sparsemixer")


# model dtype -> the dtype routers compute in: ONNX TopK has no bfloat16 (ONNX Runtime refuses to load such a graph:
# "Type 'tensor(bfloat16)' of input parameter ... of operator (TopK) ... is invalid"), so a bfloat16 model's router
# works in float32; every other dtype computes in its own
COMPUTE_DTYPES = {ir.DataType.BFLOAT16: ir.DataType.FLOAT}


@dataclass(frozen=True)
class RouterCompute:
    """The dtype a router computes its scores in (COMPUTE_DTYPES, or float32 for a float32_logits routing) and its
    constants in that dtype; `io` casts what it hands the op (or multiplies the op's output with) back to the model
    dtype. `wide_logits`: the logits themselves come out of the router's MatMul in that dtype (float32_logits)."""

    ctx: LayerContext
    dtype: ir.DataType
    wide_logits: bool = False

    @property
    def widened(self) -> bool:
        return self.dtype != self.ctx.settings.ir_dtype

    def scalar(self, name: str, value: float) -> ir.Value:
        if not self.widened:
            return self.ctx.scalar(name, value)
        return self.ctx.g.shared_constant(f"{name}.{self.dtype.name.lower()}", np.array(value, self.dtype.numpy()))

    def lowest(self) -> ir.Value:
        """The lowest finite value of the model dtype (exact in a wider dtype): a score no expert is selected with,
        whose exp is 0, and which survives the cast back."""
        return self.scalar("const.lowest", float(ml_dtypes.finfo(self.ctx.settings.numpy_dtype).min))

    def widen(self, value: ir.Value) -> ir.Value:
        return self.ctx.g.op("Cast", [value], to=self.dtype) if self.widened else value

    def widen_logits(self, logits: ir.Value) -> ir.Value:
        return logits if self.wide_logits else self.widen(logits)

    def io_logits(self, value: ir.Value) -> ir.Value:
        """A tensor computed from the logits alone (in their dtype), handed to the op in the model dtype."""
        return self.io(value) if self.wide_logits else value

    def io(self, value: ir.Value | None) -> ir.Value | None:
        if value is None or not self.widened:
            return value
        return self.ctx.g.op("Cast", [value], to=self.ctx.settings.ir_dtype)


def router_compute(ctx: LayerContext, routing: RoutingSpec | None = None) -> RouterCompute:
    if routing is not None and routing.float32_logits:
        return RouterCompute(ctx, ir.DataType.FLOAT, wide_logits=True)
    return RouterCompute(ctx, COMPUTE_DTYPES.get(ctx.settings.ir_dtype, ctx.settings.ir_dtype))


@dataclass
class RouterFeed:
    """What the fused op is given: its input, router_probs (2-D), router_weights (2-D, QMoE only), the
    normalize_routing_weights attribute, and a [B, S, 1] factor for the op's output (None: none)."""

    expert_input: ir.Value
    probs: ir.Value
    weights: ir.Value | None
    normalize: bool
    output_scale: ir.Value | None = None


def check_routing(moe: MoeSpec, index: int) -> None:
    """Refuse a RoutingSpec the graph cannot compute exactly (names the layer and the field)."""
    r = moe.routing

    def refuse(why: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"layers.{index}.moe.routing: {why}")

    if r.scoring not in SCORINGS:
        raise refuse(f"scoring {r.scoring!r} is not computed (supported: {', '.join(SCORINGS)}).")
    if r.n_group < 1 or moe.num_experts % r.n_group or not 1 <= r.topk_group <= r.n_group:
        raise refuse(f"n_group={r.n_group}, topk_group={r.topk_group} do not split {moe.num_experts} experts into "
                     "equal groups with 1 <= topk_group <= n_group.")
    if _grouped(r) and moe.num_experts // r.n_group < 2:
        raise refuse(f"groups of {moe.num_experts // r.n_group} expert cannot be ranked by their top-2 scores.")
    if _grouped(r) and moe.top_k > r.topk_group * (moe.num_experts // r.n_group):
        raise refuse(f"top_k={moe.top_k} is more than the {r.topk_group} groups kept hold.")
    if r.weight_on_input and (moe.top_k != 1 or r.correction_bias or _grouped(r) or r.scoring != "sigmoid"):
        raise refuse("a weight on the expert input is computed for top-1 sigmoid routing without correction bias or "
                     f"groups (Llama 4); this spec has top_k={moe.top_k}, scoring {r.scoring!r}.")
    if r.scoring == "sparsemixer" and (moe.top_k != 2 or r.correction_bias or _grouped(r)):
        raise refuse(f"sparsemixer routing is top-2 without correction bias or groups; this spec has "
                     f"top_k={moe.top_k}.")


def describe(moe: MoeSpec) -> str:
    """One line on how a MoE layer routes (for `inspect`)."""
    r = moe.routing
    parts = [f"{moe.num_experts} experts, top-{moe.top_k}", r.scoring]
    if r.float32_logits:
        parts[-1] += " (router in float32)"
    if r.scoring == "sparsemixer":
        parts[-1] += f" (eps {r.sparsemixer_eps:g})"
    if r.correction_bias:
        parts.append("selection + correction bias")
    if _grouped(r):
        parts.append(f"best {r.topk_group} of {r.n_group} groups")
    if r.weight_on_input:
        parts.append("weight on the expert input")
    elif r.scoring != "sparsemixer":
        parts.append("renormalised" if r.normalize_topk else "not renormalised")
    if r.scaling_factor != 1.0:
        parts.append(f"x{r.scaling_factor:g} (folded into fc2)")
    if moe.shared_expert_size:
        parts.append(f"shared expert {moe.shared_expert_size}" + (" gated" if moe.shared_expert_gated else ""))
    return ", ".join(parts)


def _grouped(r: RoutingSpec) -> bool:
    return r.n_group > 1 and r.topk_group < r.n_group


def router_feed(ctx: LayerContext, x: ir.Value, index: int, moe: MoeSpec, *, quantized: bool) -> RouterFeed:
    """The router of layer `index` on x [B, S, H], in the form the fused op reads (QMoE when `quantized`)."""
    check_routing(moe, index)
    return _feed(ctx, x, index, moe, router_weights=quantized and ctx.settings.qmoe_router_weights,
                 raw_softmax=not quantized and ctx.settings.moe_raw_softmax)


def _feed(ctx: LayerContext, x: ir.Value, index: int, moe: MoeSpec, *, router_weights: bool,
          raw_softmax: bool) -> RouterFeed:
    """`router_weights`: the op takes the weights in a router_weights input (QMoE on CPU); else in router_probs alone
    (MoE; QMoE on CUDA). `raw_softmax`: the op honours normalize_routing_weights=0 for a plain softmax router."""
    g, r = ctx.g, moe.routing
    c = router_compute(ctx, r)
    with g.scope("router"):
        logits = _logits(c, x, index, moe)
        if r.weight_on_input:
            top = g.op("ReduceMax", [c.widen_logits(logits), g.ints("const.axis_last", [-1])], keepdims=1)
            return RouterFeed(g.op("Mul", [x, c.io(g.op("Sigmoid", [top]))]), c.io_logits(_flat(ctx, logits, moe)),
                              None, True)
        if r.scoring == "sparsemixer":
            return _sparsemixer(c, x, c.widen_logits(logits), moe, router_weights)
        if not r.correction_bias and not _grouped(r):
            return _monotone(c, x, logits, moe, router_weights, raw_softmax)
        wide = c.widen_logits(logits)
        scores = g.op("Softmax" if r.scoring == "softmax" else "Sigmoid", [wide], **_axis(r))
        selection = scores
        if r.correction_bias:
            bias = ctx.float_initializer(f"layers.{index}.moe.router.correction_bias", ctx.weights.get(
                f"layers.{index}.moe.router.correction_bias", (moe.num_experts,)), dtype=c.dtype)
            selection = g.op("Add", [scores, bias])
        if router_weights:  # the group limit's own reshape back makes the selection 2-D
            selection = _group_limited(c, selection, moe, flat=True) if _grouped(r) else _flat(ctx, selection, moe)
            return RouterFeed(x, c.io(selection), c.io(_flat(ctx, scores, moe)), r.normalize_topk)
        if _grouped(r):
            selection = _group_limited(c, selection, moe, flat=False)
        log_weights = wide if r.scoring == "softmax" else g.op("Log", [scores])
        return _one_input(c, x, selection, log_weights, scores, moe)


def _axis(r: RoutingSpec) -> dict:
    return dict(axis=-1) if r.scoring == "softmax" else {}


def _logits(c: RouterCompute, x: ir.Value, index: int, moe: MoeSpec) -> ir.Value:
    """[B, S, E] router logits: in the model dtype, or in float32 from x cast to float32 (c.wide_logits)."""
    ctx = c.ctx
    w, prefix, e = ctx.weights, f"layers.{index}.moe.router", moe.num_experts
    bias = w.get(f"{prefix}.bias", (e,)) if moe.router_bias else None
    if c.wide_logits and c.widened:
        x = c.widen(x)
    return linear(ctx, x, prefix, w.get(f"{prefix}.weight", (e, ctx.spec.hidden_size)),
                  ctx.settings.plan.format_for("moe.router", index), bias, dtype=c.dtype if c.wide_logits else None)


def _flat(ctx: LayerContext, value: ir.Value, moe: MoeSpec) -> ir.Value:
    """[B, S, E] -> [B * S, E]: the ops' router inputs are 2-D."""
    return ctx.g.op("Reshape", [value, ctx.g.ints(f"shape.router.{moe.num_experts}", [-1, moe.num_experts])])


def _monotone(c: RouterCompute, x: ir.Value, logits: ir.Value, moe: MoeSpec, router_weights: bool,
              raw_softmax: bool) -> RouterFeed:
    """Selection by the weights themselves (softmax or sigmoid of the logits, no bias, no groups): the logits select
    the same top-k, so no mask is needed."""
    ctx, g, r = c.ctx, c.ctx.g, moe.routing
    flat = c.io_logits(_flat(ctx, logits, moe))
    if r.scoring == "softmax":
        if r.normalize_topk or raw_softmax:
            return RouterFeed(x, flat, None, r.normalize_topk)  # both ops weight by the softmax
        if router_weights:  # QMoE renormalises its own softmax whatever the attribute says
            return RouterFeed(x, flat, g.op("Softmax", [flat], axis=-1), False)
        top, _ = g.op("TopK", [g.op("Softmax", [c.widen_logits(logits)], axis=-1),
                               g.ints(f"const.topk.{moe.top_k}", [moe.top_k])], axis=-1, outputs=2)
        return RouterFeed(x, flat, None, True,
                          c.io(g.op("ReduceSum", [top, g.ints("const.axis_last", [-1])], keepdims=1)))
    if router_weights:
        return RouterFeed(x, flat, g.op("Sigmoid", [flat]), r.normalize_topk)
    wide = c.widen_logits(logits)
    scores = g.op("Sigmoid", [wide])
    log_sigmoid = g.op("Log", [scores])  # monotone in the logits: the same top-k
    if r.normalize_topk:
        return RouterFeed(x, c.io(_flat(ctx, log_sigmoid, moe)), None, True)
    return _one_input(c, x, wide, log_sigmoid, scores, moe)


def _top_k_mask(ctx: LayerContext, selection: ir.Value, k: int, axis: int = -1) -> ir.Value:
    """bool, the shape of `selection`: its k largest scores along `axis` (ties measure zero for float scores)."""
    g = ctx.g  # TopK takes float16 and float32 (not bfloat16: see COMPUTE_DTYPES)
    values, _ = g.op("TopK", [selection, g.ints(f"const.topk.{k}", [k])], axis=axis, outputs=2)
    kth = g.op("ReduceMin", [values, g.ints(f"const.axis.{axis}", [axis])], keepdims=1)
    return g.op("GreaterOrEqual", [selection, kth])


def _one_input(c: RouterCompute, x: ir.Value, selection: ir.Value, log_weights: ir.Value, weights: ir.Value,
               moe: MoeSpec) -> RouterFeed:
    """One router input for selection and weights (MoE; QMoE on CUDA): log-weights on the selected experts, the lowest
    float elsewhere; the op's softmax + top-k then picks the same experts with weights w_i / sum_k w_j."""
    ctx, g, r = c.ctx, c.ctx.g, moe.routing
    mask = _top_k_mask(ctx, selection, moe.top_k)
    probs = g.op("Where", [mask, log_weights, c.lowest()])
    scale = None
    if not r.normalize_topk:
        scale = g.op("ReduceSum", [g.op("Where", [mask, weights, c.scalar("const.zero", 0.0)]),
                                   g.ints("const.axis_last", [-1])], keepdims=1)
    return RouterFeed(x, c.io(_flat(ctx, probs, moe)), None, True, c.io(scale))


def _group_limited(c: RouterCompute, selection: ir.Value, moe: MoeSpec, *, flat: bool) -> ir.Value:
    """Selection scores outside the topk_group best groups set to the lowest float, [B, S, E] (or [B * S, E] when
    `flat`). A group's rank is the sum of its two best selection scores (transformers' DeepSeek-V3 / GLM-4.5 noaux_tc
    rule)."""
    ctx, g, r, e = c.ctx, c.ctx.g, moe.routing, moe.num_experts
    size = e // r.n_group
    with g.scope("group_limit"):
        grouped = g.op("Reshape", [selection, g.ints(f"shape.groups.{r.n_group}.{size}", [0, 0, r.n_group, size])])
        best2, _ = g.op("TopK", [grouped, g.ints("const.topk.2", [2])], axis=-1, outputs=2)
        group_scores = g.op("ReduceSum", [best2, g.ints("const.axis_last", [-1])], keepdims=1)  # [B, S, G, 1]
        kept = _top_k_mask(ctx, group_scores, r.topk_group, axis=-2)
        masked = g.op("Where", [kept, grouped, c.lowest()])
        if flat:
            return _flat(ctx, masked, moe)
        return g.op("Reshape", [masked, g.ints(f"shape.ungroup.{e}", [0, 0, e])])


def _sparsemixer(c: RouterCompute, x: ir.Value, logits: ir.Value, moe: MoeSpec, router_weights: bool) -> RouterFeed:
    """PhiMoE's sparsemixer at inference (transformers' `sparsemixer`, not training): the top-2 logits select;
    each pick's weight is the softmax at the pick over the logits within a relative distance 2 * eps of it, the
    first pick masked out for the second. Both weights go to the op as router_weights (QMoE on CPU), or as
    log-weights with the output scaled by their sum (MoE; QMoE on CUDA). `logits` are in the compute dtype."""
    ctx, g = c.ctx, c.ctx.g
    axis = g.ints("const.axis_last", [-1])
    eps2 = c.scalar(f"const.sparsemixer.{moe.routing.sparsemixer_eps:g}", 2.0 * moe.routing.sparsemixer_eps)
    lowest = c.lowest()
    magnitude = g.op("Abs", [logits])

    def pick_weight(scores: ir.Value, top: ir.Value) -> ir.Value:
        far = g.op("Greater", [g.op("Div", [g.op("Sub", [top, logits]), g.op("Max", [magnitude, top])]), eps2])
        return g.op("ReduceMax", [g.op("Softmax", [g.op("Where", [far, lowest, scores])], axis=-1), axis], keepdims=1)

    with g.scope("sparsemixer"):
        top1 = g.op("ReduceMax", [logits, axis], keepdims=1)
        w1 = pick_weight(logits, top1)
        first = g.op("Equal", [logits, top1])
        rest = g.op("Where", [first, lowest, logits])
        top2 = g.op("ReduceMax", [rest, axis], keepdims=1)
        w2 = pick_weight(rest, top2)
        weights = g.op("Where", [first, w1, w2])  # each selected expert's weight (others are never read)
        if router_weights:
            return RouterFeed(x, c.io(_flat(ctx, logits, moe)), c.io(_flat(ctx, weights, moe)), False)
        chosen = g.op("GreaterOrEqual", [logits, top2])
        probs = g.op("Where", [chosen, g.op("Log", [weights]), lowest])
        return RouterFeed(x, c.io(_flat(ctx, probs, moe)), None, True, c.io(g.op("Add", [w1, w2])))

"""Self-attention through com.microsoft GroupQueryAttention (rotary inside the op, KV cache in/out).

One packed QKV projection feeds the op (the checkpoint's fused qkv tensor when it stores one, else q, k and v
concatenated). Layers whose rotary the op cannot do (q/k norm after rotary, rotary half-widths that are not a multiple
of 8) are rotated before it (builder/layers/rotary_graph.py). Per-head q/k RMSNorm is either fused into the op
(CUDA: q_norm_weight / k_norm_weight inputs) or emitted as separate SimplifiedLayerNormalization nodes before it
(CPU rejects the inputs). Variants switched on by the AttentionSpec: sliding window, softcap, custom scale,
attention sinks (head_sink), weightless v norm and values from the key projection (Gemma 4), a query scale by
position (Ministral 3), an output gate (Qwen3.5 / Qwen3-Next: gate rows packed after q|k|v, the op's output
multiplied by their sigmoid before o_proj), and KV sharing: a layer with kv_source feeds GroupQueryAttention the
source layer's new (normalised, un-rotated) keys/values and cache, so the op rebuilds exactly the source's keys and
values while the layer itself has no k/v projection and no cache of its own (its present outputs are left unused).
Multi-head latent attention (AttentionSpec.latent, DeepSeek) is its own layer: builder/layers/mla.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext, StepInputs
from builder.layers.linear import linear
from builder.layers.norm import norm_weight, rms_norm, weightless_rms_norm
from builder.layers.rotary_graph import cos_sin, position_ids, rotary_in_op, rotary_outside, rotate
from builder.spec import AttentionSpec
from builder.weights import Concatenated, Weight, WeightMap


@dataclass
class SharedKV:
    """What a KV-sharing consumer needs from its source layer: new keys/values before rotary, and the cache."""

    key: ir.Value
    value: ir.Value
    past_key: ir.Value
    past_value: ir.Value


def _packed(w: WeightMap, prefix: str, kind: str, attn: AttentionSpec, tail: tuple[int, ...]) -> Weight:
    """The fused qkv weight/bias as the checkpoint stores it, else q, k and v concatenated (v = k with k_eq_v); then
    the output-gate rows when the layer has them (one MatMul, split after)."""
    if f"{prefix}.qkv.{kind}" in w:
        packed = w.get(f"{prefix}.qkv.{kind}", (attn.q_size + 2 * attn.kv_size, *tail))
    else:
        value = "k" if attn.k_eq_v else "v"  # k_eq_v: the value projection is the key projection
        packed = Concatenated((w.get(f"{prefix}.q.{kind}", (attn.q_size, *tail)),
                               w.get(f"{prefix}.k.{kind}", (attn.kv_size, *tail)),
                               w.get(f"{prefix}.{value}.{kind}", (attn.kv_size, *tail))))
    if attn.output_gate:
        return Concatenated((packed, w.get(f"{prefix}.gate.{kind}", (attn.q_size, *tail))))
    return packed


def _rotate_qk(ctx: LayerContext, q: ir.Value, k: ir.Value, attn: AttentionSpec, step: StepInputs):
    positions = _positions(ctx, step, q)
    caches = cos_sin(ctx, attn.rope, step.seqlens_k)
    with ctx.g.scope("rotary"):
        return (rotate(ctx, q, attn.rope, attn.num_heads, positions, caches),
                rotate(ctx, k, attn.rope, attn.num_kv_heads, positions, caches))


def _positions(ctx: LayerContext, step: StepInputs, like: ir.Value) -> ir.Value:
    if step.position_ids is None:
        step.position_ids = position_ids(ctx, step.seqlens_k, like)
    return step.position_ids


def _scale_query(ctx: LayerContext, q: ir.Value, attn: AttentionSpec, step: StepInputs) -> ir.Value:
    """q * (1 + beta * ln(1 + floor(position / period))), from a table over the context (rotation commutes with it)."""
    g, (beta, period) = ctx.g, attn.query_position_scale
    name = f"query_position_scale.{beta:g}.{period}"
    if not g.has_initializer(name):
        positions = np.arange(ctx.spec.context_length, dtype=np.float64)
        table = 1 + beta * np.log1p(np.floor(positions / period))
        g.constant(name, table.astype(np.float32).astype(ctx.settings.numpy_dtype))
    with g.scope("query_scale"):
        scale = g.op("Gather", [g.initializer(name), _positions(ctx, step, q)], axis=0)
        return g.op("Mul", [q, g.op("Unsqueeze", [scale, g.ints("const.-1", [-1])])])


def _per_head_norm(ctx: LayerContext, x: ir.Value, name: str, head_dim: int) -> ir.Value:
    g = ctx.g
    heads = g.op("Reshape", [x, g.ints(f"shape.heads.{head_dim}", [0, 0, -1, head_dim])])
    normed = rms_norm(ctx, heads, name, size=head_dim)
    return g.op("Reshape", [normed, g.ints("shape.merge_heads", [0, 0, -1])])


def _qk_norm(ctx: LayerContext, x: ir.Value, name: str, attn: AttentionSpec, size: int) -> ir.Value:
    """q or k RMSNorm: per head, or over the whole projection of width `size` (qk_norm_scope="projection")."""
    if attn.qk_norm_scope == "projection":
        return rms_norm(ctx, x, name, size=size)
    if attn.qk_norm_scope != "head":
        raise ValueError(f"unknown q/k norm scope {attn.qk_norm_scope!r}")
    return _per_head_norm(ctx, x, name, attn.head_dim)


def _weightless_head_norm(ctx: LayerContext, x: ir.Value, head_dim: int) -> ir.Value:
    """RMSNorm per head with no learned scale (Gemma 4 v_norm): a ones weight, shared by every layer."""
    g = ctx.g
    heads = g.op("Reshape", [x, g.ints(f"shape.heads.{head_dim}", [0, 0, -1, head_dim])])
    normed = weightless_rms_norm(ctx, heads, head_dim)
    return g.op("Reshape", [normed, g.ints("shape.merge_heads", [0, 0, -1])])


def _query_only(ctx: LayerContext, x: ir.Value, layer: int, attn: AttentionSpec) -> ir.Value:
    """q projection (+ q norm) of a KV-sharing consumer."""
    g, w, prefix = ctx.g, ctx.weights, f"layers.{layer}.attn"
    bias = w.get(f"{prefix}.q.bias", (attn.q_size,)) if attn.qkv_bias else None
    with g.scope("q_proj"):
        q = linear(ctx, x, f"{prefix}.q", w.get(f"{prefix}.q.weight", (attn.q_size, ctx.spec.hidden_size)),
                   ctx.settings.plan.format_for("attn.q", layer), bias)
    if attn.qk_norm:
        with g.scope("q_norm"):
            q = _qk_norm(ctx, q, f"{prefix}.q_norm.weight", attn, attn.q_size)
    return q


def attention(ctx: LayerContext, x: ir.Value, layer: int, attn: AttentionSpec, step: StepInputs,
              past_key: ir.Value | None, past_value: ir.Value | None, *, kv_store: dict | None = None,
              ) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Returns (output [B, S, hidden], present_key, present_value).

    kv_store (layer -> SharedKV): a source layer records its keys/values there; a consumer (attn.kv_source) reads
    them and ignores past_key/past_value.
    """
    if attn.latent is not None:  # multi-head latent attention (DeepSeek): its own layer
        from builder.layers.mla import latent_attention

        if kv_store is not None:
            raise ValueError(f"layer {layer}: KV sharing with latent attention is not implemented")
        return latent_attention(ctx, x, layer, attn, step, past_key, past_value)
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    prefix = f"layers.{layer}.attn"
    plan = ctx.settings.plan
    q_size, kv_size = attn.q_size, attn.kv_size
    outside = rotary_outside(attn)
    if outside and kv_store is not None:
        raise ValueError(f"layer {layer}: KV sharing with rotary outside GroupQueryAttention is not implemented")
    if attn.kv_source is not None:
        shared = kv_store[attn.kv_source]
        q = _query_only(ctx, x, layer, attn)
        return _group_query_attention(ctx, layer, attn, step, [q, shared.key, shared.value],
                                      shared.past_key, shared.past_value, None, None)
    qkv_bias = _packed(w, prefix, "bias", attn, ()) if attn.qkv_bias else None
    with g.scope("qkv_proj"):
        qkv = linear(ctx, x, f"{prefix}.qkv", _packed(w, prefix, "weight", attn, (hidden,)),
                     plan.format_for("attn.q", layer), qkv_bias)
    gate = None
    if attn.output_gate:
        qkv, gate = g.op("Split", [qkv, g.ints(f"split.qkv_gate.{q_size + 2 * kv_size}.{q_size}",
                                                  [q_size + 2 * kv_size, q_size])], axis=-1, outputs=2)

    q_norm = k_norm = None
    # keys/values must exist as separate values when a later layer shares them, v gets its own norm, or q/k are
    # rotated or scaled before the op
    separate = attn.v_norm or kv_store is not None or outside or attn.query_position_scale is not None
    # GroupQueryAttention's fused q/k norm is per head only
    if attn.qk_norm and attn.qk_norm_scope == "head" and ctx.settings.fuse_qk_norm and not separate:
        q, k, v = qkv, None, None
        q_norm = norm_weight(ctx, f"{prefix}.q_norm.weight", attn.head_dim)
        k_norm = norm_weight(ctx, f"{prefix}.k_norm.weight", attn.head_dim)
    elif attn.qk_norm or separate:
        q, k, v = g.op("Split", [qkv, g.ints(f"split.qkv.{q_size}.{kv_size}", [q_size, kv_size, kv_size])],
                       axis=-1, outputs=3)
        if outside and attn.qk_norm_after_rope:
            q, k = _rotate_qk(ctx, q, k, attn, step)
        if attn.qk_norm:
            with g.scope("q_norm"):
                q = _qk_norm(ctx, q, f"{prefix}.q_norm.weight", attn, q_size)
            with g.scope("k_norm"):
                k = _qk_norm(ctx, k, f"{prefix}.k_norm.weight", attn, kv_size)
        if outside and not attn.qk_norm_after_rope:
            q, k = _rotate_qk(ctx, q, k, attn, step)
        if attn.query_position_scale is not None:
            q = _scale_query(ctx, q, attn, step)
        if attn.v_norm:
            with g.scope("v_norm"):
                v = _weightless_head_norm(ctx, v, attn.head_dim)
        if kv_store is not None:
            kv_store[layer] = SharedKV(k, v, past_key, past_value)
    else:
        q, k, v = qkv, None, None
    return _group_query_attention(ctx, layer, attn, step, [q, k, v], past_key, past_value, q_norm, k_norm, gate)


def _group_query_attention(ctx: LayerContext, layer: int, attn: AttentionSpec, step: StepInputs,
                           qkv: list, past_key: ir.Value, past_value: ir.Value, q_norm: ir.Value | None,
                           k_norm: ir.Value | None, gate: ir.Value | None = None
                           ) -> tuple[ir.Value, ir.Value, ir.Value]:
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    prefix = f"layers.{layer}.attn"
    plan = ctx.settings.plan
    q, k, v = qkv

    in_op = rotary_in_op(attn)
    cos, sin = cos_sin(ctx, attn.rope, step.seqlens_k) if in_op else (None, None)
    sinks = ctx.float_initializer(f"{prefix}.sinks", w.get(f"{prefix}.sinks", (attn.num_heads,))) if attn.sinks else None
    inputs = [q, k, v, past_key, past_value, step.seqlens_k, step.total_sequence_length, cos, sin,
              None, None, sinks, None, None, q_norm, k_norm]
    while inputs[-1] is None:
        inputs.pop()
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(attn.head_dim)
    out, present_key, present_value = g.ms(
        "GroupQueryAttention", inputs, outputs=3,
        num_heads=attn.num_heads, kv_num_heads=attn.num_kv_heads, scale=float(scale),
        do_rotary=int(in_op), rotary_interleaved=int(in_op and attn.rope.interleaved),
        local_window_size=attn.sliding_window if attn.sliding_window else -1,
        softcap=float(attn.softcap) if attn.softcap else None,
        qk_norm_epsilon=float(ctx.spec.norm_eps) if q_norm is not None else None)
    if gate is not None:
        with g.scope("output_gate"):
            out = g.op("Mul", [out, g.op("Sigmoid", [gate])])
    with g.scope("o_proj"):
        o_bias = w.get(f"{prefix}.o.bias", (hidden,)) if attn.o_bias else None
        out = linear(ctx, out, f"{prefix}.o", w.get(f"{prefix}.o.weight", (hidden, attn.q_size)),
                     plan.format_for("attn.o", layer), o_bias)
    return out, present_key, present_value

"""Self-attention through com.microsoft GroupQueryAttention (rotary inside the op, KV cache in/out).

One packed QKV projection feeds the op. Per-head q/k RMSNorm is either fused into the op (CUDA: q_norm_weight /
k_norm_weight inputs) or emitted as separate SimplifiedLayerNormalization nodes before it (CPU rejects the inputs).
Variants switched on by the AttentionSpec: sliding window, softcap, custom scale, attention sinks (head_sink),
weightless v norm and values from the key projection (Gemma 4), and KV sharing: a layer with kv_source feeds GroupQueryAttention the source layer's
new (normalised, un-rotated) keys/values and cache, so the op rebuilds exactly the source's keys and values while
the layer itself has no k/v projection and no cache of its own (its present outputs are left unused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.linear import linear
from builder.layers.norm import norm_weight, rms_norm, weightless_rms_norm
from builder.layers.rotary import cos_sin_cache
from builder.spec import AttentionSpec, RopeSpec
from builder.weights import Concatenated


@dataclass
class AttentionInputs:
    """Per-step values every layer shares, computed once by the decoder (builder/layers/padding.py).

    Layers run in the "real tokens first" layout: a row's n real new tokens are its columns 0..n-1.
    """

    seqlens_k: ir.Value  # int32 [batch]: total length - 1
    total_sequence_length: ir.Value  # int32 scalar
    token_mask: ir.Value  # bool [batch, sequence_length]: which new tokens are real (column < n)
    token_count: ir.Value  # int64 [batch]: n, the real new tokens per row


@dataclass
class SharedKV:
    """What a KV-sharing consumer needs from its source layer: new keys/values before rotary, and the cache."""

    key: ir.Value
    value: ir.Value
    past_key: ir.Value
    past_value: ir.Value


def rotary_caches(ctx: LayerContext, rope: RopeSpec) -> tuple[ir.Value, ir.Value]:
    """cos/sin caches, shared by every layer with the same rope (named by order of first use)."""
    caches = ctx.rope_caches
    if rope not in caches:
        suffix = "" if not caches else f"_{len(caches)}"
        cos, sin = cos_sin_cache(rope)
        dtype = ctx.settings.numpy_dtype
        caches[rope] = (ctx.g.constant(f"cos_cache{suffix}", cos.astype(dtype)),
                        ctx.g.constant(f"sin_cache{suffix}", sin.astype(dtype)))
    return caches[rope]


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


def attention(ctx: LayerContext, x: ir.Value, layer: int, attn: AttentionSpec, step: AttentionInputs,
              past_key: ir.Value | None, past_value: ir.Value | None, *, kv_store: dict | None = None,
              ) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Returns (output [B, S, hidden], present_key, present_value).

    kv_store (layer -> SharedKV): a source layer records its keys/values there; a consumer (attn.kv_source) reads
    them and ignores past_key/past_value.
    """
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    prefix = f"layers.{layer}.attn"
    plan = ctx.settings.plan
    q_size, kv_size = attn.q_size, attn.kv_size
    if attn.kv_source is not None:
        shared = kv_store[attn.kv_source]
        q = _query_only(ctx, x, layer, attn)
        return _group_query_attention(ctx, layer, attn, step, [q, shared.key, shared.value],
                                      shared.past_key, shared.past_value, None, None)
    value_proj = "k" if attn.k_eq_v else "v"  # k_eq_v: the value projection is the key projection
    qkv_weight = Concatenated((w.get(f"{prefix}.q.weight", (q_size, hidden)),
                               w.get(f"{prefix}.k.weight", (kv_size, hidden)),
                               w.get(f"{prefix}.{value_proj}.weight", (kv_size, hidden))))
    qkv_bias = None
    if attn.qkv_bias:
        qkv_bias = Concatenated((w.get(f"{prefix}.q.bias", (q_size,)), w.get(f"{prefix}.k.bias", (kv_size,)),
                                 w.get(f"{prefix}.{value_proj}.bias", (kv_size,))))
    with g.scope("qkv_proj"):
        qkv = linear(ctx, x, f"{prefix}.qkv", qkv_weight, plan.format_for("attn.q", layer), qkv_bias)

    q_norm = k_norm = None
    # keys/values must exist as separate values when a later layer shares them or v gets its own norm
    separate = attn.v_norm or kv_store is not None
    # GroupQueryAttention's fused q/k norm is per head only
    if attn.qk_norm and attn.qk_norm_scope == "head" and ctx.settings.fuse_qk_norm and not separate:
        q, k, v = qkv, None, None
        q_norm = norm_weight(ctx, f"{prefix}.q_norm.weight", attn.head_dim)
        k_norm = norm_weight(ctx, f"{prefix}.k_norm.weight", attn.head_dim)
    elif attn.qk_norm or separate:
        q, k, v = g.op("Split", [qkv, g.ints(f"split.qkv.{q_size}.{kv_size}", [q_size, kv_size, kv_size])],
                       axis=-1, outputs=3)
        if attn.qk_norm:
            with g.scope("q_norm"):
                q = _qk_norm(ctx, q, f"{prefix}.q_norm.weight", attn, q_size)
            with g.scope("k_norm"):
                k = _qk_norm(ctx, k, f"{prefix}.k_norm.weight", attn, kv_size)
        if attn.v_norm:
            with g.scope("v_norm"):
                v = _weightless_head_norm(ctx, v, attn.head_dim)
        if kv_store is not None:
            kv_store[layer] = SharedKV(k, v, past_key, past_value)
    else:
        q, k, v = qkv, None, None
    return _group_query_attention(ctx, layer, attn, step, [q, k, v], past_key, past_value, q_norm, k_norm)


def _group_query_attention(ctx: LayerContext, layer: int, attn: AttentionSpec, step: AttentionInputs,
                           qkv: list, past_key: ir.Value, past_value: ir.Value, q_norm: ir.Value | None,
                           k_norm: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value]:
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    prefix = f"layers.{layer}.attn"
    plan = ctx.settings.plan
    q, k, v = qkv

    cos = sin = None
    if attn.rope is not None:
        cos, sin = rotary_caches(ctx, attn.rope)
    sinks = ctx.float_initializer(f"{prefix}.sinks", w.get(f"{prefix}.sinks", (attn.num_heads,))) if attn.sinks else None
    inputs = [q, k, v, past_key, past_value, step.seqlens_k, step.total_sequence_length, cos, sin,
              None, None, sinks, None, None, q_norm, k_norm]
    while inputs[-1] is None:
        inputs.pop()
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(attn.head_dim)
    out, present_key, present_value = g.ms(
        "GroupQueryAttention", inputs, outputs=3,
        num_heads=attn.num_heads, kv_num_heads=attn.num_kv_heads, scale=float(scale),
        do_rotary=int(attn.rope is not None), rotary_interleaved=int(bool(attn.rope and attn.rope.interleaved)),
        local_window_size=attn.sliding_window if attn.sliding_window else -1,
        softcap=float(attn.softcap) if attn.softcap else None,
        qk_norm_epsilon=float(ctx.spec.norm_eps) if q_norm is not None else None)
    with g.scope("o_proj"):
        o_bias = w.get(f"{prefix}.o.bias", (hidden,)) if attn.o_bias else None
        out = linear(ctx, out, f"{prefix}.o", w.get(f"{prefix}.o.weight", (hidden, attn.q_size)),
                     plan.format_for("attn.o", layer), o_bias)
    return out, present_key, present_value

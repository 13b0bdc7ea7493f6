"""Self-attention through com.microsoft GroupQueryAttention (rotary inside the op, KV cache in/out).

One packed QKV projection feeds the op (the checkpoint's fused qkv tensor when it stores one, else q, k and v
concatenated). Layers whose rotary the op cannot do (q/k norm after rotary, rotary half-widths that are not a multiple
of 8) are rotated before it (builder/layers/rotary_graph.py). Per-head q/k RMSNorm is either fused into the op
(CUDA: q_norm_weight / k_norm_weight inputs) or emitted as separate SimplifiedLayerNormalization nodes before it
(CPU rejects the inputs). Variants switched on by the AttentionSpec: sliding window, softcap, custom scale,
attention sinks (head_sink), weightless v norm and values from the key projection (Gemma 4), a query scale by
position (Ministral 3, Llama 4), chunked attention through the op's attention_bias (Llama 4), weightless q/k norm
(Llama 4), an output gate (Qwen3.5 / Qwen3-Next: gate rows packed after q|k|v, the op's output
multiplied by their sigmoid before o_proj), and KV sharing: a layer with kv_source feeds GroupQueryAttention the
source layer's new (normalised, un-rotated) keys/values and cache, so the op rebuilds exactly the source's keys and
values while the layer itself has no k/v projection and no cache of its own (its present outputs are left unused).
Multi-head latent attention (AttentionSpec.latent, DeepSeek) is its own layer: builder/layers/mla.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext, StepInputs
from builder.layers.linear import linear
from builder.layers.norm import norm_weight, rms_norm, weightless_rms_norm
from builder.layers.residual import Biased
from builder.layers.rotary_graph import cos_sin, rotary_in_op, rotary_outside, rotate
from builder.spec import AttentionSpec, ModelSpec
from builder.weights import Concatenated, Weight, WeightMap


def kv_sharing_layers(spec) -> set[int]:
    """Layers whose new keys/values another layer reads (KV-sharing sources) and the layers that read them."""
    sources = {getattr(layer.attention, "kv_source", None) for layer in spec.layers} - {None}
    return {i for i, layer in enumerate(spec.layers)
            if i in sources or getattr(layer.attention, "kv_source", None) is not None}


def qk_norm_placement(attn: AttentionSpec, fuse: bool, shares_kv: bool) -> str | None:
    """How a layer's q/k norm runs: None without one; "fused" into GroupQueryAttention (its q_norm_weight /
    k_norm_weight inputs, which only a weighted per-head norm right before the op's own rotary can use); else why it
    runs as separate RMSNorm nodes. `fuse` is ExportSettings.fuse_qk_norm; `shares_kv`: the layer is in kv_sharing_layers."""
    if not attn.qk_norm:
        return None
    if attn.kv_source is not None:
        return "q only: keys come normalised from the layer they are shared with"
    reasons = (("over the whole q / k projection", attn.qk_norm_scope != "head"),
               ("after rotary", attn.qk_norm_after_rope),
               ("without a weight", attn.qk_norm_weightless),
               ("rotary runs before the op", rotary_outside(attn)),
               ("v has a norm too", attn.v_norm),
               ("keys shared with another layer", shares_kv),
               ("queries scaled by position", attn.query_position_scale is not None),
               ("the fused form needs -e cuda and float16/bfloat16 activations, fuse_qk_norm_gqa", not fuse))
    return next((why for why, applies in reasons if applies), "fused")


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
    positions = step.position_ids
    caches = cos_sin(ctx, attn.rope, step.seqlens_k)
    with ctx.g.scope("rotary"):
        return (rotate(ctx, q, attn.rope, attn.num_heads, positions, caches),
                rotate(ctx, k, attn.rope, attn.num_kv_heads, positions, caches))


def _scale_query(ctx: LayerContext, q: ir.Value, attn: AttentionSpec, step: StepInputs) -> ir.Value:
    """q * (1 + beta * ln(1 + floor((position + offset) / period))), from a table over the context (rotation
    commutes with it)."""
    g, (beta, period), offset = ctx.g, attn.query_position_scale, attn.query_position_offset
    name = f"query_position_scale.{beta:g}.{period}" + (f".{offset}" if offset else "")
    if not g.has_initializer(name):
        positions = np.arange(ctx.spec.context_length, dtype=np.float64)
        table = 1 + beta * np.log1p(np.floor((positions + offset) / period))
        g.constant(name, table.astype(np.float32).astype(ctx.settings.numpy_dtype))
    with g.scope("query_scale"):
        scale = g.op("Gather", [g.initializer(name), step.position_ids], axis=0)
        return g.op("Mul", [q, g.op("Unsqueeze", [scale, g.ints("const.-1", [-1])])])


def fit_chunked_attention(spec: ModelSpec, ep: str) -> tuple[ModelSpec, list[str]]:
    """Chunked attention on CUDA: its GroupQueryAttention kernel rejects attention_bias ("attention_bias is not
    supported in GroupQueryAttention cuda kernel", onnxruntime 1.31-1.32), so `chunk_bias` cannot run there. Plain
    causal attention equals chunked attention exactly while every position lies in the first chunk, i.e. for
    sequences of at most `attention_chunk` tokens, and differs past it. So a cuda export drops the chunk and caps the
    context at the smallest chunk size (genai_config's max_length then refuses longer runs), and says so."""
    chunks = {layer.attention.attention_chunk for layer in spec.layers
              if isinstance(layer.attention, AttentionSpec) and layer.attention.attention_chunk}
    if ep != "cuda" or not chunks:
        return spec, []
    limit = min(chunks)
    layers = tuple(replace(layer, attention=replace(layer.attention, attention_chunk=None))
                   if isinstance(layer.attention, AttentionSpec) else layer for layer in spec.layers)
    note = (f"chunked attention (chunks of {limit}) on CUDA: GroupQueryAttention's CUDA kernel takes no attention_bias, "
            f"and causal attention equals chunked attention only up to {limit} tokens, so the context is capped at "
            f"{limit} (was {spec.context_length}); export -e cpu for longer contexts")
    return replace(spec, layers=layers, context_length=min(limit, spec.context_length)), [note]


def chunk_bias(ctx: LayerContext, step: StepInputs, chunk: int) -> ir.Value:
    """GroupQueryAttention's attention_bias [B, 1, S, T] for chunked attention: 0 where key slot j and the query
    share a chunk (position // chunk), the lowest float elsewhere; the op's causal and padding masks do the rest.
    Exact at every length: key slot j holds position j (layers run real tokens first, padding.py) and a query's
    position is GroupQueryAttention's own (StepInputs.position_ids). Built once per chunk size."""
    key = f"chunk_bias.{chunk}"
    if key not in step.derived:
        g = ctx.g
        with g.scope(f"chunk_mask_{chunk}"):
            size = g.ints(f"const.chunk.{chunk}", [chunk])
            query_chunk = g.op("Div", [step.position_ids, size])  # int64 [B, S]; positions are >= 0
            total = g.op("Cast", [step.total_sequence_length], to=ir.DataType.INT64)
            slots = g.op("Range", [g.shared_constant("const.zero_i64", np.array(0, np.int64)), total,
                                   g.shared_constant("const.one_i64", np.array(1, np.int64))])
            same = g.op("Equal", [g.op("Unsqueeze", [query_chunk, g.ints("const.axis_last", [-1])]),
                                  g.op("Div", [slots, size])])  # [B, S, T]
            lowest = ctx.scalar("const.lowest", float(np.finfo(ctx.settings.numpy_dtype).min))
            bias = g.op("Where", [same, ctx.scalar("const.zero", 0.0), lowest])
            step.derived[key] = g.op("Unsqueeze", [bias, g.ints("const.axis1", [1])])
    return step.derived[key]


def _per_head_norm(ctx: LayerContext, x: ir.Value, name: str, head_dim: int) -> ir.Value:
    g = ctx.g
    heads = g.op("Reshape", [x, g.ints(f"shape.heads.{head_dim}", [0, 0, -1, head_dim])])
    normed = rms_norm(ctx, heads, name, size=head_dim)
    return g.op("Reshape", [normed, g.ints("shape.merge_heads", [0, 0, -1])])


def _qk_norm(ctx: LayerContext, x: ir.Value, name: str, attn: AttentionSpec, size: int) -> ir.Value:
    """q or k RMSNorm: per head, or over the whole projection of width `size` (qk_norm_scope="projection")."""
    if attn.qk_norm_weightless and attn.qk_norm_scope == "head":
        return _weightless_head_norm(ctx, x, attn.head_dim)
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
    """Returns (output [B, S, hidden], or `Biased` when o_proj has a bias, present_key, present_value).

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
    if qk_norm_placement(attn, ctx.settings.fuse_qk_norm, kv_store is not None) == "fused":
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
    bias = chunk_bias(ctx, step, attn.attention_chunk) if attn.attention_chunk else None
    inputs = [q, k, v, past_key, past_value, step.seqlens_k, step.total_sequence_length, cos, sin,
              None, bias, sinks, None, None, q_norm, k_norm]
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
        out = linear(ctx, out, f"{prefix}.o", w.get(f"{prefix}.o.weight", (hidden, attn.q_size)),
                     plan.format_for("attn.o", layer))
    if attn.o_bias:  # added by the next residual norm when nothing comes between (builder/layers/residual.py)
        out = Biased(out, ctx.float_initializer(f"{prefix}.o.bias", w.get(f"{prefix}.o.bias", (hidden,))))
    return out, present_key, present_value

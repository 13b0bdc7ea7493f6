"""Gated DeltaNet linear attention (Qwen3.5, Qwen3-Next) from ONNX Runtime contrib ops with CPU and CUDA kernels.

    x * token_mask                 pads zeroed first, as transformers' apply_mask_to_padding_states
    [qkv | z] = x W1               one MatMul / MatMulNBits;  [a | b] = x W2 (float: tiny, drives the decay)
    qkv = CausalConvWithState(qkv, conv weight, past conv state; silu)
    q, k  L2-normalised per head: SimplifiedLayerNormalization with epsilon eps/d and weight 1/sqrt(d) computes
          x / sqrt(sum x^2 + eps), transformers' l2norm (LpNormalization has no epsilon: ~1e-3 off)
    decay, beta = LinearAttentionGate(a, dt_bias, -exp(A_log), b)          both forced to 0 at pads
    out, state = LinearAttention(q, k, v, past recurrent state, decay, beta; gated_delta, value heads grouped per
                 key head)
    y = out_proj(GatedRMSNorm(out, norm.weight, z; silu))                  norm.weight applied as w, never 1 + w

Padding: the decoder runs every layer with each row's real new tokens first (builder/layers/padding.py), so pads are
a row's trailing columns; each pad is an exact no-op. Its conv input is zero, its log-decay 0 and its update rate 0,
so the recurrent state passes through unchanged, and the present conv state is gathered per row from the kernel-1
entries of [past conv state | new inputs] that end at the row's last real token (token_count; the op's own present
would hold the trailing pads). A padded batch therefore gives every row exactly its unpadded result.

The core (conv, gate, LinearAttention, GatedRMSNorm) and both states run in ExportSettings.linear_attn_dtype: float32
unless asked otherwise, so fp16/bf16 exports keep the recurrent state as transformers does and need no fp16/bf16
kernels for these ops (Casts in and out); the projections run in the activation dtype.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from builder.errors import UnsupportedModelError
from builder.graph import FLOAT_DTYPES
from builder.layers import LayerContext, StepInputs
from builder.layers.linear import linear
from builder.spec import LinearAttentionSpec
from builder.weights import Concatenated, RowMap


def _token_mask(ctx: LayerContext, step: StepInputs, dtype: ir.DataType) -> ir.Value:
    """token_mask as [batch, sequence, 1] in `dtype` (shared by every layer)."""
    key = ("token_mask", dtype)
    if key not in step.derived:
        g = ctx.g
        with g.scope("token_mask"):
            mask = g.op("Unsqueeze", [step.token_mask, g.ints("const.axis2", [2])])
            step.derived[key] = g.op("Cast", [mask], to=dtype)
    return step.derived[key]


def _conv_tail_index(ctx: LayerContext, step: StepInputs, width: int) -> ir.Value:
    """int64 [batch, width]: the positions in [past conv state (width) | new inputs] of each row's last `width` real
    entries. Real new tokens are a row's first n columns (the decoder's aligned layout), so they end at n + width - 1.
    Shared by every layer with this conv width."""
    key = ("conv_tail_index", width)
    if key not in step.derived:
        g = ctx.g
        with g.scope(f"conv_tail_index_{width}"):
            count = g.op("Unsqueeze", [step.token_count, g.ints("const.axis1", [1])])  # [batch, 1]
            step.derived[key] = g.op("Add", [count, g.shared_constant(f"const.arange.{width}",
                                                                      np.arange(width, dtype=np.int64))])
    return step.derived[key]


def _present_conv_state(ctx: LayerContext, step: StepInputs, past: ir.Value, conv_in: ir.Value,
                        width: int) -> ir.Value:
    g = ctx.g
    with g.scope("present_conv"):
        stream = g.op("Concat", [past, conv_in], axis=2)  # [batch, channels, width + sequence]
        index = g.op("Unsqueeze", [_conv_tail_index(ctx, step, width), g.ints("const.axis1", [1])])
        index = g.op("Expand", [index, g.op("Shape", [past])])  # [batch, channels, width]
        return g.op("GatherElements", [stream, index], axis=2)


def _l2_norm_heads(ctx: LayerContext, x: ir.Value, head_dim: int, eps: float, dtype) -> ir.Value:
    """x / sqrt(sum(x^2) + eps) per head of size head_dim (x [batch, sequence, heads * head_dim])."""
    g = ctx.g
    scale = g.shared_constant(f"const.inv_sqrt.{head_dim}.{np.dtype(dtype).name}",
                              np.full(head_dim, 1.0 / math.sqrt(head_dim), np.float32).astype(dtype))
    heads = g.op("Reshape", [x, g.ints(f"shape.heads.{head_dim}", [0, 0, -1, head_dim])])
    normed = g.op("SimplifiedLayerNormalization", [heads, scale], axis=-1, epsilon=float(eps / head_dim),
                  stash_type=1)
    return g.op("Reshape", [normed, g.ints("shape.merge_heads", [0, 0, -1])])


def linear_attention(ctx: LayerContext, x: ir.Value, layer: int, spec: LinearAttentionSpec, step: StepInputs,
                     past_conv: ir.Value, past_recurrent: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Returns (output [B, S, hidden], present conv state, present recurrent state)."""
    g, w, hidden = ctx.g, ctx.weights, ctx.spec.hidden_size
    prefix = f"layers.{layer}.linear_attn"
    plan = ctx.settings.plan
    io = ctx.settings.ir_dtype
    if ctx.settings.ep == "cpu" and ctx.settings.linear_attn_dtype != "float32":
        raise UnsupportedModelError(f"{ctx.spec.architecture}: linear_attn_fp32=false with -p {ctx.settings.precision}"
                                    " -e cpu: ONNX Runtime's CPU kernels for CausalConvWithState and LinearAttention "
                                    "are float32 only. Keep linear_attn_fp32=true (the default) or export for -e cuda.")
    core, core_np = FLOAT_DTYPES[ctx.settings.linear_attn_dtype]
    channels, value_size, heads = spec.conv_channels, spec.value_size, spec.num_value_heads
    width = spec.conv_kernel - 1

    x = g.op("Mul", [x, _token_mask(ctx, step, io)])
    with g.scope("in_proj"):
        proj = linear(ctx, x, f"{prefix}.in_proj", Concatenated((w.get(f"{prefix}.qkv.weight", (channels, hidden)),
                                                                 w.get(f"{prefix}.z.weight", (value_size, hidden)))),
                      plan.format_for("linear_attn.qkv", layer))
        qkv, z = g.op("Split", [proj, g.ints(f"split.{channels}.{value_size}", [channels, value_size])], axis=-1,
                      outputs=2)
    with g.scope("in_proj_ab"):
        ab = linear(ctx, x, f"{prefix}.ab", Concatenated((w.get(f"{prefix}.a.weight", (heads, hidden)),
                                                          w.get(f"{prefix}.b.weight", (heads, hidden)))),
                    plan.format_for("linear_attn.ab", layer))

    if core != io:
        qkv, ab, z = (g.op("Cast", [t], to=core) for t in (qkv, ab, z))
    with g.scope("conv"):
        conv_in = g.op("Transpose", [qkv], perm=[0, 2, 1])  # [batch, channels, sequence]
        weight = ctx.float_initializer(f"{prefix}.conv.weight",
                                       w.get(f"{prefix}.conv.weight", (channels, 1, spec.conv_kernel)), dtype=core)
        conv_out, _ = g.ms("CausalConvWithState", [conv_in, weight, None, past_conv], outputs=2, activation="silu")
        mixed = g.op("Transpose", [conv_out], perm=[0, 2, 1])
    present_conv = _present_conv_state(ctx, step, past_conv, conv_in, width)

    key_size = spec.key_size
    q, k, v = g.op("Split", [mixed, g.ints(f"split.{key_size}.{key_size}.{value_size}",
                                           [key_size, key_size, value_size])], axis=-1, outputs=3)
    with g.scope("q_l2norm"):
        q = _l2_norm_heads(ctx, q, spec.key_head_dim, spec.qk_norm_eps, core_np)
    with g.scope("k_l2norm"):
        k = _l2_norm_heads(ctx, k, spec.key_head_dim, spec.qk_norm_eps, core_np)

    with g.scope("gate"):
        a, b = g.op("Split", [ab], axis=-1, num_outputs=2, outputs=2)
        dt_bias = ctx.float_initializer(f"{prefix}.dt_bias", w.get(f"{prefix}.dt_bias", (heads,)),
                                        dtype=ir.DataType.FLOAT)
        a_log = w.get(f"{prefix}.A_log", (heads,))
        decay_scale = ctx.float_initializer(f"{prefix}.decay_scale", RowMap(a_log, lambda r: -np.exp(r), a_log.shape),
                                            dtype=ir.DataType.FLOAT)
        decay, beta = g.ms("LinearAttentionGate", [a, dt_bias, decay_scale, b], outputs=2)
        mask = _token_mask(ctx, step, core)  # pads: log-decay 0 and update rate 0 leave the state unchanged
        decay, beta = g.op("Mul", [decay, mask]), g.op("Mul", [beta, mask])

    out, present_recurrent = g.ms("LinearAttention", [q, k, v, past_recurrent, decay, beta], outputs=2,
                                  q_num_heads=spec.num_key_heads, kv_num_heads=heads, update_rule="gated_delta",
                                  scale=1.0 / math.sqrt(spec.key_head_dim))
    with g.scope("norm"):
        scale = ctx.float_initializer(f"{prefix}.norm.weight", w.get(f"{prefix}.norm.weight", (spec.value_head_dim,)),
                                      dtype=core)
        out = g.ms("GatedRMSNorm", [out, scale, z], activation="silu", epsilon=float(ctx.spec.norm_eps))
    if core != io:
        out = g.op("Cast", [out], to=io)
    with g.scope("out_proj"):
        out = linear(ctx, out, f"{prefix}.out", w.get(f"{prefix}.out.weight", (hidden, value_size)),
                     plan.format_for("linear_attn.out", layer))
    return out, present_conv, present_recurrent

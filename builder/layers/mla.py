"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) through GroupQueryAttention over a latent cache.

Transformers computes, per head h, with c = norm(kv_a(x)[:kv_lora]) the latent of a token and k_rope its rotated
rope key (one per token, shared by every head):
    k_h = [W_UK_h c ; k_rope],  v_h = W_UV_h c,  out_h = softmax(q_h . k_h * scale) v_h,  then o_proj
(W_UK_h / W_UV_h: head h's key / value rows of kv_b). Since q_nope_h . (W_UK_h c) = (q_nope_h W_UK_h) . c, the keys
never need decompressing: W_UK is absorbed into the query and W_UV into the output, and attention runs as
multi-query attention over one [rope key | latent] row per token:

    q_h = [q_rope_h | q_nope_h @ W_UK_h]   (H heads of rope + kv_lora)     k = v = [k_rope | c]   (one head)
    GroupQueryAttention: scores_h = q_rope_h . k_rope + (q_nope_h W_UK_h) . c  (transformers' q_h . k_h)
    out_h = (its output past the rope dims, i.e. sum_t p_t c_t) @ W_UV_h^T  ->  o_proj

The rope dims go first in every head because GroupQueryAttention rotates the leading rotary_dim dims of q and k (its
partial rotary); a rope whose half-width is not a multiple of 8, which the op refuses, is rotated before it. DeepSeek
rotates adjacent pairs (rope_interleave): RopeSpec.interleaved. Rotating pairs in place instead of transformers'
de-interleaving permutation changes no dot product, since q and k are permuted alike.

State: the op keeps a key and a value cache, [batch, 1, length, rope + kv_lora] each (k = v), i.e. 2 x 576 values per
token and layer for DeepSeek-V3, where caching decompressed keys and values through GroupQueryAttention (values padded
to the qk head size, which the op requires) would take 2 x 128 x 192 = 49152. The ideal, one latent row (576), would
need an attention op that reads the values as a slice of the keys; ONNX Runtime 1.32 has none (README, "Multi-head
latent attention").

The absorbed matrices, W_UK [H, nope, kv_lora] and W_UV^T [H, kv_lora, v], are weights of batched per-head MatMuls,
which MatMulNBits cannot hold: the QuantPlan keeps them float (role attn.kv_b) whatever the precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext, StepInputs
from builder.layers.linear import linear
from builder.layers.norm import rms_norm
from builder.layers.residual import Biased
from builder.layers.rotary_graph import cos_sin, position_ids, rotary_in_op, rotate
from builder.spec import AttentionSpec, LatentSpec
from builder.weights import Concatenated, Constant, Weight

# AttentionSpec variants the latent layer does not combine with (the families that use MLA set none of them)
_NOT_WITH_LATENT = ("qk_norm", "qk_norm_after_rope", "query_position_scale", "softcap", "sliding_window", "sinks",
                    "v_norm", "kv_source", "k_eq_v", "output_gate")


@dataclass(frozen=True)
class KvbHeads:
    """Head blocks of kv_b [H * (nope + v), kv_lora], read head by head: the key rows W_UK [H, nope, kv_lora]
    (part "key") or the value rows transposed, W_UV^T [H, kv_lora, v] (part "value")."""

    source: Weight
    latent: LatentSpec
    heads: int
    part: str

    @property
    def shape(self) -> tuple[int, ...]:
        lat = self.latent
        if self.part == "key":
            return (self.heads, lat.qk_nope_head_dim, lat.kv_lora_rank)
        return (self.heads, lat.kv_lora_rank, lat.v_head_dim)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.heads if stop is None else min(stop, self.heads)
        nope, per = self.latent.qk_nope_head_dim, self.latent.qk_nope_head_dim + self.latent.v_head_dim
        block = self.source.rows(start * per, stop * per).reshape(stop - start, per, -1)
        if self.part == "key":
            return np.ascontiguousarray(block[:, :nope])
        return np.ascontiguousarray(block[:, nope:].transpose(0, 2, 1))


def _check(attn: AttentionSpec, layer: int) -> None:
    defaults = AttentionSpec(0, 0, 0, None)
    mixed = [name for name in _NOT_WITH_LATENT if getattr(attn, name) != getattr(defaults, name)]
    if mixed or attn.num_kv_heads != 1 or attn.head_dim != attn.latent.cache_width or attn.rope is None:
        raise ValueError(f"layer {layer}: latent attention needs num_kv_heads 1, head_dim = cache width "
                         f"{attn.latent.cache_width} and a rope, and takes none of {', '.join(mixed) or '-'}")


def _input_projection(ctx: LayerContext, x: ir.Value, layer: int, attn: AttentionSpec) -> tuple[ir.Value, ir.Value]:
    """(q, kv): q_a (or the plain q) and kv_a read from x in one MatMul."""
    g, w, hidden, lat = ctx.g, ctx.weights, ctx.spec.hidden_size, attn.latent
    prefix = f"layers.{layer}.attn"
    q_name = "q_a" if lat.q_lora_rank is not None else "q"
    q_rows = lat.q_lora_rank if lat.q_lora_rank is not None else attn.num_heads * lat.qk_head_dim
    kv_rows = lat.kv_lora_rank + lat.qk_rope_head_dim
    weight = Concatenated((w.get(f"{prefix}.{q_name}.weight", (q_rows, hidden)),
                           w.get(f"{prefix}.kv_a.weight", (kv_rows, hidden))))
    bias = None
    if attn.qkv_bias:  # q_a and kv_a carry attention_bias; a plain q projection has none
        q_bias = (w.get(f"{prefix}.q_a.bias", (q_rows,)) if lat.q_lora_rank is not None
                  else Constant(np.zeros(q_rows, np.float32)))
        bias = Concatenated((q_bias, w.get(f"{prefix}.kv_a.bias", (kv_rows,))))
    with g.scope("qkv_a_proj"):
        projected = linear(ctx, x, f"{prefix}.qkv_a", weight, ctx.settings.plan.format_for("attn.q", layer), bias)
    q, kv = g.op("Split", [projected, g.ints(f"split.mla.{q_rows}.{kv_rows}", [q_rows, kv_rows])], axis=-1,
                 outputs=2)
    if lat.q_lora_rank is not None:
        with g.scope("q_a_norm"):
            q = rms_norm(ctx, q, f"{prefix}.q_a_norm.weight", lat.q_lora_rank)
        with g.scope("q_b_proj"):
            q = linear(ctx, q, f"{prefix}.q_b", w.get(f"{prefix}.q_b.weight", (attn.num_heads * lat.qk_head_dim,
                                                                             lat.q_lora_rank)),
                       ctx.settings.plan.format_for("attn.q", layer))
    return q, kv


def _per_head(ctx: LayerContext, x: ir.Value, weight: ir.Value) -> ir.Value:
    """x [B, S, H, d] @ weight [H, d, e] per head -> [B, S, H, e]."""
    g = ctx.g
    perm = [0, 2, 1, 3]
    return g.op("Transpose", [g.op("MatMul", [g.op("Transpose", [x], perm=perm), weight])], perm=perm)


def _absorbed(ctx: LayerContext, layer: int, attn: AttentionSpec, part: str) -> ir.Value:
    name = f"layers.{layer}.attn.kv_b"
    fmt = ctx.settings.plan.format_for("attn.kv_b", layer)
    if not fmt.is_float:
        raise ValueError(f"{name}: the absorbed kv_b matrices are batched MatMul weights; the plan must keep them "
                         f"float, not {fmt.describe()}")
    lat = attn.latent
    kv_b = ctx.weights.get(f"{name}.weight", (attn.num_heads * (lat.qk_nope_head_dim + lat.v_head_dim),
                                              lat.kv_lora_rank))
    return ctx.float_initializer(f"{name}_{part}.weight", KvbHeads(kv_b, lat, attn.num_heads, part))


def _rotate_outside(ctx: LayerContext, step: StepInputs, attn: AttentionSpec, q_rope: ir.Value,
                    k_rope: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Rotate q_rope [B, S, H, rope] and k_rope [B, S, rope] before the op (rope half-width not a multiple of 8)."""
    g, rope = ctx.g, attn.rope
    if step.position_ids is None:
        step.position_ids = position_ids(ctx, step.seqlens_k, k_rope)
    caches = cos_sin(ctx, rope, step.seqlens_k)
    with g.scope("rotary"):
        flat = g.op("Reshape", [q_rope, g.ints("shape.merge_heads", [0, 0, -1])])
        q_rope = rotate(ctx, flat, rope, attn.num_heads, step.position_ids, caches)
        q_rope = g.op("Reshape", [q_rope, g.ints(f"shape.heads.{rope.rotary_dim}", [0, 0, -1, rope.rotary_dim])])
        k_rope = rotate(ctx, k_rope, rope, 1, step.position_ids, caches)
    return q_rope, k_rope


def latent_attention(ctx: LayerContext, x: ir.Value, layer: int, attn: AttentionSpec, step: StepInputs,
                     past_key: ir.Value, past_value: ir.Value) -> tuple:
    """Returns (output [B, S, hidden], or `Biased` when o_proj has a bias, present_key, present_value); both caches
    hold [rope key | latent] rows."""
    _check(attn, layer)
    g, w, lat, heads = ctx.g, ctx.weights, attn.latent, attn.num_heads
    prefix = f"layers.{layer}.attn"
    rope_dim, nope, kv_lora = lat.qk_rope_head_dim, lat.qk_nope_head_dim, lat.kv_lora_rank
    q, kv = _input_projection(ctx, x, layer, attn)
    q = g.op("Reshape", [q, g.ints(f"shape.heads.{lat.qk_head_dim}", [0, 0, -1, lat.qk_head_dim])])
    q_nope, q_rope = g.op("Split", [q, g.ints(f"split.mla_q.{nope}.{rope_dim}", [nope, rope_dim])], axis=-1,
                          outputs=2)
    latent, k_rope = g.op("Split", [kv, g.ints(f"split.mla_kv.{kv_lora}.{rope_dim}", [kv_lora, rope_dim])],
                          axis=-1, outputs=2)
    with g.scope("kv_a_norm"):
        latent = rms_norm(ctx, latent, f"{prefix}.kv_a_norm.weight", kv_lora)
    with g.scope("k_absorb"):
        q_latent = _per_head(ctx, q_nope, _absorbed(ctx, layer, attn, "key"))
    in_op = rotary_in_op(attn)
    if not in_op:
        q_rope, k_rope = _rotate_outside(ctx, step, attn, q_rope, k_rope)
    query = g.op("Reshape", [g.op("Concat", [q_rope, q_latent], axis=-1), g.ints("shape.merge_heads", [0, 0, -1])])
    key = g.op("Concat", [k_rope, latent], axis=-1)
    cos, sin = cos_sin(ctx, attn.rope, step.seqlens_k) if in_op else (None, None)
    scale = attn.scale if attn.scale is not None else lat.qk_head_dim ** -0.5
    out, present_key, present_value = g.ms(
        "GroupQueryAttention", [query, key, key, past_key, past_value, step.seqlens_k, step.total_sequence_length,
                                cos, sin],
        outputs=3, num_heads=heads, kv_num_heads=1, scale=float(scale), do_rotary=int(in_op),
        rotary_interleaved=int(in_op and attn.rope.interleaved))
    width = lat.cache_width
    out = g.op("Reshape", [out, g.ints(f"shape.heads.{width}", [0, 0, -1, width])])
    out = g.op("Slice", [out, g.ints(f"const.{rope_dim}", [rope_dim]), g.ints("const.int64_max", [2**63 - 1]),
                         g.ints("const.-1", [-1])])
    with g.scope("v_absorb"):
        out = _per_head(ctx, out, _absorbed(ctx, layer, attn, "value"))
    out = g.op("Reshape", [out, g.ints("shape.merge_heads", [0, 0, -1])])
    hidden = ctx.spec.hidden_size
    with g.scope("o_proj"):
        out = linear(ctx, out, f"{prefix}.o", w.get(f"{prefix}.o.weight", (hidden, heads * lat.v_head_dim)),
                     ctx.settings.plan.format_for("attn.o", layer))
    if attn.o_bias:  # added by the next residual norm when nothing comes between (builder/layers/residual.py)
        out = Biased(out, ctx.float_initializer(f"{prefix}.o.bias", w.get(f"{prefix}.o.bias", (hidden,))))
    return out, present_key, present_value

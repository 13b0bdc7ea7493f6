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
token and layer for DeepSeek-V3. The ideal, one latent row (576), would need an attention op that reads the values as
a slice of the keys; ONNX Runtime 1.32 has none (README, "Multi-head latent attention").

The decompressed form (LatentSpec.form) is transformers' own computation: kv_b turns each token's latent into per-head
nope keys and values, every head's key is [k_rope | k_nope] (the shared rope key broadcast to every head, rope dims
first for the op's partial rotary) and GroupQueryAttention runs with num_heads kv heads. The op needs one head size
for q, k and v (its CheckInputs: "Input 'value' is expected to have same hidden size as key"; the caches share one
head_size), so values are zero-padded to the qk head size and the padding sliced off the output: 2 x 128 x 192 =
49152 values per token and layer for DeepSeek-V3, 43 times the absorbed rows. It exists because GroupQueryAttention on
CUDA takes heads of at most 512 (onnxruntime 1.31.1: "Head size (576) exceeds maximum supported MAX_HEAD_SIZE (512)",
from the kernel that unpacks q/k/v, rotates and appends to the cache; flash attention takes up to 256, XQA 64/128/256),
so the 576-wide absorbed row of DeepSeek-V3 / Kimi-K2 cannot run there; `fit_latent_attention` picks the form per
export (GQA_MAX_HEAD) unless latent_attention_form forces one.

The absorbed matrices, W_UK [H, nope, kv_lora] and W_UV^T [H, kv_lora, v], are weights of batched per-head MatMuls,
which MatMulNBits cannot hold: the QuantPlan keeps them float (role attn.kv_b) whatever the precision; the
decompressed form's kv_b is one plain MatMul under the same role, so it stays float too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext, StepInputs
from builder.layers.linear import linear
from builder.layers.norm import rms_norm
from builder.layers.residual import Biased
from builder.layers.rotary_graph import cos_sin, rotary_in_op, rotate
from builder.errors import UnsupportedModelError, UsageError
from builder.spec import AttentionSpec, LatentSpec, ModelSpec
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


# Widest head GroupQueryAttention takes, per EP (onnxruntime 1.31.1; module docstring). No cap on CPU.
GQA_MAX_HEAD = {"cuda": 512}


def decompressed_head_dim(attn: AttentionSpec) -> int:
    """The decompressed form's head size: q/k heads [rope | nope], values padded to it, rounded up to what the op
    takes (a multiple of 8; of 16 when it rotates q/k itself)."""
    lat = attn.latent
    step = 16 if rotary_in_op(attn) else 8
    return -(-max(lat.qk_head_dim, lat.v_head_dim) // step) * step


def _cache_layout(attn: AttentionSpec) -> tuple[int, int]:
    """(kv heads, head size) of the cache the layer's form keeps."""
    if attn.latent.form == "decompressed":
        return attn.num_heads, decompressed_head_dim(attn)
    return 1, attn.latent.cache_width


def _per_token(attn: AttentionSpec, layers: int, itemsize: int) -> str:
    kv_heads, head = _cache_layout(attn)
    size = 2 * kv_heads * head * layers * itemsize
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def fit_latent_attention(spec: ModelSpec, settings) -> tuple[ModelSpec, list[str]]:
    """Decide each latent-attention layer's form once, for the export's EP: absorbed unless its [rope key | latent]
    row is wider than GroupQueryAttention takes there (GQA_MAX_HEAD), or the form latent_attention_form forces; the
    layer's num_kv_heads / head_dim become its cache's, so the state declarations and genai_config follow."""
    forced = settings.extra.get("latent_attention_form")
    latent = [i for i, layer in enumerate(spec.layers)
              if isinstance(layer.attention, AttentionSpec) and layer.attention.latent is not None]
    if not latent:
        notes = ([f"latent_attention_form has no target: {spec.architecture} has no latent-attention layers"]
                 if forced else [])
        return spec, notes
    attn = spec.layers[latent[0]].attention
    ep, limit, width = settings.ep, GQA_MAX_HEAD.get(settings.ep), attn.latent.cache_width
    too_wide = limit is not None and width > limit
    if forced == "absorbed" and too_wide:
        raise UsageError(f"latent_attention_form=absorbed: {spec.architecture}'s [rope key | latent] rows are {width} "
                         f"wide, past GroupQueryAttention's {ep} limit of {limit} (onnxruntime 1.31.1 fails the "
                         f"session: 'Head size ({width}) exceeds maximum supported MAX_HEAD_SIZE ({limit})'). Drop the "
                         f"option ({ep} then caches decompressed keys and values) or export with -e cpu.")
    form = forced or ("decompressed" if too_wide else "absorbed")
    layers = list(spec.layers)
    for i in latent:
        old = layers[i].attention
        new = replace(old, latent=replace(old.latent, form=form))
        kv_heads, head = _cache_layout(new)
        if limit is not None and head > limit:
            raise UnsupportedModelError(f"{spec.architecture}: latent attention's heads are {head} wide "
                                        f"decompressed and {width} absorbed, both past GroupQueryAttention's {ep} "
                                        f"limit of {limit}; export with -e cpu")
        layers[i] = replace(layers[i], attention=replace(new, num_kv_heads=kv_heads, head_dim=head))
    spec = replace(spec, layers=tuple(layers))
    if form == "absorbed":
        return spec, []
    fitted = spec.layers[latent[0]].attention
    lat, itemsize = fitted.latent, np.dtype(settings.numpy_dtype).itemsize
    why = (f"the absorbed [rope key | latent] rows ({width} wide) are past GroupQueryAttention's {ep} limit of "
           f"{limit}, so" if forced is None else "latent_attention_form=decompressed:")
    padded = f", values {lat.v_head_dim} padded to {fitted.head_dim}" if lat.v_head_dim != fitted.head_dim else ""
    return spec, [f"latent attention: {why} keys and values are cached decompressed: {fitted.num_kv_heads} kv heads "
                  f"of {fitted.head_dim} (rope {lat.qk_rope_head_dim} + nope {lat.qk_nope_head_dim}{padded}), "
                  f"{_per_token(fitted, len(latent), itemsize)} per token over {len(latent)} layers in "
                  f"{settings.io_dtype}, against {_per_token(attn, len(latent), itemsize)} absorbed"]


def _check(attn: AttentionSpec, layer: int) -> None:
    defaults = AttentionSpec(0, 0, 0, None)
    mixed = [name for name in _NOT_WITH_LATENT if getattr(attn, name) != getattr(defaults, name)]
    kv_heads, head = _cache_layout(attn)
    if mixed or (attn.num_kv_heads, attn.head_dim) != (kv_heads, head) or attn.rope is None:
        raise ValueError(f"layer {layer}: {attn.latent.form} latent attention needs num_kv_heads {kv_heads}, head_dim "
                         f"{head} and a rope, and takes none of {', '.join(mixed) or '-'}")


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
    caches = cos_sin(ctx, rope, step.seqlens_k)
    with g.scope("rotary"):
        flat = g.op("Reshape", [q_rope, g.ints("shape.merge_heads", [0, 0, -1])])
        q_rope = rotate(ctx, flat, rope, attn.num_heads, step.position_ids, caches)
        q_rope = g.op("Reshape", [q_rope, g.ints(f"shape.heads.{rope.rotary_dim}", [0, 0, -1, rope.rotary_dim])])
        k_rope = rotate(ctx, k_rope, rope, 1, step.position_ids, caches)
    return q_rope, k_rope


def _gqa(ctx: LayerContext, attn: AttentionSpec, step: StepInputs, query: ir.Value, key: ir.Value, value: ir.Value,
         past_key: ir.Value, past_value: ir.Value, kv_heads: int) -> tuple[ir.Value, ir.Value, ir.Value]:
    in_op = rotary_in_op(attn)
    cos, sin = cos_sin(ctx, attn.rope, step.seqlens_k) if in_op else (None, None)
    scale = attn.scale if attn.scale is not None else attn.latent.qk_head_dim ** -0.5
    return ctx.g.ms(
        "GroupQueryAttention", [query, key, value, past_key, past_value, step.seqlens_k, step.total_sequence_length,
                                cos, sin],
        outputs=3, num_heads=attn.num_heads, kv_num_heads=kv_heads, scale=float(scale), do_rotary=int(in_op),
        rotary_interleaved=int(in_op and attn.rope.interleaved))


def _head_slice(ctx: LayerContext, out: ir.Value, head: int, start: int, stop: int | None) -> ir.Value:
    """[B, S, H * head] -> [B, S, H, stop - start]: dims start..stop of every head."""
    g = ctx.g
    out = g.op("Reshape", [out, g.ints(f"shape.heads.{head}", [0, 0, -1, head])])
    return g.op("Slice", [out, g.ints(f"const.{start}", [start]),
                          g.ints(f"const.{stop}" if stop is not None else "const.int64_max",
                                 [stop if stop is not None else 2**63 - 1]), g.ints("const.-1", [-1])])


def _pad_heads(ctx: LayerContext, x: ir.Value, width: int, head: int) -> ir.Value:
    """[B, S, H, width] zero-padded to [B, S, H, head] (the padding adds nothing to a dot product): a Concat with
    zeros expanded to [B, S, H, head - width], not a Pad, which has no bfloat16 kernel on the CUDA EP (nor the CPU
    EP) of onnxruntime 1.31.1 ("Provider type for Pad node ... is not set", a -p bf16 DeepSeek-V3 export on an
    H200)."""
    if width == head:
        return x
    g = ctx.g
    lead = g.op("Slice", [g.op("Shape", [x]), g.ints("const.0", [0]), g.ints("const.3", [3])])
    shape = g.op("Concat", [lead, g.ints(f"const.{head - width}", [head - width])], axis=0)
    return g.op("Concat", [x, g.op("Expand", [ctx.scalar("const.zero", 0.0), shape])], axis=-1)


def _absorbed_attention(ctx: LayerContext, layer: int, attn: AttentionSpec, step: StepInputs, q_nope: ir.Value,
                        q_rope: ir.Value, latent: ir.Value, k_rope: ir.Value, past_key: ir.Value,
                        past_value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """One kv head of [rope key | latent] rows; W_UK folded into the query, W_UV into the output."""
    g = ctx.g
    with g.scope("k_absorb"):
        q_latent = _per_head(ctx, q_nope, _absorbed(ctx, layer, attn, "key"))
    if not rotary_in_op(attn):
        q_rope, k_rope = _rotate_outside(ctx, step, attn, q_rope, k_rope)
    query = g.op("Reshape", [g.op("Concat", [q_rope, q_latent], axis=-1), g.ints("shape.merge_heads", [0, 0, -1])])
    key = g.op("Concat", [k_rope, latent], axis=-1)
    out, present_key, present_value = _gqa(ctx, attn, step, query, key, key, past_key, past_value, 1)
    out = _head_slice(ctx, out, attn.latent.cache_width, attn.latent.qk_rope_head_dim, None)
    with g.scope("v_absorb"):
        out = _per_head(ctx, out, _absorbed(ctx, layer, attn, "value"))
    return out, present_key, present_value


def _decompressed_attention(ctx: LayerContext, layer: int, attn: AttentionSpec, step: StepInputs, q_nope: ir.Value,
                            q_rope: ir.Value, latent: ir.Value, k_rope: ir.Value, past_key: ir.Value,
                            past_value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """kv_b decompresses the latent into per-head nope keys and values; num_heads kv heads of [rope | nope] keys
    (the shared rope key broadcast to every head) and zero-padded values."""
    g, lat, heads, head = ctx.g, attn.latent, attn.num_heads, attn.head_dim
    nope, v_dim = lat.qk_nope_head_dim, lat.v_head_dim
    name = f"layers.{layer}.attn.kv_b"
    weight = ctx.weights.get(f"{name}.weight", (heads * (nope + v_dim), lat.kv_lora_rank))
    with g.scope("kv_b_proj"):
        kv = linear(ctx, latent, name, weight, ctx.settings.plan.format_for("attn.kv_b", layer))
    kv = g.op("Reshape", [kv, g.ints(f"shape.heads.{nope + v_dim}", [0, 0, -1, nope + v_dim])])
    k_nope, value = g.op("Split", [kv, g.ints(f"split.mla_kv_b.{nope}.{v_dim}", [nope, v_dim])], axis=-1, outputs=2)
    if not rotary_in_op(attn):
        q_rope, k_rope = _rotate_outside(ctx, step, attn, q_rope, k_rope)
    k_rope = g.op("Expand", [g.op("Unsqueeze", [k_rope, g.ints("const.axis2", [2])]),
                             g.ints(f"shape.expand_heads.{heads}", [1, 1, heads, 1])])
    merge = g.ints("shape.merge_heads", [0, 0, -1])
    query = g.op("Reshape", [_pad_heads(ctx, g.op("Concat", [q_rope, q_nope], axis=-1), lat.qk_head_dim, head), merge])
    key = g.op("Reshape", [_pad_heads(ctx, g.op("Concat", [k_rope, k_nope], axis=-1), lat.qk_head_dim, head), merge])
    value = g.op("Reshape", [_pad_heads(ctx, value, v_dim, head), merge])
    out, present_key, present_value = _gqa(ctx, attn, step, query, key, value, past_key, past_value, heads)
    if v_dim != head:
        out = _head_slice(ctx, out, head, 0, v_dim)
    return out, present_key, present_value


def latent_attention(ctx: LayerContext, x: ir.Value, layer: int, attn: AttentionSpec, step: StepInputs,
                     past_key: ir.Value, past_value: ir.Value) -> tuple:
    """Returns (output [B, S, hidden], or `Biased` when o_proj has a bias, present_key, present_value); the caches
    hold [rope key | latent] rows (absorbed form) or per-head [rope | nope] keys and padded values (decompressed)."""
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
    form = _decompressed_attention if lat.form == "decompressed" else _absorbed_attention
    out, present_key, present_value = form(ctx, layer, attn, step, q_nope, q_rope, latent, k_rope, past_key,
                                           past_value)
    out = g.op("Reshape", [out, g.ints("shape.merge_heads", [0, 0, -1])])
    hidden = ctx.spec.hidden_size
    with g.scope("o_proj"):
        out = linear(ctx, out, f"{prefix}.o", w.get(f"{prefix}.o.weight", (hidden, heads * lat.v_head_dim)),
                     ctx.settings.plan.format_for("attn.o", layer))
    if attn.o_bias:  # added by the next residual norm when nothing comes between (builder/layers/residual.py)
        out = Biased(out, ctx.float_initializer(f"{prefix}.o.bias", w.get(f"{prefix}.o.bias", (hidden,))))
    return out, present_key, present_value

"""Rotary embedding in the graph: cos/sin caches (with longrope's length switch) and the rotation of q/k outside
GroupQueryAttention, at the step's position ids (StepInputs.position_ids, built by builder/layers/padding.py).

GroupQueryAttention rotates q and k itself from cos/sin caches indexed by position. Two things it cannot do:
- rotate a share of the head whose half (rotary_dim / 2) is not a multiple of 8 (ORT refuses such caches), and
- normalise q/k *after* rotary (HunYuan): its fused q/k norm, like the separate norm nodes, comes before rotary.
For those layers q and k are rotated here with com.microsoft RotaryEmbedding at the positions the op would use, and
GroupQueryAttention runs with do_rotary=0 (`rotary_outside`).

A rope with a length switch (longrope) gets two cache pairs and an If on the run's sequence length (the longest
row's past + new tokens, from seqlens_k rather than the attention mask's width), so a run of length <= the switch
reads the short set at every position and a longer run the long set, as transformers does for each forward pass
(its length: max position + 1); keys already in the KV cache keep the rotation of the run that wrote them, as in
transformers' cache. (A cache-free pass of a sequence grown past the switch differs from that; transformers'
generate and onnxruntime-genai's Phi-3 rewind re-prefill at the crossing: see README, "longrope".)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.rotary import cos_sin_cache, length_switch
from builder.spec import AttentionSpec, RopeSpec


def rotary_in_op(attn: AttentionSpec) -> bool:
    """Whether GroupQueryAttention can rotate this layer's q/k itself (else `rotate` does, before the op)."""
    rope = attn.rope
    return rope is not None and not attn.qk_norm_after_rope and (rope.rotary_dim // 2) % 8 == 0


def rotary_outside(attn: AttentionSpec) -> bool:
    return attn.rope is not None and not rotary_in_op(attn)


def _cache_pair(ctx: LayerContext, rope: RopeSpec, name: str, long: bool = False) -> tuple[ir.Value, ir.Value]:
    cos, sin = cos_sin_cache(rope, long=long)
    dtype = ctx.settings.numpy_dtype
    return ctx.g.constant(f"cos_cache{name}", cos.astype(dtype)), ctx.g.constant(f"sin_cache{name}", sin.astype(dtype))


def _branch(name: str, cos: ir.Value, sin: ir.Value) -> ir.Graph:
    """An If branch that hands out one cache pair (outer-scope initializers, aliased by Identity, not copied)."""
    nodes = [ir.node("Identity", [cache], name=f"/model/rope_switch/{name}/Identity_{i}") for i, cache in
             enumerate((cos, sin))]
    for node, kind in zip(nodes, ("cos", "sin")):
        node.outputs[0].name = f"/model/rope_switch/{name}/{kind}"
    return ir.Graph([], [n.outputs[0] for n in nodes], nodes=nodes, name=f"rope_{name}")


def cos_sin(ctx: LayerContext, rope: RopeSpec, seqlens_k: ir.Value) -> tuple[ir.Value, ir.Value]:
    """cos/sin caches [max_positions, rotary_dim/2] for this run, shared by every layer with the same rope (named by
    order of first use). seqlens_k: int32 [batch], each row's total length - 1."""
    caches = ctx.rope_caches
    if rope not in caches:
        suffix = "" if not caches else f"_{len(caches)}"
        switch = length_switch(rope)
        if switch is None:
            caches[rope] = _cache_pair(ctx, rope, suffix)
        else:
            g = ctx.g
            short, long = _cache_pair(ctx, rope, f"_short{suffix}"), _cache_pair(ctx, rope, f"_long{suffix}", True)
            with g.scope("rope_switch"):
                longest = g.op("ReduceMax", [seqlens_k], keepdims=0)  # total length - 1 of the longest row
                limit = g.shared_constant(f"const.rope_switch.{switch - 1}", np.array(switch - 1, np.int32))
                is_long = g.op("Greater", [longest, limit])
                caches[rope] = g.op("If", [is_long], outputs=2, then_branch=_branch(f"long{suffix}", *long),
                                    else_branch=_branch(f"short{suffix}", *short))
    return caches[rope]


def rotate(ctx: LayerContext, x: ir.Value, rope: RopeSpec, num_heads: int, positions: ir.Value,
           caches: tuple[ir.Value, ir.Value]) -> ir.Value:
    """x [batch, sequence, num_heads * head_dim] with the first rotary_dim of each head rotated (half-split pairs,
    or interleaved pairs when the rope says so)."""
    cos, sin = caches
    return ctx.g.ms("RotaryEmbedding", [x, positions, cos, sin], num_heads=num_heads,
                    rotary_embedding_dim=rope.rotary_dim, interleaved=int(rope.interleaved))

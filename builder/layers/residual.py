"""Where the norms sit around a layer's two sublayers (attention, feed-forward) and how their outputs join the
residual stream.

The stream travels as (pending, residual): the hidden state is pending + residual, the add left pending so that the
next norm fuses it (Skip*Normalization also returns the sum). LayerSpec.norm_scheme:
    "pre"       h + f(norm(h))               (Llama and most decoders)
    "sandwich"  h + post_norm(f(norm(h)))    (Gemma 2/3/4)
    "post"      h + post_norm(f(h))          (OLMo 2/3: no norm before a sublayer)
LayerSpec.residual_scale multiplies each sublayer's output before the add (Granite residual_multiplier).
"""

from __future__ import annotations

import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.norm import skip_stream_norm, stream_norm
from builder.spec import LayerSpec

PRE_NORM = {"attn": "attn_norm", "ffn": "ffn_norm"}
POST_NORM = {"attn": "post_attn_norm", "ffn": "post_ffn_norm"}
NORM_SCHEMES = ("pre", "sandwich", "post")


def sublayer_input(ctx: LayerContext, pending: ir.Value | None, residual: ir.Value, index: int, sublayer: str,
                   layer: LayerSpec) -> tuple[ir.Value, ir.Value]:
    """(the sublayer's input, the new residual: the hidden state before the sublayer)."""
    if layer.norm_scheme not in NORM_SCHEMES:
        raise ValueError(f"unknown norm scheme {layer.norm_scheme!r}")
    if layer.norm_scheme == "post":
        hidden = residual if pending is None else ctx.g.op("Add", [pending, residual])
        return hidden, hidden
    name = PRE_NORM[sublayer]
    with ctx.g.scope(name):
        if pending is None:
            return stream_norm(ctx, residual, f"layers.{index}.{name}"), residual
        return skip_stream_norm(ctx, pending, residual, f"layers.{index}.{name}")


def sublayer_output(ctx: LayerContext, out: ir.Value, index: int, sublayer: str, layer: LayerSpec) -> ir.Value:
    """What the sublayer adds to the residual stream: its output, post-normed and scaled as the layer says."""
    if layer.norm_scheme in ("sandwich", "post"):
        name = POST_NORM[sublayer]
        with ctx.g.scope(name):
            out = stream_norm(ctx, out, f"layers.{index}.{name}")
    if layer.residual_scale != 1.0:
        with ctx.g.scope("residual_scale"):
            out = ctx.g.op("Mul", [out, ctx.scalar(f"residual_scale.{layer.residual_scale!r}", layer.residual_scale)])
    return out

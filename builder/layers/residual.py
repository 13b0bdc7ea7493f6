"""Where the norms sit around a layer's two sublayers (attention, feed-forward) and how their outputs join the
residual stream.

The stream travels as (pending, residual): the hidden state is pending + residual, the add left pending so that the
next norm fuses it (Skip*Normalization also returns the sum). LayerSpec.norm_scheme:
    "pre"       h + f(norm(h))               (Llama and most decoders)
    "sandwich"  h + post_norm(f(norm(h)))    (Gemma 2/3/4)
    "post"      h + post_norm(f(h))          (OLMo 2/3: no norm before a sublayer)
LayerSpec.residual_scale multiplies each sublayer's output before the add (Granite residual_multiplier).

A sublayer may hand back its output projection's bias unadded (`Biased`): under the "pre" scheme the next
Skip*Normalization adds it in the same kernel through its bias input (one node and one kernel fewer per decode step);
wherever the sum is needed on its own (post-norms, scales, the per-layer paths) `settled` adds it first, with the same
initializer, so the weights are byte-identical either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from builder.layers import LayerContext
from builder.layers.norm import skip_stream_norm, stream_norm
from builder.spec import LayerSpec

@dataclass(frozen=True)
class Biased:
    """A sublayer output whose bias is still to be added (value + bias)."""

    value: ir.Value
    bias: ir.Value


def settled(ctx: LayerContext, x: "ir.Value | Biased | None") -> ir.Value | None:
    """x with any deferred bias added."""
    if isinstance(x, Biased):
        return ctx.g.op("Add", [x.value, x.bias])
    return x


def add_to_stream(ctx: LayerContext, pending: "ir.Value | Biased", residual: ir.Value, prefix: str
                  ) -> tuple[ir.Value, ir.Value]:
    """(norm(pending + residual), pending + residual) through the model's Skip*Normalization; a deferred bias goes in
    its bias input."""
    if isinstance(pending, Biased):
        return skip_stream_norm(ctx, pending.value, residual, prefix, pending.bias)
    return skip_stream_norm(ctx, pending, residual, prefix)


PRE_NORM = {"attn": "attn_norm", "ffn": "ffn_norm"}
POST_NORM = {"attn": "post_attn_norm", "ffn": "post_ffn_norm"}
NORM_SCHEMES = ("pre", "sandwich", "post")


def sublayer_input(ctx: LayerContext, pending: ir.Value | None, residual: ir.Value, index: int, sublayer: str,
                   layer: LayerSpec) -> tuple[ir.Value, ir.Value]:
    """(the sublayer's input, the new residual: the hidden state before the sublayer)."""
    if layer.norm_scheme not in NORM_SCHEMES:
        raise ValueError(f"unknown norm scheme {layer.norm_scheme!r}")
    if layer.norm_scheme == "post":
        hidden = residual if pending is None else ctx.g.op("Add", [settled(ctx, pending), residual])
        return hidden, hidden
    name = PRE_NORM[sublayer]
    with ctx.g.scope(name):
        if pending is None:
            return stream_norm(ctx, residual, f"layers.{index}.{name}"), residual
        return add_to_stream(ctx, pending, residual, f"layers.{index}.{name}")


def sublayer_output(ctx: LayerContext, out: "ir.Value | Biased", index: int, sublayer: str,
                    layer: LayerSpec) -> "ir.Value | Biased":
    """What the sublayer adds to the residual stream: its output, post-normed and scaled as the layer says (a deferred
    bias stays deferred only when nothing comes between the sublayer and the next norm)."""
    if layer.norm_scheme != "pre" or layer.residual_scale != 1.0:
        out = settled(ctx, out)
    if layer.norm_scheme in ("sandwich", "post"):
        name = POST_NORM[sublayer]
        with ctx.g.scope(name):
            out = stream_norm(ctx, out, f"layers.{index}.{name}")
    if layer.residual_scale != 1.0:
        with ctx.g.scope("residual_scale"):
            out = ctx.g.op("Mul", [out, ctx.scalar(f"residual_scale.{layer.residual_scale!r}", layer.residual_scale)])
    return out

"""Assemble the decoder graph from a ModelSpec: inputs, embedding, layers, final norm, lm_head, state outputs.

Inputs follow onnxruntime-genai's decoder convention: input_ids [batch, sequence_length] int64,
attention_mask [batch, total_sequence_length] int64, and each layer's past state; outputs logits
[batch, sequence_length, vocab] and each layer's present state. The state is what each layer's token mixer declares
(builder/state.py: a KV cache for full attention, conv + recurrent state for linear attention, none for a layer that
reuses another layer's keys/values); its names carry the decoder layer index, and shapes are per layer. Every layer
runs with each row's real new tokens first (builder/layers/padding.py); logits come back in the caller's order
([batch, 1, vocab] for last_token_logits: each row's last real token).
"""

from __future__ import annotations

import onnx_ir as ir

import builder
from builder.graph import FLOAT_DTYPES, GraphBuilder
from builder.layers import LayerContext, StepInputs
from builder.layers.attention import attention, kv_sharing_layers
from builder.layers.dense_moe import dense_moe_block
from builder.layers.embedding import embedding
from builder.layers.linear_attention import linear_attention
from builder.layers.lm_head import lm_head
from builder.layers.mlp import gated_mlp
from builder.layers.padding import last_token_rows, restore_order, step_inputs
from builder.layers.residual import add_to_stream, settled, sublayer_input, sublayer_output
from builder.settings import ExportSettings
from builder.layers.per_layer_input import per_layer_block, per_layer_inputs
from builder.spec import DenseMoeSpec, LayerSpec, LinearAttentionSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap


def _token_mixer(ctx: LayerContext, x: ir.Value, index: int, layer: LayerSpec, step: StepInputs, pasts: dict,
                 kv_store: dict | None) -> tuple[ir.Value, dict]:
    """The layer's attention or linear attention: (output, {(layer, state kind): present value})."""
    g, mixer = ctx.g, layer.attention
    if isinstance(mixer, LinearAttentionSpec):
        with g.scope("linear_attn"):
            out, conv, recurrent = linear_attention(ctx, x, index, mixer, step, pasts[index, "conv"],
                                                    pasts[index, "recurrent"])
        return out, {(index, "conv"): conv, (index, "recurrent"): recurrent}
    with g.scope("attn"):
        out, key, value = attention(ctx, x, index, mixer, step, pasts.get((index, "key")),
                                    pasts.get((index, "value")), kv_store=kv_store)
    return out, {(index, "key"): key, (index, "value"): value}


def _ffn(ctx: LayerContext, x: ir.Value, residual: ir.Value, index: int, layer: LayerSpec) -> ir.Value:
    if isinstance(layer.ffn, MlpSpec):
        with ctx.g.scope("mlp"):
            return gated_mlp(ctx, x, f"layers.{index}.mlp", layer.ffn, index)
    if isinstance(layer.ffn, DenseMoeSpec):
        return dense_moe_block(ctx, x, residual, index, layer.ffn)
    from builder.layers.moe import moe_block  # MoE families only

    with ctx.g.scope("moe"):
        return moe_block(ctx, x, index, layer.ffn)


def build_decoder(spec: ModelSpec, settings: ExportSettings, weights: WeightMap, on_written=None) -> ir.Model:
    g = GraphBuilder()
    g.on_written = on_written  # progress: bytes of each streamed initializer
    ctx = LayerContext(g, spec, settings, weights)
    dtype = settings.ir_dtype
    input_ids = g.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    attention_mask = g.input("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
    states = spec.state
    state_dtypes = {"io": dtype, "linear_attn": FLOAT_DTYPES[settings.linear_attn_dtype][0]}
    pasts = {(t.layer, t.kind): g.input(t.past_name, state_dtypes[t.dtype], list(t.past_shape)) for t in states}
    sharing = kv_sharing_layers(spec)
    kv_store: dict = {}  # source layer -> SharedKV, for KV-sharing consumers
    # every layer runs with each row's real tokens first (builder/layers/padding.py; left_padding=false: in the
    # caller's layout, the same for unpadded and right-padded rows); logits come back in the caller's order
    input_ids, step, rank = step_inputs(g, input_ids, attention_mask, reorder=settings.left_padding)

    hidden = embedding(ctx, input_ids)
    per_layer = per_layer_inputs(ctx, input_ids, hidden) if spec.per_layer_input_size else None
    residual, pending = hidden, None
    presents: dict = {}
    for i, layer in enumerate(spec.layers):
        with g.scope(f"layers.{i}"):
            x, residual = sublayer_input(ctx, pending, residual, i, "attn", layer)
            shares = i in sharing
            attn_out, present = _token_mixer(ctx, x, i, layer, step, pasts, kv_store if shares else None)
            presents.update(present)
            attn_out = sublayer_output(ctx, attn_out, i, "attn", layer)
            x, residual = sublayer_input(ctx, attn_out, residual, i, "ffn", layer)
            pending = sublayer_output(ctx, _ffn(ctx, x, residual, i, layer), i, "ffn", layer)
            if per_layer is not None or layer.output_scale:
                pending = settled(ctx, pending)
            if per_layer is not None:
                with g.scope("per_layer"):
                    residual = g.op("Add", [pending, residual])
                    pending = per_layer_block(ctx, residual, i, per_layer)
            if layer.output_scale:
                # (residual + pending) * s, kept as the pair the next SkipSimplifiedLayerNormalization adds
                with g.scope("layer_scalar"):
                    scale = ctx.float_initializer(f"layers.{i}.layer_scalar",
                                                  ctx.weights.get(f"layers.{i}.layer_scalar", (1,)))
                    pending, residual = g.op("Mul", [pending, scale]), g.op("Mul", [residual, scale])
    with g.scope("final_norm"):
        x, _ = add_to_stream(ctx, pending, residual, "final_norm")
    last_only = settings.last_token_logits
    if last_only:
        x = last_token_rows(g, x, step)
    elif rank is not None:
        x = restore_order(g, x, rank)
    logits = lm_head(ctx, x)

    g.output(logits, "logits", dtype, ["batch_size", 1 if last_only else "sequence_length", spec.vocab_size])
    for t in states:
        g.output(presents[t.layer, t.kind], t.present_name, state_dtypes[t.dtype], list(t.present_shape))
    return ir.Model(g.graph, ir_version=10, producer_name="ortbuild", producer_version=builder.__version__)

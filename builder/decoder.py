"""Assemble the decoder graph from a ModelSpec: inputs, embedding, layers, final norm, lm_head, KV outputs.

Inputs follow onnxruntime-genai's decoder convention: input_ids [batch, sequence_length] int64,
attention_mask [batch, total_sequence_length] int64, past_key_values.{i}.key/.value
[batch, kv_heads, past_sequence_length, head_dim]; outputs logits [batch, sequence_length, vocab] and
present.{i}.key/.value. The cache index i counts the layers that own a cache (spec.kv_layers): layers that reuse
another layer's keys/values (Gemma 4 KV sharing) have none. Past/present shapes are per layer (head_dim and
kv_heads may differ between layers).
"""

from __future__ import annotations

import onnx_ir as ir

import builder
from builder.graph import GraphBuilder
from builder.layers import LayerContext
from builder.layers.attention import attention
from builder.layers.dense_moe import dense_moe_block
from builder.layers.embedding import embedding
from builder.layers.lm_head import lm_head
from builder.layers.mlp import gated_mlp
from builder.layers.norm import skip_stream_norm
from builder.layers.padding import restore_order, step_inputs
from builder.layers.residual import sublayer_input, sublayer_output
from builder.settings import ExportSettings
from builder.layers.per_layer_input import per_layer_block, per_layer_inputs
from builder.spec import DenseMoeSpec, LayerSpec, MlpSpec, ModelSpec
from builder.weights import WeightMap


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
    kv_shape = lambda i, length: ["batch_size", spec.layers[i].attention.num_kv_heads, length,  # noqa: E731
                                  spec.layers[i].attention.head_dim]
    slots = {layer: slot for slot, layer in enumerate(spec.kv_layers)}  # layer index -> cache index
    pasts = {i: (g.input(f"past_key_values.{slot}.key", dtype, kv_shape(i, "past_sequence_length")),
                 g.input(f"past_key_values.{slot}.value", dtype, kv_shape(i, "past_sequence_length")))
             for i, slot in slots.items()}
    kv_sources = {layer.attention.kv_source for layer in spec.layers} - {None}
    kv_store: dict = {}  # source layer -> SharedKV, for KV-sharing consumers
    # every layer runs with each row's real tokens first (builder/layers/padding.py); logits come back in order
    input_ids, step, rank = step_inputs(g, input_ids, attention_mask)

    hidden = embedding(ctx, input_ids)
    per_layer = per_layer_inputs(ctx, input_ids, hidden) if spec.per_layer_input_size else None
    residual, pending = hidden, None
    presents = []
    for i, layer in enumerate(spec.layers):
        with g.scope(f"layers.{i}"):
            x, residual = sublayer_input(ctx, pending, residual, i, "attn", layer)
            with g.scope("attn"):
                shares = i in kv_sources or layer.attention.kv_source is not None
                attn_out, present_key, present_value = attention(ctx, x, i, layer.attention, step,
                                                                 *pasts.get(i, (None, None)),
                                                                 kv_store=kv_store if shares else None)
            if i in slots:
                presents.append((i, present_key, present_value))
            attn_out = sublayer_output(ctx, attn_out, i, "attn", layer)
            x, residual = sublayer_input(ctx, attn_out, residual, i, "ffn", layer)
            pending = sublayer_output(ctx, _ffn(ctx, x, residual, i, layer), i, "ffn", layer)
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
        x, _ = skip_stream_norm(ctx, pending, residual, "final_norm")
    logits = lm_head(ctx, restore_order(g, x, rank))

    g.output(logits, "logits", dtype, ["batch_size", "sequence_length", spec.vocab_size])
    for i, key, value in presents:
        g.output(key, f"present.{slots[i]}.key", dtype, kv_shape(i, "total_sequence_length"))
        g.output(value, f"present.{slots[i]}.value", dtype, kv_shape(i, "total_sequence_length"))
    return ir.Model(g.graph, ir_version=10, producer_name="ortbuild", producer_version=builder.__version__)

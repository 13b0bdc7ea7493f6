"""Padded batches: the per-step bundle every layer reads, and the "real tokens first" layout the layers run in.

GroupQueryAttention takes a row's valid tokens to be its first seqlens_k + 1 positions: rotary positions, the cache
slots it writes and the keys it attends all follow from that. A right-padded batch therefore runs exactly as each
row would alone, a left-padded one does not (its real tokens sit after the pads). So the decoder permutes each row's
new tokens once, right after reading input_ids, so that the real ones (attention_mask 1) come first and in order,
runs every layer in that layout, and puts the final hidden states back in the caller's order before the lm_head:
logits come out at the positions the caller passed. For any padding pattern every layer then sees exactly what it
would see for the row alone followed by pad tokens, and the cache holds the row's keys/values at [0, n), where the
next decode step (mask one wider, seqlens_k = n) writes slot n, in a shared past/present buffer and a growing one
alike. Pad tokens still flow through position-wise layers (embedding, MLP, MoE routing); their results land in
columns no real token reads and are dropped by the final reorder. In a decode step (one new token) and in an
unpadded batch the permutation is the identity.

Layers that keep other state (recurrent mixers) read `token_mask`/`token_count` from the bundle to make the pad
positions no-ops; in the aligned layout the pads are always a row's trailing columns.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from builder.graph import GraphBuilder
from builder.layers import StepInputs

INT64_MAX = np.iinfo(np.int64).max


def step_inputs(g: GraphBuilder, input_ids: ir.Value, attention_mask: ir.Value
                ) -> tuple[ir.Value, StepInputs, ir.Value]:
    """(input_ids in the aligned layout, the bundle every layer reads, rank).

    rank int64 [B, S]: the aligned column of the caller's column s. With m the new tokens' mask (the last S columns
    of attention_mask) and c = cumsum(m): rank = c - 1 for a real token and n + s - c for a pad (n = sum(m)), i.e.
    real tokens keep their order at 0..n-1 and pads keep theirs at n..S-1 (a permutation for any mask).
    A single new token counts as real whatever its mask column says: that is a decode step, and with the static
    [B, max_length] mask of CUDA-graph decoding (ones up to the current length, then zeros) its column is not the
    last one. (GroupQueryAttention, too, takes every new token of a step with a cache as real.)
    """
    one = g.shared_constant("const.one_i64", np.array(1, np.int64))
    axis1 = g.ints("const.axis1", [1])
    with g.scope("attn_mask"):
        total = g.op("ReduceSum", [attention_mask, axis1], keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [total, one])], to=ir.DataType.INT32)
        length = g.op("Gather", [g.op("Shape", [attention_mask]), g.constant("const.idx1", np.array(1, np.int64))],
                      axis=0)
        total_len = g.op("Cast", [length], to=ir.DataType.INT32)
    with g.scope("padding"):
        # Shape-derived values stay on the host and feed only host-side inputs (Slice starts, Range limit); everything
        # else derives from device tensors, so a CUDA session needs no Memcpy node (CUDA-graph capture requires that).
        new = g.op("Shape", [input_ids], start=1, end=2)  # [S]
        columns = g.op("Range", [g.shared_constant("const.zero_i64", np.array(0, np.int64)),
                                 g.op("Squeeze", [new, g.ints("const.axis0", [0])]), one])  # [S]
        mask = g.op("Slice", [attention_mask, g.op("Neg", [new]), g.ints("const.int64_max", [INT64_MAX]), axis1])
        last_column = g.op("ReduceMax", [columns], keepdims=1)  # [1]: S - 1
        single = g.op("Cast", [g.op("Equal", [last_column, g.ints("const.0", [0])])], to=ir.DataType.INT64)
        mask = g.op("Max", [mask, single])  # [B, S]: which new tokens are real
        count = g.op("ReduceSum", [mask, axis1], keepdims=1)  # [B, 1] real new tokens per row
        cumsum = g.op("CumSum", [mask, one])  # along axis 1
        real_rank = g.op("Sub", [cumsum, one])
        pad_rank = g.op("Sub", [g.op("Add", [count, columns]), cumsum])
        rank = g.op("Where", [g.op("Cast", [mask], to=ir.DataType.BOOL), real_rank, pad_rank])
        aligned_ids = g.op("ScatterElements", [input_ids, rank, input_ids], axis=1)
        token_mask = g.op("Less", [columns, count])  # [B, S] bool, aligned layout: column < n
        token_count = g.op("Squeeze", [count, axis1])
    return aligned_ids, StepInputs(seqlens_k=seqlens, total_sequence_length=total_len, token_mask=token_mask,
                                        token_count=token_count), rank


def restore_order(g: GraphBuilder, hidden: ir.Value, rank: ir.Value) -> ir.Value:
    """hidden [B, S, H] in the aligned layout -> the caller's column order (out[b, s] = hidden[b, rank[b, s]]).

    GatherND over whole rows (batch_dims=1): the index is [B, S, 1], not a [B, S, H] GatherElements index.
    """
    with g.scope("padding_restore"):
        index = g.op("Unsqueeze", [rank, g.ints("const.axis_last", [-1])])
        return g.op("GatherND", [hidden, index], batch_dims=1)

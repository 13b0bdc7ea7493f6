"""Padded batches: the per-step bundle every layer reads, and the "real tokens first" layout the layers run in.

GroupQueryAttention takes a row's valid tokens to be its first seqlens_k + 1 positions: rotary positions, the cache
slots it writes and the keys it attends all follow from that. A right-padded batch therefore runs exactly as each
row would alone, a left-padded one does not (its real tokens sit after the pads). So the decoder permutes each row's
new tokens once, right after reading input_ids, so that the real ones (attention_mask 1) come first and in order,
runs every layer in that layout, and puts the final hidden states back in the caller's order before the lm_head:
logits come out at the positions the caller passed (with last_token_logits, only each row's last real token:
last_token_rows). For any padding pattern every layer then sees exactly what it
would see for the row alone followed by pad tokens, and the cache holds the row's keys/values at [0, n), where the
next decode step (mask one wider, seqlens_k = n) writes slot n, in a shared past/present buffer and a growing one
alike. Pad tokens still flow through position-wise layers (embedding, MLP, MoE routing); their results land in
columns no real token reads and are dropped by the final reorder. In a decode step (one new token) and in an
unpadded batch the permutation is the identity.

Layers that keep other state (recurrent mixers) read `token_mask`/`token_count` from the bundle to make the pad
positions no-ops; in the aligned layout the pads are always a row's trailing columns. Those two are built only when a
layer asks: every node of this bundle runs at every decode step (a CUDA graph cannot skip work with an If), so the
bundle holds only what the model reads.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from builder.graph import GraphBuilder
from builder.layers import StepInputs

INT64_MAX = np.iinfo(np.int64).max


def step_inputs(g: GraphBuilder, input_ids: ir.Value, attention_mask: ir.Value, reorder: bool = True
                ) -> tuple[ir.Value, StepInputs, ir.Value | None]:
    """(input_ids in the aligned layout, the bundle every layer reads, rank; rank None without the reorder).

    reorder=False (left_padding=false) writes no permutation: the layers run in the caller's layout, which is the
    aligned one for unpadded and right-padded rows (onnxruntime-genai's padding) and wrong for left-padded ones.

    rank int64 [B, S]: the aligned column of the caller's column s. With m the new tokens' mask (the last S columns
    of attention_mask): a real token goes to the number of real tokens before it, a pad to s plus the number of real
    tokens after it, i.e. real tokens keep their order at 0..n-1 and pads keep theirs at n..S-1 (a permutation for
    any mask). Both counts are one exclusive CumSum each (forward and reverse), so the bundle is a handful of ops,
    all of which a decode step runs; in a decode step (S = 1) rank is 0 whatever the mask column says (both counts
    are 0), which covers the static [B, max_length] mask of CUDA-graph decoding, whose column for the new token is
    not the last one.
    """
    one = g.shared_constant("const.one_i64", np.array(1, np.int64))
    axis1 = g.ints("const.axis1", [1])
    with g.scope("attn_mask"):
        total = g.op("ReduceSum", [attention_mask, axis1], keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [total, one])], to=ir.DataType.INT32)
        length = g.op("Gather", [g.op("Shape", [attention_mask]), g.constant("const.idx1", np.array(1, np.int64))],
                      axis=0)
        total_len = g.op("Cast", [length], to=ir.DataType.INT32)
    built: dict = {}

    def columns_and_mask() -> tuple[ir.Value, ir.Value]:
        """(the new columns 0..S-1 [S], the new tokens' mask [B, S]), built once, where first needed."""
        if not built:
            with g.scope("padding"):
                # Shape-derived values stay on the host and feed only host-side inputs (Slice starts, Range limit);
                # everything else derives from device tensors, so a CUDA session needs no Memcpy node (CUDA-graph
                # capture requires that).
                new = g.op("Shape", [input_ids], start=1, end=2)  # [S]
                built["columns"] = g.op("Range", [g.shared_constant("const.zero_i64", np.array(0, np.int64)),
                                                  g.op("Squeeze", [new, g.ints("const.axis0", [0])]), one])  # [S]
                built["mask"] = g.op("Slice", [attention_mask, g.op("Neg", [new]),
                                               g.ints("const.int64_max", [INT64_MAX]), axis1])
        return built["columns"], built["mask"]

    aligned_ids, rank = input_ids, None
    if reorder:
        columns, mask = columns_and_mask()
        with g.scope("padding"):
            real_before = g.op("CumSum", [mask, one], exclusive=1)  # [B, S] real tokens left of each column
            real_after = g.op("CumSum", [mask, one], exclusive=1, reverse=1)  # ... and right of it
            rank = g.op("Where", [g.op("Cast", [mask], to=ir.DataType.BOOL), real_before,
                                  g.op("Add", [columns, real_after])])
            aligned_ids = g.op("ScatterElements", [input_ids, rank, input_ids], axis=1)

    def last_column() -> ir.Value:
        """int64 [1]: S - 1, on the device (a shape mixed into device values would need a Memcpy)."""
        if "last_column" not in step.derived:
            step.derived["last_column"] = g.op("ReduceMax", [columns_and_mask()[0]], keepdims=1)
        return step.derived["last_column"]

    def token_state(name: str) -> ir.Value:
        """token_count / token_mask for layers with recurrent state, position_ids for layers that rotate or scale
        outside the op (built on first use, once)."""
        columns, mask = columns_and_mask()
        if name == "position_ids":
            # GroupQueryAttention's numbering: the past length (seqlens_k + 1 - S, at least 0: rows of a padded
            # prompt start at 0) plus the column j, i.e. max(seqlens_k - (S - 1 - j), j), from device tensors only
            with g.scope("position_ids"):
                last = g.op("Unsqueeze", [g.op("Cast", [seqlens], to=ir.DataType.INT64), axis1])  # [B, 1]
                return g.op("Max", [g.op("Sub", [last, g.op("Sub", [last_column(), columns])]), columns])
        with g.scope("padding"):
            if "count" not in step.derived:
                # The real new tokens of a row. A growing mask ends with the newest column: where that column is
                # real, the real new tokens are the ones in the last S columns (left-padded prompts, decode steps,
                # continued chunks, holes included). Where it is not, the row is a right-padded prompt or
                # onnxruntime-genai's static CUDA-graph mask [B, max_length] (ones for the row's tokens so far,
                # prompt included, then zeros), and the count is min(S, the row's ones), as GroupQueryAttention
                # counts it. (Reading the last S columns alone broke captured Qwen3.5 generation on an H200: a
                # static mask's last columns are zeros, or hold part of a long prompt.)
                last_real = g.op("Cast", [g.op("Slice", [attention_mask, g.ints("const.-1", [-1]),
                                                         g.ints("const.int64_max", [INT64_MAX]), axis1])],
                                 to=ir.DataType.BOOL)  # [B, 1]
                new_tokens = g.op("Add", [last_column(), one])  # [1]: S
                step.derived["count"] = g.op("Where", [last_real, g.op("ReduceSum", [mask, axis1], keepdims=1),
                                                       g.op("Min", [g.op("Unsqueeze", [total, axis1]), new_tokens])])
            count = step.derived["count"]
            if name == "token_count":
                return g.op("Squeeze", [count, axis1])
            return g.op("Less", [columns, count])  # [B, S] bool, aligned layout: column < n

    step = StepInputs(seqlens_k=seqlens, total_sequence_length=total_len, make=token_state)
    return aligned_ids, step, rank


def restore_order(g: GraphBuilder, hidden: ir.Value, rank: ir.Value) -> ir.Value:
    """hidden [B, S, H] in the aligned layout -> the caller's column order (out[b, s] = hidden[b, rank[b, s]]).

    GatherND over whole rows (batch_dims=1): the index is [B, S, 1], not a [B, S, H] GatherElements index.
    """
    with g.scope("padding_restore"):
        index = g.op("Unsqueeze", [rank, g.ints("const.axis_last", [-1])])
        return g.op("GatherND", [hidden, index], batch_dims=1)


def last_token_rows(g: GraphBuilder, hidden: ir.Value, step: StepInputs) -> ir.Value:
    """hidden [B, S, H] in the aligned layout -> [B, 1, H]: each row's last real new token (aligned column n - 1;
    column 0 for a row with none, as in a decode step under onnxruntime-genai's static mask, whose new column is not
    counted). The lm_head then runs on one row per sequence (last_token_logits)."""
    with g.scope("last_token"):
        last = g.op("Sub", [step.token_count, g.shared_constant("const.one_i64", np.array(1, np.int64))])
        last = g.op("Max", [last, g.shared_constant("const.zero_i64", np.array(0, np.int64))])  # [B]
        index = g.op("Unsqueeze", [last, g.ints("const.axes12", [1, 2])])  # [B, 1, 1]
        return g.op("GatherND", [hidden, index], batch_dims=1)

"""Uneven prompts in one batch give each prompt exactly what it gets alone, for every family.

Three prompts of 17, 11 and 5 tokens (tests/batching.py) run as one batch, padded on the left or on the right, with
a growing cache (present -> past) or one preallocated shared buffer (onnxruntime-genai's layout; also with the
static decode mask of CUDA-graph decoding), then 6 decode steps fed each row's own greedy tokens; every row's prompt
logits (at its real columns) and decode logits must equal the same prompt run alone. onnxruntime-genai's own
batching (right-padded with the pad token, as its Tokenizer.encode_batch pads) must pick the same 16 greedy tokens as
each prompt generated alone. The 11-token row is longer than the sliding windows (8) of mistral, gpt_oss and
gemma2/3/4 and is padded in every batch; the 5-token row decodes past the window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import batching
import parity

TOL = 1e-5  # fp32 logits max-abs, batch row vs alone: 0.0 for dense/Gemma families, <= 1.2e-6 with MoE ops
DECODE_STEPS = 6  # the 5-token row reaches 11 tokens, past the window of 8
NEW_TOKENS = 16
CASES = batching.FAMILIES
# (padding side, shared buffer length, static mask as in CUDA-graph decoding: False, True (decode steps) or "genai"
# (the prompt too, right-padded: what onnxruntime-genai feeds under capture))
LAYOUTS = [("left", None, False), ("left", 64, False), ("right", None, False), ("right", 64, False),
           ("left", 64, True)]
LAYOUT_IDS = [f"{side}-{'growing' if not length else 'static' if static else 'shared'}"
              for side, length, static in LAYOUTS]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    def checkpoint(case: str) -> Path:
        arch, overrides = CASES[case]
        return tiny_checkpoint(arch, **overrides)

    cache = parity.export_cache(checkpoint, tmp_path_factory, "batch")
    return lambda case: cache(case, "fp32", "cpu", *batching.EXPORT_OPTIONS.get(case, ()))


@pytest.fixture(scope="module")
def alone(exported):
    """case -> (greedy decode tokens per prompt, each prompt's own run fed those tokens), computed once."""
    done: dict[str, tuple] = {}

    def get(case: str):
        if case not in done:
            model = exported(case)
            feeds = [batching.greedy_tokens(model, p, DECODE_STEPS) for p in batching.PROMPTS]
            done[case] = feeds, [batching.run_onnx_solo(model, p, f) for p, f in zip(batching.PROMPTS, feeds)]
        return done[case]

    return get


@pytest.mark.parametrize("side,shared,static", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_matches_each_prompt_alone(case, side, shared, static, exported, alone):
    feeds, solos = alone(case)
    run = batching.run_onnx_batch(exported(case), batching.PROMPTS, side, feeds, max_length=shared,
                                  static_mask=static)
    prompt_err, decode_err = batching.batch_vs_solo(run, solos)
    assert prompt_err <= TOL, f"{case} {side}: prompt logits max-abs {prompt_err:.3g} vs alone"
    assert decode_err <= TOL, f"{case} {side}: decode logits max-abs {decode_err:.3g} vs alone"


@pytest.mark.parametrize("case", list(CASES))
def test_static_mask_from_the_prompt_on_matches_a_growing_one(case, exported, alone):
    """What onnxruntime-genai feeds under CUDA-graph capture: the prompt's mask in the first columns of a zeroed
    [1, max_length] buffer, then ones up to the current length (batch 1: ONNX Runtime's CPU GroupQueryAttention
    refuses a multi-token batch whose total length exceeds its new tokens)."""
    feeds, solos = alone(case)
    for prompt, feed, solo in zip(batching.PROMPTS, feeds, solos):
        ids, mask = batching.pad([prompt], "right", 3)
        # max_length as genai sets it (prompt + new tokens): the prompt's ones reach into the mask's last columns
        logits, steps = batching.run_onnx_masked(exported(case), ids, mask, [feed], len(prompt) + len(feed),
                                                 static_mask=True, static_prompt=True)
        assert parity.max_abs(logits[0], solo.prompt_logits[0]) <= TOL, case
        assert max(parity.max_abs(a, b) for a, b in zip(steps[0], solo.step_logits[0])) <= TOL, case


@pytest.mark.genai
@pytest.mark.parametrize("case", list(CASES))
def test_genai_batch_generates_what_each_prompt_generates_alone(case, exported):
    model = exported(case)
    batched = batching.genai_batch_greedy(model, batching.PROMPTS, NEW_TOKENS)
    solo = [batching.genai_solo_greedy(model, p, NEW_TOKENS) for p in batching.PROMPTS]
    assert [len(s) for s in solo] == [NEW_TOKENS] * len(solo)  # no early eos: all 16 tokens compared
    assert batched == solo


def test_pads_anywhere_in_the_row(exported, alone):
    """Pads before, between and after the real tokens of a prompt: the mask decides, not the pad side."""
    feeds, solos = alone("mistral")
    width = 20
    columns = [np.array([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19]),  # 17 real of 20
               np.arange(4, 15), np.array([0, 7, 8, 12, 19])]
    ids = np.full((len(batching.PROMPTS), width), 3, np.int64)
    mask = np.zeros_like(ids)
    for b, (p, cols) in enumerate(zip(batching.PROMPTS, columns)):
        ids[b, cols], mask[b, cols] = p, 1
    prompt, steps = batching.run_onnx_masked(exported("mistral"), ids, mask, feeds)
    for b, cols in enumerate(columns):
        assert parity.max_abs(prompt[b, cols], solos[b].prompt_logits[0]) <= TOL
        assert max(parity.max_abs(x, y) for x, y in zip(steps[b], solos[b].step_logits[0])) <= TOL


def test_without_the_reorder_left_padding_is_wrong(exported, alone, tmp_path):
    """Control: the same graph with the reorder bypassed is exact for right padding only (what GQA gives alone)."""
    bypassed = batching.without_reorder(exported("mistral"), tmp_path / "bypassed")
    feeds, solos = alone("mistral")
    left = batching.batch_vs_solo(batching.run_onnx_batch(bypassed, batching.PROMPTS, "left", feeds), solos)
    right = batching.batch_vs_solo(batching.run_onnx_batch(bypassed, batching.PROMPTS, "right", feeds), solos)
    assert min(left) > 0.1, left
    assert max(right) <= TOL, right


def test_reorder_ops_run_once_per_step(exported):
    """One reorder of the new token ids and one of the final hidden states, whatever the depth."""
    ops = parity.ops_in(exported("gemma4_all"))
    assert ops["ScatterElements"] == 1 and ops["GatherND"] == 1 and ops["CumSum"] == 2


# ------------------------------------------------------------------------------------- the bundle layers read

def _step_graph():
    """step_inputs + restore_order on their own: (ids, mask, hidden) -> aligned ids, bundle, restored hidden."""
    import onnx_ir as ir
    import onnxruntime as ort

    from builder.graph import GraphBuilder
    from builder.layers.padding import restore_order, step_inputs

    g = GraphBuilder()
    ids = g.input("input_ids", ir.DataType.INT64, ["B", "S"])
    mask = g.input("attention_mask", ir.DataType.INT64, ["B", "T"])
    hidden = g.input("hidden", ir.DataType.FLOAT, ["B", "S", 2])
    aligned, step, rank = step_inputs(g, ids, mask)
    for value, name, dtype in [(aligned, "aligned", ir.DataType.INT64),
                               (step.seqlens_k, "seqlens_k", ir.DataType.INT32),
                               (step.total_sequence_length, "total", ir.DataType.INT32),
                               (step.token_mask, "token_mask", ir.DataType.BOOL),
                               (step.token_count, "token_count", ir.DataType.INT64),
                               (restore_order(g, hidden, rank), "restored", ir.DataType.FLOAT)]:
        g.output(value, name, dtype, [])
    proto = ir.serde.serialize_model(ir.Model(g.graph, ir_version=10))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mask,new", [
    ([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], 5),  # left-padded prefill
    ([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], 5),  # right-padded, holes, a row with no real token
    ([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]], 1),  # decode after left / right padding
    ([[1, 1, 1, 1, 0, 0, 0, 0]], 1),  # decode with a static CUDA-graph mask: the new token is real
    ([[0, 1, 1, 1, 1, 0, 1]], 3),  # new tokens are the last 3 columns of a wider mask
    # onnxruntime-genai's static CUDA-graph mask from the prompt on: a right-padded prompt batch in the first columns
    ([[1, 1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0]], 4),
    ([[1, 1, 1, 1, 1, 1, 0, 0]], 6),  # ... a prompt whose ones reach into the last 6 columns
])
def test_step_bundle_puts_real_tokens_first(mask, new):
    """Against a numpy reference: aligned ids, token_mask/token_count, seqlens_k, and the reorder undone exactly."""
    mask = np.array(mask, np.int64)
    batch = mask.shape[0]
    ids = np.arange(100, 100 + batch * new, dtype=np.int64).reshape(batch, new)
    real = mask[:, -new:].astype(bool) | (new == 1)
    # per row, the caller's column of each aligned column: real tokens in order, then pads in order
    order = np.stack([np.concatenate([np.flatnonzero(r), np.flatnonzero(~r)]) for r in real])
    hidden = np.random.default_rng(0).standard_normal((batch, new, 2)).astype(np.float32)
    aligned_hidden = np.take_along_axis(hidden, order[:, :, None], axis=1)  # what the layers hand back
    names = ["aligned", "seqlens_k", "total", "token_mask", "token_count", "restored"]
    out = dict(zip(names, _step_graph().run(None, {"input_ids": ids, "attention_mask": mask,
                                                   "hidden": aligned_hidden})))
    assert out["aligned"].tolist() == np.take_along_axis(ids, order, axis=1).tolist()
    # where the mask's newest column is a pad (a right-padded prompt, a static mask), the real new tokens are the
    # row's first min(S, ones): its real tokens are already first, so the aligned layout is the caller's
    counts = np.where(mask[:, -1] == 1, real.sum(1), np.minimum(new, mask.sum(1)))
    assert out["token_count"].tolist() == counts.tolist()
    assert out["token_mask"].tolist() == (np.arange(new)[None, :] < counts[:, None]).tolist()
    assert np.array_equal(out["restored"], hidden)
    assert out["seqlens_k"].tolist() == (mask.sum(1) - 1).tolist()
    assert int(out["total"]) == mask.shape[1]

"""left_padding=false: the export without the "real tokens first" reorder (builder/layers/padding.py). Right-padded
and unpadded batches (onnxruntime-genai pads on the right) give exactly the default export's logits, with and
without last_token_logits, through a shared cache and decode steps; the permutation's ops are gone; a left-padded
batch is wrong, as the option's help says."""

from __future__ import annotations

import numpy as np
import pytest

import batching
import parity
from builder.export import prepare
from builder.report import describe

CASES = {"llama": "llama", "qwen3_5": "qwen3_5", "hunyuan": "hunyuan"}  # dense; hybrid (token mask/count);
FEED = [[40, 41, 42], [50, 51, 52], [60, 61, 62]]                        # rotary outside the op (position_ids)


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    built = {}

    def get(case: str, *extra: str):
        key = (case, extra)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"pad-{case}") / "model"
            built[key] = parity.export(tiny_checkpoint(CASES[case]), folder, extra=list(extra))
        return built[key]

    return get


def _ops(folder) -> list[str]:
    return [n.op_type for n in parity.load_graph(folder).graph.node]


def test_the_permutation_is_left_out(exports):
    default, right = _ops(exports("llama")), _ops(exports("llama", "left_padding=false"))
    assert {"ScatterElements", "GatherND", "CumSum"} <= set(default)
    assert not {"ScatterElements", "GatherND", "CumSum", "Where", "Range"} & set(right)
    # Shape Squeeze Range Neg Slice, CumSum x2 Cast Add Where ScatterElements, Unsqueeze GatherND
    assert len(default) - len(right) == 13


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("max_length", [None, 40])
def test_right_padded_batches_give_the_default_exports_logits(exports, case, max_length):
    default, right = exports(case), exports(case, "left_padding=false")
    runs = [batching.run_onnx_batch(folder, batching.PROMPTS, "right", FEED, max_length=max_length)
            for folder in (default, right)]
    for b in range(len(batching.PROMPTS)):
        assert np.array_equal(runs[0].prompt_logits[b], runs[1].prompt_logits[b])
        for x, y in zip(runs[0].step_logits[b], runs[1].step_logits[b]):
            assert np.array_equal(x, y)


def test_with_last_token_logits_right_padded_rows_read_their_last_token(exports):
    default = exports("llama")
    both = exports("llama", "left_padding=false", "last_token_logits=true")
    ids, mask = batching.pad(batching.PROMPTS, "right", 3)
    (full, full_steps), (last, last_steps) = [batching.run_onnx_masked(f, ids, mask, FEED) for f in (default, both)]
    for b, columns in enumerate(batching.real_columns(batching.PROMPTS, "right")):
        assert np.array_equal(last[b, 0], full[b, columns[-1]])
        assert all(np.array_equal(x, y) for x, y in zip(last_steps[b], full_steps[b]))


def test_a_left_padded_batch_is_wrong_without_the_reorder(exports):
    right = exports("llama", "left_padding=false")
    batch = batching.run_onnx_batch(right, batching.PROMPTS, "left", FEED)
    solos = [batching.run_onnx_solo(right, p, f) for p, f in zip(batching.PROMPTS, FEED)]
    prompt_error, _ = batching.batch_vs_solo(batch, solos)
    assert prompt_error > 0.1  # the padded rows' real tokens sit after their pads, which GroupQueryAttention misreads


@pytest.mark.genai
def test_genai_batches_generate_the_default_exports_tokens(exports):
    expected = batching.genai_batch_greedy(exports("llama"), batching.PROMPTS)
    assert batching.genai_batch_greedy(exports("llama", "left_padding=false"), batching.PROMPTS) == expected


def test_inspect_says_which_padding(tiny_checkpoint):
    ckpt = str(tiny_checkpoint("llama"))
    lines = {flag: describe(prepare(ckpt, "fp32", "cpu", extra)).splitlines()[4]
             for flag, extra in ((True, []), (False, ["left_padding=false"]))}
    assert lines[True] == "padded batches: left or right, exact"
    assert lines[False] == "padded batches: right-padded or unpadded only (left_padding=false: no reorder)"


@pytest.mark.parametrize("case", list(batching.FAMILIES))
def test_every_family_without_the_reorder_and_with_last_token_logits(tiny_checkpoint, tmp_path, case):
    """Both options together on every family of the batching suite: a right-padded batch through a shared cache
    gives the default export's logits at each row's last real token and at each decode step, exactly."""
    arch, overrides = batching.FAMILIES[case]
    ckpt = tiny_checkpoint(arch, **overrides)
    extra = list(batching.EXPORT_OPTIONS.get(case, ()))
    default = parity.export(ckpt, tmp_path / "default", extra=extra)
    both = parity.export(ckpt, tmp_path / "both", extra=extra + ["left_padding=false", "last_token_logits=true"])
    ids, mask = batching.pad(batching.PROMPTS, "right", 3)
    (full, full_steps), (last, last_steps) = [batching.run_onnx_masked(f, ids, mask, FEED, max_length=48)
                                              for f in (default, both)]
    for b, columns in enumerate(batching.real_columns(batching.PROMPTS, "right")):
        assert np.array_equal(last[b, 0], full[b, columns[-1]])
        assert all(np.array_equal(x, y) for x, y in zip(last_steps[b], full_steps[b]))

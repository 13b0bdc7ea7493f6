"""last_token_logits=true: logits [batch, 1, vocab] holding each row's last real token, i.e. exactly the default
export's logits at that row's last unpadded column, for left- and right-padded batches, a shared preallocated cache,
onnxruntime-genai's static capture mask, and the decode steps after. onnxruntime-genai generates the same tokens
from it, and `verify` measures it against transformers from the prompt's last position on."""

from __future__ import annotations

import json

import numpy as np
import pytest

import batching
import parity
from builder.report import describe
from builder.verify import verify

CASES = {"llama": "llama", "qwen3_5": "qwen3_5"}  # dense, and a hybrid whose layers already read token_count
FEED = [[40, 41, 42], [50, 51, 52], [60, 61, 62]]  # decode tokens per row (three steps)


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    built = {}

    def get(case: str):
        if case not in built:
            root = tmp_path_factory.mktemp(f"last-{case}")
            ckpt = tiny_checkpoint(CASES[case])
            built[case] = (ckpt, parity.export(ckpt, root / "full"),
                           parity.export(ckpt, root / "last", extra=["last_token_logits=true"]))
        return built[case]

    return get


def test_graph_outputs_one_position_and_no_restore(exports):
    _, full, last = exports("llama")
    graph = parity.load_graph(last).graph
    dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert graph.output[0].name == "logits" and dims == ["batch_size", 1, 512]
    names = {n.name: n.op_type for n in graph.node}
    assert not [n for n in names if n.startswith("/model/padding_restore/")]
    assert names["/model/last_token/GatherND"] == "GatherND"
    assert "/model/padding_restore/GatherND" in {n.name for n in parity.load_graph(full).graph.node}
    assert json.loads((last / "ortbuild.json").read_text())["last_token_logits"] is True
    assert json.loads((full / "ortbuild.json").read_text())["last_token_logits"] is False


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("side,max_length,static", [("right", None, False), ("left", None, False),
                                                    ("right", 40, False), ("right", 40, True)])
def test_logits_are_the_full_exports_at_each_rows_last_real_token(exports, case, side, max_length, static):
    _, full, last = exports(case)
    # onnxruntime-genai's capture mask comes with batch 1 (it captures batch-1 generation only)
    prompts = batching.PROMPTS[1:2] if static else batching.PROMPTS
    ids, mask = batching.pad(prompts, side, 3)
    runs = [batching.run_onnx_masked(folder, ids, mask, FEED[:len(prompts)], max_length=max_length,
                                     static_mask=static, static_prompt=static) for folder in (full, last)]
    (full_prompt, full_steps), (last_prompt, last_steps) = runs
    assert last_prompt.shape == (len(prompts), 1, full_prompt.shape[-1])
    for b, columns in enumerate(batching.real_columns(prompts, side)):
        assert np.array_equal(last_prompt[b, 0], full_prompt[b, columns[-1]])
        for x, y in zip(last_steps[b], full_steps[b]):
            assert np.array_equal(x, y)


@pytest.mark.genai
def test_genai_generates_the_same_tokens(exports):
    _, full, last = exports("llama")
    expected = batching.genai_batch_greedy(full, batching.PROMPTS)
    assert batching.genai_batch_greedy(last, batching.PROMPTS) == expected
    assert batching.genai_solo_greedy(last, batching.PROMPTS[1]) == batching.genai_solo_greedy(full, batching.PROMPTS[1])


def test_verify_compares_from_the_prompts_last_position(exports):
    ckpt, _, last = exports("llama")
    report = verify(last, str(ckpt), prompt_ids=[[5, 17, 99, 30, 250]], steps=3, use_genai=False)
    assert report.passed, report.failures()
    (prompt,) = report.prompts
    assert prompt.positions == 4 and prompt.top1_matches == 4  # the prompt's last position + 3 decode steps
    assert prompt.ort_greedy_prefix == 3 and prompt.prompt_error < 1e-5 and prompt.decode_error < 1e-5


def test_inspect_says_which_logits(exports):
    from builder.export import prepare

    ckpt, _, _ = exports("llama")
    lines = {flag: describe(prepare(str(ckpt), "fp32", "cpu", extra)).splitlines()[3]
             for flag, extra in ((True, ["last_token_logits=true"]), (False, []))}
    assert lines[True] == "logits: [batch, 1, vocab], each row's last real token (last_token_logits)"
    assert lines[False] == "logits: [batch, sequence, vocab], every position"

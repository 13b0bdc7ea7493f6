"""End-to-end tests of the routed-MoE families: GLM-4.5 MoE, ERNIE-4.5-MoE, Llama 4 text (alone and inside
Llama4ForConditionalGeneration) and PhiMoE.

What is proved here:
- fp32/cpu exports reproduce transformers fp32 logits within 1e-4 at every prompt position and for four KV-cache
  decode steps, and onnxruntime-genai's greedy search picks transformers' 16 tokens; variants cover GLM without q/k
  norm, groups or renormalisation (the float router's output scale), ERNIE with MoE on every other layer, PhiMoE with
  a jitter eps wide enough that its masked softmaxes keep several experts;
- controls: each routing or attention feature the tiny checkpoints exercise changes transformers' own logits by far
  more than the tolerance (group limit, correction bias, chunked attention, temperature tuning), so parity proves
  the export computes it;
- the graph is the intended one: one MoE/QMoE node per MoE layer fed the 3-D hidden states, QMoE fed router_weights
  where selection and weights differ, Llama 4's expert input scaled by the router, GroupQueryAttention given an
  attention_bias on the chunked layers only (cuda: no bias, the context capped at the chunk, where causal attention
  is chunked attention), routed_scaling_factor folded into fc2;
- int4 and int8 (QMoE) exports run prompt + decode; int8 stays within a few per cent;
- routing fields the graph does not compute exit 3 naming the field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper

import parity
from test_errors import UNSUPPORTED, assert_refused

TOL = 1e-4  # fp32 logits max-abs; measured <= 2e-6
# Phi-3.5-MoE's rope: longrope with equal short/long mscale (original length 64: the parity prompts stay below it)
PHIMOE_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                   "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.5 + 0.5 * i for i in range(8)],
                   "short_mscale": 1.2, "long_mscale": 1.2}
NEW_TOKENS = 16
CASES = {
    "glm4_moe": ("glm4_moe", {}),
    "glm4_moe_plain": ("glm4_moe", {"use_qk_norm": False, "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
                                    "first_k_dense_replace": 0}),
    "ernie4_5_moe": ("ernie4_5_moe", {}),
    "ernie4_5_moe_interval": ("ernie4_5_moe", {"moe_layer_start_index": 0, "moe_layer_interval": 2}),
    "llama4_text": ("llama4_text", {}),
    "llama4_vlm": ("llama4_vlm", {}),
    "phimoe": ("phimoe", {}),
    "phimoe_wide": ("phimoe", {"router_jitter_noise": 0.5}),
    "phimoe_longrope": ("phimoe", {"rope_parameters": PHIMOE_LONGROPE}),
}
MAIN = ["glm4_moe", "ernie4_5_moe", "llama4_text", "llama4_vlm", "phimoe"]
MOE_LAYERS = {"glm4_moe": [1, 2], "glm4_moe_plain": [0, 1, 2], "ernie4_5_moe": [1, 2], "ernie4_5_moe_interval": [1],
              "llama4_text": [1, 3], "llama4_vlm": [1, 3], "phimoe": [0, 1], "phimoe_wide": [0, 1],
              "phimoe_longrope": [0, 1]}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return parity.case_checkpoints(tiny_checkpoint, CASES)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return parity.export_cache(checkpoint, tmp_path_factory, "routing")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """case -> transformers fp32 logits of the prompt (computed once)."""
    return parity.hf_prompt_cache(checkpoint)


# ------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_transformers(case, checkpoint, exported):
    prompt_err, step_err, _, _ = parity.compare_with_hf(exported(case), checkpoint(case), decode_steps=4)
    assert prompt_err <= TOL, f"{case}: prompt logits max-abs {prompt_err:.3g}"
    assert step_err <= TOL, f"{case}: decode logits max-abs {step_err:.3g}"


@pytest.mark.genai
@pytest.mark.parametrize("case", MAIN)
def test_genai_greedy_matches_transformers(case, checkpoint, exported):
    expected = parity.hf_greedy(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS, NEW_TOKENS)
    assert parity.genai_greedy(exported(case), parity.PROMPT_IDS, NEW_TOKENS) == expected


# ------------------------------------------------------------------------------------------------- controls


def _changed(checkpoint: Path, edit) -> np.ndarray:
    """transformers' prompt logits with `edit(model)` applied to the loaded model."""
    model = parity.load_hf(checkpoint)
    with torch.no_grad():
        edit(model)
    return parity.hf_logits(model, parity.PROMPT_IDS)


def _zero_correction_bias(model) -> None:
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("e_score_correction_bias"):
            tensor.zero_()


@pytest.mark.parametrize("case,overrides", [
    ("glm4_moe", {"n_group": 1, "topk_group": 1}),  # no group limit
    ("llama4_text", {"attention_chunk_size": 1024}),  # chunks longer than the prompt: plain causal attention
    ("llama4_text", {"attn_temperature_tuning": False}),
])
def test_feature_changes_transformers_logits(case, overrides, tiny_checkpoint, reference):
    """The same weights without the feature give other logits (so parity above proves the export computes it)."""
    arch, base = CASES[case]
    without = parity.hf_logits(parity.load_hf(tiny_checkpoint(arch, **base, **overrides)), parity.PROMPT_IDS)
    assert parity.max_abs(without, reference(case)) > 100 * TOL


@pytest.mark.parametrize("case", ["glm4_moe", "ernie4_5_moe"])
def test_correction_bias_changes_transformers_logits(case, checkpoint, reference):
    assert parity.max_abs(_changed(checkpoint(case), _zero_correction_bias), reference(case)) > 100 * TOL


# ------------------------------------------------------------------------------------------------- graph


def _layer(name: str) -> int:
    return int(name.split("/layers.")[1].split("/")[0])


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("case", CASES)
def test_one_fused_op_per_moe_layer(case, precision, exported):
    model = parity.load_graph(exported(case, precision))
    op = "MoE" if precision == "fp32" else "QMoE"
    nodes = parity.nodes_of(model, op)
    assert [_layer(n.name) for n in nodes] == MOE_LAYERS[case]
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in nodes:
        feed = producers[node.input[0]]
        if case.startswith("llama4"):  # the expert input is x * sigmoid(top logit)
            assert feed.op_type == "Mul" and producers[feed.input[1]].op_type == "Sigmoid"
        assert producers[node.input[1]].op_type == "Reshape"  # only the router tensors are made 2-D
        has_weights = len(node.input) > 14 and node.input[14] != ""
        wants_weights = op == "QMoE" and not case.startswith("llama4")
        assert has_weights == wants_weights


def test_chunked_layers_get_an_attention_bias(exported):
    model = parity.load_graph(exported("llama4_text"))
    gqa = {_layer(n.name): n for n in parity.nodes_of(model, "GroupQueryAttention")}
    with_bias = sorted(i for i, n in gqa.items() if len(n.input) > 10 and n.input[10])
    assert with_bias == [0, 2]  # the rope layers; NoPE layers 1 and 3 attend to every earlier key
    assert len({gqa[i].input[10] for i in with_bias}) == 1  # one bias, shared by the chunked layers


def test_cuda_export_caps_the_context_at_the_chunk_instead_of_an_attention_bias(checkpoint, exported):
    """CUDA's GroupQueryAttention rejects attention_bias: a cuda export runs the chunked layers causally, which is
    exact up to the chunk size (8 here), caps genai's max_length there, and says so before writing."""
    from builder.export import prepare

    prepared = prepare(str(checkpoint("llama4_text")), "fp16", "cuda")
    assert prepared.spec.context_length == 8
    assert any("chunked attention (chunks of 8) on CUDA" in note for note in prepared.notes)
    folder = exported("llama4_text", "fp16", "cuda")
    assert all(len(n.input) <= 10 or not n.input[10]
               for n in parity.nodes_of(parity.load_graph(folder), "GroupQueryAttention"))
    assert parity.genai_config(folder)["search"]["max_length"] == 8
    assert prepare(str(checkpoint("llama4_text")), "fp16", "cpu").spec.context_length == 256


def test_scaling_factor_is_folded_into_fc2(checkpoint, exported):
    """fc2 = 2.5 x the checkpoint's down_proj, and no Mul after the op."""
    from safetensors import safe_open

    model = parity.load_graph(exported("glm4_moe"), weights=True)
    fc2 = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "layers.1.moe.fc2"}
    with safe_open(str(checkpoint("glm4_moe") / "model.safetensors"), "pt") as f:
        down = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight").float().numpy()
    np.testing.assert_allclose(fc2["layers.1.moe.fc2"][3], 2.5 * down, rtol=1e-6)
    consumers = [n.op_type for n in model.graph.node if any(o in n.input for o in
                                                           parity.nodes_of(model, "MoE")[0].output)]
    assert consumers == ["Add"]  # straight into the shared expert's sum


# ------------------------------------------------------------------------------------------------- quantized


@pytest.mark.parametrize("case", MAIN)
def test_int4_export_runs(case, exported):
    run = parity.run_onnx(exported(case, "int4"), decode_steps=4)
    assert np.isfinite(run.prompt_logits).all() and all(np.isfinite(s).all() for s in run.step_logits)


@pytest.mark.parametrize("case", MAIN)
def test_int8_stays_close(case, exported, reference):
    """8-bit experts and weights land within a few per cent; a wrong routing or layout is off by tens."""
    run = parity.run_onnx(exported(case, "int8"), decode_steps=2)
    ref = reference(case)
    relative = np.linalg.norm(run.prompt_logits - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.median(relative) < 0.05, relative
    assert (run.prompt_logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# ------------------------------------------------------------------------------------------------- bad input


def _edited(checkpoint: Path, tmp_path: Path, key: str | None = None, **changes) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (cfg[key] if key else cfg).update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("case,key,changes,says", [
    ("glm4_moe", None, {"topk_method": "group_limited_greedy"},
     "field 'topk_method'='group_limited_greedy' is not supported (supported: 'noaux_tc')"),
    ("glm4_moe", None, {"scoring_func": "softmax"}, "field 'scoring_func'='softmax' is not supported"),
    ("llama4_text", None, {"num_experts_per_tok": 2}, "field 'num_experts_per_tok'=2 is not supported"),
    ("llama4_vlm", "text_config", {"layer_types": ["sliding_attention"] * 4},
     "field 'text_config.layer_types'=['sliding_attention'] is not supported"),
    ("phimoe", None, {"num_experts_per_tok": 1}, "field 'num_experts_per_tok'=1 is not supported"),
    ("ernie4_5_moe", None, {"moe_norm_min": 0.5}, "field 'moe_norm_min'=0.5 is not supported"),
    ("phimoe", None, {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                       "short_mscale": 1.2, "long_mscale": 1.3,
                                       "original_max_position_embeddings": 64}, "rope_parameters": None},
     "long_mscale'=1.3 is not supported"),
])
def test_routing_the_graph_does_not_compute_exits_3(case, key, changes, says, checkpoint, tmp_path, capsys):
    folder = _edited(checkpoint(case), tmp_path, key, **changes)
    out = tmp_path / "out"
    assert_refused(capsys, ["-m", str(folder), "-o", str(out), "-p", "fp32", "-e", "cpu", "-q"], UNSUPPORTED, says,
                   out=out)

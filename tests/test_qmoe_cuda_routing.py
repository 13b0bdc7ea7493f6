"""The QMoE router form of -e cuda exports, proved on CPU.

onnxruntime-gpu 1.31.1's CUDA QMoE ignores router_weights and normalize_routing_weights=0 (scripts/moe_routing_check.py
on an H200: it weights the selected experts by the renormalised softmax of their router_probs), so cuda exports hand
QMoE what they hand the float MoE op (ExportSettings.qmoe_router_weights=False): masked log-weights in router_probs,
normalize_routing_weights=1, and the output scaled by the weights' sum where the routing does not renormalise. The
CPU QMoE weights a router_weights-less input the same way (tests/test_routing_op.py), so cpu exports built with that
form show it computes each routing kind right:
- no QMoE node reads router_weights and every one renormalises, where the cpu form feeds router_weights (the kinds
  whose selection and weights differ);
- int4 and int8 exports in that form give the logits of the cpu form (the same expert bytes; only the routing-weight
  arithmetic differs) to 1e-4 of the logit range at every prompt position and four decode steps, and agree with
  transformers within the bounds of the other quantized MoE tests (int4 runs, and picks the last token where
  test_moe_families.py asks that; int8 a few per cent, argmax at >= 90% of the positions).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import parity
from builder.settings import ExportSettings

# case -> (recipe, overrides): one per routing kind
CASES = {
    "qwen3_moe": ("qwen3_moe", {}),  # softmax, renormalised (the two forms coincide)
    "qwen2_moe": ("qwen2_moe", {}),  # softmax, not renormalised
    "glm4_moe": ("glm4_moe", {}),  # sigmoid + correction bias + groups, renormalised
    "glm4_moe_plain": ("glm4_moe", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}),  # sigmoid, not renorm.
    "deepseek_v3_moe": ("deepseek_v3_moe", {"norm_topk_prob": False}),  # groups + bias, not renormalised
    "phimoe": ("phimoe", {"router_jitter_noise": 0.5}),  # sparsemixer
}
DISTINCT_WEIGHTS = {"qwen2_moe", "glm4_moe", "glm4_moe_plain", "deepseek_v3_moe", "phimoe"}
INT4_LAST_TOKEN = {"qwen3_moe", "qwen2_moe"}  # as tests/test_moe_families.py checks them
ROUTER_WEIGHTS = 14  # QMoE's router_weights input


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return lambda case: tiny_checkpoint(CASES[case][0], **CASES[case][1])


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """(case, precision, form) -> cpu export; form "cuda" is built with qmoe_router_weights=False."""
    built = {}
    resolve = ExportSettings.resolve.__func__

    def cuda_form(cls, *args, **kwargs):
        return replace(resolve(cls, *args, **kwargs), qmoe_router_weights=False)

    def get(case: str, precision: str, form: str):
        key = (case, precision, form)
        if key not in built:
            out = tmp_path_factory.mktemp(f"qmoe-{case}-{precision}-{form}") / "m"
            with pytest.MonkeyPatch.context() as patch:
                if form == "cuda":
                    patch.setattr(ExportSettings, "resolve", classmethod(cuda_form))
                built[key] = parity.export(checkpoint(case), out, precision)
        return built[key]

    return get


@pytest.fixture(scope="module")
def reference(checkpoint):
    done = {}

    def get(case: str) -> np.ndarray:
        if case not in done:
            done[case] = parity.hf_logits(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS)
        return done[case]

    return get


def _qmoe_nodes(folder):
    nodes = parity.nodes_of(parity.load_graph(folder), "QMoE")
    assert nodes, "no QMoE node"
    return nodes


@pytest.mark.parametrize("case", CASES)
def test_cuda_form_feeds_no_router_weights_and_renormalises(case, exported):
    for node in _qmoe_nodes(exported(case, "int4", "cuda")):
        assert len(node.input) <= ROUTER_WEIGHTS or not node.input[ROUTER_WEIGHTS], node.name
        assert parity.attrs(node)["normalize_routing_weights"] == 1
    cpu_form = [len(n.input) > ROUTER_WEIGHTS and n.input[ROUTER_WEIGHTS] for n in _qmoe_nodes(exported(case, "int4",
                                                                                                        "cpu"))]
    assert all(cpu_form) if case in DISTINCT_WEIGHTS else not any(cpu_form)  # control: the forms differ there


@pytest.mark.parametrize("precision", ["int4", "int8"])
@pytest.mark.parametrize("case", CASES)
def test_cuda_form_gives_the_cpu_form_logits(case, precision, exported):
    ours = parity.run_onnx(exported(case, precision, "cuda"), decode_steps=4)
    theirs = parity.run_onnx(exported(case, precision, "cpu"), decode_steps=4, feed_tokens=ours.step_tokens)
    scale = float(np.abs(theirs.prompt_logits).max())
    assert parity.max_abs(ours.prompt_logits, theirs.prompt_logits) <= 1e-4 * scale
    for a, b in zip(ours.step_logits, theirs.step_logits):
        assert parity.max_abs(a, b) <= 1e-4 * scale


@pytest.mark.parametrize("case", CASES)
def test_cuda_form_agrees_with_transformers(case, exported, reference):
    """The other quantized MoE tests' bounds: int4 runs (and, for the families test_moe_families.py checks that way,
    picks transformers' last token); int8 within a few per cent (median; a near-tied router flips a position or two
    under 8-bit noise in both forms alike) with the same argmax at >= 90% of the positions."""
    ref = reference(case)
    int4 = parity.run_onnx(exported(case, "int4", "cuda"), decode_steps=0).prompt_logits
    assert np.isfinite(int4).all()
    if case in INT4_LAST_TOKEN:
        assert int(np.argmax(int4[-1])) == int(np.argmax(ref[-1]))
    int8 = parity.run_onnx(exported(case, "int8", "cuda"), decode_steps=0).prompt_logits
    relative = np.linalg.norm(int8 - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.median(relative) < 0.05, relative
    assert (int8.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_only_cpu_exports_feed_router_weights(tiny_checkpoint):
    from builder.decoder import build_decoder
    from builder.export import prepare

    assert ExportSettings.resolve("int4", "cpu").qmoe_router_weights
    assert not ExportSettings.resolve("int4", "cuda").qmoe_router_weights
    prepared = prepare(str(tiny_checkpoint("glm4_moe", moe_intermediate_size=64)), "int4", "cuda")
    graph = build_decoder(prepared.spec, prepared.settings, prepared.weights).graph
    qmoe = [n for n in graph if n.op_type == "QMoE"]
    assert len(qmoe) == 2 and all(len(n.inputs) <= ROUTER_WEIGHTS for n in qmoe)
    assert all(n.attributes["normalize_routing_weights"].value == 1 for n in qmoe)

"""End-to-end tests of the sparse-MoE families with the Llama attention layout: Qwen3-MoE, Qwen2-MoE, Mixtral.

What is proved here:
- fp32/cpu exports (com.microsoft MoE) reproduce transformers fp32 logits within 1e-4 at every prompt position
  and for four KV-cache decode steps, and onnxruntime-genai's greedy search picks transformers' 16 tokens;
  this holds with dense layers mixed in either order (mlp_only_layers / decoder_sparse_step) and for a
  Qwen3-MoE without top-k renormalisation (norm_topk_prob=False);
- the graph is the intended one: one MoE/QMoE per sparse layer with k=top_k, SwiGLU interleaved (fc1 rows
  alternate the checkpoint's gate and up rows), a dense MLP on the dense layers, Qwen2-MoE's shared expert
  gated by sigmoid(shared_expert_gate(x)) and added to the routed output;
- Qwen2-MoE (norm_topk_prob=False) does not renormalise the top-k weights: the float export matches
  transformers and differs from a norm_topk_prob=True reference by far more than the tolerance, while the same
  graph with the op's renormalisation switched on matches the True reference instead; the QMoE export feeds
  Softmax(logits) as router_weights, and dropping that input (QMoE then renormalises) moves the logits the way
  transformers' norm_topk_prob=True does;
- int4 (QMoE, 4-bit experts) exports run prompt + decode and agree with transformers on the last prompt token;
  int8 (8-bit experts) stays within a few per cent, small enough to expose a routing or layout error;
- with -e cuda, Qwen3-MoE's q/k norm goes into GroupQueryAttention (q_norm_weight/k_norm_weight);
- exporting reads the experts lazily: no expert byte before the writer asks, one expert per block when the
  block budget says so, each expert tensor read once, layer after layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import parity

TOL = 1e-4  # fp32 logits max-abs; measured ~2e-6
NEW_TOKENS = 16
HIDDEN, EXPERTS, TOP_K, MOE_INTER = 64, 4, 2, 32  # the factory recipes (tests/factory.py)

# case -> (factory architecture, config overrides, indices of the sparse layers per the HF config rules,
#          whether transformers renormalises the top-k weights)
CASES = {
    "qwen3_moe": ("qwen3_moe", {}, [1], True),  # mlp_only_layers=[0]
    "qwen2_moe": ("qwen2_moe", {}, [1], False),  # decoder_sparse_step=2
    "mixtral": ("mixtral", {}, [0, 1], True),
    "qwen3_moe_dense_last": ("qwen3_moe", {"mlp_only_layers": [1]}, [0], True),
    "qwen3_moe_no_renorm": ("qwen3_moe", {"norm_topk_prob": False}, [1], False),
}
FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral"]
# where each family keeps its experts, and the names of (gate, up, down)
EXPERT_NAMES = {
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    def get(case: str) -> Path:
        arch, overrides, *_ = CASES[case]
        return tiny_checkpoint(arch, **overrides)

    return get


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """(case, precision, ep, extra...) -> exported model folder, built once per module."""
    return parity.export_cache(checkpoint, tmp_path_factory, "moe")


@pytest.fixture(scope="module")
def qwen2_moe_renormalised(checkpoint, tmp_path_factory):
    """The Qwen2-MoE checkpoint with norm_topk_prob flipped to True (same weights)."""
    dst = tmp_path_factory.mktemp("qwen2-moe-renorm") / "ckpt"
    shutil.copytree(checkpoint("qwen2_moe"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["norm_topk_prob"] is False
    cfg["norm_topk_prob"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


load_graph, attrs = parity.load_graph, parity.attrs


def producer(model: onnx.ModelProto, value: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if value in n.output]
    return node


def layer_of(node: onnx.NodeProto) -> int:
    return int(node.name.split("/layers.")[1].split("/")[0])


def patched_copy(src: Path, dst: Path, edit, ops: tuple[str, ...] = ("MoE", "QMoE")) -> Path:
    """A copy of an exported folder whose `ops` nodes (MoE/QMoE) went through `edit(node)` (weights unchanged)."""
    shutil.copytree(src, dst)
    model = load_graph(dst)
    for node in model.graph.node:
        if node.op_type in ops:
            edit(node)
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_cpu_logits_match_transformers(case, checkpoint, exported):
    prompt_err, decode_err, run, full = parity.compare_with_hf(exported(case), checkpoint(case), decode_steps=4)
    assert len(run.step_logits) == 4
    assert np.ptp(full, axis=0).max() > 100 * TOL
    assert prompt_err <= TOL, f"{case}: prompt logits max-abs {prompt_err:.3g} > {TOL}"
    assert decode_err <= TOL, f"{case}: decode-step logits max-abs {decode_err:.3g} > {TOL}"


@pytest.mark.genai
@pytest.mark.parametrize("case", FAMILIES)
def test_genai_greedy_matches_transformers_generate(case, checkpoint, exported):
    expected = parity.hf_greedy(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS, NEW_TOKENS)
    produced = parity.genai_greedy(exported(case), parity.PROMPT_IDS, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert produced == expected


# --------------------------------------------------------------------------------------------- graph structure


@pytest.mark.parametrize("case", list(CASES))
def test_float_export_has_one_moe_per_sparse_layer(case, exported):
    model = load_graph(exported(case))
    sparse = CASES[case][2]
    moes = [n for n in model.graph.node if n.op_type == "MoE"]
    assert [layer_of(n) for n in moes] == sparse
    assert not [n for n in model.graph.node if n.op_type == "QMoE"]
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in moes:
        i = layer_of(node)
        # On cpu the op always renormalises: onnxruntime 1.31.1's MoE is wrong with normalize_routing_weights=0
        # (ExportSettings.moe_raw_softmax), so families without renormalisation scale the output
        # back by the top-k softmax mass (test_qwen2_moe_float_export_does_not_renormalise)
        assert attrs(node) == {"k": TOP_K, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                               "activation_beta": 0.0, "normalize_routing_weights": 1}
        assert list(node.input) == [node.input[0], node.input[1], f"layers.{i}.moe.fc1", "", f"layers.{i}.moe.fc2", ""]
        flat = producer(model, node.input[1])  # the 3-D logits made 2-D, the hidden states go in 3-D as they are
        router = producer(model, flat.input[0])
        assert flat.op_type == "Reshape" and router.op_type == "MatMul" and router.input[0] == node.input[0]
        assert shapes[router.input[1]] == [HIDDEN, EXPERTS]
        assert shapes[f"layers.{i}.moe.fc1"] == [EXPERTS, 2 * MOE_INTER, HIDDEN]
        assert shapes[f"layers.{i}.moe.fc2"] == [EXPERTS, HIDDEN, MOE_INTER]
    names = set(shapes)
    for i in set(range(2)) - set(sparse):  # dense layers keep a plain gated MLP
        assert f"layers.{i}.mlp.gate_up.weight" in names or f"layers.{i}.mlp.gate.weight" in names
        assert not any(n.startswith(f"layers.{i}.moe.") for n in names)


@pytest.mark.parametrize("case", FAMILIES)
def test_fc1_interleaves_checkpoint_gate_and_up_rows(case, checkpoint, exported):
    """fc1[e] rows alternate gate/up (swiglu_fusion=1), fc2[e] is down; read straight from the safetensors file."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint(case) / "model.safetensors"))
    block, gate, up, down = EXPERT_NAMES[case]
    init = {t.name: numpy_helper.to_array(t) for t in load_graph(exported(case), weights=True).graph.initializer}
    for i in CASES[case][2]:
        fc1, fc2 = init[f"layers.{i}.moe.fc1"], init[f"layers.{i}.moe.fc2"]
        for e in range(EXPERTS):
            ckpt = {p: tensors[f"model.layers.{i}.{block}.experts.{e}.{p}.weight"].float().numpy()
                    for p in (gate, up, down)}
            np.testing.assert_array_equal(fc1[e, 0::2], ckpt[gate])
            np.testing.assert_array_equal(fc1[e, 1::2], ckpt[up])
            np.testing.assert_array_equal(fc2[e], ckpt[down])


@pytest.mark.parametrize("case", FAMILIES + ["qwen3_moe_no_renorm"])
def test_int4_export_uses_qmoe(case, exported):
    model = load_graph(exported(case, "int4"))
    sparse = CASES[case][2]
    qmoes = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert [layer_of(n) for n in qmoes] == sparse
    assert not [n for n in model.graph.node if n.op_type == "MoE"]
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in qmoes:
        i = layer_of(node)
        a = attrs(node)
        assert (a["expert_weight_bits"], a["k"], a["swiglu_fusion"], a["activation_type"]) == (4, TOP_K, 1, "swiglu")
        assert a["normalize_routing_weights"] == int(CASES[case][3])
        assert list(node.input[2:7]) == [f"layers.{i}.moe.fc1.qweight", f"layers.{i}.moe.fc1.scales", "",
                                         f"layers.{i}.moe.fc2.qweight", f"layers.{i}.moe.fc2.scales"]
        assert shapes[node.input[2]] == [EXPERTS, 2 * MOE_INTER, HIDDEN // 2]
        assert shapes[node.input[5]] == [EXPERTS, HIDDEN, MOE_INTER // 2]
        block = a.get("block_size", 0)
        assert shapes[node.input[3]] == ([EXPERTS, 2 * MOE_INTER, HIDDEN // block] if block else
                                         [EXPERTS, 2 * MOE_INTER])
        if not CASES[case][3]:
            # QMoE ignores normalize_routing_weights=0, so the probabilities come in explicitly
            assert len(node.input) == 15 and all(x == "" for x in node.input[7:14])
            softmax = producer(model, node.input[14])
            assert softmax.op_type == "Softmax" and attrs(softmax)["axis"] == -1
            assert list(softmax.input) == [node.input[1]]
        else:
            assert len(node.input) <= 8


def test_qwen2_moe_shared_expert_is_gated_and_added(exported):
    model = load_graph(exported("qwen2_moe"))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    (moe,) = [n for n in model.graph.node if n.op_type == "MoE"]
    (unnormalise,) = [n for n in model.graph.node if n.op_type == "Mul" and moe.output[0] in n.input]  # top-k mass
    (add,) = [n for n in model.graph.node if n.op_type == "Add" and unnormalise.output[0] in n.input]
    gated = producer(model, [x for x in add.input if x != unnormalise.output[0]][0])
    assert gated.op_type == "Mul"
    kinds = {producer(model, x).op_type: producer(model, x) for x in gated.input}
    assert set(kinds) == {"Sigmoid", "MatMul"}
    gate_logit = producer(model, kinds["Sigmoid"].input[0])
    assert gate_logit.op_type == "MatMul" and gate_logit.input[0] == moe.input[0]
    assert gate_logit.input[1] == "layers.1.moe.shared_gate.weight"
    assert shapes[gate_logit.input[1]] == [HIDDEN, 1]
    assert kinds["MatMul"].input[1] == "layers.1.moe.shared.down.weight"
    assert shapes["layers.1.moe.shared.down.weight"] == [HIDDEN, HIDDEN]  # shared_expert_intermediate_size 64


# --------------------------------------------------------------------------------------------- routing


def test_qwen2_moe_float_export_does_not_renormalise(checkpoint, exported, qwen2_moe_renormalised, tmp_path):
    ids = parity.PROMPT_IDS
    without = parity.hf_logits(parity.load_hf(checkpoint("qwen2_moe")), ids)
    with_renorm = parity.hf_logits(parity.load_hf(qwen2_moe_renormalised), ids)
    assert parity.max_abs(without, with_renorm) > 1e-2  # renormalisation matters for this checkpoint

    ours = parity.run_onnx(exported("qwen2_moe"), ids, decode_steps=0).prompt_logits
    assert parity.max_abs(ours, without) <= TOL
    assert parity.max_abs(ours, with_renorm) > 1e-2

    def renormalise(node):  # drop the scale-back by the top-k mass after the (renormalising) MoE
        if node.input[0].endswith("/MoE/output_0"):
            node.input[1] = node.input[0]
            node.op_type = "Max"  # max(y, y) = y

    sneaked = patched_copy(exported("qwen2_moe"), tmp_path / "renorm", renormalise, ops=("Mul",))
    renormed = parity.run_onnx(sneaked, ids, decode_steps=0).prompt_logits
    assert parity.max_abs(renormed, with_renorm) <= TOL  # the only difference is the renormalisation


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_qwen2_moe_qmoe_router_weights_prevent_renormalisation(precision, checkpoint, exported,
                                                               qwen2_moe_renormalised, tmp_path):
    """QMoE renormalises unless router_weights are given. Dropping them must change the logits the way
    transformers' norm_topk_prob=True does (same quantized weights on both sides, so only routing differs)."""
    ids = parity.PROMPT_IDS
    hf_effect = (parity.hf_logits(parity.load_hf(qwen2_moe_renormalised), ids)
                 - parity.hf_logits(parity.load_hf(checkpoint("qwen2_moe")), ids))
    ours = exported("qwen2_moe", precision)
    real = parity.run_onnx(ours, ids, decode_steps=0).prompt_logits

    def drop_router_weights(node):
        del node.input[7:]

    sneaked = parity.run_onnx(patched_copy(ours, tmp_path / "sneaked", drop_router_weights), ids,
                              decode_steps=0).prompt_logits
    our_effect = (sneaked - real).ravel()
    assert rms(sneaked, real) > 0.5 * rms(hf_effect, 0), "router_weights made no difference"
    cosine = float(our_effect @ hf_effect.ravel() / np.linalg.norm(our_effect) / np.linalg.norm(hf_effect))
    assert cosine > 0.7, f"dropping router_weights does not look like renormalisation (cos {cosine:.2f})"


# --------------------------------------------------------------------------------------------- quantized


@pytest.mark.parametrize("case", FAMILIES)
def test_int4_export_runs_and_agrees_on_last_token(case, checkpoint, exported):
    run = parity.run_onnx(exported(case, "int4"), decode_steps=4)
    assert np.isfinite(run.prompt_logits).all() and all(np.isfinite(s).all() for s in run.step_logits)
    reference = parity.hf_logits(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS)
    assert int(np.argmax(run.prompt_logits[-1])) == int(np.argmax(reference[-1]))


@pytest.mark.parametrize("case", FAMILIES)
def test_int8_experts_stay_close(case, checkpoint, exported):
    """8-bit experts (and 8-bit dense weights) land within a few per cent; a wrong routing, nibble order or
    scale sign would be off by tens of per cent (int4 noise on these 64-wide models is too large to tell)."""
    run = parity.run_onnx(exported(case, "int8"), decode_steps=0)
    reference = parity.hf_logits(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS)
    relative = np.linalg.norm(run.prompt_logits - reference, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert relative.max() < 0.08, relative
    assert (run.prompt_logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


# --------------------------------------------------------------------------------------------- laziness


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("case", FAMILIES)
def test_experts_are_read_lazily_one_expert_at_a_time(case, precision, checkpoint, tmp_path, monkeypatch):
    import builder.export
    import builder.layers.moe
    import builder.weights
    from builder.checkpoint import TensorRef
    from builder.weights import Stacked

    log: list[tuple] = []
    real_read, real_rows, real_save = TensorRef.read, Stacked.rows, builder.export.save_model

    def read(self, start=0, stop=None):
        log.append(("read", self.name))
        return real_read(self, start, stop)

    def rows(self, start=0, stop=None):
        out = real_rows(self, start, stop)
        log.append(("stack", out.shape[0], out.nbytes))
        return out

    def save(*args, **kwargs):
        log.append(("save",))
        return real_save(*args, **kwargs)

    expert_bytes = 4 * MOE_INTER * HIDDEN  # one expert's gate (or up, or down) in float32
    monkeypatch.setattr(TensorRef, "read", read)
    monkeypatch.setattr(Stacked, "rows", rows)
    monkeypatch.setattr(builder.export, "save_model", save)
    monkeypatch.setattr(builder.weights.row_blocks, "__defaults__", (expert_bytes,))  # float path: 1 expert/block
    monkeypatch.setattr(builder.layers.moe, "EXPERT_BLOCK_BYTES", 1)  # QMoE path: 1 expert per block

    parity.export(checkpoint(case), tmp_path / "out", precision)

    block = EXPERT_NAMES[case][0]
    expert_reads = [e[1] for e in log if e[0] == "read" and ".experts." in e[1]]
    save_at = log.index(("save",))
    assert not [e for e in log[:save_at] if e[0] == "read" and ".experts." in e[1]], "experts read before saving"
    sparse = CASES[case][2]
    expected = {f"model.layers.{i}.{block}.experts.{e}.{p}.weight" for i in sparse for e in range(EXPERTS)
                for p in EXPERT_NAMES[case][1:]}
    assert sorted(expert_reads) == sorted(expected), "each expert tensor read exactly once"
    stacks = [e for e in log if e[0] == "stack"]
    assert stacks and all(n == 1 and nbytes <= expert_bytes for _, n, nbytes in stacks)
    layers = [int(name.split(".")[2]) for name in expert_reads]
    assert layers == sorted(layers), "experts are read layer after layer"


def test_qwen3_moe_cuda_fuses_qk_norm_into_gqa(exported):
    model = load_graph(exported("qwen3_moe", "fp16", "cuda"))
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [list(n.input[14:]) for n in gqa] == [[f"layers.{i}.attn.q_norm.weight", f"layers.{i}.attn.k_norm.weight"]
                                                 for i in range(2)]
    assert all(attrs(n)["qk_norm_epsilon"] == pytest.approx(1e-6) for n in gqa)
    assert len([n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization"]) == 1
    assert [layer_of(n) for n in model.graph.node if n.op_type == "MoE"] == [1]

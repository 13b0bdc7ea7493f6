"""bfloat16 routers compute in float32 (builder/layers/routing.py COMPUTE_DTYPES): ONNX TopK has no bfloat16, and a
-p bf16 -e cuda GLM-4.5 MoE export failed to load on an H200 ("Type 'tensor(bfloat16)' ... of operator (TopK) ... is
invalid").

What is proved here:
- every -p bf16 -e cuda MoE export (grouped sigmoid with correction bias, plain sigmoid, softmax, sparsemixer, the
  expert-input weight, Gemma 4's per-expert router) passes ONNX Runtime's graph type check: creating a CPU session
  gets as far as kernel lookup (the CPU EP has no bfloat16 MatMul), where the unwidened graph failed as an invalid
  model; no TopK reads bfloat16;
- the widened code path computes the right routing: with COMPUTE_DTYPES forced to widen float32 to float64 (every
  Cast, constant and cast back the bfloat16 path has, at a dtype the CPU EP runs), fp32 exports of the same families
  match transformers within 1e-4 at every prompt position and four decode steps;
- routers transformers computes in float32 (RoutingSpec.float32_logits: DeepSeek-V2/V3, GLM-4.5 MoE, ERNIE-4.5-MoE)
  do so in a float16 export too: float32 weight, input cast to float32, scores and selection in float32. (A float16
  selection flipped grouped DeepSeek-V3 routing on an H200: prompt logits off by 1.69, 12/16 top-1.)
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

import parity
from builder.layers import routing

TOL = 1e-4
# case -> (recipe, overrides): one per router code path
CASES = {
    "glm4_moe": ("glm4_moe", {}),  # sigmoid, correction bias, groups, renormalised (float32 logits)
    "glm4_moe_plain": ("glm4_moe", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}),  # sigmoid, no renorm
    "qwen3_moe": ("qwen3_moe", {}),  # softmax, renormalised
    "qwen2_moe": ("qwen2_moe", {}),  # softmax, not renormalised (cpu: top-k mass scale)
    "phimoe": ("phimoe", {"router_jitter_noise": 0.5}),  # sparsemixer
    "llama4_text": ("llama4_text", {}),  # top-1 weight on the expert input
    "gemma4_moe": ("gemma4_moe", {}),  # per-expert experts, their own softmax top-k
}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return lambda case: tiny_checkpoint(CASES[case][0], **CASES[case][1])


@pytest.fixture(scope="module")
def bf16_exports(checkpoint, tmp_path_factory):
    return parity.export_cache(checkpoint, tmp_path_factory, "bf16-router")


@pytest.fixture(scope="module")
def widened(checkpoint, tmp_path_factory):
    """case -> fp32 cpu export whose routers compute in float64 (the bfloat16 path, one dtype up)."""
    built = {}

    def get(case: str):
        if case not in built:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(routing, "COMPUTE_DTYPES", {ir.DataType.FLOAT: ir.DataType.DOUBLE})
                built[case] = parity.export(checkpoint(case), tmp_path_factory.mktemp(f"wide-{case}") / "m")
        return built[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_bf16_cuda_export_passes_the_graph_type_check(case, bf16_exports):
    import onnxruntime as ort

    folder = bf16_exports(case, "bf16", "cuda")
    with pytest.raises(Exception) as info:  # the CPU EP has no bfloat16 MatMul/Mul: the first kernel lookup fails
        ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "NOT_IMPLEMENTED : Could not find an implementation for" in str(info.value), str(info.value)[:300]
    nodes = parity.load_graph(folder).graph.node
    casts = [parity.attrs(n)["to"] for n in nodes if n.op_type == "Cast" and "/moe/router/" in n.name]
    if any(n.op_type == "TopK" for n in nodes):  # (Qwen2-MoE on cuda hands the op its logits: nothing to widen)
        assert ir.DataType.FLOAT in casts and ir.DataType.BFLOAT16 in casts, casts


def test_unwidened_bf16_router_is_an_invalid_graph(checkpoint, tmp_path):
    """Control: the same export computing its router in bfloat16 fails ONNX Runtime's type check at TopK."""
    import onnxruntime as ort

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routing, "COMPUTE_DTYPES", {})
        folder = parity.export(checkpoint("gemma4_moe"), tmp_path / "m", "bf16", "cuda")
    with pytest.raises(Exception, match=r"INVALID_GRAPH.*tensor\(bfloat16\).*operator \(TopK\)"):
        ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


# the routers that take the COMPUTE_DTYPES path (float32_logits routers compute in float32 whatever the table says;
# a renormalised softmax hands the op its logits as they are)
WIDENED = [case for case in CASES if not case.startswith("glm4_moe") and case != "qwen3_moe"]


@pytest.mark.parametrize("case", WIDENED)
def test_widened_router_matches_transformers(case, checkpoint, widened):
    folder = widened(case)
    doubles = [n for n in parity.load_graph(folder).graph.node
               if n.op_type == "Cast" and parity.attrs(n)["to"] == ir.DataType.DOUBLE]
    assert doubles, "the router did not widen"  # not vacuous: the widened path is the one measured
    prompt_err, step_err, _, _ = parity.compare_with_hf(folder, checkpoint(case), decode_steps=4)
    assert prompt_err <= TOL and step_err <= TOL, (prompt_err, step_err)


@pytest.mark.parametrize("arch", ["glm4_moe", "deepseek_v3_moe", "deepseek_v2", "ernie4_5_moe"])
def test_float32_logits_routers_compute_in_float32_in_a_float16_export(arch, tiny_checkpoint, tmp_path):
    from onnx import TensorProto

    ckpt = tiny_checkpoint(arch)
    folder = parity.export(ckpt, tmp_path / "m", "fp16", "cpu")
    model = parity.load_graph(folder)
    weights = {i.name: i.data_type for i in model.graph.initializer}
    routers = [n for n in model.graph.node if n.op_type == "MatMul" and "/moe/router/" in n.name]
    assert routers and all(weights[n.input[1]] == TensorProto.FLOAT for n in routers)
    produced = {out: n for n in model.graph.node for out in n.output}
    assert all(produced[n.input[0]].op_type == "Cast" and parity.attrs(produced[n.input[0]])["to"] == TensorProto.FLOAT
               for n in routers)
    topk = [n for n in model.graph.node if n.op_type == "TopK" and "/moe/router/" in n.name]
    assert all("Cast" not in produced[n.input[0]].op_type for n in topk)  # selection stays in float32
    run = parity.run_onnx(folder, decode_steps=2)
    full = parity.hf_logits(parity.load_hf(ckpt), parity.PROMPT_IDS)
    assert parity.max_abs(run.prompt_logits, full) < 0.02
    assert (run.prompt_logits.argmax(-1) == full.argmax(-1)).all()


def test_inspect_says_which_routers_compute_in_float32(tiny_checkpoint, capsys):
    from builder.cli import main

    for arch, says in [("glm4_moe", True), ("deepseek_v3_moe", True), ("qwen3_moe", False)]:
        with pytest.raises(SystemExit) as info:
            main(["inspect", "-m", str(tiny_checkpoint(arch)), "-p", "fp16", "-e", "cpu"])
        assert info.value.code == 0
        moe = [line for line in capsys.readouterr().out.splitlines() if line.startswith("moe: ")]
        assert moe and all(("(router in float32)" in line) == says for line in moe), moe

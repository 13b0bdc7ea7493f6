"""The CPU-side logic of the GPU check scripts (scripts/ort_placement.py, gpu_check.py, gpu_hybrid_check.py): what
they decide before a GPU is involved must be right, or a GPU run reports the wrong thing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import parity
from builder.errors import CheckpointError
from builder.export import prepare

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


placement_module = _script("ort_placement")
gpu_check = _script("gpu_check")
hybrid_check = _script("gpu_hybrid_check")


class _Session:
    def __init__(self, providers):
        self._providers = providers

    def get_providers(self):
        return self._providers


def _event(op: str, provider: str, dtype: str) -> dict:
    return {"cat": "Node", "name": f"{op}_kernel_time",
            "args": {"op_name": op, "provider": provider, "output_type_shape": [{dtype: [1, 4]}]}}


def test_placement_tells_fallen_back_compute_from_shape_nodes(tmp_path):
    profile = tmp_path / "profile.json"
    events = [_event("MatMul", "CUDAExecutionProvider", "float16"), _event("Shape", "CPUExecutionProvider", "int64"),
              _event("GroupQueryAttention", "CPUExecutionProvider", "float"),
              _event("MemcpyToHost", "CUDAExecutionProvider", "float")]
    profile.write_text(json.dumps(events))
    cuda = _Session(["CUDAExecutionProvider", "CPUExecutionProvider"])
    refused = placement_module.placement(cuda, profile, "CUDAExecutionProvider")
    assert not refused["placement_ok"] and refused["cpu_compute"] == {"GroupQueryAttention": 1}
    assert refused["placement_problems"] == ["compute fell back to the CPU EP: GroupQueryAttention x1"]
    assert refused["memcpy_kernels"] == 1
    allowed = placement_module.placement(cuda, profile, "CUDAExecutionProvider", ("GroupQueryAttention",))
    assert allowed["placement_ok"]
    profile.write_text(json.dumps(events[:2]))  # the shape node alone is no fallback
    assert placement_module.placement(cuda, profile, "CUDAExecutionProvider")["placement_ok"]
    whole = placement_module.placement(_Session(["CPUExecutionProvider"]), profile, "CUDAExecutionProvider")
    assert whole["placement_problems"] == ["the session runs on CPUExecutionProvider, not CUDAExecutionProvider"]


def test_placement_reads_a_real_profile(tiny_checkpoint, tmp_path):
    folder = parity.export(tiny_checkpoint("qwen3"), tmp_path / "m")
    session = ort.InferenceSession(str(folder / "model.onnx"), placement_module.profiled_options(ort),
                                   providers=["CPUExecutionProvider"])
    gpu_check.decode_run(session, parity.PROMPT_IDS, [], on_prompt=None)
    result = placement_module.placement(session, session.end_profiling(), "CPUExecutionProvider")
    assert result["placement_ok"] and result["cpu_compute"]["MatMul"] >= 2 * 2  # qkv, o, mlp per layer
    assert "Shape" not in result["cpu_compute"]  # integer outputs: not compute


def test_gpu_check_reads_each_exports_own_decisions(tiny_checkpoint, tmp_path):
    captured = parity.export(tiny_checkpoint("qwen3"), tmp_path / "qwen3", "fp16", "cuda")
    per_expert = parity.export(tiny_checkpoint("gemma4_moe"), tmp_path / "gemma4_moe", "fp16", "cuda")
    fp32 = parity.export(tiny_checkpoint("qwen3"), tmp_path / "fp32", "fp32", "cuda")
    assert gpu_check.capture_on(captured) and not gpu_check.capture_on(per_expert)
    assert not gpu_check.capture_on(fp32)
    assert gpu_check.allowed_cpu_ops(fp32) == ("GroupQueryAttention",) and gpu_check.allowed_cpu_ops(captured) == ()


def test_decode_run_matches_the_parity_harness(tiny_checkpoint, tmp_path):
    folder = parity.export(tiny_checkpoint("qwen3"), tmp_path / "m")
    ours = gpu_check.decode_run(ort.InferenceSession(str(folder / "model.onnx")), parity.PROMPT_IDS, [7, 8])
    run = parity.run_onnx(folder, decode_steps=2, feed_tokens=[7, 8])
    np.testing.assert_allclose(ours, np.concatenate([run.prompt_logits, np.stack(run.step_logits)]), atol=1e-6)


@pytest.mark.parametrize("model", list(hybrid_check.MODELS))
def test_hybrid_probes_get_mrope_sections_that_fit(model, tiny_checkpoint):
    arch, overrides = hybrid_check.MODELS[model]
    fitted = hybrid_check.probe_overrides(arch, overrides)
    rope = fitted.get("rope_parameters")
    if model == "qwen3_next":  # no mRoPE: nothing added
        assert rope is None
    else:
        assert rope["mrope_section"] == [11, 11, 10]  # rotary 256 * 0.25 = 64: half 32, as Qwen3.5 ships it
        with pytest.raises(CheckpointError, match="mrope_section' is \\[2, 3, 3\\]"):  # the recipe's own sections
            prepare(str(tiny_checkpoint(arch, **overrides)), "fp16", "cuda")
    prepare(str(tiny_checkpoint(arch, **fitted)), "fp16", "cuda")  # the checkpoint reader accepts it


def test_kernel_profile_names_keep_templates_and_drop_parameter_lists():
    """gpu_kernel_profile groups CUPTI kernel records by name: the template arguments tell kernels apart (block size,
    head size), the parameter list would only split one kernel into many rows."""
    from gpu_kernel_profile import _kernel_name

    m1 = "onnxruntime::contrib::cuda::MatMulFloat4BitsKernelM1<__half, 32, false>"
    assert _kernel_name(f"void {m1}(__half*, unsigned char const*, int)") == m1
    cublas = "nvjet_sm90_hsh_64x8_64x16_4x1_v_bz_splitK_NNT"
    assert _kernel_name(cublas) == cublas
    assert _kernel_name("void cutlass::Kernel2<cutlass_80_wmma_tensorop_f16_s161616gemm_f16_16x16_128x1_tn_align8>"
                        "(cutlass_80_wmma_tensorop_f16_s161616gemm_f16_16x16_128x1_tn_align8::Params)") == \
        "cutlass::Kernel2<cutlass_80_wmma_tensorop_f16_s161616gemm_f16_16x16_128x1_tn_align8>"


def test_bench_sizes_window_caches_as_their_attention_requires(tmp_path):
    """The reference builder writes GPT-OSS's sliding layers with sliding_window_cache=1, whose cache ONNX Runtime
    requires to hold exactly local_window_size positions: gpu_decode_bench sizes those buffers to the window, every
    other cache to max_length."""
    import onnx
    from onnx import TensorProto, helper

    from gpu_decode_bench import window_caches

    def gqa(layer: int, **attrs):
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        return helper.make_node("GroupQueryAttention", [f"q{layer}", "", "", *past, "seqlens_k", "total"],
                                [f"o{layer}", f"present.{layer}.key", f"present.{layer}.value"], domain="com.microsoft",
                                num_heads=2, kv_num_heads=1, **attrs)

    nodes = [gqa(0, local_window_size=128, sliding_window_cache=1), gqa(1, local_window_size=128), gqa(2)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT16, None)
                                                for i in range(3)])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert window_caches(tmp_path / "model.onnx") == {"past_key_values.0.key": 128, "past_key_values.0.value": 128}

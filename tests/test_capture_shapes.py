"""CUDA-graph capture is on only for graphs whose shapes are fixed by the shapes of the step's inputs
(builder/capture.py; tests/shape_flow.py finds nodes whose output shape depends on input values).

Every factory recipe is built for -e cuda (graph only: no weight is read) at fp16, bf16 and int4, with CUDA-sized
experts for the QMoE routing kinds and both latent-attention forms: every graph with capture on has no data-dependent
shape and no host/device copy; the per-expert MoE (Gemma 4) has one NonZero per expert and capture off; float32
activations keep capture off and the q/k norm unfused; the hybrids capture (measured right under genai since their
token count follows the static mask).
"""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

import factory
from builder.cli import main
from builder.decoder import build_decoder
from builder.errors import OrtBuildError, UsageError
from builder.export import prepare
from builder.settings import ExportSettings
from shape_flow import data_dependent_shapes, host_device_copies

PRECISIONS = ("fp16", "bf16", "int4", "fp32")
REAL_MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}
HYBRIDS = ("qwen3_5", "qwen3_5_vlm", "qwen3_5_moe", "qwen3_5_moe_vlm", "qwen3_next")
# case -> (recipe, config overrides, extra options): every recipe as it is, plus
VARIANTS = {
    # experts CUDA QMoE takes (K % 64 == 0), one per routing kind: softmax renormalised / not, grouped sigmoid with
    # correction bias, sparsemixer, top-1 on the input, hybrid MoE
    "qwen3_moe-cuda": ("qwen3_moe", {"moe_intermediate_size": 64}, ()),
    "qwen2_moe-cuda": ("qwen2_moe", {"moe_intermediate_size": 64}, ()),
    "glm4_moe-cuda": ("glm4_moe", {"moe_intermediate_size": 64}, ()),
    "deepseek_v3_moe-cuda": ("deepseek_v3_moe", {"moe_intermediate_size": 64}, ()),
    "phimoe-cuda": ("phimoe", {"intermediate_size": 64}, ()),
    "gpt_oss-cuda": ("gpt_oss", {"intermediate_size": 64}, ()),
    "qwen3_next-cuda": ("qwen3_next", {"moe_intermediate_size": 64}, ()),
    # latent attention: the 576-wide row is decompressed on cuda by itself, the 48-wide one absorbed unless forced
    "deepseek_v3-576": ("deepseek_v3", REAL_MLA, ()),
    "deepseek_v3-decompressed": ("deepseek_v3", {}, ("latent_attention_form=decompressed",)),
}


@pytest.fixture(scope="module")
def cuda_graphs(tiny_checkpoint):
    """case -> precision -> (settings, data-dependent nodes, host/device copies); combinations the exporter refuses
    are left out."""
    cases = {**{arch: (arch, {}, ()) for arch in factory.ARCHS}, **VARIANTS}
    built: dict[str, dict] = {}
    for case, (arch, overrides, extra) in cases.items():
        folder = str(tiny_checkpoint(arch, **overrides))
        for precision in PRECISIONS:
            try:
                prepared = prepare(folder, precision, "cuda", list(extra))
                model = build_decoder(prepared.spec, prepared.settings, prepared.weights)
            except OrtBuildError:  # e.g. CUDA QMoE on 32-wide experts
                continue
            built.setdefault(case, {})[precision] = (prepared.settings, data_dependent_shapes(model),
                                                     host_device_copies(model))
    return built


def test_graphs_with_capture_on_have_no_data_dependent_shapes(cuda_graphs):
    captured = {(case, p) for case, by in cuda_graphs.items() for p, (s, *_) in by.items() if s.graph_capture.enabled}
    for case, precision in sorted(captured):
        assert cuda_graphs[case][precision][1] == [], f"{case} -p {precision} -e cuda has capture on"
    # not vacuous: these are captured, QMoE in each routing kind and both latent-attention forms among them
    expected = {("llama", "fp16"), ("llama4_text", "fp16"), ("llama4_text", "int4"), ("deepseek_v3", "fp16"),
                ("deepseek_v3-576", "fp16"), ("deepseek_v3-576", "int4"), ("deepseek_v3-decompressed", "bf16"),
                ("glm4_moe", "bf16")}
    expected |= {(case, "int4") for case in VARIANTS if case.endswith("-cuda")}
    expected |= {(h, p) for h in HYBRIDS for p in ("fp16", "bf16")}
    assert expected <= captured, sorted(expected - captured)


def test_graphs_with_capture_on_need_no_memcpy(cuda_graphs):
    """ONNX Runtime refuses to capture a session with a Memcpy node. Measured on an H200 (onnxruntime-gpu 1.31.1, the
    batch entries of scripts/gpu_bundle.py): HunYuan and Llama 4 had one, from rotary position ids that mixed a shape
    (host) into seqlens_k (device); the longrope families have one for their If's condition (capture is off there)."""
    for case, by in sorted(cuda_graphs.items()):
        for precision, (settings, _, copies) in by.items():
            if settings.graph_capture.enabled:
                assert copies == [], f"{case} -p {precision} -e cuda has capture on"
    assert cuda_graphs["hunyuan"]["fp16"][0].graph_capture.enabled  # rotary outside the op, captured
    assert cuda_graphs["phi3"]["fp16"][2] == ["If: /model/layers.0/attn/rope_switch/If (input 0, to host)"]


def test_per_expert_moe_has_data_dependent_shapes_and_capture_off(cuda_graphs):
    for precision in ("fp16", "bf16", "int4"):
        settings, found, _ = cuda_graphs["gemma4_moe"][precision]
        assert found and all(f.startswith("NonZero: ") and "/moe/experts." in f for f in found), found
        assert len(found) == 4 * 3  # one per expert (4) in each of the 3 layers
        assert not settings.graph_capture.enabled
        assert "NonZero" in settings.graph_capture.reason and "CUDA error 700" in settings.graph_capture.reason
    assert cuda_graphs["gemma4"]["fp16"][0].graph_capture.enabled  # the same family without experts is captured


def test_float32_activations_keep_capture_off_and_norms_unfused(cuda_graphs):
    fp32 = {case: by["fp32"][0] for case, by in cuda_graphs.items() if "fp32" in by}
    assert set(factory.ARCHS) <= set(fp32)  # (enable_cuda_graph=true variants are refused at fp32)
    for case, settings in fp32.items():
        assert not settings.graph_capture.enabled, case
        assert not settings.fuse_qk_norm, case
    reason = cuda_graphs["qwen3"]["fp32"][0].graph_capture.reason
    assert "GroupQueryAttention has no float32 CUDA kernel" in reason and "CPU EP" in reason
    assert all(cuda_graphs["qwen3"][p][0].fuse_qk_norm for p in ("fp16", "bf16", "int4"))


@pytest.mark.parametrize("arch, precision, why", [
    ("gemma4_moe", "fp16", "per-expert MoE layers gather the tokens routed to each expert (NonZero)"),
    ("qwen3", "fp32", "GroupQueryAttention has no float32 CUDA kernel"),
])
def test_asking_to_capture_a_refused_graph_is_a_usage_error(tiny_checkpoint, capsys, tmp_path, arch, precision, why):
    with pytest.raises(SystemExit) as info:
        main(["-m", str(tiny_checkpoint(arch)), "-o", str(tmp_path / "m"), "-p", precision, "-e", "cuda", "-q",
              "--extra_options", "enable_cuda_graph=true"])
    assert info.value.code == UsageError.exit_code
    err = capsys.readouterr().err
    assert f"enable_cuda_graph=true: {factory.ARCHS[arch].architecture} cannot be captured: " in err and why in err
    assert "Drop the option (capture stays off for this model)." in err
    assert not (tmp_path / "m").exists()


def test_fused_qk_norm_default_and_float32_refusal():
    assert ExportSettings.resolve("fp16", "cuda").fuse_qk_norm
    assert ExportSettings.resolve("bf16", "cuda").fuse_qk_norm
    assert ExportSettings.resolve("int4", "cuda").fuse_qk_norm  # float16 activations
    assert not ExportSettings.resolve("fp32", "cuda").fuse_qk_norm
    assert not ExportSettings.resolve("fp32", "cpu").fuse_qk_norm
    with pytest.raises(UsageError) as info:
        ExportSettings.resolve("fp32", "cuda", ["fuse_qk_norm_gqa=true"])
    assert str(info.value) == (
        "fuse_qk_norm_gqa=true needs float16/bfloat16 activations (-p fp32 -e cuda has float32): GroupQueryAttention "
        "has no float32 CUDA kernel, so ONNX Runtime runs a float32 model's attention on the CPU EP, which rejects the "
        "q_norm_weight/k_norm_weight inputs. Drop the option or export with -p fp16/bf16/int4/int8.")


# --- the analysis itself, on hand-built graphs -------------------------------------------------------------------


def _model(nodes, outputs, inputs=None):
    inputs = inputs or [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                   for o in outputs],
                              [helper.make_tensor("one", TensorProto.INT64, [], [1]),
                               helper.make_tensor("zero", TensorProto.INT64, [], [0])])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _gqa(total: str):
    return helper.make_node("GroupQueryAttention", ["x", "x", "x", "", "", "seqlens", total], ["out", "pk", "pv"],
                            name="gqa", domain="com.microsoft", num_heads=1, kv_num_heads=1)


def test_analysis_tells_shape_derived_from_value_derived_lengths():
    seqlens = [helper.make_node("ReduceSum", ["attention_mask", "one"], ["sum"], keepdims=0),
               helper.make_node("Cast", ["sum"], ["seqlens"], to=TensorProto.INT32)]
    from_shape = seqlens + [helper.make_node("Shape", ["attention_mask"], ["shape"], start=1, end=2),
                            helper.make_node("Squeeze", ["shape"], ["len"]),
                            helper.make_node("Cast", ["len"], ["total"], to=TensorProto.INT32), _gqa("total")]
    assert data_dependent_shapes(_model(from_shape, ["out"])) == []
    from_values = seqlens + [helper.make_node("ReduceMax", ["sum"], ["longest"], keepdims=0),
                             helper.make_node("Cast", ["longest"], ["total"], to=TensorProto.INT32), _gqa("total")]
    assert data_dependent_shapes(_model(from_values, ["out"])) == ["GroupQueryAttention: gqa"]
    # a Range to a summed mask and a NonZero are flagged where they start, not downstream
    ranged = [helper.make_node("ReduceSum", ["attention_mask"], ["n"], keepdims=0),
              helper.make_node("Range", ["zero", "n", "one"], ["r"], name="range"),
              helper.make_node("NonZero", ["attention_mask"], ["nz"], name="nonzero"),
              helper.make_node("Cast", ["r"], ["out"], to=TensorProto.FLOAT),
              helper.make_node("Cast", ["nz"], ["y"], to=TensorProto.FLOAT, name="downstream")]
    assert data_dependent_shapes(_model(ranged, ["out", "y"])) == ["Range: range", "NonZero: nonzero"]


def test_analysis_refuses_an_op_it_does_not_know():
    model = _model([helper.make_node("Det", ["x"], ["out"], name="det")], ["out"])
    with pytest.raises(ValueError, match="Det .det.: not in tests/shape_flow.py's tables"):
        data_dependent_shapes(model)


def test_copy_analysis_finds_a_shape_mixed_into_device_values():
    """Positions as the earlier rotary code built them: past = seqlens_k + 1 - (new tokens from x's shape)."""
    nodes = [helper.make_node("ReduceSum", ["attention_mask"], ["seqlens"], keepdims=1),
             helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),
             helper.make_node("Sub", ["seqlens", "shape"], ["past"], name="sub"),
             helper.make_node("Range", ["zero", "shape_scalar", "one"], ["steps"], name="range"),
             helper.make_node("Cast", ["past"], ["out"], to=TensorProto.FLOAT)]
    nodes.insert(2, helper.make_node("Squeeze", ["shape"], ["shape_scalar"]))
    assert host_device_copies(_model(nodes, ["out"])) == ["Sub: sub (input 1, from host)"]
    ones = [helper.make_node("Shape", ["x"], ["shape"], start=0, end=2),
            helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=helper.make_tensor("v", TensorProto.INT64,
                                                                                             [1], [1])),
            helper.make_node("CumSum", ["ones", "one"], ["steps"], exclusive=1),
            helper.make_node("ReduceSum", ["attention_mask", "one"], ["seqlens"], keepdims=1),
            helper.make_node("Sub", ["seqlens", "steps"], ["past"], name="sub"),
            helper.make_node("Cast", ["past"], ["out"], to=TensorProto.FLOAT)]
    assert host_device_copies(_model(ones, ["out"])) == []

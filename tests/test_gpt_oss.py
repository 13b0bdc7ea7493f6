"""GPT-OSS end to end: bf16 and MXFP4 checkpoints against transformers, graph shape, quantized exports.

What is proved here:
- fp32/cpu exports of the bf16 and MXFP4 checkpoints match transformers fp32 within 1e-4 at all 12 prompt positions
  (longer than the sliding window of 8) and 4 KV-cache decode steps past it, also with a swiglu_limit small enough
  that the clamp is active; onnxruntime-genai's greedy search picks transformers' 16 tokens;
- the graph uses GroupQueryAttention with 12 inputs (head_sink = the sinks), the per-layer local_window_size, and
  com.microsoft MoE (float) / QMoE (int4, expert_weight_bits=4) with the GPT-OSS SwiGLU attributes;
- int4 exports of both formats (accuracy_level 0) match transformers running the same int4 weights within 1e-4 at
  the prompt and the decode steps, so the QMoE wiring is exact; the default int4 export (accuracy_level 4) runs in
  onnxruntime and onnxruntime-genai and agrees with fp32 transformers' top-1 at the last prompt position;
- fp16 and int8 cpu exports of the MXFP4 checkpoint run and agree with transformers' last top-1;
- cuda exports (fp16, bf16, int4) build with the right dtypes (they cannot run here);
- the released openai/gpt-oss-20b config.json (rope_scaling spelling) maps to the right spec and YaRN frequencies;
  unsupported quantization and missing experts are refused with messages that say what to do.
The expert-major transform and MXFP4 decoding have their unit tests in test_mxfp4.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import parity
from builder.errors import CheckpointError, UnsupportedModelError
from builders.config import Config

ARCH = "GptOssForCausalLM"

TOL = 1e-4
WINDOW = 8  # the factory's sliding window

# openai/gpt-oss-20b config.json as released (transformers 4.55 spelling: rope_scaling + rope_theta)
RELEASED_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
}

# case -> factory kwargs. "small_limit": same weights (same seed), swiglu_limit low enough that the clamps bite.
# "cuda_sizes": CUDA QMoE needs hidden and expert intermediate sizes that are multiples of 64 (gpt-oss: 2880).
CASES = {"bf16": {}, "mxfp4": {"mxfp4": True}, "small_limit": {"swiglu_limit": 0.5},
         "cuda_sizes": {"mxfp4": True, "intermediate_size": 64}}


def transformers_dequantized_copy(src: Path, dst: Path) -> Path:
    """An fp32 copy of an MXFP4 checkpoint whose experts transformers itself dequantized (its own lookup table).

    transformers' MXFP4 loader needs `accelerate`; loading this copy does not, and it runs the same maths.
    """
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    stored = load_file(src / "model.safetensors")
    tensors = {}
    for name, t in stored.items():
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            tensors[base] = convert_moe_packed_tensors(t, stored[base + "_scales"], dtype=torch.float32)
        elif not name.endswith("_scales"):
            tensors[name] = t.float()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return lambda case: tiny_checkpoint("gpt_oss", **CASES[case])


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """case -> a folder transformers loads in fp32 without extra packages (MXFP4 dequantized by transformers)."""
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            src = checkpoint(case)
            built[case] = (transformers_dequantized_copy(src, tmp_path_factory.mktemp("gpt-oss-ref"))
                           if CASES[case].get("mxfp4") else src)
        return built[case]

    return get


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """(case, precision, ep, extra...) -> exported model folder, built once per module."""
    return parity.export_cache(checkpoint, tmp_path_factory, "gpt-oss")


load_graph, nodes_of, attrs = parity.load_graph, parity.nodes_of, parity.attrs


# ------------------------------------------------------------------------------------- spec from config


def test_released_20b_config_maps_to_the_expected_spec():
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from builder.layers.rotary import inverse_frequencies
    from builders.gpt_oss import make_spec

    spec = make_spec(Config(RELEASED_20B_CONFIG, ARCH))
    assert spec.num_layers == 24 and spec.vocab_size == 201088 and not spec.tie_embeddings
    windows = [layer.attention.sliding_window for layer in spec.layers]
    assert windows == [128, None] * 12
    attn, moe = spec.layers[0].attention, spec.layers[0].ffn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (64, 8, 64)
    assert attn.sinks and attn.qkv_bias and attn.o_bias and not attn.qk_norm and not attn.rope.interleaved
    assert (moe.num_experts, moe.top_k, moe.intermediate_size) == (32, 4, 2880)
    assert (moe.activation, moe.swiglu_limit, moe.swiglu_alpha, moe.swiglu_beta) == ("gpt_oss", 7.0, 1.702, 1.0)
    assert moe.expert_bias and moe.router_bias and moe.routing.normalize_topk

    hf_config = GptOssConfig(**{k: v for k, v in RELEASED_20B_CONFIG.items() if k != "quantization_config"})
    inv_freq, factor = inverse_frequencies(attn.rope)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    np.testing.assert_allclose(inv_freq, hf_inv_freq.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor, rel=1e-12) and factor == pytest.approx(0.1 * np.log(32) + 1)


def test_config_without_rope_gets_transformers_default_yarn():
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from builder.layers.rotary import inverse_frequencies
    from builders.gpt_oss import make_spec

    config = {k: v for k, v in RELEASED_20B_CONFIG.items() if k not in ("rope_scaling", "rope_theta")}
    rope = make_spec(Config(config, ARCH)).layers[0].attention.rope
    hf_config = GptOssConfig(**{k: v for k, v in config.items() if k != "quantization_config"})
    assert rope.rope_type == hf_config.rope_parameters["rope_type"] == "yarn" and rope.theta == 150000.0
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    inv_freq, factor = inverse_frequencies(rope)
    np.testing.assert_allclose(inv_freq, hf_inv_freq.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor, rel=1e-12)


def test_unsupported_quantization_is_refused():
    from builders.gpt_oss import make_spec

    config = {**RELEASED_20B_CONFIG, "quantization_config": {"quant_method": "bitsandbytes"}}
    with pytest.raises(UnsupportedModelError) as err:
        make_spec(Config(config, ARCH))
    assert str(err.value) == (
        "GptOssForCausalLM: quantization_config.quant_method='bitsandbytes' is not supported; ortbuild reads "
        "GPT-OSS experts in bf16/fp16/fp32 or the original MXFP4 format. Use the original or a dequantized "
        "checkpoint.")


def test_missing_experts_name_both_formats(checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(checkpoint("mxfp4"), folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        parity.export(folder, tmp_path / "out")
    assert str(err.value) == (
        "GptOssForCausalLM: neither model.layers.1.mlp.experts.down_proj (bf16 experts) nor "
        "model.layers.1.mlp.experts.down_proj_blocks + model.layers.1.mlp.experts.down_proj_scales (MXFP4 experts) "
        f"is in the checkpoint in {folder}. The checkpoint is incomplete; re-download it.")


# ------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_transformers_past_the_sliding_window(case, exported, reference):
    assert len(parity.PROMPT_IDS) > WINDOW
    prompt_err, step_err, run, _ = parity.compare_with_hf(exported(case), reference(case), decode_steps=4)
    print(f"gpt_oss {case} fp32: prompt max-abs {prompt_err:.3g}, decode max-abs {step_err:.3g}")
    assert len(run.step_logits) == 4
    assert prompt_err <= TOL and step_err <= TOL


def test_the_parity_cases_exercise_clamp_and_window(checkpoint, tiny_checkpoint):
    """The small-limit case and the sliding window change transformers' logits, so parity above checks them."""
    base = parity.hf_logits(parity.load_hf(checkpoint("bf16")), parity.PROMPT_IDS)
    clamped = parity.hf_logits(parity.load_hf(checkpoint("small_limit")), parity.PROMPT_IDS)
    full = parity.hf_logits(parity.load_hf(tiny_checkpoint("gpt_oss", layer_types=["full_attention"] * 2)),
                            parity.PROMPT_IDS)
    assert parity.max_abs(base, clamped) > 0.05
    assert parity.max_abs(base[:WINDOW], full[:WINDOW]) < 1e-5  # identical until the window is exceeded
    assert parity.max_abs(base[WINDOW:], full[WINDOW:]) > 1e-3


@pytest.mark.genai
@pytest.mark.parametrize("case", ["bf16", "mxfp4"])
def test_genai_greedy_matches_transformers(case, exported, reference):
    pytest.importorskip("onnxruntime_genai")
    hf = parity.hf_greedy(parity.load_hf(reference(case)), parity.PROMPT_IDS, 16)
    ours = parity.genai_greedy(exported(case), parity.PROMPT_IDS, 16)
    assert ours == hf


# ------------------------------------------------------------------------------------- graph


def test_fp32_graph_uses_sinks_windows_and_the_moe_op(exported):
    model = load_graph(exported("bf16"))
    gqa = nodes_of(model, "GroupQueryAttention")
    assert len(gqa) == 2
    for i, node in enumerate(gqa):
        assert len(node.input) == 12 and node.input[11] == f"layers.{i}.attn.sinks"
        assert attrs(node)["local_window_size"] == (WINDOW if i == 0 else -1)
        assert attrs(node)["do_rotary"] == 1 and attrs(node)["rotary_interleaved"] == 0
    sinks = {t.name: t for t in model.graph.initializer}["layers.0.attn.sinks"]
    assert list(sinks.dims) == [4] and sinks.data_type == onnx.TensorProto.FLOAT

    moe = nodes_of(model, "MoE")
    assert len(moe) == 2 and not nodes_of(model, "QMoE")
    for node in moe:
        a = attrs(node)
        assert a["k"] == 2 and a["activation_type"] == "swiglu" and a["swiglu_fusion"] == 1
        assert a["activation_alpha"] == pytest.approx(1.702) and a["activation_beta"] == 1.0
        assert a["swiglu_limit"] == 7.0 and a["normalize_routing_weights"] == 1
        assert len(node.input) == 6 and all(node.input)  # input, router logits, fc1 w/b, fc2 w/b
    assert not nodes_of(model, "TopK") and not nodes_of(model, "Softmax")  # routing is the op's


def test_int4_graph_uses_qmoe(exported):
    model = load_graph(exported("mxfp4", "int4"))
    qmoe = nodes_of(model, "QMoE")
    assert len(qmoe) == 2 and not nodes_of(model, "MoE")
    for node in qmoe:
        a = attrs(node)
        assert a["expert_weight_bits"] == 4 and a["block_size"] == 32 and a["swiglu_fusion"] == 1
        assert a["activation_alpha"] == pytest.approx(1.702) and a["activation_beta"] == 1.0
        assert a["swiglu_limit"] == 7.0 and a["k"] == 2
        assert len(node.input) == 8 and all(node.input)  # weights, scales and biases of fc1 and fc2
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert shapes["layers.0.moe.fc1.qweight"] == [4, 64, 32] and shapes["layers.0.moe.fc1.scales"] == [4, 64, 2]
    assert shapes["layers.0.moe.fc2.qweight"] == [4, 64, 16] and shapes["layers.0.moe.fc2.scales"] == [4, 64, 1]
    assert len(nodes_of(model, "MatMulNBits")) == 2 * 2 + 1  # qkv and o per layer, lm_head


@pytest.mark.parametrize("precision,dtype", [("fp16", onnx.TensorProto.FLOAT16), ("bf16", onnx.TensorProto.BFLOAT16),
                                             ("int4", onnx.TensorProto.FLOAT16)])
def test_cuda_exports_build(precision, dtype, exported):
    folder = exported("cuda_sizes", precision, "cuda")
    model = load_graph(folder)
    assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output}["logits"] == dtype
    assert len(nodes_of(model, "QMoE" if precision == "int4" else "MoE")) == 2
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["layers.0.attn.sinks"].data_type == dtype
    assert inits["layers.0.moe.fc1.bias"].data_type == dtype
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
        "provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]  # capture (builder/capture.py)


# ------------------------------------------------------------------------------------- quantized exports


def int4_reference(folder: Path):
    """transformers fp32 with every weight the int4 export quantizes replaced by its int4 reconstruction.

    Attention and lm_head go through the MatMulNBits quantizer (default, block 32, symmetric), experts through the
    QMoE quantizer (block 32); both quantizers are checked bit for bit against ONNX Runtime's own in
    test_quant_blockwise.py / test_quant_moe.py. Against this model an int4 export differs only by how the graph
    wires the quantized experts (layout, interleave, scales, biases, routing), which is what is under test here.
    """
    from builder.quant.blockwise import dequantize_blockwise, quantize_blockwise
    from builder.quant.moe import dequantize_experts, quantize_experts

    def linear(weight: torch.Tensor) -> torch.Tensor:
        q = quantize_blockwise(weight.numpy(), bits=4, block_size=32, symmetric=True, method="default")
        return torch.from_numpy(dequantize_blockwise(q))

    def experts(weight: torch.Tensor) -> torch.Tensor:  # HF [E, K, N] -> QMoE [E, N, K] and back
        q = quantize_experts(np.ascontiguousarray(weight.numpy().transpose(0, 2, 1)), bits=4, block_size=32)
        return torch.from_numpy(np.ascontiguousarray(dequantize_experts(q).transpose(0, 2, 1)))

    model = parity.load_hf(folder)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).weight.copy_(linear(getattr(layer.self_attn, proj).weight))
            for proj in ("gate_up_proj", "down_proj"):
                getattr(layer.mlp.experts, proj).copy_(experts(getattr(layer.mlp.experts, proj)))
        model.lm_head.weight.copy_(linear(model.lm_head.weight))
    return model


@pytest.mark.parametrize("case", ["bf16", "mxfp4"])
def test_int4_matches_transformers_running_the_same_int4_weights(case, exported, reference):
    """accuracy_level=0 keeps activations in float, so only the weights differ from fp32 -- and those we replicate."""
    model = int4_reference(reference(case))
    continuation = parity.hf_greedy(model, parity.PROMPT_IDS, 4)
    run = parity.run_onnx(exported(case, "int4", "cpu", "int4_accuracy_level=0"), parity.PROMPT_IDS, 4,
                          feed_tokens=continuation)
    full = parity.hf_logits(model, parity.PROMPT_IDS + continuation)
    prompt_err = parity.max_abs(run.prompt_logits, full[: len(parity.PROMPT_IDS)])
    step_err = max(parity.max_abs(s, full[len(parity.PROMPT_IDS) + k]) for k, s in enumerate(run.step_logits))
    print(f"gpt_oss {case} int4 (accuracy_level 0) vs transformers with int4 weights: prompt max-abs "
          f"{prompt_err:.3g}, decode max-abs {step_err:.3g}")
    assert prompt_err <= TOL and step_err <= TOL


@pytest.mark.parametrize("case", ["bf16", "mxfp4"])
def test_int4_default_agrees_with_transformers_top1(case, exported, reference):
    """The default int4 export (accuracy_level 4 on cpu: int8 activations) against fp32 and int4-weight references."""
    run = parity.run_onnx(exported(case, "int4"), parity.PROMPT_IDS, 0)
    fp32 = parity.hf_logits(parity.load_hf(reference(case)), parity.PROMPT_IDS)
    same_weights = parity.hf_logits(int4_reference(reference(case)), parity.PROMPT_IDS)
    ours = run.prompt_logits.argmax(-1)
    agree = ours == fp32.argmax(-1)
    print(f"gpt_oss {case} int4 (onnxruntime): top-1 agrees with fp32 transformers at {int(agree.sum())}/"
          f"{agree.size} prompt positions, max-abs {parity.max_abs(run.prompt_logits, fp32):.3g}; vs int4-weight "
          f"transformers max-abs {parity.max_abs(run.prompt_logits, same_weights):.3g}")
    assert agree[-1]
    assert (ours == same_weights.argmax(-1)).all() and parity.max_abs(run.prompt_logits, same_weights) < 0.1


@pytest.mark.genai
@pytest.mark.parametrize("case", ["bf16", "mxfp4"])
def test_int4_runs_in_genai_and_agrees_top1(case, exported, reference):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(exported(case, "int4")))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(parity.PROMPT_IDS) + 4)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([parity.PROMPT_IDS], dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"))[0]
    fp32 = parity.hf_logits(parity.load_hf(reference(case)), parity.PROMPT_IDS)
    agree = logits.argmax(-1) == fp32.argmax(-1)
    print(f"gpt_oss {case} int4 (genai): top-1 agrees with fp32 transformers at {int(agree.sum())}/{agree.size} "
          "prompt positions")
    assert logits.shape == fp32.shape and agree[-1]
    onnx_run = parity.run_onnx(exported(case, "int4"), parity.PROMPT_IDS, 0)
    assert parity.max_abs(logits, onnx_run.prompt_logits) < 1e-4  # genai runs the same graph as onnxruntime


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_other_cpu_precisions_run(precision, exported, reference):
    run = parity.run_onnx(exported("mxfp4", precision), parity.PROMPT_IDS, 0)
    fp32 = parity.hf_logits(parity.load_hf(reference("mxfp4")), parity.PROMPT_IDS)
    agree = run.prompt_logits.argmax(-1) == fp32.argmax(-1)
    print(f"gpt_oss mxfp4 {precision}: top-1 agrees at {int(agree.sum())}/{agree.size}, "
          f"max-abs {parity.max_abs(run.prompt_logits, fp32):.3g}")
    assert agree[-1] and np.isfinite(run.prompt_logits).all()

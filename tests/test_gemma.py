"""Gemma family end to end: Gemma, Gemma 2, Gemma 3 (text and multimodal checkpoints), Gemma 4 dense / MoE.

Parity is measured against transformers in fp32 at every prompt position (12 tokens, past the tiny sliding window
of 8) and for 4 KV-cache decode steps fed the same tokens; graph structure is checked where a spec field switches
a variant on (softcap, sliding window, per-layer cache shapes, KV sharing); unsupported configs fail by name.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import parity
from builder.errors import CheckpointError, UnsupportedModelError
from builders import family_for, text_config

# tanh softcapping loosens fp32 agreement (gemma2: attention + final; gemma4_all: final softcap over 5 layers of
# scale-1.0 attention, measured 4.2e-5); every other case must hold 1e-4
PROMPT_TOL = {"gemma2": 1e-3, "gemma4_all": 1e-3}
FULL, SLIDING = "full_attention", "sliding_attention"

# Gemma 4 with every text feature on at once: per-layer inputs, KV sharing (layers 3 and 4 reuse layers 2 and 1),
# double-wide MLPs on the sharing layers, k = v on full layers with their own kv-head count, final softcapping.
# (transformers needs per-layer inputs whenever KV sharing is on: its prompt path slices them unconditionally.)
GEMMA4_ALL = dict(num_hidden_layers=5, layer_types=[SLIDING, FULL, SLIDING, SLIDING, FULL], num_kv_shared_layers=2,
                  hidden_size_per_layer_input=8, use_double_wide_mlp=True, attention_k_eq_v=True,
                  num_global_key_value_heads=1, final_logit_softcapping=30.0)

CASES = {  # id -> (factory arch, checkpoint kwargs)
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {"shards": 2}),
    "gemma3_vlm": ("gemma3_vlm", {}),
    "gemma4": ("gemma4", {}),
    "gemma4_all": ("gemma4", GEMMA4_ALL),
    "gemma4_moe": ("gemma4_moe", {}),
    "gemma4_vlm": ("gemma4_vlm", {}),
}


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """exported(case, precision="fp32", *extra_options) -> (checkpoint, model folder), each exported once."""
    done: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(case: str, precision: str = "fp32", *extra: str) -> tuple[Path, Path]:
        if (case, precision, extra) not in done:
            arch, kwargs = CASES[case]
            ckpt = tiny_checkpoint(arch, **kwargs)
            out = tmp_path_factory.mktemp(f"{case}-{precision}") / "model"
            parity.export(ckpt, out, precision, extra=list(extra))
            done[case, precision, extra] = (ckpt, out)
        return done[case, precision, extra]

    return get


def _graph(model_dir: Path) -> onnx.GraphProto:
    return onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _gqa(model_dir: Path) -> list[dict]:
    return [_attrs(n) for n in _graph(model_dir).node if n.op_type == "GroupQueryAttention"]


def _cache_shapes(model_dir: Path) -> dict[str, list]:
    return {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in _graph(model_dir).input if i.name.startswith("past_key_values.")}


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_parity_with_transformers(case, exported):
    ckpt, out = exported(case)
    prompt_err, decode_err, run, full = parity.compare_with_hf(out, ckpt, decode_steps=4)
    tol = PROMPT_TOL.get(case, 1e-4)
    per_position = [parity.max_abs(run.prompt_logits[i], full[i]) for i in range(len(parity.PROMPT_IDS))]
    assert max(per_position) <= tol, per_position
    assert decode_err <= tol, decode_err


# ------------------------------------------------------------------------------------------------ structure


def test_gemma2_softcaps_scale_and_alternating_window(exported):
    _, out = exported("gemma2")
    layers = _gqa(out)
    assert [a["local_window_size"] for a in layers] == [8, -1]  # layer_types: sliding, full
    assert all(a["softcap"] == pytest.approx(50.0) for a in layers)
    assert all(a["scale"] == pytest.approx(32 ** -0.5) for a in layers)  # query_pre_attn_scalar, not head_dim
    assert parity.ops_in(out).get("Tanh") == 1  # final logit softcapping
    assert parity.genai_config(out)["model"]["type"] == "gemma2"


def test_gemma3_local_global_rope_and_cpu_qk_norm(exported):
    _, out = exported("gemma3")
    graph = _graph(out)
    layers = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert [_attrs(n)["local_window_size"] for n in layers] == [8, 8, -1]
    # sliding layers share the local cache, the global layer has its own (linear-scaled, other base)
    assert [(n.input[7], n.input[8]) for n in layers] == [("cos_cache", "sin_cache")] * 2 + [
        ("cos_cache_1", "sin_cache_1")]
    assert all(len(n.input) == 9 for n in layers)  # no fused q/k norm inputs on CPU
    norm_nodes = [n.name for n in graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert sum("/q_norm/" in n for n in norm_nodes) == 3 and sum("/k_norm/" in n for n in norm_nodes) == 3
    assert parity.genai_config(out)["model"]["type"] == "gemma3_text"


def test_gemma4_per_layer_cache_shapes_and_scale(exported):
    _, out = exported("gemma4")
    shapes = _cache_shapes(out)
    # global_head_dim=32 on the full-attention layer, 16 elsewhere
    assert shapes["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert shapes["past_key_values.2.value"] == ["batch_size", 2, "past_sequence_length", 32]
    assert all(a["scale"] == 1.0 for a in _gqa(out))


def test_gemma4_kv_sharing_layers_have_no_cache(exported):
    _, out = exported("gemma4_all")
    shapes = _cache_shapes(out)
    assert sorted(shapes) == sorted(f"past_key_values.{i}.{kv}" for i in range(3) for kv in ("key", "value"))
    # layer 1 is full attention with num_global_key_value_heads=1 and head_dim 32
    assert shapes["past_key_values.1.key"] == ["batch_size", 1, "past_sequence_length", 32]
    outputs = [o.name for o in _graph(out).output]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(3) for kv in ("key", "value")]
    assert parity.genai_config(out)["model"]["decoder"]["num_hidden_layers"] == 3
    assert len(_gqa(out)) == 5  # consumers still attend, over their source's keys and values


def test_gemma4_moe_experts_are_per_expert_subgraphs(exported):
    _, out = exported("gemma4_moe")
    ops = parity.ops_in(out)
    assert "MoE" not in ops and "QMoE" not in ops  # ORT 1.31.1 CPU kernels reject activation_type=geglu
    assert ops["NonZero"] == 3 * 4 and ops["ScatterND"] == 3 * 4  # 3 layers x 4 experts
    assert ops["TopK"] == 3


def test_gemma4_moe_fp16_runs_on_cpu(exported):
    """The experts' outputs are combined without a float16 ScatterND add reduction, which ONNX Runtime's CPU EP
    lacks ("MLFloat16 data type is not supported with ScatterND opset 16 when reduction is 'add'")."""
    ckpt, out = exported("gemma4_moe", "fp16")
    assert all(node.attribute == [] for node in _graph(out).node if node.op_type == "ScatterND")
    run = parity.run_onnx(out, decode_steps=4)
    full = parity.hf_logits(parity.load_hf(ckpt), parity.PROMPT_IDS)
    assert parity.max_abs(run.prompt_logits, full) < 0.05
    assert (run.prompt_logits.argmax(-1) == full.argmax(-1)).all()


def test_gemma4_moe_bf16_router_selects_in_float32(tiny_checkpoint, tmp_path):
    """ONNX TopK has no bfloat16 type: the bf16 export's top-k runs on float32 scores."""
    out = parity.export(tiny_checkpoint("gemma4_moe"), tmp_path / "model", "bf16", "cuda")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.onnx"), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topk) == 3 and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in topk)


def test_multimodal_checkpoints_export_text_only(exported):
    for case in ("gemma3_vlm", "gemma4_vlm"):
        ckpt, out = exported(case)
        config = json.loads((ckpt / "config.json").read_text())
        assert parity.genai_config(out)["model"]["vocab_size"] == config["text_config"]["vocab_size"]


def test_unknown_tensor_next_to_vision_tower_is_still_reported(tiny_checkpoint, tmp_path):
    """The vision tower is ignored by name, not by giving up on unconsumed-tensor checks."""
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("gemma3_vlm"), ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["language_model.model.extra_adapter.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"Gemma3ForConditionalGeneration: 1 checkpoint tensor\(s\) were not "
                                              r"used by the export: language_model\.model\.extra_adapter\.weight\."):
        parity.export(ckpt, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ rope


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_proportional_rope_matches_transformers(factor):
    from transformers import Gemma4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from builder.layers.rotary import inverse_frequencies
    from builder.spec import RopeSpec

    params = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6, "factor": factor}
    config = Gemma4TextConfig(num_hidden_layers=2, layer_types=[SLIDING, FULL], head_dim=16, global_head_dim=64,
                              rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 1e4}, FULL: params})
    expected, expected_scale = ROPE_INIT_FUNCTIONS["proportional"](config, None, layer_type=FULL)
    ours, scale = inverse_frequencies(RopeSpec(theta=1e6, rotary_dim=64, rope_type="proportional",
                                               params=(("factor", factor), ("partial_rotary_factor", 0.25))))
    assert scale == expected_scale == 1.0
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=0)
    assert (ours[8:] == 0).all() and (ours[:8] > 0).all()  # 0.25 * 64 / 2 = 8 rotated pairs


# ------------------------------------------------------------------------------------------------ int4


@pytest.mark.parametrize("case,matmul_nbits", [
    ("gemma", 2 * 4 + 1), ("gemma2", 2 * 4 + 1), ("gemma3", 3 * 4 + 1), ("gemma4", 3 * 4 + 1),
    # per layer: qkv, o, gate_up, down + 4 experts x (gate_up, down); plus the tied lm_head
    ("gemma4_moe", 3 * (4 + 4 * 2) + 1)])
def test_int4_export_runs_and_tracks_transformers(case, matmul_nbits, exported):
    # the layers' int4 error alone: the tied embedding keeps a float table here (the shared int4 table, the int4
    # default, costs these tiny random models a little more: quantization.md, "Embeddings")
    ckpt, out = exported(case, "int4", "quantize_embeddings=false")
    assert parity.ops_in(out)["MatMulNBits"] == matmul_nbits
    run = parity.run_onnx(out, decode_steps=4)  # decode steps route single tokens (empty experts included)
    assert all(np.isfinite(s).all() for s in [run.prompt_logits, *run.step_logits])
    full = parity.hf_logits(parity.load_hf(ckpt), parity.PROMPT_IDS)
    # Tiny random Gemma 4 models are very sensitive to weight rounding (transformers itself, with its weights
    # rounded to int4 the same way, moves logits by ~2.5), so compare the shape of the logits, not the top token.
    corr = np.corrcoef(run.prompt_logits.ravel(), full.ravel())[0, 1]
    assert corr >= 0.8, corr


# ------------------------------------------------------------------------------------------------ genai


@pytest.mark.genai
@pytest.mark.parametrize("case", ["gemma", "gemma2", "gemma3", "gemma3_vlm", "gemma4", "gemma4_all", "gemma4_moe"])
def test_genai_greedy_matches_transformers(case, exported):
    # gemma4_vlm is left out: its transformers model treats generated multimodal placeholder ids (e.g. the audio
    # token) specially, so a text-only decoder legitimately diverges once one is generated.
    ckpt, out = exported(case)
    expected = parity.hf_greedy(parity.load_hf(ckpt), parity.PROMPT_IDS, 16)
    assert parity.genai_greedy(out, parity.PROMPT_IDS, 16) == expected


# ------------------------------------------------------------------------------------------------ errors


def _config(tiny_checkpoint, arch: str, **changes) -> tuple:
    config = json.loads((tiny_checkpoint(arch) / "config.json").read_text())
    family = family_for(config["architectures"][0])
    return family, text_config(family, config, config["architectures"][0]).updated(**changes)


@pytest.mark.parametrize("arch,changes,message", [
    ("gemma3", {"use_bidirectional_attention": True},
     "Gemma3ForCausalLM: config.json field 'use_bidirectional_attention'=True is not supported (only causal "
     "decoders export; this is an embedding model)."),
    ("gemma2", {"hidden_activation": "relu"},
     "Gemma2ForCausalLM: config.json field 'hidden_activation'='relu' is not supported (supported: 'gelu', "
     "'gelu_new', 'gelu_pytorch_tanh', 'silu')."),
    ("gemma4", {"use_bidirectional_attention": "all"},
     "Gemma4ForCausalLM: config.json field 'use_bidirectional_attention'='all' is not supported (only causal "
     "decoders export; 'vision' is fine, it only affects image tokens)."),
    ("gemma4", {"per_layer_config": {"2": {"head_dim": 32, "sliding_window": 4}}},
     "Gemma4ForCausalLM: per_layer_config[2] overrides ['sliding_window'], which this exporter does not support "
     "(only head_dim, num_key_value_heads)."),
    ("gemma4", {"num_kv_shared_layers": 1},
     "Gemma4ForCausalLM: num_kv_shared_layers=1 makes layer 2 (full_attention) reuse the cache of an earlier "
     "layer of its type, but there is none."),
    ("gemma4", {"rope_parameters": {FULL: {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0},
                                    SLIDING: {"rope_type": "default", "rope_theta": 1e4}}},
     "Gemma4ForCausalLM: config.json field 'rope_parameters.full_attention.rope_type'='yarn' is not supported "
     "(supported: 'default', 'proportional', 'linear')."),
])
def test_unsupported_configs_are_named(arch, changes, message, tiny_checkpoint):
    family, config = _config(tiny_checkpoint, arch, **changes)
    with pytest.raises(UnsupportedModelError) as err:
        family.make_spec(config)
    assert str(err.value) == message


def test_legacy_gemma3_rope_fields(tiny_checkpoint):
    """Hub configs written before transformers 5 spell the two ropes rope_theta + rope_scaling (global layers) and
    rope_local_base_freq (sliding layers), with sliding_window_pattern instead of layer_types."""
    family, config = _config(tiny_checkpoint, "gemma3", rope_parameters=None, layer_types=None, rope_theta=1e6,
                             rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                             sliding_window_pattern=3)
    spec = family.make_spec(config)
    ropes = [layer.attention.rope for layer in spec.layers]
    assert [(r.rope_type, r.theta, r.param("factor")) for r in ropes] == [
        ("default", 1e4, None), ("default", 1e4, None), ("linear", 1e6, 8.0)]
    assert [layer.attention.sliding_window for layer in spec.layers] == [8, 8, None]
    assert spec.embedding_scale == math.sqrt(64) and spec.norm_weight_offset == 1.0

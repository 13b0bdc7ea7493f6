"""End-to-end tests of the hybrid linear-attention families: Qwen3.5 and Qwen3.5-MoE (CausalLM layout; multimodal
layout with experts fused 3-D and an mtp head) and Qwen3-Next (fused in_proj_qkvz / in_proj_ba, experts per expert).

What is proved here:
- fp32/cpu exports reproduce transformers fp32 logits within 1e-4 at every prompt position and through four decode
  steps (conv + recurrent state and KV cache fed back), also for a 75-token prompt (longer than transformers'
  64-token chunk), and onnxruntime-genai's greedy search picks transformers' 16 tokens;
- the state each layer declares is what the graph and genai_config carry: KV names by layer index only for the
  full-attention layers, past.{i}.conv [batch, channels, kernel-1] and past.{i}.recurrent [batch, value heads,
  key dim, value dim] for the linear-attention ones;
- the graph is the intended one: CausalConvWithState (silu), LinearAttentionGate, LinearAttention (gated_delta, value
  heads grouped per key head), GatedRMSNorm with the plain norm weight, q/k L2 norms with transformers' epsilon, the
  attention output gate;
- padding is exact: on a model of linear-attention layers only, a right-padded batch, a left-padded batch (also with
  fewer real tokens than the conv width) and a decode step after right padding equal the unpadded runs bit for bit;
  treating the pads as tokens does not; transformers' own left-padded batch agrees;
- int4, int8 and int4 + int8_linear_attn exports run; the flag moves exactly the linear-attention layers'
  projections and their MLP / shared expert to 8 bits, `inspect` shows it, and its legacy spellings write the same
  bytes;
- bad input: fields the graph does not compute exit 3 naming the field, malformed tensors exit 4 naming tensor and
  file, and the progress output says which checkpoint parts are deliberately not exported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

import parity
from builder.state import present_for
from test_errors import CHECKPOINT, UNSUPPORTED, assert_refused, run_cli

TOL = 1e-4  # fp32 logits max-abs; measured 5e-6 .. 1.2e-5
CASES = {
    "qwen3_5": ("qwen3_5", {}),
    "qwen3_5_vlm": ("qwen3_5_vlm", {}),
    "qwen3_5_moe": ("qwen3_5_moe", {}),
    "qwen3_5_moe_vlm": ("qwen3_5_moe_vlm", {}),
    "qwen3_next": ("qwen3_next", {}),
    "linear_only": ("qwen3_5", {"layer_types": ["linear_attention"] * 4}),
}
FAMILIES = ["qwen3_5", "qwen3_5_vlm", "qwen3_5_moe", "qwen3_5_moe_vlm", "qwen3_next"]
LINEAR_LAYERS = {"qwen3_5": [0, 2, 3], "qwen3_5_vlm": [0, 2, 3], "qwen3_5_moe_vlm": [0, 1, 2], "qwen3_next": [0, 2]}
CONV, KEY_HEADS, VALUE_HEADS, HEAD = 2 * 2 * 16 + 4 * 16, 2, 4, 16  # the factory's linear-attention shapes


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return parity.case_checkpoints(tiny_checkpoint, CASES)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return parity.export_cache(checkpoint, tmp_path_factory, "hybrid")


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", FAMILIES)
def test_fp32_matches_transformers_at_every_position(case, checkpoint, exported):
    prompt_err, step_err, run, _ = parity.compare_with_hf(exported(case), checkpoint(case), decode_steps=4)
    assert len(run.step_logits) == 4
    assert prompt_err <= TOL and step_err <= TOL, (prompt_err, step_err)


def test_prompt_longer_than_the_chunk(checkpoint, exported):
    ids = np.random.default_rng(7).integers(5, 500, size=75).tolist()
    prompt_err, step_err, _, _ = parity.compare_with_hf(exported("qwen3_5"), checkpoint("qwen3_5"), decode_steps=4,
                                                        ids=ids)
    assert prompt_err <= TOL and step_err <= TOL, (prompt_err, step_err)


@pytest.mark.genai
@pytest.mark.parametrize("case", FAMILIES)
def test_genai_greedy_equals_transformers_generate(case, checkpoint, exported):
    pytest.importorskip("onnxruntime_genai")
    expected = parity.hf_greedy(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS, 16)
    assert parity.genai_greedy(exported(case), parity.PROMPT_IDS, 16) == expected


def test_verify_reads_the_declared_state(checkpoint, exported):
    """`ortbuild verify` feeds conv / recurrent state like KV caches, through onnxruntime and onnxruntime-genai."""
    from builder.verify import verify

    report = verify(exported("qwen3_next"), str(checkpoint("qwen3_next")), prompt_ids=[parity.PROMPT_IDS], steps=4)
    assert report.passed, report.failures()
    assert report.max_abs_error <= TOL
    if report.genai_installed:
        assert report.greedy("onnxruntime-genai") == (4, 4)
    assert report.greedy("onnxruntime") == (4, 4)


# ------------------------------------------------------------------------------------------------ state and graph


def _io(model_dir: Path) -> tuple[dict, dict]:
    model = parity.load_graph(model_dir)

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return ({i.name: shape(i) for i in model.graph.input}, {o.name: shape(o) for o in model.graph.output})


@pytest.mark.parametrize("case", ["qwen3_5", "qwen3_next"])
def test_state_is_declared_per_layer(case, exported):
    inputs, outputs = _io(exported(case))
    linear = LINEAR_LAYERS[case]
    full = [i for i in range(4) if i not in linear]
    expected = {"input_ids": ["batch_size", "sequence_length"],
                "attention_mask": ["batch_size", "total_sequence_length"]}
    for i in range(4):
        if i in linear:
            expected[f"past.{i}.conv"] = ["batch_size", CONV, 3]
            expected[f"past.{i}.recurrent"] = ["batch_size", VALUE_HEADS, HEAD, HEAD]
        else:
            for kv in ("key", "value"):
                expected[f"past_key_values.{i}.{kv}"] = ["batch_size", 2, "past_sequence_length", 64]
    assert inputs == expected  # in this order: per layer, as declared
    assert list(inputs) == list(expected)
    assert list(outputs) == ["logits"] + [present_for(n) for n in list(expected)[2:]]
    for i in full:
        assert outputs[f"present.{i}.key"] == ["batch_size", 2, "total_sequence_length", 64]
    decoder = parity.genai_config(exported(case))["model"]["decoder"]
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value", "past_conv_names": "past.%d.conv",
                                 "past_recurrent_names": "past.%d.recurrent"}
    assert decoder["outputs"]["present_recurrent_names"] == "present.%d.recurrent"
    assert (decoder["num_hidden_layers"], decoder["head_size"], decoder["num_key_value_heads"]) == (4, 64, 2)
    genai_type = parity.genai_config(exported(case))["model"]["type"]
    assert genai_type == {"qwen3_5": "qwen3_5_text", "qwen3_next": "decoder"}[case]


def test_present_state_is_transformers_cache_state(checkpoint, exported):
    """present.{i}.recurrent is transformers' recurrent state [batch, value heads, key dim, value dim]; present.{i}.conv
    is the last kernel-1 columns of its conv state (transformers keeps kernel columns)."""
    model = parity.load_hf(checkpoint("qwen3_5"))
    with torch.no_grad():
        cache = model(torch.tensor([parity.PROMPT_IDS]), use_cache=True).past_key_values
    run = Runner(exported("qwen3_5"))
    _, state = run([parity.PROMPT_IDS], [[1] * len(parity.PROMPT_IDS)])
    for i in LINEAR_LAYERS["qwen3_5"]:
        layer = cache.layers[i]
        np.testing.assert_allclose(state[f"past.{i}.recurrent"], layer.recurrent_states[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(state[f"past.{i}.conv"], layer.conv_states[0].numpy()[..., 1:], atol=1e-5)


def _initializers(model_dir: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in parity.load_graph(model_dir, weights=True).graph.initializer}


def test_graph_is_built_from_the_linear_attention_ops(checkpoint, exported):
    model = parity.load_graph(exported("qwen3_5"))
    ops = parity.ops_in(exported("qwen3_5"))
    for op in ("CausalConvWithState", "LinearAttentionGate", "LinearAttention", "GatedRMSNorm"):
        assert ops[op] == 3, op
    assert ops["GroupQueryAttention"] == 1 and "LpNormalization" not in ops
    for node in parity.nodes_of(model, "LinearAttention"):
        assert parity.attrs(node) == {"q_num_heads": KEY_HEADS, "kv_num_heads": VALUE_HEADS,
                                      "update_rule": "gated_delta", "scale": pytest.approx(HEAD ** -0.5)}
    assert {parity.attrs(n)["activation"] for n in parity.nodes_of(model, "CausalConvWithState")} == {"silu"}
    assert {parity.attrs(n)["activation"] for n in parity.nodes_of(model, "GatedRMSNorm")} == {"silu"}
    l2 = [n for n in parity.nodes_of(model, "SimplifiedLayerNormalization") if "l2norm" in n.name]
    assert len(l2) == 6 and all(parity.attrs(n)["epsilon"] == pytest.approx(1e-6 / HEAD) for n in l2)
    # the output gate: sigmoid of the gate rows multiplies the attention output before o_proj
    gate = [n for n in model.graph.node if n.op_type == "Mul" and "output_gate" in n.name]
    assert len(gate) == 1 and gate[0].input[0].startswith("/model/layers.1/attn/GroupQueryAttention")
    # the linear-attention norm is applied as w, the other norms as 1 + w
    weights, source = _initializers(exported("qwen3_5")), load_file(checkpoint("qwen3_5") / "model.safetensors")
    np.testing.assert_array_equal(weights["layers.0.linear_attn.norm.weight"],
                                  source["model.layers.0.linear_attn.norm.weight"].float().numpy())
    np.testing.assert_array_equal(weights["layers.0.attn_norm.weight"],
                                  1 + source["model.layers.0.input_layernorm.weight"].float().numpy())
    np.testing.assert_array_equal(weights["layers.0.linear_attn.decay_scale"],
                                  -np.exp(source["model.layers.0.linear_attn.A_log"].float().numpy()))


def test_q_proj_is_split_per_head_into_query_and_gate(checkpoint, exported):
    """q_proj rows are [q_0 | gate_0 | q_1 | gate_1 ...]: the packed projection holds q heads, k, v, then gates."""
    q_proj = load_file(checkpoint("qwen3_5") / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    heads = q_proj.float().view(4, 2, 64, 64)
    packed = _initializers(exported("qwen3_5"))["layers.1.attn.qkv.weight"].T  # [q | k | v | gate, hidden]
    np.testing.assert_array_equal(packed[:256], heads[:, 0].reshape(256, 64).numpy())
    np.testing.assert_array_equal(packed[-256:], heads[:, 1].reshape(256, 64).numpy())


# ------------------------------------------------------------------------------------------------ padding


class Runner:
    def __init__(self, model_dir: Path):
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.pasts = parity.state_inputs(self.session)
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, ids, mask, state=None):
        ids = np.array(ids, np.int64)
        feed = {"input_ids": ids, "attention_mask": np.array(mask, np.int64),
                **(state or parity.empty_state(self.pasts, ids.shape[0]))}
        out = dict(zip(self.names, self.session.run(None, feed)))
        return out["logits"], {p.name: out[present_for(p.name)] for p in self.pasts}


def _row(state: dict, row: int) -> dict:
    return {k: v[row:row + 1] for k, v in state.items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


A, B, C = list(range(5, 17)), [7, 99, 3, 250, 8, 300, 11], [9, 10]  # 12, 7 and 2 tokens (conv width 3)


def test_padding_is_exact_for_linear_attention(checkpoint, exported):
    run = Runner(exported("linear_only"))
    logits_a, state_a = run([A], [[1] * 12])
    logits_b, state_b = run([B], [[1] * 7])
    logits_c, state_c = run([C], [[1] * 2])

    right, right_state = run([A, B + [0] * 5], [[1] * 12, [1] * 7 + [0] * 5])
    np.testing.assert_array_equal(right[0], logits_a[0])
    np.testing.assert_array_equal(right[1, :7], logits_b[0])
    _assert_same_state(_row(right_state, 0), state_a)
    _assert_same_state(_row(right_state, 1), state_b)
    # the next step continues both rows from the batched state
    step, step_state = run([[42], [43]], [[1] * 13, [1] * 7 + [0] * 5 + [1]], right_state)
    alone, alone_state = run([[43]], [[1] * 8], state_b)
    np.testing.assert_array_equal(step[1], alone[0])
    _assert_same_state(_row(step_state, 1), alone_state)

    left, left_state = run([A, [0] * 5 + B], [[1] * 12, [0] * 5 + [1] * 7])
    np.testing.assert_array_equal(left[1, 5:], logits_b[0])
    _assert_same_state(_row(left_state, 1), state_b)
    short, short_state = run([A, [0] * 10 + C], [[1] * 12, [0] * 10 + [1] * 2])  # fewer real tokens than the width
    np.testing.assert_array_equal(short[1, 10:], logits_c[0])
    _assert_same_state(_row(short_state, 1), state_c)

    # control: the same left-padded batch with the pads treated as tokens is far off
    unmasked, _ = run([A, [0] * 5 + B], [[1] * 12, [1] * 12])
    assert np.abs(unmasked[1, 5:] - logits_b[0]).max() > 0.1

    # transformers (no cache: it cannot cache a model without full attention) agrees on both batches
    model = parity.load_hf(checkpoint("linear_only"))
    with torch.no_grad():
        hf = model(torch.tensor([A, [0] * 5 + B]), attention_mask=torch.tensor([[1] * 12, [0] * 5 + [1] * 7]),
                   use_cache=False).logits.numpy()
    assert np.abs(hf[1, 5:] - logits_b[0]).max() <= TOL
    assert np.abs(hf[0] - logits_a[0]).max() <= TOL


def test_linear_only_model_decodes_like_transformers(checkpoint, exported):
    model = parity.load_hf(checkpoint("linear_only"))
    run = parity.run_onnx(exported("linear_only"), parity.PROMPT_IDS, decode_steps=4)
    with torch.no_grad():
        full = model(torch.tensor([parity.PROMPT_IDS + run.step_tokens]), use_cache=False).logits[0].numpy()
    n = len(parity.PROMPT_IDS)
    assert parity.max_abs(run.prompt_logits, full[:n]) <= TOL
    for k, step in enumerate(run.step_logits[:-1]):  # the last step's token has no reference row
        assert parity.max_abs(step, full[n + k]) <= TOL


# ------------------------------------------------------------------------------------------------ quantization


def _bits(model_dir: Path) -> dict[str, int]:
    """MatMulNBits node scope -> bits."""
    return {n.name.rsplit("/", 1)[0]: parity.attrs(n)["bits"]
            for n in parity.nodes_of(parity.load_graph(model_dir), "MatMulNBits")}


def test_int8_linear_attn_moves_the_linear_layers_to_8_bits(exported):
    plain, flagged = _bits(exported("qwen3_5_moe_vlm", "int4")), _bits(exported("qwen3_5_moe_vlm", "int4", "cpu",
                                                                                 "int8_linear_attn=true"))
    assert set(plain.values()) == {4} and plain.keys() == flagged.keys()
    moved = {scope for scope, bits in flagged.items() if bits == 8}
    expected = {f"/model/layers.{i}/{part}" for i in LINEAR_LAYERS["qwen3_5_moe_vlm"]
                for part in ("linear_attn/in_proj", "linear_attn/out_proj", "moe/shared_expert/gate_up_proj",
                             "moe/shared_expert/down_proj")}
    assert moved == expected
    model = parity.load_graph(exported("qwen3_5_moe_vlm", "int4", "cpu", "int8_linear_attn=true"))
    float_matmuls = {n.name.rsplit("/", 1)[0] for n in parity.nodes_of(model, "MatMul")}
    assert {f"/model/layers.{i}/linear_attn/in_proj_ab" for i in LINEAR_LAYERS["qwen3_5_moe_vlm"]} <= float_matmuls


@pytest.mark.parametrize("precision, extra", [("int4", ()), ("int8", ()), ("int4", ("int8_linear_attn=true",))])
def test_quantized_exports_run(precision, extra, exported):
    run = parity.run_onnx(exported("qwen3_5_moe_vlm", precision, "cpu", *extra), decode_steps=4)
    assert run.prompt_logits.shape == (len(parity.PROMPT_IDS), 512)
    assert np.isfinite(run.prompt_logits).all() and all(np.isfinite(s).all() for s in run.step_logits)


def test_int8_linear_attn_spellings_write_the_same_bytes(checkpoint, exported, tmp_path):
    reference = exported("qwen3_5", "int4", "cpu", "int4_algo_config=k_quant", "int8_linear_attn=true")
    for extra in (["int4_algo_config=k_quant_linear"],
                  ["int4_algo_config=k_quant", "matmul_mixed_precision=linear_attn:int8"]):
        out = parity.export(checkpoint("qwen3_5"), tmp_path / extra[-1].replace("=", "-").replace(":", "-"),
                            "int4", "cpu", extra)
        for name in ("model.onnx", "model.onnx.data"):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), (extra, name)


def test_inspect_shows_the_linear_attention_plan(checkpoint, capsys):
    from builder.cli import main

    with pytest.raises(SystemExit) as info:
        main(["inspect", "-m", str(checkpoint("qwen3_5")), "-p", "int4", "--extra_options", "int8_linear_attn=true"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "linear attention (Gated DeltaNet): layers 0,2,3; key heads 2 x 16, value heads 4 x 16" in out
    assert "int8 for linear-attention layers' projections and MLP / shared expert" in out
    rows = {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines() if line.startswith("  layers.")}
    assert rows["layers.0.linear_attn.in_proj"].startswith("int8") and rows["layers.0.mlp.gate_up"].startswith("int8")
    assert rows["layers.0.linear_attn.ab"] == "float"
    assert rows["layers.1.attn.qkv"].startswith("int4") and rows["layers.1.mlp.gate_up"].startswith("int4")


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def writable(checkpoint, tmp_path):
    def copy(case: str) -> Path:
        dst = tmp_path / f"ckpt-{case}"
        shutil.copytree(checkpoint(case), dst)
        return dst

    return copy


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    text.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _export_args(folder: Path, out: Path) -> list[str]:
    return ["-m", str(folder), "-o", str(out), "-p", "fp32", "-e", "cpu", "-q"]


@pytest.mark.parametrize("case, changes, says", [
    ("qwen3_5", {"layer_types": ["linear_attention", "mamba", "linear_attention", "full_attention"]},
     "field 'layer_types[1]'='mamba' is not supported"),
    ("qwen3_5_vlm", {"linear_conv_kernel_dim": 1}, "field 'text_config.linear_conv_kernel_dim'=1 is not supported"),
    ("qwen3_next", {"conv_bias": True}, "field 'conv_bias'=True is not supported"),
    ("qwen3_5", {"update_rule": "delta"}, "field 'update_rule'='delta' is not supported (supported: 'gated_delta')"),
    ("qwen3_5", {"hidden_act": "gelu"}, "field 'hidden_act'='gelu' is not supported"),
])
def test_config_the_graph_does_not_compute_exits_3(case, changes, says, writable, tmp_path, capsys):
    folder = writable(case)
    _edit_config(folder, **changes)
    out = tmp_path / "out"
    assert_refused(capsys, _export_args(folder, out), UNSUPPORTED, says, out=out)


def test_fp16_activations_keep_the_linear_attention_core_in_float32(checkpoint, exported):
    """-p fp16: the projections run in fp16, the conv / gate / recurrence / gated norm and both states in float32
    (Casts around the core), which also lets the export run on CPU, whose kernels for these ops are float32 only."""
    model_dir = exported("qwen3_5_moe_vlm", "fp16")
    types = {i.name: i.type.tensor_type.elem_type for i in parity.load_graph(model_dir).graph.input}
    assert types["past.0.conv"] == types["past.0.recurrent"] == 1 and types["past_key_values.3.key"] == 10
    model = parity.load_hf(checkpoint("qwen3_5_moe_vlm"))
    tokens = parity.hf_greedy(model, parity.PROMPT_IDS, 4)
    full = parity.hf_logits(model, parity.PROMPT_IDS + tokens)
    run = parity.run_onnx(model_dir, parity.PROMPT_IDS, 4, feed_tokens=tokens)
    ours = np.concatenate([run.prompt_logits, np.stack(run.step_logits)])
    assert np.abs(ours - full).max() < 0.05 and (ours.argmax(-1) == full.argmax(-1)).all()


def test_fp16_core_on_cpu_is_refused_before_writing(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-m", str(checkpoint("qwen3_5")), "-o", str(out), "-p", "fp16", "-e", "cpu", "-q", "--extra_options",
            "linear_attn_fp32=false"]
    assert_refused(capsys, args, UNSUPPORTED, "CPU kernels for CausalConvWithState and LinearAttention are float32 "
                   "only", out=out)


def test_linear_attention_tensor_with_a_wrong_shape_exits_4(writable, tmp_path, capsys):
    folder = writable("qwen3_5")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.2.linear_attn.in_proj_qkv.weight"
    tensors[name] = tensors[name][:-16].contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(capsys, _export_args(folder, out), CHECKPOINT,
                   f"tensor {name} in model.safetensors has shape [112, 64] but config.json implies [128, 64]", out=out)


def test_a_conv_bias_in_the_checkpoint_is_not_silently_dropped(writable, tmp_path, capsys):
    folder = writable("qwen3_next")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.linear_attn.conv1d.bias"] = torch.ones(CONV, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(capsys, _export_args(folder, out), CHECKPOINT, "model.layers.0.linear_attn.conv1d.bias", out=out)


def test_progress_says_what_is_not_exported(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(capsys, ["-m", str(checkpoint("qwen3_5_moe_vlm")), "-o", str(tmp_path / "out"),
                                    "-p", "fp32", "-e", "cpu"])
    assert code == 0
    assert "note: not exported: the vision tower (model.visual.*) (" in err
    assert "note: not exported: the multi-token-prediction head (mtp.*) (3 tensors: mtp." in err

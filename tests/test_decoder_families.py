"""Phi-3 / Phi-4-mini, SmolLM3, HunYuan dense and the text decoders of Mistral 3, Qwen2.5-VL and Qwen3-VL, end to end.

What is proved here:
- fp32/cpu exports reproduce transformers fp32 logits within 1e-4 at every prompt position (12 tokens) and for four
  KV-cache decode steps, and onnxruntime-genai picks transformers' 16 greedy tokens (the genai model type each needs);
- each family's feature is in the graph and matters: fused qkv/gate_up tensors reach MatMul as stored, longrope picks
  its caches with an If on the sequence length, SmolLM3's NoPE layers run GroupQueryAttention without rotary, HunYuan
  rotates q/k with RotaryEmbedding before normalising them (and the other order is far off), a partial rotary whose
  half is not a multiple of 8 is rotated outside the op; control tests show transformers' logits move by far more
  than the tolerance when the feature is dropped;
- int4 (accuracy_level 0) equals transformers running the same dequantized weights; int8 exports run close to fp32;
- `inspect` prints the plan and the per-layer rope; config fields that change the maths and are not implemented
  exit 3 naming the field, broken ones exit 4.
The longrope switch itself (both sides, crossing, genai's rewind) is tested in test_longrope.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import factory
import parity
from builder.cli import main
from builder.errors import CheckpointError, UnsupportedModelError
from builders import family_for, text_config

TOL = 1e-4
NEW_TOKENS = 16
FAMILIES = ["phi3", "phi4_mini", "smollm3", "hunyuan", "mistral3", "qwen2_5_vl", "qwen3_vl"]
CASES = {  # case -> (factory arch, config overrides)
    **{arch: (arch, {}) for arch in FAMILIES},
    # Phi-3-mini-4k: plain rope and a sliding window (8) that the 12-token prompt crosses
    "phi3_4k": ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "sliding_window": 8}),
    # half the head rotates: rotary_dim 8, whose half (4) GroupQueryAttention cannot rotate: RotaryEmbedding does
    "phi3_rotary_outside": ("phi3", {"partial_rotary_factor": 0.5, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
}
# Ministral 3 inside Mistral 3: YaRN and queries scaled by 1 + beta * ln(1 + floor(position / 8)) from position 8 on
MINISTRAL3_TEXT = {**factory.ARCHS["mistral3"].config["text_config"], "model_type": "ministral3",
                   "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta_fast": 32.0,
                                       "beta_slow": 1.0, "original_max_position_embeddings": 8, "mscale": 1.0,
                                       "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}}
CASES["ministral3"] = ("mistral3", {"text_config": MINISTRAL3_TEXT})
GENAI_TYPES = {"phi3": "phi3", "phi4_mini": "phi3", "smollm3": "smollm3", "hunyuan": "hunyuandensev1",
               "mistral3": "mistral", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3", "ministral3": "decoder"}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return parity.case_checkpoints(tiny_checkpoint, CASES)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return parity.export_cache(checkpoint, tmp_path_factory, "families")


def spec_of(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    family = family_for(config["architectures"][0])
    return family.make_spec(text_config(family, config, config["architectures"][0]))


def with_config(src: Path, dst: Path, text: bool = False, **changes) -> Path:
    """A copy of a checkpoint folder with `changes` in config.json (in text_config when `text`)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (cfg["text_config"] if text else cfg).update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_logits_match_transformers(case, checkpoint, exported):
    prompt_err, decode_err, run, full = parity.compare_with_hf(exported(case), checkpoint(case), decode_steps=4)
    assert run.prompt_logits.shape == (len(parity.PROMPT_IDS), 512) and len(run.step_logits) == 4
    assert np.ptp(full, axis=0).max() > 100 * TOL
    assert prompt_err <= TOL, f"{case}: prompt logits max-abs {prompt_err:.3g} > {TOL}"
    assert decode_err <= TOL, f"{case}: decode-step logits max-abs {decode_err:.3g} > {TOL}"


@pytest.mark.genai
@pytest.mark.parametrize("case", [*FAMILIES, "ministral3"])
def test_genai_greedy_matches_transformers_generate(case, checkpoint, exported):
    assert parity.genai_config(exported(case))["model"]["type"] == GENAI_TYPES[case]
    expected = parity.hf_greedy(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert parity.genai_greedy(exported(case), parity.PROMPT_IDS, NEW_TOKENS) == expected


# --------------------------------------------------------------------------------------------- graphs


def test_phi3_fused_tensors_reach_the_layers_as_stored(checkpoint, exported):
    from builder.export import prepare
    from builder.weights import Stored

    prepared = prepare(str(checkpoint("phi3")), "fp32", "cpu")
    names = prepared.weights.names()
    assert {"layers.0.attn.qkv.weight", "layers.0.mlp.gate_up.weight"} <= set(names)
    assert not any(n.endswith((".q.weight", ".k.weight", ".v.weight", ".gate.weight", ".up.weight")) for n in names)
    for name in ("layers.1.attn.qkv.weight", "layers.1.mlp.gate_up.weight"):
        weight = prepared.weights.get(name)
        assert isinstance(weight, Stored) and weight.ref.name.endswith(("qkv_proj.weight", "gate_up_proj.weight"))
    model = parity.load_graph(exported("phi3"), weights=True)
    inits = {i.name: i for i in model.graph.initializer}
    stored = {n: t.float().numpy() for n, t in _tensors(checkpoint("phi3")).items()}
    for onnx_name, hf_name in (("layers.0.attn.qkv.weight", "model.layers.0.self_attn.qkv_proj.weight"),
                               ("layers.0.mlp.gate_up.weight", "model.layers.0.mlp.gate_up_proj.weight")):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[onnx_name]), stored[hf_name].T)


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_longrope_caches_switch_on_the_sequence_length(exported):
    model = parity.load_graph(exported("phi3"))
    ifs = parity.nodes_of(model, "If")
    assert len(ifs) == 1
    greater = next(n for n in model.graph.node if n.output[0] == ifs[0].input[0])
    gqas = parity.nodes_of(model, "GroupQueryAttention")
    longest = next(n for n in model.graph.node if n.output[0] == greater.input[0])
    assert greater.op_type == "Greater" and longest.op_type == "ReduceMax"
    assert longest.input[0] == gqas[0].input[5]  # max(seqlens_k) > 31: the longest row has more than 32 tokens
    limit = next(i for i in model.graph.initializer if i.name == greater.input[1])
    assert int(onnx.numpy_helper.to_array(limit)) == 31
    branches = {a.name: a.g for a in ifs[0].attribute}
    assert [n.input[0] for n in branches["then_branch"].node] == ["cos_cache_long", "sin_cache_long"]
    assert [n.input[0] for n in branches["else_branch"].node] == ["cos_cache_short", "sin_cache_short"]
    for gqa in gqas:
        assert list(gqa.input[7:9]) == list(ifs[0].output) and parity.attrs(gqa)["do_rotary"] == 1


def test_smollm3_nope_layers_run_without_rotary(checkpoint, exported):
    assert [layer.attention.rope is None for layer in spec_of(checkpoint("smollm3")).layers] == [False, True]
    gqa = parity.nodes_of(parity.load_graph(exported("smollm3")), "GroupQueryAttention")
    assert [parity.attrs(n)["do_rotary"] for n in gqa] == [1, 0]
    assert len(gqa[1].input) == 7  # no cos/sin caches on the NoPE layer


@pytest.mark.parametrize("case", ["hunyuan", "phi3_rotary_outside"])
def test_rotary_outside_the_op_feeds_gqa_without_rotary(case, exported):
    model = parity.load_graph(exported(case))
    producer = {o: n for n in model.graph.node for o in n.output}
    for gqa in parity.nodes_of(model, "GroupQueryAttention"):
        assert parity.attrs(gqa)["do_rotary"] == 0 and len(gqa.input) == 7
        q, k = producer[gqa.input[0]], producer[gqa.input[1]]
        if case == "hunyuan":  # q/k norm after rotary: Reshape <- SimplifiedLayerNormalization <- ... RotaryEmbedding
            for node in (q, k):
                norm = producer[node.input[0]]
                assert norm.op_type == "SimplifiedLayerNormalization"
                assert producer[producer[norm.input[0]].input[0]].op_type == "RotaryEmbedding"
        else:
            assert q.op_type == k.op_type == "RotaryEmbedding"
            assert parity.attrs(q)["rotary_embedding_dim"] == 8


def test_hunyuan_norm_before_rotary_would_be_far_off(checkpoint, exported, tmp_path):
    """Control for the qk_norm_after_rope variant: the same weights exported with the norm before rotary (the Qwen3
    order) miss transformers by far more than the tolerance."""
    from builder.decoder import build_decoder
    from builder.export import prepare
    from builder.output import save_model
    from builder.progress import Progress

    prepared = prepare(str(checkpoint("hunyuan")), "fp32", "cpu")
    layers = tuple(dataclasses.replace(layer, attention=dataclasses.replace(layer.attention, qk_norm_after_rope=False))
                   for layer in prepared.spec.layers)
    spec = dataclasses.replace(prepared.spec, layers=layers)
    save_model(build_decoder(spec, prepared.settings, prepared.weights), tmp_path, "model.onnx", Progress(quiet=True))
    wrong = parity.run_onnx(tmp_path, parity.PROMPT_IDS, 0).prompt_logits
    right = parity.run_onnx(exported("hunyuan"), parity.PROMPT_IDS, 0).prompt_logits
    reference = parity.hf_logits(parity.load_hf(checkpoint("hunyuan")), parity.PROMPT_IDS)
    assert parity.max_abs(right, reference) <= TOL
    assert parity.max_abs(wrong, reference) > 1000 * TOL


@pytest.mark.parametrize("case, changes", [
    ("smollm3", {"no_rope_layers": [1, 1]}),  # NoPE layer back to rotary
    ("hunyuan", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),  # alpha dropped
    ("phi4_mini", {"partial_rotary_factor": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}),
    ("ministral3", {"rope_parameters": {**MINISTRAL3_TEXT["rope_parameters"], "llama_4_scaling_beta": 0.0}}),
])
def test_reference_depends_on_the_feature(case, changes, checkpoint, tmp_path):
    with_feature = parity.hf_logits(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS)
    without = parity.hf_logits(parity.load_hf(with_config(checkpoint(case), tmp_path / "c", text=case == "ministral3",
                                                          **changes)), parity.PROMPT_IDS)
    assert parity.max_abs(with_feature, without) > 1000 * TOL


def test_ministral3_queries_are_scaled_by_position(exported):
    model = parity.load_graph(exported("ministral3"), weights=True)
    producer = {o: n for n in model.graph.node for o in n.output}
    table = next(i for i in model.graph.initializer if i.name.startswith("query_position_scale"))
    positions = np.arange(256)
    np.testing.assert_allclose(onnx.numpy_helper.to_array(table), 1 + 0.5 * np.log1p(positions // 8), rtol=1e-6)
    for gqa in parity.nodes_of(model, "GroupQueryAttention"):
        mul = producer[gqa.input[0]]
        assert mul.op_type == "Mul" and producer[mul.input[0]].op_type == "Split"
        assert producer[producer[mul.input[1]].input[0]].input[0] == table.name  # Unsqueeze(Gather(table, pos))


@pytest.mark.parametrize("case, prefix", [("mistral3", "language_model.model."), ("qwen2_5_vl", "model."),
                                          ("qwen3_vl", "model.language_model.")])
def test_vision_towers_are_skipped_deliberately(case, prefix, checkpoint, exported):
    """The wrappers' vision tensors are marked as not exported (an export fails on any other unused tensor) and
    the text decoder is found under the prefix each checkpoint layout uses."""
    from builder.export import prepare

    names = set(_tensors(checkpoint(case)))
    assert f"{prefix}embed_tokens.weight" in names
    vision = {n for n in names if not n.startswith(prefix) and not n.endswith("lm_head.weight")}
    assert vision and all("vision" in n or "visual" in n or "multi_modal_projector" in n for n in vision)
    prepared = prepare(str(checkpoint(case)), "fp32", "cpu")
    assert prepared.checkpoint.unconsumed() == []  # vision ignored on purpose, every text tensor mapped
    inits = {i.name for i in parity.load_graph(exported(case)).graph.initializer}
    assert not any("vis" in n or "projector" in n for n in inits)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_mrope_with_text_positions_is_plain_rope(arch, checkpoint):
    """transformers' own mRoPE module, fed equal t/h/w positions, gives exactly the cos/sin of the plain rope we
    export; unequal positions (an image grid) would not, so the sections only matter for vision tokens."""
    from builder.layers.rotary import cos_sin_cache

    config = factory.build_config(arch)
    text = config.text_config
    model_cls = {"qwen2_5_vl": "Qwen2_5_VLRotaryEmbedding", "qwen3_vl": "Qwen3VLTextRotaryEmbedding"}[arch]
    module = __import__(f"transformers.models.{arch}.modeling_{arch}", fromlist=[model_cls])
    rotary = getattr(module, model_cls)(text)
    positions = torch.arange(40)[None]
    x = torch.zeros(1, 40, 16)
    cos, sin = rotary(x, positions[None].expand(3, 1, 40))
    ours_cos, ours_sin = cos_sin_cache(spec_of(checkpoint(arch)).attention.rope)
    np.testing.assert_allclose(cos[0].numpy(), np.concatenate([ours_cos[:40]] * 2, -1), atol=1e-6)
    np.testing.assert_allclose(sin[0].numpy(), np.concatenate([ours_sin[:40]] * 2, -1), atol=1e-6)
    grid = torch.stack([positions, positions // 4, positions % 4])  # t, h, w differ: [3, 1, 40]
    assert not np.allclose(rotary(x, grid)[0][0].numpy(), cos[0].numpy(), atol=1e-3)


# --------------------------------------------------------------------------------------------- quantized


def dequantized_reference(folder: Path):
    """transformers fp32 with every decoder Linear and the lm_head replaced by its int4 round trip (block 32,
    symmetric: the default plan); an untied embedding stays float, a tied one reads the head's int4 table (the
    default shares it)."""
    from quant_reference import Fmt, round_trip

    model = parity.load_hf(folder)
    head = model.lm_head
    embed = model.get_input_embeddings()
    tied = embed.weight is head.weight
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (".layers." in name and "vis" not in name or module is head):
                back = round_trip(module.weight.detach().numpy().copy(), Fmt(bits=4))
                module.weight = torch.nn.Parameter(torch.from_numpy(back), requires_grad=False)
        if tied:
            embed.weight = head.weight
    return model


@pytest.mark.parametrize("case", FAMILIES)
def test_int4_matches_transformers_on_the_same_dequantized_weights(case, checkpoint, exported):
    out = exported(case, "int4", "cpu", "int4_accuracy_level=0")
    nodes = parity.ops_in(out)
    assert nodes["MatMulNBits"] == 4 * 2 + 1 and "MatMul" not in nodes  # qkv, o, gate_up, down per layer + lm_head
    continuation = parity.hf_greedy(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS, 4)
    run = parity.run_onnx(out, parity.PROMPT_IDS, 4, feed_tokens=continuation)
    ours = np.concatenate([run.prompt_logits, np.stack(run.step_logits)])
    expected = parity.hf_logits(dequantized_reference(checkpoint(case)), parity.PROMPT_IDS + continuation)
    assert parity.max_abs(ours, expected) <= 1e-4


@pytest.mark.parametrize("case", FAMILIES)
def test_int8_export_runs_close_to_fp32(case, checkpoint, exported):
    out = exported(case, "int8")
    assert parity.ops_in(out)["MatMulNBits"] == 4 * 2 + 1
    prompt_err, decode_err, run, full = parity.compare_with_hf(out, checkpoint(case), decode_steps=4)
    assert np.isfinite(run.prompt_logits).all() and len(run.step_logits) == 4
    assert max(prompt_err, decode_err) < 0.05 * np.ptp(full)  # measured 1.1-2.3 % of the logit range


# --------------------------------------------------------------------------------------------- inspect, bad input


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.mark.parametrize("case, rope_rows", [
    ("phi3", ["layers 0-1: longrope, theta 10000, 16 of 16 dims, short factors up to 32 tokens, long beyond, in "
              "GroupQueryAttention"]),
    ("phi4_mini", ["layers 0-1: longrope, theta 10000, 48 of 64 dims, short factors up to 32 tokens, long beyond, "
                   "in GroupQueryAttention"]),
    ("smollm3", ["layer 0: default, theta 2e+06, 16 of 16 dims, in GroupQueryAttention", "layer 1: none (NoPE)"]),
    ("hunyuan", ["layers 0-1: ntk_alpha, theta 10000, 16 of 16 dims, RotaryEmbedding before attention (q/k norm "
                 "after rotary)"]),
    ("qwen3_vl", ["layers 0-1: default, theta 1e+06, 16 of 16 dims, in GroupQueryAttention"]),
])
def test_inspect_shows_the_plan_and_the_rope(case, rope_rows, checkpoint, capsys):
    code, out, err = run_cli(capsys, ["inspect", "-m", str(checkpoint(case)), "-p", "int4"])
    assert code == 0, err
    assert [line[len("rope: "):] for line in out.splitlines() if line.startswith("rope: ")] == rope_rows
    plan = out.split("plan:\n", 1)[1]
    assert "layers.1.attn.qkv     int4 default block 32 sym" in plan
    assert "layers.1.mlp.gate_up  int4 default block 32 sym" in plan


# (case, config changes (text_config for the wrappers), exception, fragments of the message)
BAD = [
    ("phi3", {"rope_parameters": {**factory.PHI3_LONGROPE, "rope_type": "dynamic"}}, UnsupportedModelError,
     "field 'rope_parameters.rope_type'='dynamic' is not supported (supported: 'default', 'longrope')"),
    ("phi3", {"hidden_act": "gelu_new"}, UnsupportedModelError, "field 'hidden_act'='gelu_new' is not supported"),
    ("phi3", {"rope_parameters": {**factory.PHI3_LONGROPE, "short_factor": [1.0] * 6}}, CheckpointError,
     "field 'rope_parameters.short_factor' is [1.0, 1.0, 1.0, 1.0, 1.0, 1.0] (a list); expected a list of 8 entries"),
    ("smollm3", {"no_rope_layers": [1, 2]}, CheckpointError, "field 'no_rope_layers' is [1, 2]"),
    ("smollm3", {"layer_types": ["full_attention", "chunked_attention"]}, UnsupportedModelError,
     "field 'layer_types'=['chunked_attention'] is not supported"),
    ("hunyuan", {"use_cla": True}, UnsupportedModelError, "field 'use_cla'=True is not supported (supported: False)"),
    ("hunyuan", {"num_experts": 8}, UnsupportedModelError, "field 'num_experts'=8 is not supported"),
    ("hunyuan", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, UnsupportedModelError,
     "field 'rope_parameters.rope_type'='longrope' is not supported"),
    ("mistral3", {"model_type": "llama"}, UnsupportedModelError,
     "field 'text_config.model_type'='llama' is not supported (supported: 'mistral', 'ministral3')"),
    ("qwen2_5_vl", {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 4], "rope_theta": 1e6}},
     CheckpointError, "field 'text_config.rope_parameters.mrope_section' is [2, 3, 4]"),
    ("qwen3_vl", {"hidden_act": "gelu"}, UnsupportedModelError,
     "field 'text_config.hidden_act'='gelu' is not supported"),
]


@pytest.mark.parametrize("case, changes, error, fragment", BAD, ids=[f"{b[0]}-{next(iter(b[1]))}" for b in BAD])
def test_config_fields_that_change_the_maths_are_refused_by_name(case, changes, error, fragment, checkpoint):
    config = json.loads((checkpoint(case) / "config.json").read_text())
    (config["text_config"] if "text_config" in config else config).update(changes)
    family = family_for(config["architectures"][0])
    with pytest.raises(error) as info:
        family.make_spec(text_config(family, config, config["architectures"][0]))
    assert fragment in str(info.value) and config["architectures"][0] in str(info.value)


def test_cli_exit_codes_name_the_field(checkpoint, tmp_path, capsys):
    bad = with_config(checkpoint("hunyuan"), tmp_path / "c", use_cla=True)
    code, _, err = run_cli(capsys, ["-m", str(bad), "-o", str(tmp_path / "out"), "-p", "fp32"])
    assert code == 3 and "use_cla" in err and not (tmp_path / "out").exists()
    bad = with_config(checkpoint("qwen2_5_vl"), tmp_path / "d", text=True, rope_parameters={
        "rope_type": "default", "mrope_section": [4, 4, 4], "rope_theta": 1e6})
    code, _, err = run_cli(capsys, ["-m", str(bad), "-o", str(tmp_path / "out"), "-p", "fp32"])
    assert code == 4 and "mrope_section" in err


def test_a_tied_config_with_a_different_stored_head_exports_untied(checkpoint, tmp_path, capsys):
    """transformers keeps a stored lm_head that differs from the embedding even when the config says tied (it warns
    and unties them); the export does the same, with a note, instead of reading the embedding."""
    from safetensors.torch import save_file

    src = checkpoint("phi3")  # untied: it stores lm_head.weight
    bad = with_config(src, tmp_path / "c", tie_word_embeddings=True)
    code, _, err = run_cli(capsys, ["-m", str(bad), "-o", str(tmp_path / "out"), "-p", "fp32"])
    assert code == 0, err
    assert "note: the config ties the lm_head to the embedding, but lm_head.weight differs" in err
    assert (tmp_path / "out/model.onnx.data").read_bytes() == (parity.export(src, tmp_path / "untied")
                                                               / "model.onnx.data").read_bytes()
    tensors = _tensors(src)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # an identical copy is fine
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, ["-m", str(bad), "-o", str(tmp_path / "out2"), "-p", "fp32"])
    assert code == 0, err
    assert "not exported: a copy of the tied embedding (identical values) (1 tensor: lm_head.weight)" in err
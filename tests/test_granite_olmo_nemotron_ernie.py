"""Granite, OLMo 2, OLMo 3, Nemotron and ERNIE 4.5 dense end to end against transformers.

What is proved here:
- fp32/cpu exports reproduce transformers fp32 logits within 1e-4 max-abs at every prompt position (12 tokens, past
  OLMo 3's sliding window of 8) and for 4 KV-cache decode steps; onnxruntime-genai's greedy search picks the same 16
  tokens as transformers `generate`;
- each family's features reach the graph as the spec says (multipliers, post-norms, whole-projection q/k norms,
  per-layer windows and ropes, LayerNorm with bias, squared-ReLU MLP, partial and interleaved rotary), and the
  config-driven ones really move transformers' logits, so the parity above would catch an export that ignored them;
- int4 and int8 exports run; `inspect` shows the plan of a non-gated MLP;
- a config field that changes the maths and is not implemented exits 3 naming the field; a bias tensor the config
  does not announce is refused as unused (exit 4).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

import parity
from builder.cli import main

TOL = 1e-4
NEW_TOKENS = 16
CASES = ("granite", "olmo2", "olmo3", "nemotron", "ernie4_5")  # factory recipes: every feature switched on
# Nemotron rotating 8 of 32 dims: half (4) is not a width GroupQueryAttention rotates, so rotary runs before it
NEMOTRON_QUARTER = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}}
SLIDING, FULL = "sliding_attention", "full_attention"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return lambda case: (tiny_checkpoint("nemotron", **NEMOTRON_QUARTER) if case == "nemotron_quarter"
                         else tiny_checkpoint(case))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return parity.export_cache(checkpoint, tmp_path_factory, "breadth")


def _gqa(model_dir: Path) -> list[dict]:
    return [parity.attrs(n) for n in parity.nodes_of(parity.load_graph(model_dir), "GroupQueryAttention")]


def _initializers(model_dir: Path) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in parity.load_graph(model_dir).graph.initializer}


def _with_config(src: Path, dst: Path, keep_null: bool = False, **changes) -> Path:
    """A copy of a checkpoint folder whose config.json has `changes` applied (None deletes a key unless keep_null)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None and not keep_null:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", [*CASES, "nemotron_quarter"])
def test_fp32_cpu_logits_match_transformers(case, checkpoint, exported):
    prompt_err, decode_err, run, full = parity.compare_with_hf(exported(case), checkpoint(case), decode_steps=4)
    assert run.prompt_logits.shape == (len(parity.PROMPT_IDS), 512) and len(run.step_logits) == 4
    assert np.ptp(full, axis=0).max() > 1000 * TOL  # the reference is not degenerate
    per_position = [parity.max_abs(run.prompt_logits[i], full[i]) for i in range(len(parity.PROMPT_IDS))]
    assert max(per_position) <= TOL, per_position
    assert decode_err <= TOL, decode_err


@pytest.mark.genai
@pytest.mark.parametrize("case", CASES)
def test_genai_greedy_matches_transformers_generate(case, checkpoint, exported):
    expected = parity.hf_greedy(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert parity.genai_greedy(exported(case), parity.PROMPT_IDS, NEW_TOKENS) == expected


@pytest.mark.parametrize("case, changes", [
    ("granite", {"embedding_multiplier": 1.0}),
    ("granite", {"residual_multiplier": 1.0}),
    ("granite", {"attention_multiplier": 0.25}),  # 1/sqrt(head_dim)
    ("granite", {"logits_scaling": 1.0}),
    ("olmo3", {"sliding_window": 64}),
    ("olmo3", {"rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 500000.0},
                                   FULL: {"rope_type": "default", "rope_theta": 500000.0}}}),
    ("nemotron", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}),
])
def test_reference_depends_on_the_feature(case, changes, checkpoint, tmp_path):
    """Control for the parity test: without the feature transformers' logits move by far more than the tolerance."""
    with_feature = parity.hf_logits(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS)
    without = parity.hf_logits(parity.load_hf(_with_config(checkpoint(case), tmp_path / "ckpt", **changes)),
                               parity.PROMPT_IDS)
    assert parity.max_abs(with_feature, without) > 100 * TOL


# ------------------------------------------------------------------------------------------------ structure


def test_granite_multipliers_are_graph_constants(exported):
    out = exported("granite")
    assert [a["scale"] for a in _gqa(out)] == [pytest.approx(0.125)] * 2  # attention_multiplier, not 1/sqrt(16)
    graph = parity.load_graph(out, weights=True).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.dims}
    assert constants["embed.scale"] == pytest.approx(12.0)
    assert constants["residual_scale.0.22"] == pytest.approx(0.22)
    assert constants["logits_divisor"] == pytest.approx(2.0)
    residual_muls = [n for n in graph.node if n.op_type == "Mul" and "residual_scale.0.22" in n.input]
    assert len(residual_muls) == 4  # attention and MLP outputs of both layers
    assert [n.input[1] for n in graph.node if n.op_type == "Div"] == ["logits_divisor"]
    assert parity.genai_config(out)["model"]["type"] == "granite"


def test_olmo_post_norms_and_whole_projection_qk_norm(exported):
    for case in ("olmo2", "olmo3"):
        out = exported(case)
        shapes = _initializers(out)
        for i in range(2):
            assert shapes[f"layers.{i}.attn.q_norm.weight"] == [64]  # 4 heads x 16: one norm over the projection
            assert shapes[f"layers.{i}.attn.k_norm.weight"] == [32]
            assert f"layers.{i}.attn_norm.weight" not in shapes and f"layers.{i}.ffn_norm.weight" not in shapes
        ops = parity.ops_in(out)
        # per layer: q norm, k norm, post-attention and post-MLP norms; the final norm fuses the last residual add
        assert ops["SimplifiedLayerNormalization"] == 8 and ops["SkipSimplifiedLayerNormalization"] == 1
        assert all(len(n.input) == 9 for n in parity.nodes_of(parity.load_graph(out), "GroupQueryAttention"))
        assert parity.genai_config(out)["model"]["type"] == "decoder"
    assert [a["local_window_size"] for a in _gqa(exported("olmo2"))] == [-1, -1]


def test_olmo_qk_norm_stays_outside_gqa_on_cuda(exported):
    """GroupQueryAttention's fused q/k norm is per head: a whole-projection norm must stay a separate node."""
    out = exported("olmo2", "fp16", "cuda")
    assert all(len(n.input) == 9 and "qk_norm_epsilon" not in parity.attrs(n)
               for n in parity.nodes_of(parity.load_graph(out), "GroupQueryAttention"))
    assert parity.ops_in(out)["SimplifiedLayerNormalization"] == 8


def test_olmo3_sliding_layers_and_rope_per_layer_type(exported):
    out = exported("olmo3")
    assert [a["local_window_size"] for a in _gqa(out)] == [8, -1]
    gqa = parity.nodes_of(parity.load_graph(out), "GroupQueryAttention")
    assert [(n.input[7], n.input[8]) for n in gqa] == [("cos_cache", "sin_cache"), ("cos_cache_1", "sin_cache_1")]


def test_nemotron_layer_norm_relu2_mlp_and_partial_rotary(exported):
    out = exported("nemotron")
    ops = parity.ops_in(out)
    assert ops["LayerNormalization"] == 1 and ops["SkipLayerNormalization"] == 4  # 2 per layer + final, 1 unfused
    assert "SimplifiedLayerNormalization" not in ops and "SkipSimplifiedLayerNormalization" not in ops
    assert ops["Relu"] == 2 and "Split" not in ops and "Sigmoid" not in ops  # up -> relu^2 -> down, no gate
    shapes = _initializers(out)
    assert shapes["cos_cache"] == [256, 8]  # head_dim 32, half of it rotated
    assert shapes["final_norm.bias"] == [64] and shapes["layers.1.mlp.up.bias"] == [128]
    assert parity.genai_config(out)["model"]["type"] == "nemotron"


def test_ernie_interleaved_rotary_and_biases(exported):
    out = exported("ernie4_5")
    assert [a["rotary_interleaved"] for a in _gqa(out)] == [1, 1]
    shapes = _initializers(out)
    assert shapes["layers.0.attn.qkv.bias"] == [128] and shapes["layers.0.attn.o.bias"] == [64]
    assert "lm_head.weight" not in shapes  # tied
    assert parity.genai_config(out)["model"]["type"] == "ernie4_5"


# ------------------------------------------------------------------------------------------------ quantized


@pytest.mark.parametrize("precision, bits", [("int4", 4), ("int8", 8)])
@pytest.mark.parametrize("case", CASES)
def test_quantized_exports_run(case, precision, bits, exported):
    out = exported(case, precision)
    nbits = parity.nodes_of(parity.load_graph(out), "MatMulNBits")
    assert len(nbits) == 2 * 4 + 1 and {parity.attrs(n)["bits"] for n in nbits} == {bits}  # qkv, o, up(+gate), down
    run = parity.run_onnx(out, decode_steps=2)
    assert np.isfinite(run.prompt_logits).all() and all(np.isfinite(s).all() for s in run.step_logits)


def test_inspect_shows_the_plain_mlp_plan(checkpoint, capsys):
    with pytest.raises(SystemExit) as done:
        main(["inspect", "-m", str(checkpoint("nemotron")), "-p", "int4"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "architecture: NemotronForCausalLM (model_type nemotron)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  layers.1.")]
    assert rows == [["layers.1.attn.qkv", "int4", "default", "block", "32", "sym"],
                    ["layers.1.attn.o", "int4", "default", "block", "32", "sym"],
                    ["layers.1.mlp.up", "int4", "default", "block", "32", "sym"],
                    ["layers.1.mlp.down", "int4", "default", "block", "32", "sym"]]


# ------------------------------------------------------------------------------------------------ bad input


def _refused(capsys, checkpoint_dir: Path, out: Path) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(["-m", str(checkpoint_dir), "-o", str(out), "-p", "fp32", "-q"])
    assert not out.exists()
    return done.value.code, capsys.readouterr().err.strip()


UNSUPPORTED = "ortbuild: unsupported model: "


@pytest.mark.parametrize("case, changes, message", [
    ("granite", {"hidden_act": "gelu"},
     "GraniteForCausalLM: config.json field 'hidden_act'='gelu' is not supported (supported: 'silu')."),
    ("granite", {"rope_parameters": {"rope_type": "made_up", "rope_theta": 10000.0}},
     "GraniteForCausalLM: config.json field 'rope_parameters.rope_type'='made_up' is not supported (supported: "),
    ("olmo2", {"mlp_bias": True},
     "Olmo2ForCausalLM: config.json field 'mlp_bias'=True is not supported (supported: False)."),
    ("olmo3", {"layer_types": [SLIDING, "chunked_attention"]},
     "Olmo3ForCausalLM: config.json field 'layer_types'='chunked_attention' is not supported (supported: "
     "'full_attention', 'sliding_attention')."),
    ("olmo3", {"rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 1e4},
                                   FULL: {"rope_type": "made_up", "rope_theta": 1e4}}},
     "Olmo3ForCausalLM: config.json field 'rope_parameters.full_attention.rope_type'='made_up' is not supported"),
    ("nemotron", {"hidden_act": "silu"},
     "NemotronForCausalLM: config.json field 'hidden_act'='silu' is not supported (supported: 'relu2')."),
    ("nemotron", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}},
     "NemotronForCausalLM: config.json field 'rope_parameters.partial_rotary_factor'=0.1 is not supported "
     "(supported: a factor whose rotated width (head_dim * factor, head_dim 32) is even)."),
    ("ernie4_5", {"attention_bias": True},
     "Ernie4_5ForCausalLM: config.json field 'attention_bias'=True is not supported (supported: False)."),
])
def test_unimplemented_config_field_exits_3_naming_it(case, changes, message, checkpoint, tmp_path, capsys):
    code, err = _refused(capsys, _with_config(checkpoint(case), tmp_path / "ckpt", **changes), tmp_path / "out")
    assert code == 3
    assert err.startswith(UNSUPPORTED + message), err
    assert len(err.splitlines()) == 1


def test_olmo3_null_sliding_window_is_a_broken_config(checkpoint, tmp_path, capsys):
    code, err = _refused(capsys, _with_config(checkpoint("olmo3"), tmp_path / "ckpt", sliding_window=None,
                                              keep_null=True), tmp_path / "out")
    assert code == 4
    assert err == ("ortbuild: bad checkpoint: Olmo3ForCausalLM: config.json field 'sliding_window' is missing (or "
                   "null); this architecture needs it. The checkpoint's config is incomplete: re-download it or add "
                   "the field.")


@pytest.mark.parametrize("case, flag", [("granite", "attention_bias"), ("nemotron", "mlp_bias"),
                                        ("ernie4_5", "use_bias")])
def test_bias_tensors_the_config_does_not_announce_are_refused(case, flag, checkpoint, tmp_path, capsys):
    code, err = _refused(capsys, _with_config(checkpoint(case), tmp_path / "ckpt", **{flag: False}), tmp_path / "out")
    assert code == 4
    assert "checkpoint tensor(s) were not used by the export: model.layers.0." in err and "_proj.bias" in err, err


# ------------------------------------------------------------------------------------------------ config spellings


LEGACY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)


@pytest.mark.parametrize("arch, extra", [
    ("Olmo3ForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024,
                                           "attention_factor": 1.2}}),
    ("Olmo3ForCausalLM", {}),
    ("NemotronForCausalLM", {"partial_rotary_factor": 0.25, "rope_scaling": None}),
    ("NemotronForCausalLM", {}),
])
def test_older_rope_spellings_read_as_transformers_reads_them(arch, extra):
    """rope_theta / rope_scaling / top-level partial_rotary_factor (configs written before transformers 5): the
    spec's ropes equal what transformers' own config class makes of the same keys."""
    import transformers

    from builders import family_for
    from builders.config import Config

    config = {**LEGACY, **extra, "architectures": [arch]}
    hf = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**config)
    config["model_type"] = hf.model_type
    spec = family_for(arch).make_spec(Config(config, arch))
    head_dim = 64
    for layer, kind in zip(spec.layers, getattr(hf, "layer_types", None) or [None] * 4):
        rope, params = layer.attention.rope, (hf.rope_parameters[kind] if kind else hf.rope_parameters)
        assert rope.rope_type == params["rope_type"] and rope.theta == params["rope_theta"]
        assert rope.rotary_dim == int(head_dim * params.get("partial_rotary_factor", 1.0))
        assert dict(rope.params) == {k: v for k, v in params.items()
                                     if k not in ("rope_type", "rope_theta", "partial_rotary_factor")}

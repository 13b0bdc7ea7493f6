"""`ortbuild inspect` tells the truth: its plan has a row for every weight the graph writes, and the bits, block size
and symmetry of each row are what the exported model stores, for every family (MoE experts included).

The model side is read from the written graph alone: MatMulNBits / GatherBlockQuantized / QMoE attributes and
inputs, float MatMul / Gemm / Gather / MoE initializers. Options that cannot apply are a note or a usage error.
"""

from __future__ import annotations

import re

import pytest

import factory
import parity
from builder.cli import main
from test_gemma import GEMMA4_ALL

# case -> (factory arch, checkpoint overrides, precision, extra options): every recipe once, the options varied
CASES = {
    "llama": ("llama", {}, "int4", ["int4_block_size=64", "last_matmul_weight_int8=true"]),
    "mistral": ("mistral", {}, "int4", ["int4_is_symmetric=false"]),
    "qwen2": ("qwen2", {}, "int8", []),
    "qwen3": ("qwen3", {}, "int4", ["quantize_embeddings=true"]),
    "qwen2_moe": ("qwen2_moe", {}, "int4", ["moe_quant_bits=8", "qmoe_block_size=0"]),
    "qwen3_moe": ("qwen3_moe", {}, "int4", ["qmoe_block_size=16", "int8_mixed_layers=true"]),
    "qwen3_moe_fp32": ("qwen3_moe", {}, "fp32", []),
    "mixtral": ("mixtral", {}, "int8", []),
    "gpt_oss": ("gpt_oss", {}, "int4", []),
    "gemma": ("gemma", {}, "int4", ["int4_algo_config=k_quant"]),
    "gemma2": ("gemma2", {}, "int4", ["int4_algo_config=rtn"]),
    "gemma3": ("gemma3", {}, "int4", ["quantize_embeddings=true", "last_matmul_weight_int8=true"]),
    "gemma3_vlm": ("gemma3_vlm", {}, "int8", []),
    "gemma4": ("gemma4", {}, "int4", []),
    "gemma4_all": ("gemma4", GEMMA4_ALL, "int4", ["int8_mixed_layers=true"]),
    "gemma4_moe": ("gemma4_moe", {}, "int4", ["moe_quant_bits=8", "qmoe_block_size=16"]),
    "gemma4_vlm": ("gemma4_vlm", {}, "int4", ["quantize_embeddings=true"]),
    "granite": ("granite", {}, "int4", ["int4_algo_config=rtn", "int4_is_symmetric=false"]),
    "olmo2": ("olmo2", {}, "int8", []),
    "olmo3": ("olmo3", {}, "int4", ["last_matmul_weight_int8=true"]),
    "nemotron": ("nemotron", {}, "int4", ["int4_block_size=16"]),
    "ernie4_5": ("ernie4_5", {}, "int4", ["quantize_embeddings=true"]),
    "phi3": ("phi3", {}, "int4", ["int8_mixed_layers=true"]),
    "phi4_mini": ("phi4_mini", {}, "int4", ["quantize_embeddings=true", "int4_block_size=128"]),
    "smollm3": ("smollm3", {}, "int8", ["int4_is_symmetric=false"]),
    "hunyuan": ("hunyuan", {}, "int4", ["int4_algo_config=k_quant"]),
    "mistral3": ("mistral3", {}, "int4", ["last_matmul_weight_int8=true"]),
    "qwen2_5_vl": ("qwen2_5_vl", {}, "int4", []),
    "qwen3_vl": ("qwen3_vl", {}, "int8", ["quantize_embeddings=true"]),
    "qwen3_5": ("qwen3_5", {}, "int4", ["int8_linear_attn=true"]),
    "qwen3_5_vlm": ("qwen3_5_vlm", {}, "int4", []),
    "qwen3_5_moe": ("qwen3_5_moe", {}, "int4", ["moe_quant_bits=8", "qmoe_block_size=16"]),
    "qwen3_5_moe_vlm": ("qwen3_5_moe_vlm", {}, "int8", ["qmoe_block_size=0"]),
    "qwen3_next": ("qwen3_next", {}, "int4", ["int8_linear_attn=true", "int4_is_symmetric=false"]),
    "glm4_moe": ("glm4_moe", {}, "int4", ["moe_quant_bits=8"]),
    "ernie4_5_moe": ("ernie4_5_moe", {}, "int8", ["qmoe_block_size=0"]),
    "llama4_text": ("llama4_text", {}, "int4", []),
    "llama4_vlm": ("llama4_vlm", {}, "int4", ["qmoe_block_size=16"]),
    "phimoe": ("phimoe", {}, "int4", ["last_matmul_weight_int8=true"]),
    "deepseek_v3": ("deepseek_v3", {}, "int4", ["int8_mixed_layers=true"]),
    "deepseek_v3_no_q_lora": ("deepseek_v3", {"q_lora_rank": None}, "int8", []),
    "deepseek_v2": ("deepseek_v2", {}, "int4", ["moe_quant_bits=8"]),
    "deepseek_v3_moe": ("deepseek_v3_moe", {}, "int4", ["qmoe_block_size=16"]),
}
assert {arch for arch, *_ in CASES.values()} == set(factory.ARCHS)  # every family recipe is covered
FORMAT = re.compile(r"^int(\d) \S+ (?:block (\d+)|per-channel) (sym|asym)")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def plan_rows(text: str) -> dict[str, str]:
    rows = text.split("plan:\n", 1)[1].splitlines()
    return {m.group(1): m.group(2) for m in (re.match(r"^  (\S+)(?: \(tied\))?\s{2,}(.+)$", r) for r in rows)}


def as_stored(fmt: str):
    """'int4 default block 32 sym (QMoE)' -> (4, 32, True); 'float ...' -> None."""
    if fmt.startswith("float"):
        return None
    bits, block, sym = FORMAT.match(fmt).groups()
    return int(bits), int(block or 0), sym == "sym"


def prefix(name: str) -> str:
    """An initializer name without its .weight / .qweight suffix (float MoE experts carry none)."""
    return re.sub(r"\.q?weight$", "", name)


def model_formats(model) -> dict[str, tuple | None]:
    """initializer prefix -> (bits, block, symmetric) or None (float), for every weight a compute node reads."""
    import onnx

    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    inits = set(dims)
    reshaped = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape"}
    attrs = lambda node: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    found: dict[str, tuple | None] = {}
    for node in model.graph.node:
        ins = list(node.input)
        if "/lm_head/" in node.name and node.op_type in ("MatMulNBits", "FusedMatMul", "MatMul"):
            key = "lm_head"
        elif node.op_type in ("MatMulNBits", "MatMul", "Gemm"):
            key = prefix(reshaped.get(ins[1], ins[1]))
        if node.op_type == "MatMulNBits":
            a = attrs(node)
            blocks = -(-a["K"] // a["block_size"])
            assert dims[ins[2]] == [a["N"], blocks], node.name  # the scales really are per block of this size
            if ins[1] in dims:
                assert dims[ins[1]] == [a["N"], blocks, a["block_size"] * a["bits"] // 8], node.name
            found[key] = (a["bits"], a["block_size"], len(ins) < 4 or not ins[3])
        elif node.op_type in ("MatMul", "FusedMatMul", "Gemm") and ins[1] in inits:
            found[key] = None
        elif node.op_type == "GatherBlockQuantized":
            a = attrs(node)
            vocab, packed_h = dims[ins[0]]
            assert dims[ins[2]] == [vocab, packed_h * 8 // a["bits"] // a["block_size"]], node.name
            found[prefix(ins[0])] = (a["bits"], a["block_size"], len(ins) < 4)
        elif node.op_type == "Gather" and ins[0] in inits and ins[0].endswith("embed.weight"):
            found[prefix(ins[0])] = None
        elif node.op_type == "QMoE":
            a = attrs(node)
            block = a.get("block_size", 0)
            for weight, scales in ((ins[2], ins[3]), (ins[5], ins[6])):
                e, n, packed_k = dims[weight]
                k = packed_k * 8 // a["expert_weight_bits"]
                assert dims[scales] == ([e, n, k // block] if block else [e, n]), node.name
                found[prefix(weight)] = (a["expert_weight_bits"], block, True)
        elif node.op_type == "MoE":
            for weight in (ins[2], ins[4]):
                found[prefix(weight)] = None
    return found


def expand(rows: dict[str, str], names) -> dict[str, str]:
    """`layers.0.moe.experts.*.gate_up` rows -> one row per expert found in the model."""
    out = {}
    for name, fmt in rows.items():
        if "*" not in name:
            out[name] = fmt
            continue
        pattern = re.compile(re.escape(name).replace(r"\*", r"\d+") + "$")
        matches = [n for n in names if pattern.match(n)]
        assert matches, f"no weight in the model for plan row {name}"
        out.update({n: fmt for n in matches})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_plan_is_what_the_model_stores(case, tiny_checkpoint, tmp_path, capsys):
    arch, overrides, precision, extra = CASES[case]
    ckpt = tiny_checkpoint(arch, **overrides)
    options = ["--extra_options", *extra] if extra else []
    code, out, err = run_cli(capsys, "inspect", "-m", str(ckpt), "-p", precision, *options)
    assert code == 0, err
    exported = parity.export(ckpt, tmp_path / "model", precision, "cpu", extra)
    stored = model_formats(parity.load_graph(exported))
    planned = {name: as_stored(fmt) for name, fmt in expand(plan_rows(out), stored).items()}
    assert sorted(planned) == sorted(stored)
    wrong = {name: (planned[name], stored[name]) for name in planned if planned[name] != stored[name]}
    assert not wrong, f"plan vs model (bits, block, symmetric): {wrong}"


# ------------------------------------------------------------------------------------- options that cannot apply


def test_per_channel_experts_cannot_apply_to_per_expert_matmuls(tiny_checkpoint, tmp_path, capsys):
    """Gemma 4's experts are one MatMulNBits per expert, whose scales come in blocks of 16..256."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-m", str(tiny_checkpoint("gemma4_moe")), "-o", str(out), "-p", "int4", "-q",
                           "--extra_options", "moe_quant_bits=8", "qmoe_block_size=0")
    assert code == 2 and not out.exists()
    assert err == ("ortbuild: usage error: qmoe_block_size=0 asks for per-channel expert scales, but "
                   "Gemma4ForCausalLM's experts are per-expert MatMulNBits weights (no QMoE op), whose scales come in "
                   "blocks of 16..256 along K. Use qmoe_block_size=16, 32, 64, 128 or 256 (default 32).\n")


def test_qmoe_block_that_does_not_tile_k_is_a_usage_error(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-m", str(tiny_checkpoint("qwen3_moe")), "-o", str(out), "-p", "int4",
                           "--extra_options", "qmoe_block_size=64")
    assert code == 2 and not out.exists()
    assert "qmoe_block_size=64 does not divide the experts' input width 32 in Qwen3MoeForCausalLM" in err


@pytest.mark.parametrize("arch, precision, extra, note", [
    ("llama", "int4", ["moe_quant_bits=8", "qmoe_block_size=16"],
     "moe_quant_bits, qmoe_block_size: LlamaForCausalLM has no MoE experts, so they change nothing."),
    ("gemma4_moe", "int4", ["qmoe_prepack_arch=80", "qmoe_weights_prepacked=-1", "qmoe_block_size=16"],
     "qmoe_weights_prepacked, qmoe_prepack_arch: Gemma4ForCausalLM's experts are per-expert MatMulNBits weights, "
     "not a QMoE op, so they change nothing."),
    ("qwen3_moe", "fp32", ["moe_quant_bits=4"], "-p fp32 keeps every weight in float; ignoring moe_quant_bits=4."),
])
def test_expert_options_without_a_target_are_notes(arch, precision, extra, note, tiny_checkpoint, capsys):
    code, out, err = run_cli(capsys, "inspect", "-m", str(tiny_checkpoint(arch)), "-p", precision,
                             "--extra_options", *extra)
    assert code == 0, err
    assert f"note: {note}" in out.splitlines()


# ------------------------------------------------------------------------------------------- q/k norm placement

QK_EXTRA = {"gemma4_all": ("gemma4", GEMMA4_ALL),  # KV-sharing sources and consumers
            # 0.125 of a 64-wide head rotates 8 dims: a half of 4 is not a multiple of 8, so rotary runs before the op
            "qwen3_5_rotary_outside": ("qwen3_5", {"rope_parameters": {
                "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.125, "mrope_section": [1, 2, 1],
                "mrope_interleaved": True}})}


def _by_layer(rows: list[str]) -> dict[int, str]:
    """'layers 0-2: text' / 'layers 0,3: text' / 'layer 1: text' rows -> {layer: text}."""
    out = {}
    for row in rows:
        where, text = row.split(": ", 1)
        for part in where.split(" ", 1)[1].split(","):
            first, _, last = part.partition("-")
            out.update({i: text for i in range(int(first), int(last or first) + 1)})
    return out


@pytest.mark.parametrize("ep, precision", [("cpu", "fp32"), ("cuda", "fp16")])
def test_inspect_qk_norm_rows_are_what_the_graph_does(ep, precision, tiny_checkpoint):
    """Per layer, `inspect` says "fused into GroupQueryAttention" exactly when the layer's GroupQueryAttention gets
    q_norm_weight / k_norm_weight, "RMSNorm nodes (why)" exactly when the layer has q/k norm nodes, and "none"
    otherwise (graphs built without writing weights, every recipe)."""
    from builder.decoder import build_decoder
    from builder.export import prepare
    from builder.report import qk_norm_rows

    pinned = {"qwen3": "fused into GroupQueryAttention", "olmo2": "RMSNorm nodes (over the whole q / k projection)",
              "hunyuan": "RMSNorm nodes (after rotary)", "llama": "none",
              "qwen3_5_rotary_outside": "RMSNorm nodes (rotary runs before the op)"}
    seen = set()
    for case, (arch, overrides) in {**{a: (a, {}) for a in factory.ARCHS}, **QK_EXTRA}.items():
        prepared = prepare(str(tiny_checkpoint(arch, **overrides)), precision, ep)
        graph = build_decoder(prepared.spec, prepared.settings, prepared.weights).graph
        fused = {int(n.name.split("/")[2][len("layers."):]) for n in graph if n.op_type == "GroupQueryAttention"
                 and len(n.inputs) > 14 and n.inputs[14] is not None}
        nodes = {int(n.name.split("/")[2][len("layers."):]) for n in graph if "/attn/q_norm/" in n.name}
        for layer, text in _by_layer(qk_norm_rows(prepared.spec, prepared.settings)).items():
            kind = "fused" if layer in fused else "nodes" if layer in nodes else "none"
            expected = {"fused": "fused into GroupQueryAttention", "nodes": "RMSNorm nodes (", "none": "none"}[kind]
            assert text.startswith(expected), f"{case} -e {ep}: layer {layer} does {kind}, inspect says {text!r}"
            seen.add(text)
            if ep == "cuda" and case in pinned:
                assert text == pinned[case], (case, layer, text)
    if ep == "cuda":  # each reason a recipe can give appears
        assert seen == {"none", "fused into GroupQueryAttention", "RMSNorm nodes (over the whole q / k projection)",
                        "RMSNorm nodes (after rotary)", "RMSNorm nodes (rotary runs before the op)",
                        "RMSNorm nodes (v has a norm too)",
                        "RMSNorm nodes (q only: keys come normalised from the layer they are shared with)"}
    else:
        assert "fused into GroupQueryAttention" not in seen
        assert ("RMSNorm nodes (the fused form needs -e cuda and float16/bfloat16 activations, fuse_qk_norm_gqa)"
                in seen)

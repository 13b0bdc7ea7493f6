"""The runtime-requirement tables (builder/runtime_requirements.py) cover everything an export can contain.

Every factory recipe is built (graph only: no weight is read or written) for every precision and EP and the options
that change which ops, inputs and attributes appear. For each contrib op node, every feature it uses (the op itself,
each input by position, each attribute, and the CPU kernel for cpu exports) is looked up in the schema dumps of the
onnxruntime 1.20..1.32 wheels (scripts/results/ort_op_facts.json); the minimum the export would record must be at
least the first release that has every one of them. A new op, input or attribute that the tables miss fails here,
naming what to add. The genai side: every model type and genai_config decoder input an export writes has a known
first onnxruntime-genai release.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import factory
from builder.decoder import build_decoder
from builder.errors import OrtBuildError
from builder.export import prepare
from builder.genai_config import GENAI_TYPES, genai_config
from builder.runtime_requirements import (GENAI_KEY_SINCE, GENAI_SINCE, ORT_SINCE, ir_nodes, requirements,
                                          version_key)
from builder.state import genai_names

FACTS = json.loads((Path(__file__).resolve().parent.parent / "scripts/results/ort_op_facts.json").read_text())
# (ep, precision, extra options): every precision on each EP, plus the options that add inputs, attributes or bit
# widths (combined where they do not exclude each other)
SWEEP = [
    ("cpu", "fp32", {}), ("cpu", "fp16", {}), ("cpu", "int4", {}),
    ("cpu", "int4", {"int4_is_symmetric": False, "quantize_embeddings": True, "int4_accuracy_level": 4,
                     "int8_linear_attn": True, "last_matmul_weight_int8": True}),
    ("cpu", "int4", {"moe_quant_bits": 8, "qmoe_block_size": 0}),
    ("cpu", "int8", {}), ("cpu", "int8", {"int4_is_symmetric": False, "quantize_embeddings": True}),
    ("cuda", "fp32", {}), ("cuda", "fp16", {}),
    ("cuda", "fp16", {"fuse_qk_norm_gqa": False, "linear_attn_fp32": False}),
    ("cuda", "bf16", {}), ("cuda", "int4", {}), ("cuda", "int4", {"qmoe_weights_prepacked": 0}),
    ("cuda", "int4", {"qmoe_weights_prepacked": 1, "int4_is_symmetric": False, "quantize_embeddings": True}),
    ("cuda", "int8", {}),
]
# recipes with CUDA-sized experts (CUDA QMoE wants K % 64 == 0), so the CUDA QMoE attributes are swept too
CUDA_SIZED = {"qwen3_moe-cuda": ("qwen3_moe", {"moe_intermediate_size": 64}),
              "gpt_oss-cuda": ("gpt_oss", {"intermediate_size": 64})}
BASE_GENAI_KEYS = {"input_ids", "attention_mask", "past_key_names", "past_value_names"}


@pytest.fixture(scope="module")
def swept(tiny_checkpoint):
    cases = {**{arch: (arch, {}) for arch in factory.ARCHS}, **CUDA_SIZED}
    builds = []
    for case, (arch, overrides) in cases.items():
        folder = str(tiny_checkpoint(arch, **overrides))
        for ep, precision, extra in SWEEP:
            try:
                prepared = prepare(folder, precision, ep, extra)
                graph = build_decoder(prepared.spec, prepared.settings, prepared.weights).graph
            except OrtBuildError:  # a combination the exporter refuses (e.g. CUDA QMoE on 32-wide experts)
                continue
            spec = prepared.spec
            genai = genai_config(spec, prepared.settings, prepared.config, None, "model.onnx")["model"]
            nodes = ir_nodes(graph)
            builds.append({"case": f"{case} -p {precision} -e {ep} {extra}", "ep": ep, "nodes": nodes, "genai": genai,
                           "requires": requirements(nodes, ep, GENAI_TYPES.get(spec.model_type, "decoder"),
                                                    genai_names(spec.state)[0])})
    return builds


def _first_release(key: str, has) -> str | None:
    return next((f["onnxruntime"] for f in FACTS if f["ops"].get(key) is not None and has(f["ops"][key])), None)


def _needs(domain: str, op: str, used: list[bool], attributes: list[str], ep: str) -> dict[str, str | None]:
    """feature -> the first onnxruntime release whose schema (and CPU kernel list) has it."""
    key = f"{domain}.{op}"
    newest = FACTS[-1]["ops"][key]
    needs = {f"{op} op": _first_release(key, lambda s: True)}
    for i, is_used in enumerate(used):
        if is_used:
            name = newest["inputs"][i] if i < len(newest["inputs"]) else f"#{i}"
            needs[f"{op} input {name}"] = _first_release(key, lambda s, n=name: n in s["inputs"])
    for name in attributes:
        needs[f"{op} attribute {name}"] = _first_release(key, lambda s, n=name: n in s["attributes"])
    if ep == "cpu":
        needs[f"{op} CPU kernel"] = _first_release(key, lambda s: "CPUExecutionProvider" in s["kernels"])
    return needs


def test_every_contrib_op_input_and_attribute_an_export_uses_is_covered(swept):
    cases = {b["case"].split(" ")[0] for b in swept}
    assert cases == set(factory.ARCHS) | set(CUDA_SIZED)  # every recipe built in some combination
    seen = {(domain, op, build["ep"]) for build in swept for domain, op, *_ in build["nodes"] if domain}
    assert ("com.microsoft", "QMoE", "cuda") in seen and ("com.microsoft", "LinearAttention", "cpu") in seen
    for build in swept:
        recorded = version_key(build["requires"]["onnxruntime"])
        for domain, op, used, attributes, _ in build["nodes"]:
            if domain == "" and f".{op}" not in FACTS[-1]["ops"]:
                continue  # a standard ONNX op: opset 21, which every release compared runs
            assert f"{domain}.{op}" in FACTS[-1]["ops"], (
                f"{build['case']}: {domain}.{op} is not in scripts/ort_op_facts.py OPS: add it there, regenerate "
                "scripts/results/ort_op_facts.json (see that script) and give it an entry in ORT_SINCE")
            if domain == "com.microsoft":
                assert op in ORT_SINCE, f"{op}: no entry in builder/runtime_requirements.py ORT_SINCE"
            for feature, first in _needs(domain, op, used, attributes, build["ep"]).items():
                assert first is not None, f"{build['case']}: {feature} is in no onnxruntime release compared"
                assert recorded >= version_key(first)[:2], (
                    f"{build['case']}: {feature} first appears in onnxruntime {first}, but the export records "
                    f"{build['requires']['onnxruntime']}: add it to ORT_SINCE (builder/runtime_requirements.py)")


def test_every_genai_type_and_config_key_an_export_writes_has_a_first_release(swept):
    assert set(GENAI_TYPES.values()) <= set(GENAI_SINCE)
    for build in swept:
        genai = build["genai"]
        assert genai["type"] in GENAI_SINCE, f"{build['case']}: genai type {genai['type']} not in GENAI_SINCE"
        assert version_key(build["requires"]["onnxruntime-genai"]) >= version_key(GENAI_SINCE[genai["type"]])
        for key in genai["decoder"]["inputs"]:
            assert key in BASE_GENAI_KEYS or key in GENAI_KEY_SINCE, f"{build['case']}: genai_config key {key}"
            if key in GENAI_KEY_SINCE:
                assert version_key(build["requires"]["onnxruntime-genai"]) >= version_key(GENAI_KEY_SINCE[key])


def test_hybrid_exports_record_the_linear_attention_floors(swept):
    qwen35 = next(b for b in swept if b["case"] == "qwen3_5 -p fp32 -e cpu {}")
    assert qwen35["requires"] == {
        "onnxruntime": "1.31", "onnxruntime-genai": "0.18.0",
        "because": ["GatedRMSNorm attribute activation (onnxruntime 1.31)",
                    "LinearAttentionGate CPU kernel (onnxruntime 1.30)", "GatedRMSNorm CPU kernel (onnxruntime 1.30)",
                    "LinearAttentionGate op (onnxruntime 1.29)", "GatedRMSNorm op (onnxruntime 1.29)",
                    "LinearAttention op (onnxruntime 1.25)", "LinearAttention CPU kernel (onnxruntime 1.25)",
                    "CausalConvWithState op (onnxruntime 1.25)", "CausalConvWithState CPU kernel (onnxruntime 1.25)",
                    "model type qwen3_5_text (onnxruntime-genai 0.18.0)",
                    "genai_config decoder input past_recurrent_names (onnxruntime-genai 0.16.0)",
                    "genai_config decoder input past_conv_names (onnxruntime-genai 0.14.0)"]}
    qwen3_next = next(b for b in swept if b["case"] == "qwen3_next -p fp32 -e cpu {}")  # generic type "decoder"
    assert qwen3_next["requires"]["onnxruntime-genai"] == "0.16.0"

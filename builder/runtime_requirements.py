"""The oldest ONNX Runtime and onnxruntime-genai an exported graph needs, derived from the contrib ops, inputs and
attributes it actually uses (recorded in ortbuild.json; `ortbuild verify` warns when the installed runtime is older).

Facts, not guesses:
- onnxruntime: `scripts/ort_op_facts.py` dumped the operator schemas and kernel registrations of every CPU wheel from
  1.20.1 to 1.32.0 (scripts/results/ort_op_facts.json); a feature's version is the first minor release (measured on its
  newest patch) whose schema has it. `scripts/check_runtime_floor.py` then ran tiny exports on those wheels (which
  found the two CPU-kernel limits in CPU_VALUE_SINCE): each loads and matches the newest release's logits from its
  recorded minimum on, and fails or differs one release below it (scripts/results/runtime_floor.json).
- onnxruntime-genai: the first release tag of microsoft/onnxruntime-genai whose runtime sources list the model type;
  for genai_config keys newer than the model types (linear-attention state), the first release wheel whose library
  reads the key. `scripts/check_genai_floor.py` ran tiny exports of the newer types on the 0.14.0..0.18.0 wheels
  (scripts/results/genai_floor.json): transformers' greedy tokens from the recorded minimum on, not below it (which
  moved Qwen3.5's types to 0.18.0).
Everything the graphs use that is not in the tables existed in 1.20 (ai.onnx opset 21, IR version 10).
"""

from __future__ import annotations

import re

ORT_BASE = "1.20"  # the oldest release compared

# op -> {feature: first onnxruntime minor release}; feature "op" (the op's schema), "input:<name>", "attr:<name>", or
# "cpu" for the op's CPU kernel (needed by cpu exports only). Only features newer than ORT_BASE are listed; every
# contrib op a graph can contain has an entry (tests/test_runtime_requirements.py builds every factory recipe for every
# precision and EP and checks each op, input, attribute and CPU kernel it uses against the wheels' schemas).
ORT_SINCE = {
    "GroupQueryAttention": {"input:position_ids": "1.22", "input:attention_bias": "1.22", "input:head_sink": "1.23",
                            "attr:qk_output": "1.23", "input:q_norm_weight": "1.28", "input:k_norm_weight": "1.28",
                            "attr:qk_norm_epsilon": "1.28"},
    "GatherBlockQuantized": {"attr:bits": "1.23"},
    "MoE": {"cpu": "1.23", "attr:swiglu_fusion": "1.23", "attr:swiglu_limit": "1.23", "attr:activation_alpha": "1.23",
            "attr:activation_beta": "1.23"},
    "QMoE": {"cpu": "1.23", "attr:swiglu_fusion": "1.23", "attr:swiglu_limit": "1.23",
             "attr:activation_alpha": "1.23", "attr:activation_beta": "1.23", "attr:block_size": "1.23",
             "input:fc1_zero_points": "1.24", "input:fc2_zero_points": "1.24", "input:router_weights": "1.25",
             "attr:weights_prepacked": "1.28"},
    "MatMulNBits": {"attr:weight_prepacked": "1.28"},  # its bias input (index 5) runs on the 1.20.1 CPU kernel too
    "FusedMatMul": {},  # the float lm_head (transB=1)
    "SkipSimplifiedLayerNormalization": {},
    "SkipLayerNormalization": {},
    "RotaryEmbedding": {},
    # linear attention (Gated DeltaNet, builder/layers/linear_attention.py)
    "CausalConvWithState": {"op": "1.25", "cpu": "1.25"},
    "LinearAttention": {"op": "1.25", "cpu": "1.25"},
    "LinearAttentionGate": {"op": "1.29", "cpu": "1.30"},
    "GatedRMSNorm": {"op": "1.29", "cpu": "1.30", "attr:activation": "1.31"},
}
# Input names by position, for the ops whose optional inputs matter (schema order of onnxruntime 1.32).
INPUT_NAMES = {
    "GroupQueryAttention": ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                            "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale",
                            "v_scale", "q_norm_weight", "k_norm_weight"),
    "QMoE": ("input", "router_probs", "fc1_experts_weights", "fc1_scales", "fc1_experts_bias", "fc2_experts_weights",
             "fc2_scales", "fc2_experts_bias", "fc3_experts_weights", "fc3_scales", "fc3_experts_bias",
             "fc1_zero_points", "fc2_zero_points", "fc3_zero_points", "router_weights"),
}
# (op, integer attribute, value) -> first release whose CPU kernel runs it right (cpu exports), measured by
# scripts/check_runtime_floor.py: 1.20 and 1.21 reject 8-bit MatMulNBits ("Only 4b quantization is supported");
# 1.23 runs 4-bit QMoE experts but its logits differ by ~0.9 from 1.24-1.32 (which agree exactly).
CPU_VALUE_SINCE = {("MatMulNBits", "bits", 8): "1.22", ("QMoE", "expert_weight_bits", 4): "1.24"}
# CUDA QMoE experts in the offline-prepacked layout (weights_prepacked omitted or 1) and MatMulNBits weights in it
# (weight_prepacked=1, the lm_head): both attributes appeared in 1.28, but the layout was measured on onnxruntime-gpu
# 1.31.1 only (README, "Verified on CUDA"), so that is the floor.
CUDA_PREPACKED = "1.31"

# genai model type -> first onnxruntime-genai release that runs it ("decoder" is the generic type). Every type
# builder/genai_config.py writes has an entry (a test checks it). qwen3_5_text / qwen3_5_moe_text are listed since
# 0.14.0 / 0.15.0, but 0.16.0-0.17.1 run ortbuild's Qwen3.5 exports under those types to other tokens than
# transformers from the first generated token on (0.18.0 matches it; the same graph as type "decoder" matches on
# 0.16.0), so they need 0.18.0.
GENAI_SINCE = {"decoder": "0.1.0", "llama": "0.1.0", "mistral": "0.1.0", "gemma": "0.1.0", "phi3": "0.2.0",
               "qwen2": "0.4.0", "gemma2": "0.4.0", "nemotron": "0.5.0", "granite": "0.6.0", "gemma3_text": "0.7.1",
               "qwen3": "0.8.1", "ernie4_5": "0.9.0", "gptoss": "0.9.1", "smollm3": "0.9.1", "gemma4_text": "0.14.0",
               "hunyuandensev1": "0.14.0", "qwen3_5_text": "0.18.0", "qwen3_5_moe_text": "0.18.0"}
# genai_config decoder input key -> first onnxruntime-genai release that reads it: the strings in each release's
# libonnxruntime-genai.so (0.14.0 .. 0.18.0 wheels); 0.15.2 refuses a config with past_recurrent_names ("Unknown
# value"), 0.16.0 runs the tiny Qwen3-Next export (type "decoder") to 0.18.0's and transformers' greedy tokens.
GENAI_KEY_SINCE = {"past_conv_names": "0.14.0", "past_recurrent_names": "0.16.0"}


def version_key(version: str) -> tuple[int, ...]:
    """"1.23" / "1.31.1" / "0.18.0.dev1" -> comparable numbers (pre-release suffixes ignored)."""
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # "1+cu13", "0rc1": a local or pre-release tag ends the number
            break
    return tuple(parts)


def _node_features(op: str, used_inputs: list[bool], attributes) -> list[str]:
    names = INPUT_NAMES.get(op, ())
    inputs = [f"input:{names[i]}" for i, used in enumerate(used_inputs) if used and i < len(names)]
    return ["op", *inputs, *(f"attr:{a}" for a in attributes)]


def onnx_nodes(graph) -> list[tuple[str, str, list[bool], list[str], dict]]:
    """(domain, op, inputs used, attribute names, int attributes) of an onnx GraphProto's nodes."""
    return [(n.domain, n.op_type, [bool(x) for x in n.input], [a.name for a in n.attribute],
             {a.name: a.i for a in n.attribute if a.type == a.INT}) for n in graph.node]


def ir_nodes(graph) -> list[tuple[str, str, list[bool], list[str], dict]]:
    """The same for an onnx_ir Graph."""
    out = []
    for node in graph:
        ints = {k: a.value for k, a in node.attributes.items() if isinstance(a.value, int)}
        out.append((node.domain, node.op_type, [v is not None for v in node.inputs], list(node.attributes), ints))
    return out


def requirements(nodes, ep: str, genai_type: str, genai_keys=()) -> dict:
    """{"onnxruntime": "1.23", "onnxruntime-genai": "0.8.1", "because": [...]} for a graph's nodes (ir_nodes or
    onnx_nodes) exported for `ep` and the genai model type / genai_config decoder input keys it is described with;
    `because` names each feature that raised a minimum."""
    needs: dict[str, str] = {}  # feature text -> version
    for domain, op, used, attributes, ints in nodes:
        if domain != "com.microsoft":
            continue
        table = ORT_SINCE.get(op, {})
        for feature in _node_features(op, used, attributes) + (["cpu"] if ep == "cpu" else []):
            if feature in table:
                kind, _, name = feature.partition(":")
                what = {"op": "op", "cpu": "CPU kernel", "input": f"input {name}", "attr": f"attribute {name}"}[kind]
                text = f"{op} {what}"
                needs[text] = table[feature]
        for (value_op, attr, value), version in CPU_VALUE_SINCE.items():
            if ep == "cpu" and op == value_op and ints.get(attr) == value:
                needs[f"{op} {attr}={value} on the CPU kernel"] = version
        if op == "QMoE" and ep == "cuda" and ints.get("weights_prepacked", 1) != 0:
            needs["QMoE experts in the CUDA prepacked layout"] = CUDA_PREPACKED
        if op == "MatMulNBits" and ints.get("weight_prepacked", 0):
            needs["MatMulNBits weight in the CUDA prepacked layout"] = CUDA_PREPACKED
    ort = max([ORT_BASE, *needs.values()], key=version_key)
    because = [f"{text} (onnxruntime {version})" for text, version in
               sorted(needs.items(), key=lambda kv: (version_key(kv[1]), kv[0]), reverse=True)]
    genai_needs = {f"genai_config decoder input {key}": GENAI_KEY_SINCE[key] for key in genai_keys
                   if key in GENAI_KEY_SINCE}
    if genai_type in GENAI_SINCE and GENAI_SINCE[genai_type] != GENAI_SINCE["decoder"]:
        genai_needs[f"model type {genai_type}"] = GENAI_SINCE[genai_type]
    genai = max([GENAI_SINCE["decoder"], *genai_needs.values()], key=version_key)
    because += [f"{text} (onnxruntime-genai {version})" for text, version in
                sorted(genai_needs.items(), key=lambda kv: (version_key(kv[1]), kv[0]), reverse=True)]
    return {"onnxruntime": ort, "onnxruntime-genai": genai, "because": because}


def older_than_required(required: dict, installed: dict[str, str | None]) -> list[str]:
    """Warnings for installed runtimes (package -> version, None if absent) older than an export's requirements."""
    warnings = []
    for package, version in installed.items():
        need = required.get(package)
        if need and version and version_key(version) < version_key(need):
            why = [b for b in required.get("because", []) if f"({package} " in b]
            warnings.append(f"this model needs {package} >= {need}" + (f" for {why[0]}" if why else "") +
                            f"; the installed {package} is {version}: expect it to fail to load. Upgrade it.")
    return warnings

#!/usr/bin/env python3
"""Prepare the CUDA-EP parity bundle on a CPU machine: tiny checkpoints -> cuda exports + transformers fp32 references.

The GPU machine then needs only numpy, onnx and onnxruntime-gpu (scripts/gpu_check.py): exporting and the
transformers reference both run here, so the GPU side never depends on its own transformers/onnx-ir versions.

    python scripts/gpu_bundle.py --out .gpu_bundle        # then carry .gpu_bundle to the GPU machine
    python scripts/gpu_check.py .gpu_bundle --out $OUT    # there

The bundle also holds fp16 exports of every family for the batched-generation check (names `batch-*`): there the
GPU compares each row of a padded batch with the same prompt run alone, so no transformers reference is needed.
`--only batch` bundles just those; `--only NAME ...` any set of entries.

Each int4/int8 entry gets a `cpuref` folder: the same checkpoint exported -e cpu with int4_accuracy_level=0 (the same
quantized weights, float activations), which gpu_check.py runs on the CPU EP as the reference for quantization noise.
The manifest records each export's capture decision (ortbuild.json's cuda_graph); gpu_check.py follows the folder's
genai_config.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import batching  # noqa: E402
import factory  # noqa: E402
import parity  # noqa: E402

# (name, arch, factory overrides, factory kwargs, precision, extra options)
MOE64 = {"moe_intermediate_size": 64}
REAL_MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}  # DeepSeek-V3's
CONFIGS = [
    ("qwen3-fp16-fusedqk", "qwen3", {}, {}, "fp16", []),
    ("qwen3-fp16-unfusedqk", "qwen3", {}, {}, "fp16", ["fuse_qk_norm_gqa=false"]),
    ("qwen3-bf16-fusedqk", "qwen3", {}, {}, "bf16", []),
    ("qwen3-int4", "qwen3", {}, {}, "int4", []),
    ("llama-fp16", "llama", {}, {}, "fp16", []),
    ("llama-int4", "llama", {}, {}, "int4", []),  # untied 4-bit head: stored prepacked (lm_head_prepacked)
    ("qwen3_moe-fp16", "qwen3_moe", MOE64, {}, "fp16", []),
    ("qwen3_moe-bf16", "qwen3_moe", MOE64, {}, "bf16", []),
    ("qwen3_moe-int4-auto", "qwen3_moe", MOE64, {}, "int4", []),
    ("qwen3_moe-int4-raw", "qwen3_moe", MOE64, {}, "int4", ["qmoe_weights_prepacked=0"]),
    ("qwen2_moe-int4", "qwen2_moe", MOE64, {}, "int4", []),
    ("mixtral-fp16", "mixtral", {}, {}, "fp16", []),
    ("gpt_oss-fp16", "gpt_oss", {"intermediate_size": 64}, {}, "fp16", []),
    ("gpt_oss-bf16", "gpt_oss", {"intermediate_size": 64}, {}, "bf16", []),
    ("gpt_oss-int4-auto", "gpt_oss", {"intermediate_size": 64}, {}, "int4", []),
    ("gpt_oss-int4-prepacked1", "gpt_oss", {"intermediate_size": 64}, {}, "int4", ["qmoe_weights_prepacked=1"]),
    ("gpt_oss-int4-raw", "gpt_oss", {"intermediate_size": 64}, {}, "int4", ["qmoe_weights_prepacked=0"]),
    ("gpt_oss-int4-perchannel", "gpt_oss", {"intermediate_size": 64}, {}, "int4", ["qmoe_block_size=0"]),
    ("gpt_oss_mxfp4-int4", "gpt_oss", {"intermediate_size": 64}, {"mxfp4": True}, "int4", []),
    ("gpt_oss_mxfp4-fp16", "gpt_oss", {"intermediate_size": 64}, {"mxfp4": True}, "fp16", []),
    ("gemma3-fp16-fusedqk", "gemma3", {}, {}, "fp16", []),
    ("gemma3-bf16-fusedqk", "gemma3", {}, {}, "bf16", []),
    ("gemma2-fp16", "gemma2", {}, {}, "fp16", []),
    # longrope below its switch (12 + 4 tokens <= 32) and, with the switch moved to 8, past it
    ("phi3-fp16", "phi3", {}, {}, "fp16", []),
    ("phi3-fp16-long", "phi3", {"original_max_position_embeddings": 8, "rope_parameters": {
        **factory.PHI3_LONGROPE, "original_max_position_embeddings": 8}}, {}, "fp16", []),
    ("phi4_mini-fp16", "phi4_mini", {}, {}, "fp16", []),  # partial rotary in GroupQueryAttention, tied
    ("smollm3-fp16", "smollm3", {}, {}, "fp16", []),  # NoPE layer
    ("hunyuan-fp16", "hunyuan", {}, {}, "fp16", []),  # RotaryEmbedding before attention, q/k norm after it
    ("qwen3_vl-fp16", "qwen3_vl", {}, {}, "fp16", []),
    ("ministral3-fp16", "mistral3", {"text_config": {  # query_position_scale
        **factory.ARCHS["mistral3"].config["text_config"], "model_type": "ministral3", "sliding_window": None,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 8,
                            "llama_4_scaling_beta": 0.5}}}, {}, "fp16", []),
    # routed MoE (builder/layers/routing.py): MoE gets masked log-weights, QMoE router_weights; -lowest masks on CUDA
    ("glm4_moe-fp16", "glm4_moe", MOE64, {}, "fp16", []),  # sigmoid + correction bias + groups, scale in fc2
    ("glm4_moe-bf16", "glm4_moe", MOE64, {}, "bf16", []),  # the router computes in float32 (TopK has no bf16)
    ("glm4_moe-int4", "glm4_moe", MOE64, {}, "int4", []),
    ("glm4_moe-int8", "glm4_moe", MOE64, {}, "int8", []),
    ("glm4_moe_raw-fp16", "glm4_moe", {**MOE64, "norm_topk_prob": False}, {}, "fp16", []),  # output scale
    ("ernie4_5_moe-fp16", "ernie4_5_moe", MOE64, {}, "fp16", []),
    ("ernie4_5_moe-int4", "ernie4_5_moe", MOE64, {}, "int4", []),
    ("phimoe-fp16", "phimoe", {"intermediate_size": 64}, {}, "fp16", []),  # sparsemixer weights in the graph
    ("phimoe-int4", "phimoe", {"intermediate_size": 64}, {}, "int4", []),  # QMoE: masked log-weights + scale
    ("phimoe-bf16", "phimoe", {"intermediate_size": 64}, {}, "bf16", []),
    ("qwen2_moe-fp16", "qwen2_moe", MOE64, {}, "fp16", []),
    # per-expert MoE (NonZero gathers): capture off in genai_config
    ("gemma4_moe-fp16", "gemma4_moe", MOE64, {}, "fp16", []),
    ("gemma4_moe-int4", "gemma4_moe", MOE64, {}, "int4", []),
    # float32 activations: attention on the CPU EP by design (capture off, q/k norms unfused)
    ("qwen3-fp32", "qwen3", {}, {}, "fp32", []),
    # Llama 4 on CUDA: no attention_bias (the kernel rejects it), context capped at the chunk: chunks of 64 here,
    # so the 12 + 4 tokens stay in the first chunk, where causal attention is chunked attention exactly
    ("llama4_text-fp16", "llama4_text", {"attention_chunk_size": 64}, {}, "fp16", []),
    ("llama4_text-int4", "llama4_text", {"attention_chunk_size": 64}, {}, "int4", []),
    ("llama4_text-bf16", "llama4_text", {"attention_chunk_size": 64}, {}, "bf16", []),
    # latent attention: GroupQueryAttention with one kv head of [rope key | latent] rows (48 wide here)
    ("deepseek_v3-fp16", "deepseek_v3", {}, {}, "fp16", []),
    ("deepseek_v3-bf16", "deepseek_v3", {}, {}, "bf16", []),
    ("deepseek_v3-int4", "deepseek_v3", {}, {}, "int4", []),
    # the same model cached decompressed (4 kv heads of [rope 16 | nope 16], values 24 padded to 32)
    ("deepseek_v3-fp16-decompressed", "deepseek_v3", {}, {}, "fp16", ["latent_attention_form=decompressed"]),
    # DeepSeek-V3's real latent sizes (REAL_MLA): the 576-wide absorbed row is past GroupQueryAttention's CUDA limit
    # (512), so cuda exports pick the decompressed form by themselves: 4 kv heads of 192 (rope 64 + nope 128, values
    # 128 padded), flash attention's range
    ("deepseek_v3-fp16-576", "deepseek_v3", REAL_MLA, {}, "fp16", []),
    ("deepseek_v3-bf16-576", "deepseek_v3", REAL_MLA, {}, "bf16", []),
    ("deepseek_v3-int4-576", "deepseek_v3", REAL_MLA, {}, "int4", []),
    ("deepseek_v3_moe-fp16-576", "deepseek_v3_moe", {**MOE64, **REAL_MLA}, {}, "fp16", []),
    ("deepseek_v3_moe-int4-576", "deepseek_v3_moe", {**MOE64, **REAL_MLA}, {}, "int4", []),
    ("deepseek_v2-fp16-576", "deepseek_v2", {**MOE64, **REAL_MLA}, {}, "fp16", []),  # plain q projection
    ("deepseek_v2-fp16", "deepseek_v2", MOE64, {}, "fp16", []),
    ("deepseek_v3_moe-fp16", "deepseek_v3_moe", MOE64, {}, "fp16", []),
    ("deepseek_v3_moe-int4", "deepseek_v3_moe", MOE64, {}, "int4", []),
]
DECODE_STEPS = 4
# cuda-only options left out of the cpuref export (the CPU kernels have one layout; capture and fused norms are CUDA's)
CUDA_ONLY_OPTIONS = ("qmoe_weights_prepacked", "qmoe_prepack_arch", "fuse_qk_norm_gqa", "enable_cuda_graph")
# Batched generation (tests/batching.py families) in fp16 for cuda; MoE widths as in CONFIGS above.
BATCH_OVERRIDES = {"qwen3_moe": MOE64, "qwen2_moe": MOE64, "gemma4_moe": MOE64, "gpt_oss": {"intermediate_size": 64},
                   "qwen3_5_moe": MOE64, "qwen3_next": MOE64, "glm4_moe": MOE64, "ernie4_5_moe": MOE64,
                   "phimoe": {"intermediate_size": 64}, "llama4_text": {"attention_chunk_size": 64},
                   "deepseek_v2": MOE64, "deepseek_v3_moe": MOE64, "deepseek_v2_decompressed": MOE64}
BATCH_CONFIGS = [(f"batch-{case}-fp16", arch, {**overrides, **BATCH_OVERRIDES.get(case, {})},
                  batching.EXPORT_OPTIONS.get(case, [])) for case, (arch, overrides) in batching.FAMILIES.items()]
BATCH_DECODE_STEPS = 6


def _capture(folder: Path) -> dict:
    return {"cuda_graph": json.loads((folder / "ortbuild.json").read_text())["cuda_graph"]}


def bundle_batch(out: Path, work: Path, only: list[str] | None) -> list[dict]:
    manifest = []
    for name, arch, overrides, extra in BATCH_CONFIGS:
        if only and name not in only and "batch" not in only:
            continue
        entry = {"name": name, "kind": "batch", "arch": arch, "precision": "fp16", "extra": extra,
                 "prompts": batching.PROMPTS, "decode_steps": BATCH_DECODE_STEPS}
        try:
            ckpt = factory.make_checkpoint(arch, work / name, **overrides)
            parity.export(ckpt, out / name, "fp16", "cuda", extra)
            entry.update(status="exported", **_capture(out / name))
        except Exception as exc:
            entry.update(status="export failed", error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        print(f"{name}: {entry['status']}", flush=True)
        manifest.append(entry)
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument("--only", nargs="*", help="config names to include (`batch`: every batch-* config)")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    manifest, work = [], Path(tempfile.mkdtemp())
    references: dict[tuple, tuple] = {}
    for name, arch, overrides, kwargs, precision, extra in CONFIGS:
        if args.only and name not in args.only:
            continue
        entry = {"name": name, "arch": arch, "precision": precision, "extra": extra}
        try:
            key = (arch, json.dumps(overrides, sort_keys=True), json.dumps(kwargs, sort_keys=True))
            ckpt = work / ("ckpt-" + str(abs(hash(key))))
            if not ckpt.exists():
                factory.make_checkpoint(arch, ckpt, **kwargs, **overrides)
            if key not in references:
                model = parity.load_hf(ckpt)
                tokens = parity.hf_greedy(model, parity.PROMPT_IDS, DECODE_STEPS)
                references[key] = (tokens, parity.hf_logits(model, parity.PROMPT_IDS + tokens))
            tokens, logits = references[key]
            folder = parity.export(ckpt, args.out / name, precision, "cuda", extra)
            np.save(folder / "reference_logits.npy", logits)
            if precision in ("int4", "int8"):
                cpu_extra = [o for o in extra if not o.startswith(CUDA_ONLY_OPTIONS)] + ["int4_accuracy_level=0"]
                parity.export(ckpt, folder / "cpuref", precision, "cpu", cpu_extra)
            entry.update(prompt=parity.PROMPT_IDS, decode_tokens=tokens, status="exported", **_capture(folder))
        except Exception as exc:  # keep going: the GPU run reports what could not be exported
            entry.update(status="export failed", error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        print(f"{name}: {entry['status']}", flush=True)
        manifest.append(entry)
    manifest += bundle_batch(args.out, work, args.only)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"bundle: {args.out} ({size / 2**20:.1f} MiB, {len(manifest)} configs)")
    failed = [e["name"] for e in manifest if e["status"] != "exported"]
    if failed:
        print(f"export failed: {', '.join(failed)}", file=sys.stderr)
    if args.only:
        unknown = sorted(set(args.only) - {e["name"] for e in manifest} - {"batch"})
        if unknown:
            print(f"--only names no config: {', '.join(unknown)}", file=sys.stderr)
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

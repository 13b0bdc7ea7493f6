#!/usr/bin/env python3
"""GPT-OSS on ONNX Runtime's CUDA EP: export the tiny GPT-OSS checkpoints for cuda and compare with transformers.

For each checkpoint format (bf16 experts, MXFP4 experts) and each precision (fp16, bf16, int4; with --cpu: fp32 and
int4 exported for cpu and run on CPUExecutionProvider, to smoke-test this script without a GPU) it
  1. exports with ortbuild (`-e cuda`, or `-e cpu` with --cpu),
  2. runs the 12-token prompt (longer than the sliding window of 8) and 4 KV-cache decode steps past it, feeding the
     tokens transformers' greedy search chose,
  3. compares the logits with transformers fp32 on CPU (MXFP4 experts dequantized with transformers' own function):
     max-abs error at the prompt and at the decode steps, and top-1 agreement at every position; int4 exports are
     also compared with transformers running the same int4 weights (tells a wrong QMoE layout from int4 noise).
Every configuration is isolated: a failed export or run is recorded and the next one goes on.
Prints a table and writes DIR/gpt_oss_check.json.

The tiny model: hidden 64, 4 experts of intermediate 64 (CUDA QMoE needs multiples of 64), top-2, 2 layers
(sliding, full), attention sinks, YaRN, biases everywhere.

Usage: python scripts/gpu_gpt_oss_check.py --out DIR [--cpu] [--formats bf16,mxfp4] [--precisions fp16,bf16,int4]
       [--strict]   (--strict: session.disable_cpu_ep_fallback=1, so a node CUDA cannot run fails the config)
Needs the repo (builder/, builders/, tests/factory.py, tests/parity.py), torch, transformers, onnx, onnx-ir and
onnxruntime-gpu (onnxruntime with --cpu).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import factory  # noqa: E402
import parity  # noqa: E402

DECODE_STEPS = 4
FACTORY_OVERRIDES = {"intermediate_size": 64}
BF16 = 16  # onnx TensorProto.BFLOAT16, the element type OrtValue takes


def reference_folder(checkpoint: Path, mxfp4: bool, work: Path) -> Path:
    """A folder transformers loads in fp32 without `accelerate`: MXFP4 experts dequantized by transformers."""
    if not mxfp4:
        return checkpoint
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = work / "reference_mxfp4"
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    stored = load_file(checkpoint / "model.safetensors")
    tensors = {}
    for name, t in stored.items():
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            tensors[base] = convert_moe_packed_tensors(t, stored[base + "_scales"], dtype=torch.float32)
        elif not name.endswith("_scales"):
            tensors[name] = t.float()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def int4_weight_model(folder: Path):
    """transformers fp32 with the weights an int4 export quantizes replaced by their int4 reconstruction.

    An int4 export should match this one closely (up to fp16 activations on cuda); a wrong QMoE layout or prepack
    would not, which the comparison with the fp32 reference cannot tell from ordinary int4 noise on a tiny model.
    """
    import torch

    from builder.quant.blockwise import dequantize_blockwise, quantize_blockwise
    from builder.quant.moe import dequantize_experts, quantize_experts

    def linear(weight):
        q = quantize_blockwise(weight.numpy(), bits=4, block_size=32, symmetric=True, method="default")
        return torch.from_numpy(dequantize_blockwise(q))

    def experts(weight):  # HF [E, K, N] -> QMoE [E, N, K] and back
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


def float_logits_model(folder: Path) -> Path:
    """model.onnx, or a side copy whose logits are cast to float32 (numpy cannot hold bf16)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    if logits.type.tensor_type.elem_type == TensorProto.FLOAT:
        return folder / "model.onnx"
    for node in model.graph.node:
        node.output[:] = ["logits.native" if o == "logits" else o for o in node.output]
    model.graph.node.append(helper.make_node("Cast", ["logits.native"], ["logits"], to=TensorProto.FLOAT))
    logits.type.tensor_type.elem_type = TensorProto.FLOAT
    path = folder / "model.float_logits.onnx"
    onnx.save(model, str(path))  # external data stays in place: same folder, same relative location
    return path


def run_model(folder: Path, ids: list[int], tokens: list[int], provider: str, strict: bool) -> tuple[np.ndarray, str]:
    """[len(ids) + len(tokens), V] float32 logits: prompt pass, then one pass per decode token (KV kept in ORT)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if strict:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    session = ort.InferenceSession(str(float_logits_model(folder)), options, providers=[provider])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    names = [o.name for o in session.get_outputs()]
    numpy_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

    def empty(p):
        shape = [1, p.shape[1], 0, p.shape[3]]
        if p.type == "tensor(bfloat16)":
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, BF16)
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, numpy_types[p.type]))

    def ids_mask(step_ids: list[int], total: int) -> dict:
        return {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.array([step_ids], np.int64)),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, total), np.int64))}

    feed = {**ids_mask(ids, len(ids)), **{p.name: empty(p) for p in pasts}}
    outputs = dict(zip(names, session.run_with_ort_values(names, feed)))
    logits = [outputs["logits"].numpy()[0]]
    total = len(ids)
    for token in tokens:
        total += 1
        feed = {**ids_mask([token], total),
                **{p.name: outputs[p.name.replace("past_key_values.", "present.")] for p in pasts}}
        outputs = dict(zip(names, session.run_with_ort_values(names, feed)))
        logits.append(outputs["logits"].numpy()[0])
    return np.concatenate(logits, axis=0).astype(np.float32), session.get_providers()[0]


def check(fmt: str, precision: str, ep: str, checkpoint: Path, reference: dict, work: Path, provider: str,
          strict: bool) -> dict:
    row = {"format": fmt, "precision": precision, "ep": ep}
    out = work / f"{fmt}-{precision}-{ep}"
    try:
        start = time.perf_counter()
        parity.export(checkpoint, out, precision, ep, overwrite=True)
        row["export_s"] = round(time.perf_counter() - start, 2)
        ops = parity.ops_in(out)
        row["moe_op"] = "QMoE" if "QMoE" in ops else ("MoE" if "MoE" in ops else "none")
    except Exception as exc:  # noqa: BLE001 - record and go on with the next configuration
        traceback.print_exc()
        return {**row, "status": "export failed", "error": f"{type(exc).__name__}: {exc}"[:600]}
    try:
        start = time.perf_counter()
        ours, used = run_model(out, reference["ids"], reference["tokens"], provider, strict)
        row["run_s"] = round(time.perf_counter() - start, 3)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return {**row, "status": "run failed", "error": f"{type(exc).__name__}: {exc}"[:600]}
    want = reference["logits"]
    n = len(reference["ids"])
    err = np.abs(ours - want)
    agree = ours.argmax(-1) == want.argmax(-1)
    row.update(status="ok", provider=used, prompt_max_abs=float(err[:n].max()), decode_max_abs=float(err[n:].max()),
               top1_prompt=f"{int(agree[:n].sum())}/{n}", top1_decode=f"{int(agree[n:].sum())}/{len(agree) - n}",
               top1_last_prompt=bool(agree[n - 1]), finite=bool(np.isfinite(ours).all()),
               reference_logit_std=float(want.std()))
    if precision == "int4":
        same = reference["int4_logits"]
        row.update(vs_int4_weights_max_abs=float(np.abs(ours - same).max()),
                   top1_vs_int4_weights=f"{int((ours.argmax(-1) == same.argmax(-1)).sum())}/{len(same)}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--cpu", action="store_true", help="export for cpu (fp32, int4) and run on the CPU EP")
    parser.add_argument("--formats", default="bf16,mxfp4")
    parser.add_argument("--precisions", default=None, help="default fp16,bf16,int4 (cuda) or fp32,int4 (--cpu)")
    parser.add_argument("--strict", action="store_true", help="fail a config if any node falls back to the CPU EP")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and exports under DIR/work")
    args = parser.parse_args()

    import onnxruntime as ort

    ep, provider = ("cpu", "CPUExecutionProvider") if args.cpu else ("cuda", "CUDAExecutionProvider")
    precisions = (args.precisions or ("fp32,int4" if args.cpu else "fp16,bf16,int4")).split(",")
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}", flush=True)
    if provider not in ort.get_available_providers():
        print(f"warning: {provider} is not available; sessions will fail or fall back", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work" if args.keep else Path(tempfile.mkdtemp(prefix="gpt-oss-check-"))
    rows = []
    try:
        for fmt in args.formats.split(","):
            try:
                checkpoint = factory.make_checkpoint("gpt_oss", work / f"checkpoint-{fmt}", mxfp4=fmt == "mxfp4",
                                                     **FACTORY_OVERRIDES)
                model = parity.load_hf(reference_folder(checkpoint, fmt == "mxfp4", work))
                ids = list(parity.PROMPT_IDS)
                tokens = parity.hf_greedy(model, ids, DECODE_STEPS)
                reference = {"ids": ids, "tokens": tokens, "logits": parity.hf_logits(model, ids + tokens)}
                if "int4" in precisions:
                    int4_model = int4_weight_model(reference_folder(checkpoint, fmt == "mxfp4", work))
                    reference["int4_logits"] = parity.hf_logits(int4_model, ids + tokens)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"format": fmt, "status": "checkpoint/reference failed",
                             "error": f"{type(exc).__name__}: {exc}"[:600]})
                continue
            for precision in precisions:
                row = check(fmt, precision, ep, checkpoint, reference, work, provider, args.strict)
                rows.append(row)
                if row["status"] == "ok":
                    print(f"{fmt:6s} {precision:5s} {row['moe_op']:4s} on {row['provider'][:-17]:5s} prompt max-abs "
                          f"{row['prompt_max_abs']:.3e} decode {row['decode_max_abs']:.3e} top-1 prompt "
                          f"{row['top1_prompt']} decode {row['top1_decode']} (ref std "
                          f"{row['reference_logit_std']:.2f})", flush=True)
                    if "vs_int4_weights_max_abs" in row:
                        print(f"{'':17s}vs transformers with the same int4 weights: max-abs "
                              f"{row['vs_int4_weights_max_abs']:.3e}, top-1 {row['top1_vs_int4_weights']}", flush=True)
                else:
                    print(f"{fmt:6s} {precision:5s} {row['status']}: {row['error']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    (args.out / "gpt_oss_check.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out / 'gpt_oss_check.json'}")
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

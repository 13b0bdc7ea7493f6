"""Check that ONNX Runtime's QMoE reads our expert quantization and CUDA prepack correctly.

Builds one-node com.microsoft QMoE models (fp16 io and scales, SwiGLU interleaved gate/up,
swiglu_fusion=1) for bits 4/8 x per-channel/block-wise x weight layouts, runs them on
CUDAExecutionProvider (or CPUExecutionProvider with --cpu, raw layouts only) and compares
with a float64 numpy MoE computed from ``dequantize_experts``. Prints a table and writes it
to DIR/qmoe_check.json. Every config is isolated: a failure is recorded and the run goes on.

Layouts (see builder/quant/cuda_layout.py for why):
  raw/wp=0        raw [E,N,K/pack] + weights_prepacked=0 (ORT prepacks at load)      expect ok
  raw/omitted     raw bytes, attribute omitted (-1 = "already prepacked" in 1.31)   expect bad on CUDA
  sm80/wp=1       prepack_for_cuda(arch=80), shape [E,K,N/pack], weights_prepacked=1 expect ok
  sm80/omitted    same bytes, attribute omitted                                     expect ok
  sm80/wp=1/nk    same bytes reshaped to the schema shape [E,N,K/pack]               expect ok
  smXX/wp=1       prepack for the detected arch when it is not 80 (e.g. 90)         expect bad (QMoE reads SM80)

Measured (H100 = SM90, onnxruntime-gpu 1.31.1, CUDA 13): every "expect ok" row was ok (rel err
<= 3e-3 at fp16) and every "expect bad" row mismatched (rel err > 1), for int4/int8 x per-channel /
block 32/64/128 x T=1/33 at E=8,H=256,I=128 and for block 0/32/64 x T=1/64 at E=8,H=I=2880,top-4.

Usage: python scripts/gpu_qmoe_check.py --out DIR [--cpu] [--tokens 1,33] [--experts 8 --hidden 256 --inter 128]
       [--bits 4,8] [--blocks 0,32,64,128]
Needs numpy, onnx, onnxruntime (onnxruntime-gpu for CUDA); run from anywhere inside the repo.
Exit status 1 when any row disagrees with its expectation.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from builder.quant.cuda_layout import prepack_for_cuda  # noqa: E402
from builder.quant.moe import QuantizedExperts, dequantize_experts, quantize_experts  # noqa: E402

ALPHA, BETA, LIMIT = 1.702, 1.0, 7.0
PASS_REL_ERR = 1e-2  # fp16 activations; a wrong layout lands near 1.0


def detect_sm() -> int | None:
    """Compute capability as 80/86/90..., from nvidia-smi or the CUDA runtime; None if unknown."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        if out:
            major, minor = out[0].split(".")
            return int(major) * 10 + int(minor)
    except Exception:  # noqa: BLE001 - fall through to the runtime query
        pass
    for lib in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            cudart = ctypes.CDLL(lib)
        except OSError:
            continue
        major, minor = ctypes.c_int(), ctypes.c_int()
        if cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) == 0 and \
                cudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0) == 0:
            return major.value * 10 + minor.value
    return None


def build_model(w1: np.ndarray, s1: np.ndarray, w2: np.ndarray, s2: np.ndarray, *, bits: int, block: int,
                top_k: int, experts: int, hidden: int, prepacked: int | None) -> bytes:
    attrs = dict(activation_type="swiglu", expert_weight_bits=bits, k=top_k, normalize_routing_weights=1,
                 swiglu_fusion=1, activation_alpha=ALPHA, activation_beta=BETA, swiglu_limit=LIMIT)
    if block > 0:
        attrs["block_size"] = block
    if prepacked is not None:
        attrs["weights_prepacked"] = prepacked
    node = helper.make_node("QMoE", ["x", "logits", "w1", "s1", "", "w2", "s2"], ["y"],
                            domain="com.microsoft", **attrs)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(s1, "s1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(s2, "s2")]
    graph = helper.make_graph(
        [node], "qmoe_check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["T", hidden]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["T", experts])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["T", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def int8_activations(v: np.ndarray, block: int) -> np.ndarray:
    """ORT's CPU kernel quantizes activations to int8 per K block for 8-bit block-wise experts."""
    b = v.reshape(-1, block)
    s = np.abs(b).max(axis=1, keepdims=True) / 127.0
    s[s == 0] = 1.0
    return (np.clip(np.round(b / s), -127, 127) * s).reshape(v.shape)


def moe_reference(x, logits, w1, w2, top_k, act_block=None) -> np.ndarray:
    """float64 MoE: softmax over experts, top-k, renormalise; fc1 rows alternate gate / linear."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    weight = np.take_along_axis(p, top, axis=1)
    weight /= weight.sum(axis=1, keepdims=True)
    quant = (lambda v: int8_activations(v, act_block)) if act_block else (lambda v: v)
    out = np.zeros((x.shape[0], w2.shape[1]))
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = top[t, j]
            h = w1[e] @ quant(x[t])
            gate = np.minimum(h[0::2], LIMIT)
            lin = np.clip(h[1::2], -LIMIT, LIMIT)
            out[t] += weight[t, j] * (w2[e] @ quant(gate / (1.0 + np.exp(-ALPHA * gate)) * (lin + BETA)))
    return out


def layouts(q1: QuantizedExperts, q2: QuantizedExperts, *, cpu: bool, sm: int | None):
    """(name, fc1 bytes, fc2 bytes, weights_prepacked attr or None, expected_ok)."""
    yield "raw/wp=0", q1.packed, q2.packed, 0, True
    yield "raw/omitted", q1.packed, q2.packed, None, cpu
    if cpu:
        return
    p1, p2 = prepack_for_cuda(q1, arch=80), prepack_for_cuda(q2, arch=80)
    yield "sm80/wp=1", p1, p2, 1, True
    yield "sm80/omitted", p1, p2, None, True
    yield "sm80/wp=1/nk", p1.reshape(q1.packed.shape), p2.reshape(q2.packed.shape), 1, True
    if sm is not None and sm >= 90 and sm < 100:
        yield "sm90/wp=1", prepack_for_cuda(q1, arch=90), prepack_for_cuda(q2, arch=90), 1, False


def run_all(args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    provider = "CPUExecutionProvider" if args.cpu else "CUDAExecutionProvider"
    sm = None if args.cpu else detect_sm()
    e, h, inter, top_k = args.experts, args.hidden, args.inter, args.top_k
    tokens = [int(t) for t in args.tokens.split(",")]
    w1 = (rng.standard_normal((e, 2 * inter, h)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((e, h, inter)) * 0.05).astype(np.float32)
    rows = []
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the CUDA MoE GEMM profiler warns per shape; keep the table readable
    for bits in (int(b) for b in args.bits.split(",")):
        for block in (int(b) for b in args.blocks.split(",")):
            try:
                q1 = quantize_experts(w1, bits=bits, block_size=block, name="fc1")
                q2 = quantize_experts(w2, bits=bits, block_size=block, name="fc2")
            except ValueError as exc:  # e.g. block_size does not divide K: not a runnable config
                rows.append(dict(bits=bits, block=block, layout="(quantize)", tokens=None, status="SKIP",
                                 error=str(exc), as_expected=True))
                print_row(rows[-1])
                continue
            try:
                # The model carries fp16 scales, so the reference must use them too.
                q1 = QuantizedExperts(q1.packed, q1.scales.astype(np.float16).astype(np.float32), bits, q1.block_size)
                q2 = QuantizedExperts(q2.packed, q2.scales.astype(np.float16).astype(np.float32), bits, q2.block_size)
                d1, d2 = dequantize_experts(q1).astype(np.float64), dequantize_experts(q2).astype(np.float64)
                cases = list(layouts(q1, q2, cpu=args.cpu, sm=sm))
            except Exception as exc:  # noqa: BLE001 - report and continue
                rows.append(dict(bits=bits, block=block, layout="(layouts)", tokens=None, status="ERROR",
                                 error=f"{type(exc).__name__}: {exc}", as_expected=False))
                print_row(rows[-1])
                continue
            for name, b1, b2, wp, expected in cases:
                for t in tokens:
                    row = dict(bits=bits, block=block, layout=name, tokens=t, expected_ok=expected)
                    try:
                        x = rng.standard_normal((t, h)).astype(np.float16)
                        logits = rng.standard_normal((t, e)).astype(np.float16)
                        model = build_model(b1, q1.scales.astype(np.float16), b2, q2.scales.astype(np.float16),
                                            bits=bits, block=block, top_k=top_k, experts=e, hidden=h, prepacked=wp)
                        sess = ort.InferenceSession(model, options, providers=[provider])
                        if provider not in sess.get_providers():
                            raise RuntimeError(f"{provider} not active (got {sess.get_providers()})")
                        t0 = time.perf_counter()
                        y = sess.run(None, {"x": x, "logits": logits})[0].astype(np.float64)
                        row["run_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
                        act_block = block if (args.cpu and bits == 8 and block > 0) else None
                        ref = moe_reference(x.astype(np.float64), logits.astype(np.float64), d1, d2, top_k, act_block)
                        err = float(np.abs(y - ref).max())
                        rel = err / max(float(np.abs(ref).max()), 1e-6)
                        finite = bool(np.isfinite(y).all())
                        row.update(max_abs_err=err, rel_err=rel,
                                   status="ok" if finite and rel < PASS_REL_ERR else "MISMATCH")
                    except Exception as exc:  # noqa: BLE001 - report and continue
                        row.update(status="ERROR", error=f"{type(exc).__name__}: {str(exc)[:400]}")
                        if args.verbose:
                            traceback.print_exc()
                    row["as_expected"] = (row["status"] == "ok") == expected
                    rows.append(row)
                    print_row(row)
    return rows


def print_row(row: dict) -> None:
    err = f"{row['max_abs_err']:.3e}" if "max_abs_err" in row else "-"
    rel = f"{row['rel_err']:.3e}" if "rel_err" in row else "-"
    flag = "" if row.get("as_expected", True) else "  <-- unexpected"
    cfg = f"int{row['bits']} {'per-ch' if row['block'] == 0 else 'bs' + str(row['block']):>6} {row['layout']:<14} T={row['tokens']}"
    print(f"{cfg:<40} {row['status']:<9} max_abs={err:<10} rel={rel:<10}{flag}", flush=True)
    if "error" in row:
        print(f"    {row['error']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for qmoe_check.json")
    parser.add_argument("--cpu", action="store_true", help="CPU EP, raw layouts only (smoke test without a GPU)")
    parser.add_argument("--tokens", default="1,33", help="comma list of token counts (1 = decode path)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256, help="multiple of 64 for CUDA QMoE")
    parser.add_argument("--inter", type=int, default=128, help="multiple of 64 for CUDA QMoE")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--bits", default="4,8", help="comma list of expert bit widths")
    parser.add_argument("--blocks", default="0,32,64,128", help="comma list of block sizes (0 = per-channel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = parser.parse_args()

    meta = dict(onnxruntime=ort.__version__, providers=ort.get_available_providers(),
                provider="CPU" if args.cpu else "CUDA", sm=None if args.cpu else detect_sm(),
                experts=args.experts, hidden=args.hidden, inter=args.inter, top_k=args.top_k)
    print(json.dumps(meta), flush=True)
    if not args.cpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        print("CUDAExecutionProvider is not available in this onnxruntime; install onnxruntime-gpu "
              "or pass --cpu for the CPU smoke test.", file=sys.stderr)
    rows = run_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qmoe_check.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    unexpected = [r for r in rows if not r["as_expected"]]
    print(f"{len(rows)} configs, {sum(r['status'] == 'ok' for r in rows)} ok, {len(unexpected)} unexpected; "
          f"wrote {args.out / 'qmoe_check.json'}", flush=True)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())

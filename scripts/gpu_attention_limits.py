#!/usr/bin/env python3
"""Which attention head sizes ONNX Runtime runs on an EP: one-op graphs against a numpy reference.

Latent attention (builder/layers/mla.py) caches [rope key | latent] rows of 576 for DeepSeek-V3 in its absorbed form,
or per-head keys of 192 in its decompressed form. This probes, in float16 on the chosen EP (float32 on cpu):
- GroupQueryAttention (com.microsoft) at head sizes 192 (decompressed, kv heads = heads), 256, 512 and 576 (one kv
  head, the absorbed row; k = v), prefill of 8 tokens then one decode step, with a growing cache (present -> past)
  and with onnxruntime-genai's shared past/present buffer (both bound to one OrtValue of 16 slots);
- ONNX Attention (opset 23) at a 576-wide key head with values of 576 and of 512 (growing cache only: the op has no
  shared buffer), the op onnxruntime-genai 0.18 could drive only with past_present_share_buffer false.
Needs numpy, onnx and onnxruntime(-gpu) only:

    python scripts/gpu_attention_limits.py --ep cuda --out $OUT/attention_limits.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HEADS, PROMPT, SLOTS = 4, 8, 16
# (name, op, kv heads, key head size, value head size)
CASES = [
    ("gqa-192-decompressed", "gqa", HEADS, 192, 192),
    ("gqa-256", "gqa", 1, 256, 256),
    ("gqa-512", "gqa", 1, 512, 512),
    ("gqa-576-absorbed", "gqa", 1, 576, 576),
    ("attention23-576", "attention", 1, 576, 576),
    ("attention23-576-v512", "attention", 1, 576, 512),
]


def _model(op: str, kv_heads: int, head: int, v_head: int, elem: int, causal: int) -> bytes:
    seq, past = "S", "P"
    inputs = [helper.make_tensor_value_info("query", elem, [1, seq, HEADS * head]),
              helper.make_tensor_value_info("key", elem, [1, seq, kv_heads * head]),
              helper.make_tensor_value_info("value", elem, [1, seq, kv_heads * v_head]),
              helper.make_tensor_value_info("past_key", elem, [1, kv_heads, past, head]),
              helper.make_tensor_value_info("past_value", elem, [1, kv_heads, past, v_head])]
    outputs = [helper.make_tensor_value_info(n, elem, None) for n in ("output", "present_key", "present_value")]
    scale = head ** -0.5
    if op == "gqa":
        inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                   helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
        node = helper.make_node("GroupQueryAttention", [i.name for i in inputs], [o.name for o in outputs],
                                domain="com.microsoft", num_heads=HEADS, kv_num_heads=kv_heads, scale=scale)
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    else:
        node = helper.make_node("Attention", ["query", "key", "value", "", "past_key", "past_value"],
                                [o.name for o in outputs], q_num_heads=HEADS, kv_num_heads=kv_heads, scale=scale,
                                is_causal=causal)
        opsets = [helper.make_opsetid("", 23)]
    graph = helper.make_graph([node], "probe", inputs, outputs)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _reference(q, k, v, kv_heads: int, head: int) -> np.ndarray:
    """Causal attention over all tokens: q [T, H, d], k [T, kv, d], v [T, kv, dv] -> [T, H * dv] (float64)."""
    group = HEADS // kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) * head ** -0.5
    scores += np.triu(np.full((q.shape[0],) * 2, -np.inf), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(q.shape[0], -1)


def probe(ort, name: str, op: str, kv_heads: int, head: int, v_head: int, ep: str, shared: bool) -> dict:
    dtype = np.float16 if ep == "cuda" else np.float32
    elem = TensorProto.FLOAT16 if ep == "cuda" else TensorProto.FLOAT
    providers = ["CUDAExecutionProvider"] if ep == "cuda" else ["CPUExecutionProvider"]
    rng = np.random.default_rng(0)
    tokens = PROMPT + 1
    q = rng.standard_normal((tokens, HEADS, head))
    k = rng.standard_normal((tokens, kv_heads, head))
    v = rng.standard_normal((tokens, kv_heads, v_head))
    expected = _reference(q, k, v, kv_heads, head)
    result = {"name": name, "cache": "shared" if shared else "growing", "ep": ep}
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions = [ort.InferenceSession(_model(op, kv_heads, head, v_head, elem, causal), options,
                                         providers=providers) for causal in (1, 0)]
        got = []
        past_k = np.zeros((1, kv_heads, SLOTS if shared else 0, head), dtype)
        past_v = np.zeros((1, kv_heads, SLOTS if shared else 0, v_head), dtype)
        buffers = ([ort.OrtValue.ortvalue_from_numpy(past_k, ep, 0), ort.OrtValue.ortvalue_from_numpy(past_v, ep, 0)]
                   if shared else None)
        for step, (start, stop) in enumerate([(0, PROMPT), (PROMPT, tokens)]):
            session = sessions[0] if step == 0 or op == "gqa" else sessions[1]
            feed = {"query": q[start:stop].reshape(1, stop - start, -1).astype(dtype),
                    "key": k[start:stop].reshape(1, stop - start, -1).astype(dtype),
                    "value": v[start:stop].reshape(1, stop - start, -1).astype(dtype)}
            if op == "gqa":
                feed.update(seqlens_k=np.array([stop - 1], np.int32), total_sequence_length=np.array(stop, np.int32))
            if shared:
                binding = session.io_binding()
                for key, value in feed.items():
                    binding.bind_cpu_input(key, value)
                binding.bind_ortvalue_input("past_key", buffers[0])
                binding.bind_ortvalue_input("past_value", buffers[1])
                binding.bind_output("output", "cpu")
                binding.bind_ortvalue_output("present_key", buffers[0])
                binding.bind_ortvalue_output("present_value", buffers[1])
                session.run_with_iobinding(binding)
                out = binding.copy_outputs_to_cpu()[0]
            else:
                out, past_k, past_v = session.run(None, {**feed, "past_key": past_k, "past_value": past_v})
            got.append(out[0].astype(np.float64))
        error = float(np.abs(np.concatenate(got) - expected).max())
        result.update(status="ok" if error < (2e-2 if dtype == np.float16 else 1e-4) else "wrong", max_abs=error)
    except Exception as exc:  # the op refusing the shape is the finding
        result.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import onnxruntime as ort

    rows = []
    for name, op, kv_heads, head, v_head in CASES:
        for shared in ((False, True) if op == "gqa" else (False,)):
            row = probe(ort, name, op, kv_heads, head, v_head, args.ep, shared)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"onnxruntime": ort.__version__, "onnx": onnx.__version__, "rows": rows},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

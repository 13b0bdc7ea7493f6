"""Check what com.microsoft MoE / QMoE do with their router inputs, against a float64 numpy reference.

ortbuild expresses every routing (softmax or sigmoid scores, correction bias, group-limited top-k, sparsemixer,
Llama 4's weight on the expert input) through the ops' router inputs (builder/layers/routing.py). That rests on
these behaviours, each one case here (one-node models, SwiGLU experts interleaved, swiglu_fusion=1):

  moe/softmax-norm       MoE  router_probs = logits, normalize=1  -> softmax over all, top-k, renormalised
  moe/softmax-raw        MoE  router_probs = logits, normalize=0  -> the top-k full-softmax probabilities
  moe/masked-log         MoE  router_probs = log w on k chosen experts, lowest float elsewhere, normalize=1
                              -> those k experts with weights w / sum(w)
  moe/top1               MoE  k=1, normalize=1 -> the single expert's weight is exactly 1
  moe/3d-input           MoE  input [B, S, H] with router_probs [B*S, E] -> output [B, S, H]
  qmoe/rw-raw            QMoE router_probs selects, router_weights [T, E] weights as given (normalize=0)
  qmoe/rw-norm           QMoE the same, renormalised over the k (normalize=1)
  qmoe/rw-masked-sel     QMoE router_probs with the lowest float on excluded groups, router_weights as given
  qmoe/no-rw-raw         QMoE no router_weights, normalize=0 -> softmax of the k selected probs (renormalised
                              anyway: the attribute is ignored; that is why Qwen2-MoE feeds router_weights)
  qmoe/top1              QMoE k=1, no router_weights -> weight exactly 1
  qmoe/3d-input          QMoE input [B, S, H], router inputs 2-D
  qmoe/masked-log        QMoE the MoE one-input form (what -e cuda exports feed QMoE: onnxruntime-gpu 1.31.1's CUDA
                              QMoE ignores router_weights and normalize=0): log w on the k chosen experts, lowest
                              float elsewhere, no router_weights, normalize=1 -> weights w / sum(w)
  qmoe/masked-log-3d     QMoE the same with input [B, S, H] (as the exports feed it)

Each case is run for int4 and int8 (per-channel scales) QMoE experts and float MoE experts, in the dtypes asked for
(CPU: float32 and float16; CUDA: float16, and float32 for MoE). Every row must match its reference (relative error
< 1e-5 in float32, < 1e-2 in float16) AND be at least 20 times closer to it than to the reference of the nearest
wrong semantics (renormalised vs raw, selection by the weights instead of router_probs), so a row cannot pass by
accident.

Usage: python scripts/moe_routing_check.py --out DIR [--cpu] [--dtypes float16,float32] [--tokens 1,7]
Needs numpy, onnx, onnxruntime (onnxruntime-gpu for CUDA); run from anywhere inside the repo. Writes
DIR/moe_routing_check.json; exit status 1 when any row fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from builder.quant.moe import dequantize_experts, quantize_experts  # noqa: E402

E, H, I = 8, 128, 64  # multiples of 64: the CUDA QMoE kernel's K tile
TOL = {"float32": 1e-5, "float16": 1e-2}
ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def swiglu_expert(w1: np.ndarray, w2: np.ndarray, x: np.ndarray) -> np.ndarray:
    h = w1 @ x
    gate, lin = h[0::2], h[1::2]
    return w2 @ (gate / (1.0 + np.exp(-gate)) * lin)


def reference(x: np.ndarray, chosen: np.ndarray, weights: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """sum over chosen[t] of weights[t, j] * expert(x[t]); chosen [T, k] expert ids, weights [T, k]."""
    out = np.zeros((x.shape[0], w2.shape[1]))
    for t in range(x.shape[0]):
        for j, e in enumerate(chosen[t]):
            out[t] += weights[t, j] * swiglu_expert(w1[e], w2[e], x[t])
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def gather(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, idx, axis=1)


def renorm(w: np.ndarray) -> np.ndarray:
    return w / w.sum(axis=1, keepdims=True)


def case_inputs(name: str, t: int, rng: np.random.Generator):
    """(k, normalize, router_probs, router_weights or None, chosen, weights, wrong_weights, three_d)."""
    logits = rng.standard_normal((t, E)) * 1.5
    w = rng.uniform(0.05, 1.0, (t, E))  # weights unrelated to the selection scores
    sel = rng.standard_normal((t, E))
    kind = name.split("/", 1)[1]
    if kind in ("softmax-norm", "3d-input") and name.startswith("moe"):
        c = top_k(logits, 2)
        p = gather(softmax(logits), c)
        return 2, 1, logits, None, c, renorm(p), p, kind == "3d-input"
    if kind == "softmax-raw":
        c = top_k(logits, 2)
        p = gather(softmax(logits), c)
        return 2, 0, logits, None, c, p, renorm(p), False
    if kind in ("masked-log", "masked-log-3d"):
        c = top_k(sel, 2)
        probs = np.full((t, E), float(np.finfo(np.float16).min))
        np.put_along_axis(probs, c, np.log(gather(w, c)), axis=1)
        return 2, 1, probs, None, c, renorm(gather(w, c)), gather(w, c), kind == "masked-log-3d"
    if kind == "top1":
        c = top_k(logits, 1)
        return 1, 1, logits, None, c, np.ones((t, 1)), gather(softmax(logits), c), False
    if kind in ("rw-raw", "3d-input"):
        c = top_k(sel, 2)
        return 2, 0, sel, w, c, gather(w, c), renorm(gather(w, c)), kind == "3d-input"
    if kind == "rw-norm":
        c = top_k(sel, 2)
        return 2, 1, sel, w, c, renorm(gather(w, c)), gather(w, c), False
    if kind == "rw-masked-sel":
        excluded = np.zeros((t, E), bool)
        excluded[:, : E // 2] = rng.uniform(size=(t, 1)) < 0.5  # half the rows lose the first group
        masked = np.where(excluded, float(np.finfo(np.float16).min), sel)
        c = top_k(masked, 2)
        return 2, 0, masked, w, c, gather(w, c), gather(w, top_k(w, 2)), False
    if kind == "no-rw-raw":
        c = top_k(logits, 2)
        p = gather(softmax(logits), c)
        return 2, 0, logits, None, c, renorm(p), p, False
    raise ValueError(name)


CASES = ("moe/softmax-norm", "moe/softmax-raw", "moe/masked-log", "moe/top1", "moe/3d-input",
         "qmoe/rw-raw", "qmoe/rw-norm", "qmoe/rw-masked-sel", "qmoe/no-rw-raw", "qmoe/top1", "qmoe/3d-input",
         "qmoe/masked-log", "qmoe/masked-log-3d")


def build(op: str, *, k: int, normalize: int, dtype: str, bits: int, w1, w2, rw: bool, three_d: bool,
          cuda: bool = False) -> bytes:
    """A one-node MoE / QMoE model; QMoE experts are int `bits` per-channel in the raw layout (CUDA reads it with
    weights_prepacked=0; the CPU kernel has one layout and onnxruntime < 1.28 does not know the attribute)."""
    np_dtype = np.dtype(dtype)
    attrs = dict(activation_type="swiglu", k=k, normalize_routing_weights=normalize, swiglu_fusion=1,
                 activation_alpha=1.0, activation_beta=0.0)
    if op == "MoE":
        inputs = ["x", "probs", "w1", "", "w2"]
        inits = [numpy_helper.from_array(w1.astype(np_dtype), "w1"), numpy_helper.from_array(w2.astype(np_dtype), "w2")]
    else:
        q1, q2 = w1, w2
        attrs.update(expert_weight_bits=bits, **({"weights_prepacked": 0} if cuda else {}))
        inputs = ["x", "probs", "w1", "s1", "", "w2", "s2", "", "", "", "", "", "", "", "rw" if rw else ""]
        while not inputs[-1]:
            inputs.pop()
        inits = [numpy_helper.from_array(q1.packed, "w1"), numpy_helper.from_array(q1.scales.astype(np_dtype), "s1"),
                 numpy_helper.from_array(q2.packed, "w2"), numpy_helper.from_array(q2.scales.astype(np_dtype), "s2")]
    elem = ONNX_DTYPE[dtype]
    x_shape = ["B", "S", H] if three_d else ["T", H]
    graph_inputs = [helper.make_tensor_value_info("x", elem, x_shape),
                    helper.make_tensor_value_info("probs", elem, ["T", E])]
    if op == "QMoE" and rw:
        graph_inputs.append(helper.make_tensor_value_info("rw", elem, ["T", E]))
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "routing_check", graph_inputs, [helper.make_tensor_value_info("y", elem, x_shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def run_case(name: str, *, dtype: str, bits: int, tokens: int, provider: str, seed: int = 0) -> dict:
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    op = "MoE" if name.startswith("moe/") else "QMoE"
    w1 = rng.standard_normal((E, 2 * I, H)) * 0.05
    w2 = rng.standard_normal((E, H, I)) * 0.05
    row = dict(case=name, op=op, dtype=dtype, bits=bits if op == "QMoE" else None, tokens=tokens, provider=provider)
    k, normalize, probs, rw, chosen, weights, wrong, three_d = case_inputs(name, tokens, rng)
    if op == "QMoE":
        q1 = quantize_experts(w1.astype(np.float32), bits=bits, block_size=0, name="fc1")
        q2 = quantize_experts(w2.astype(np.float32), bits=bits, block_size=0, name="fc2")
        model = build(op, k=k, normalize=normalize, dtype=dtype, bits=bits, w1=q1, w2=q2, rw=rw is not None,
                      three_d=three_d, cuda=provider == "CUDAExecutionProvider")
        # the model carries scales in `dtype`: the reference dequantizes with the same scales
        d1 = dequantize_experts(type(q1)(q1.packed, q1.scales.astype(dtype).astype(np.float32), bits, 0))
        d2 = dequantize_experts(type(q2)(q2.packed, q2.scales.astype(dtype).astype(np.float32), bits, 0))
    else:
        model = build(op, k=k, normalize=normalize, dtype=dtype, bits=0, w1=w1, w2=w2, rw=False, three_d=three_d)
        d1, d2 = w1.astype(dtype), w2.astype(dtype)
    x = rng.standard_normal((tokens, H)).astype(dtype)
    feeds = {"x": x.reshape(1, tokens, H) if three_d else x, "probs": probs.astype(dtype)}
    if rw is not None:
        feeds["rw"] = rw.astype(dtype)
    try:
        session = ort.InferenceSession(model, providers=[provider])
        y = session.run(None, feeds)[0]
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        row.update(status="ERROR", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return row
    shape_ok = list(y.shape) == list(feeds["x"].shape)
    y = y.reshape(tokens, H).astype(np.float64)
    x64, d1, d2 = x.astype(np.float64), d1.astype(np.float64), d2.astype(np.float64)
    ref = reference(x64, chosen, weights, d1, d2)
    other = reference(x64, chosen, wrong, d1, d2)
    scale = max(float(np.abs(ref).max()), 1e-6)
    rel, rel_wrong = float(np.abs(y - ref).max()) / scale, float(np.abs(y - other).max()) / scale
    ok = shape_ok and rel < TOL[dtype] and rel_wrong > 20 * max(rel, 1e-7)
    row.update(rel_err=rel, rel_err_vs_wrong_semantics=rel_wrong, shape_ok=shape_ok, status="ok" if ok else "FAIL")
    return row


def run_all(provider: str, dtypes: list[str], tokens: list[int]) -> list[dict]:
    rows = []
    for name in CASES:
        for dtype in dtypes:
            if provider == "CUDAExecutionProvider" and name.startswith("qmoe/") and dtype == "float32":
                continue  # CUDA QMoE runs float16 / bfloat16 activations
            for bits in ((4, 8) if name.startswith("qmoe/") else (0,)):
                for t in tokens:
                    row = run_case(name, dtype=dtype, bits=bits, tokens=t, provider=provider)
                    rows.append(row)
                    print_row(row)
    return rows


def print_row(row: dict) -> None:
    err = f"rel={row['rel_err']:.2e} vs-wrong={row['rel_err_vs_wrong_semantics']:.2e}" if "rel_err" in row else ""
    bits = f"int{row['bits']}" if row["bits"] else "float"
    print(f"{row['case']:<22} {row['dtype']:<8} {bits:<6} T={row['tokens']:<3} {row['status']:<6} {err}", flush=True)
    if "error" in row:
        print(f"    {row['error']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for moe_routing_check.json")
    parser.add_argument("--cpu", action="store_true", help="CPU EP instead of CUDA")
    parser.add_argument("--dtypes", default=None, help="comma list (default: CPU float32,float16; CUDA float16,float32)")
    parser.add_argument("--tokens", default="1,7", help="comma list of token counts (1 = the decode path)")
    args = parser.parse_args()
    try:  # torch (when present) loads the CUDA runtime libraries that ORT's CUDA provider links against: first
        import torch  # noqa: F401
    except ImportError:
        pass
    import onnxruntime as ort

    provider = "CPUExecutionProvider" if args.cpu else "CUDAExecutionProvider"
    if provider not in ort.get_available_providers():
        print(f"{provider} is not available in onnxruntime {ort.__version__}; install onnxruntime-gpu or pass --cpu.",
              file=sys.stderr)
        return 1
    dtypes = (args.dtypes or ("float32,float16" if args.cpu else "float16,float32")).split(",")
    rows = run_all(provider, dtypes, [int(t) for t in args.tokens.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(onnxruntime=ort.__version__, provider=provider, experts=E, hidden=H, inter=I)
    (args.out / "moe_routing_check.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} rows, {len(rows) - len(failed)} ok, {len(failed)} failed; "
          f"wrote {args.out / 'moe_routing_check.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Nodes per decode step, per family: what ONNX Runtime runs for every generated token.

A decoder graph has no control flow on the decode path (Phi-3's longrope If aside), so every node of the optimized
graph runs once per step. Each family's tiny factory model (tests/batching.py FAMILIES) is exported, loaded with
graph optimizations at ORT_ENABLE_ALL, and the optimized graph (SessionOptions.optimized_model_filepath) is counted:

- `nodes`: every node of the optimized graph;
- `host`: shape plumbing that the CUDA EP places on the CPU (Shape and what computes only from shapes and
  constants): no kernel launch there, but a host op per step, and on CUDA a Memcpy when its result feeds a device
  input (CUDA-graph capture refuses a session with any);
- `device`: the rest, a kernel launch each on CUDA (or more: MatMulNBits and GroupQueryAttention launch several).

A -e cuda export (fp16) loads on the CPU EP too; the casts the CPU EP inserts to run fp16 nodes in float32 are left
out of the counts (they do not exist in a CUDA session). Its fused q/k norm inputs load but would not run on CPU.

The CPU EP stands in for the CUDA EP here (no GPU on this machine): the layout and fusion passes are shared, but CPU
and CUDA differ in a few ORT_ENABLE_ALL fusions (e.g. MatMulNBitsFusion, which folds a following Add into
MatMulNBits' bias, is registered for the CPU EP only; GroupQueryAttentionFusion for CUDA only), so the GPU figures
come from scripts/gpu_decode_bench.py's profile of the real CUDA session.

    PYTHONPATH=$PWD python scripts/decode_nodes.py                          # every family, fp32 cpu export
    PYTHONPATH=$PWD python scripts/decode_nodes.py qwen3 gpt_oss -p int4    # some families, int4 (cpu layout)
    PYTHONPATH=$PWD python scripts/decode_nodes.py --ops qwen3              # plus the op histogram
    PYTHONPATH=$PWD python scripts/decode_nodes.py --json counts.json       # machine-readable
    PYTHONPATH=$PWD python scripts/decode_nodes.py --folders out/ref-int4 --ops  # any export folder
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST_SOURCES = {"Shape", "Size"}
CPU_FALLBACK_CAST = "InsertedPrecisionFreeCast_"  # casts the CPU EP adds around fp16 nodes it runs in float32
# ops that compute on small int64 shape tensors; the CUDA EP places them on the CPU when every input is host-side
HOST_OPS = {"Shape", "Size", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Cast", "Add", "Sub", "Mul", "Div",
            "Neg", "Equal", "Reshape", "ConstantOfShape", "Max", "Min", "ReduceMax", "ReduceSum", "Expand"}


def optimized_graph(model: Path, provider: str = "CPUExecutionProvider", level: str = "ORT_ENABLE_ALL"):
    """The graph ONNX Runtime runs for this model (node list only, no weights)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
        ort.InferenceSession(str(model), options, providers=[provider])
        return onnx.load(options.optimized_model_filepath, load_external_data=False).graph


def classify(graph) -> dict:
    """{"nodes", "host", "device", "ops": {op: count}, "host_ops": {op: count}} of one graph."""
    constants = {i.name for i in graph.initializer}
    host_values: set[str] = set()
    ops, host_ops = collections.Counter(), collections.Counter()
    inserted = 0
    for node in graph.node:  # the saved graph is topologically sorted
        if node.name.startswith(CPU_FALLBACK_CAST):
            inserted += 1  # the CPU EP's own fp16 fallback (a -e cuda export counted here): not in the CUDA session
            continue
        inputs = [i for i in node.input if i and i not in constants]
        host = node.op_type in HOST_SOURCES or (
            node.domain in ("", "ai.onnx") and node.op_type in HOST_OPS and inputs
            and all(i in host_values for i in inputs))
        if host:
            host_values.update(node.output)
            host_ops[node.op_type] += 1
        ops[node.op_type] += 1
    total = sum(ops.values())
    hosts = sum(host_ops.values())
    return {"nodes": total, "host": hosts, "device": total - hosts, "ops": dict(sorted(ops.items())),
            "host_ops": dict(sorted(host_ops.items())), "cpu_fallback_casts": inserted}


def count_export(folder: Path, provider: str = "CPUExecutionProvider") -> dict:
    import onnx

    raw = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    counts = classify(optimized_graph(folder / "model.onnx", provider))
    counts["graph_nodes"] = len(raw.node)
    return counts


def export_family(case: str, out: Path, precision: str, ep: str, extra: list[str]) -> Path:
    import batching
    import factory
    from builder.export import export

    arch, overrides = batching.FAMILIES[case]
    overrides = dict(overrides)
    seed = overrides.pop("seed", 0)
    ckpt = factory.make_checkpoint(arch, out / f"ckpt-{case}", seed=seed, **overrides)
    return export(str(ckpt), out / f"{case}-{precision}-{ep}", precision, ep,
                  [*batching.EXPORT_OPTIONS.get(case, []), *extra], overwrite=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("families", nargs="*", help="tests/batching.py FAMILIES keys (default: all)")
    parser.add_argument("-p", "--precision", default="fp32")
    parser.add_argument("-e", "--ep", default="cpu", help="export layout; counted with the CPU EP either way")
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--ops", action="store_true", help="print each family's op histogram")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--folders", nargs="+", type=Path, help="count these exports instead (e.g. the reference's)")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the ortbuild checkout that exports (before/after)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(args.repo), str(ROOT / "tests")]
    if args.folders:
        rows = {folder.name: count_export(folder) for folder in args.folders}
        for name, r in rows.items():
            print(f"{name:24s} graph {r['graph_nodes']:4d}  optimized {r['nodes']:4d}  host {r['host']:3d}  "
                  f"device {r['device']:4d}")
            if args.ops:
                print("    ops:", ", ".join(f"{k} {v}" for k, v in r["ops"].items()))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    import batching

    families = args.families or list(batching.FAMILIES)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in families:
            folder = export_family(case, Path(tmp), args.precision, args.ep, args.extra)
            rows[case] = count_export(folder)
            r = rows[case]
            print(f"{case:14s} graph {r['graph_nodes']:4d}  optimized {r['nodes']:4d}  host {r['host']:3d}  "
                  f"device {r['device']:4d}", flush=True)
            if args.ops:
                print("    ops:", ", ".join(f"{k} {v}" for k, v in r["ops"].items()))
                print("    host:", ", ".join(f"{k} {v}" for k, v in r["host_ops"].items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

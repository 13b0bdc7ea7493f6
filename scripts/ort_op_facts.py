#!/usr/bin/env python3
"""Which contrib ops, inputs and attributes the installed onnxruntime knows, and which providers have kernels for them.

    python scripts/ort_op_facts.py                      # the installed onnxruntime, as JSON on stdout
    python scripts/ort_op_facts.py --wheels DIR --out scripts/results/ort_op_facts.json
        # every onnxruntime*.whl in DIR (pip download onnxruntime==X --no-deps -d DIR), each unpacked and run in
        # its own process; the table in builder/runtime_requirements.py is read off this file

Needs only the onnxruntime wheel(s) and the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Every contrib op an ortbuild graph can contain (domain, op): tests/test_runtime_requirements.py builds every factory
# recipe for every precision, EP and op-changing option and fails on an op missing here.
OPS = [("com.microsoft", op) for op in (
    "GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized", "QMoE", "MoE", "SkipSimplifiedLayerNormalization",
    "SkipLayerNormalization", "RotaryEmbedding", "CausalConvWithState", "LinearAttention", "LinearAttentionGate",
    "GatedRMSNorm", "FusedMatMul")] + [("", "SimplifiedLayerNormalization")]


def facts() -> dict:
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    schemas = {(s.domain, s.name): s for s in C.get_all_operator_schema()}
    kernels: dict = {}
    for k in C.get_all_opkernel_def():
        kernels.setdefault((k.domain, k.op_name), set()).add(k.provider)
    out = {}
    for domain, op in OPS:
        schema = schemas.get((domain, op))
        if schema is None:
            out[f"{domain}.{op}"] = None
            continue
        out[f"{domain}.{op}"] = {"inputs": [i.name for i in schema.inputs], "attributes": sorted(schema.attributes),
                                 "kernels": sorted(kernels.get((domain, op), ()))}
    return {"onnxruntime": onnxruntime.__version__, "ops": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, help="folder of onnxruntime wheels to compare")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args()
    if not args.wheels:
        result = facts()
    else:
        result = []
        for wheel in sorted(args.wheels.glob("onnxruntime-*.whl"), key=lambda p: [int(x) for x in
                                                                                  p.name.split("-")[1].split(".")]):
            with tempfile.TemporaryDirectory() as tmp:
                zipfile.ZipFile(wheel).extractall(tmp)
                # PYTHONPATH comes before site-packages: the unpacked onnxruntime shadows an installed one
                env = {**os.environ, "PYTHONPATH": tmp}
                done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
                if done.returncode:
                    print(f"{wheel.name}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                    continue
                result.append(json.loads(done.stdout))
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

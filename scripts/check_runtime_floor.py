#!/usr/bin/env python3
"""Check the minimum onnxruntime versions that exports record (builder/runtime_requirements.py) against real wheels.

Exports tiny models that use each versioned feature, reads the minimum each one records in ortbuild.json, then runs
every model's prompt pass on the CPU provider of every onnxruntime wheel in --wheels (each unpacked and run in its
own process). Expected: at every version >= its recorded minimum a model loads, runs and matches the installed
onnxruntime's logits (fp32: 1e-4; quantized: 0.1); below it, it fails to load or gives other logits.

    mkdir -p /tmp/ortw && for v in 1.20.1 1.21.1 1.22.1 1.23.2 1.24.4 1.25.1 1.26.0 1.27.0 1.28.0 1.29.0 1.30.0 \\
        1.31.1 1.32.0; do pip download onnxruntime==$v --no-deps --only-binary :all: -d /tmp/ortw; done
    python scripts/check_runtime_floor.py --wheels /tmp/ortw --out scripts/results/runtime_floor.json

Needs the test extra (torch, transformers) for the tiny checkpoints. Exit 1 when any expectation fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from wheel_run import report, run_json  # noqa: E402 (scripts/, beside this file)

# name -> (factory architecture, factory overrides, precision, extra options): one versioned feature or more each
CASES = {
    "qwen3-fp32": ("qwen3", {}, "fp32", []),
    "qwen3-int4": ("qwen3", {}, "int4", ["int4_is_symmetric=false"]),
    "llama-int8": ("llama", {}, "int8", []),  # 8-bit MatMulNBits
    "llama-int8-quantized-embeddings": ("llama", {}, "int8", ["quantize_embeddings=true"]),  # 8-bit GBQ
    "qwen3-int4-quantized-embeddings": ("qwen3", {}, "int4", ["quantize_embeddings=true"]),  # GatherBlockQuantized
    "gemma2-fp32": ("gemma2", {}, "fp32", []),  # softcap, sliding window
    "gpt_oss-fp32": ("gpt_oss", {}, "fp32", []),  # head_sink, MoE swiglu
    "qwen3_moe-int4": ("qwen3_moe", {}, "int4", []),  # QMoE
    "qwen3_moe-int4-per-channel": ("qwen3_moe", {}, "int4", ["qmoe_block_size=0"]),  # QMoE without block_size
    "qwen3_moe-int8-per-channel": ("qwen3_moe", {}, "int8", ["qmoe_block_size=0"]),  # 8-bit QMoE
    "qwen2_moe-int4": ("qwen2_moe", {}, "int4", []),  # QMoE router_weights
    "qwen3_5-fp32": ("qwen3_5", {}, "fp32", []),  # linear attention: CausalConvWithState ... GatedRMSNorm activation
    "nemotron-fp32": ("nemotron", {}, "fp32", []),  # SkipLayerNormalization, RotaryEmbedding (partial rotary)
}

RUNNER = r"""
import json, sys
import numpy as np
import onnxruntime as ort
model, out = sys.argv[1], sys.argv[2]
options = ort.SessionOptions()
options.log_severity_level = 4
try:
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 99, 3, 42, 7, 250, 11]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name == "position_ids":
            feed[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
        elif i.name.startswith("past."):  # linear-attention conv / recurrent state: fixed size, float32
            feed[i.name] = np.zeros([1, *i.shape[1:]], np.float32)
    logits = session.run(["logits"], feed)[0]
    np.save(out, logits.astype(np.float32))
    print(json.dumps({"ok": True, "version": ort.__version__}))
except Exception as exc:
    text = str(exc).strip().splitlines()
    print(json.dumps({"ok": False, "version": ort.__version__, "error": text[0][:300] if text else type(exc).__name__}))
"""


def export_cases(root: Path) -> dict[str, dict]:
    import factory
    from builder.export import export

    made = {}
    for name, (arch, overrides, precision, extra) in CASES.items():
        checkpoint = factory.make_checkpoint(arch, root / "ckpt" / name, **overrides)
        out = export(str(checkpoint), root / name, precision, "cpu", extra)
        made[name] = {"path": out / "model.onnx",
                      "requires": json.loads((out / "ortbuild.json").read_text())["requires"]}
    return made


def run(python_path: str | None, model: Path, out: Path) -> dict:
    return run_json(RUNNER, [str(model), str(out)], python_path)


def main() -> int:
    import numpy as np

    from builder.runtime_requirements import version_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    wheels = sorted(args.wheels.glob("onnxruntime-*.whl"), key=lambda p: version_key(p.name.split("-")[1]))
    problems, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = export_cases(root)
        for name, case in cases.items():  # the installed onnxruntime's logits are the reference
            reference = run(None, case["path"], root / f"{name}.ref.npy")
            assert reference["ok"], (name, reference)
        for wheel in wheels:
            version = wheel.name.split("-")[1]
            unpacked = root / f"ort-{version}"
            zipfile.ZipFile(wheel).extractall(unpacked)
            for name, case in cases.items():
                got = run(str(unpacked), case["path"], root / f"{name}.{version}.npy")
                need = case["requires"]["onnxruntime"]
                expected = version_key(version)[:2] >= version_key(need)[:2]
                row = {"model": name, "onnxruntime": got.get("version", version), "requires": need,
                       "loads": got["ok"]}
                works = got["ok"]
                if got["ok"]:
                    diff = float(np.abs(np.load(root / f"{name}.{version}.npy") - np.load(root / f"{name}.ref.npy"))
                                 .max())
                    # fp32 must agree to rounding; quantized kernels may round activations differently across
                    # releases (int8 QMoE: 0.02), but a misread layout moves the logits by O(1)
                    limit = 1e-4 if name.endswith("fp32") else 0.1
                    row["max_abs_vs_installed"] = diff
                    works = diff <= limit
                    if not works:
                        row["error"] = f"runs, but the logits differ from the installed onnxruntime's by {diff:.3g}"
                else:
                    row["error"] = got["error"].replace(str(root), "<tmp>")
                row["works"] = works
                if works != expected:
                    problems.append(f"{name} on {version}: {'works' if works else row['error']}, but requires {need}")
                table.append(row)
                status = "works" if works else ("WRONG" if got["ok"] else "FAILS")
                print(f"{name:34} {version:8} requires {need:5} {status}"
                      f"{'' if works == expected else '  <-- unexpected'}", flush=True)
    return report(cases, table, problems, args.out)


if __name__ == "__main__":
    sys.exit(main())

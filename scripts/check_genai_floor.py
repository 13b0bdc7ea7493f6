#!/usr/bin/env python3
"""Check the minimum onnxruntime-genai versions that exports record (builder/runtime_requirements.py GENAI_SINCE,
GENAI_KEY_SINCE) against real onnxruntime-genai wheels.

Exports a tiny fp32 model of each family whose genai model type or config keys are newer than 0.14, reads the minimum
each records in ortbuild.json, then generates 12 greedy tokens with every onnxruntime-genai wheel in --wheels (each
unpacked and run in its own process, on the installed onnxruntime). Expected: from its recorded minimum on a model
loads and gives transformers' tokens; below it, it fails to load or gives other tokens.

    mkdir -p /tmp/genaiw && for v in 0.14.0 0.15.2 0.16.0 0.17.0 0.17.1 0.18.0; do
        pip download onnxruntime-genai==$v --no-deps --only-binary :all: -d /tmp/genaiw; done
    python scripts/check_genai_floor.py --wheels /tmp/genaiw --out scripts/results/genai_floor.json

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

# factory recipes whose genai type or genai_config keys appeared in onnxruntime-genai 0.14 or later (and two older
# dense types as controls)
CASES = ("qwen3", "phi3", "smollm3", "granite", "nemotron", "ernie4_5", "hunyuan", "gemma4", "qwen3_5", "qwen3_5_moe",
         "qwen3_next")
PROMPT = [5, 17, 99, 3, 42, 7]
STEPS = 12

RUNNER = r"""
import json, sys
import numpy as np
try:
    import onnxruntime_genai as og
    model = og.Model(sys.argv[1])
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=int(sys.argv[2]))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([json.loads(sys.argv[3])], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    print(json.dumps({"ok": True, "tokens": [int(t) for t in generator.get_sequence(0)]}))
except Exception as exc:
    text = str(exc).strip().splitlines()
    print(json.dumps({"ok": False, "error": text[0][:300] if text else type(exc).__name__}))
"""


def export_cases(root: Path) -> dict[str, dict]:
    import factory
    from builder.export import export
    from builder.verify import load_reference, reference_run

    made = {}
    for arch in CASES:
        checkpoint = factory.make_checkpoint(arch, root / "ckpt" / arch)
        out = export(str(checkpoint), root / arch, "fp32", "cpu")
        tokens, _ = reference_run(load_reference(str(checkpoint)), PROMPT, STEPS)
        made[arch] = {"path": out, "reference": PROMPT + tokens,
                      "type": json.loads((out / "genai_config.json").read_text())["model"]["type"],
                      "requires": json.loads((out / "ortbuild.json").read_text())["requires"]["onnxruntime-genai"]}
    return made


def run(python_path: str, model: Path) -> dict:
    return run_json(RUNNER, [str(model), str(len(PROMPT) + STEPS), json.dumps(PROMPT)], python_path)


def main() -> int:
    from builder.runtime_requirements import version_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    wheels = sorted(args.wheels.glob("onnxruntime_genai-*.whl"), key=lambda p: version_key(p.name.split("-")[1]))
    problems, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = export_cases(root)
        for wheel in wheels:
            version = wheel.name.split("-")[1]
            unpacked = root / f"genai-{version}"
            zipfile.ZipFile(wheel).extractall(unpacked)
            for name, case in cases.items():
                got = run(str(unpacked), case["path"])
                works = got["ok"] and got["tokens"] == case["reference"]
                expected = version_key(version) >= version_key(case["requires"])
                row = {"model": name, "type": case["type"], "onnxruntime-genai": version, "requires": case["requires"],
                       "loads": got["ok"], "works": works}
                if not got["ok"]:
                    row["error"] = got["error"].replace(str(root), "<tmp>")
                elif not works:
                    row["error"] = f"runs, but generates {got['tokens'][len(PROMPT):]} instead of transformers' " \
                                   f"{case['reference'][len(PROMPT):]}"
                if works != expected:
                    problems.append(f"{name} on {version}: {'works' if works else row['error']}, but requires "
                                    f"{case['requires']}")
                table.append(row)
                status = "works" if works else ("WRONG" if got["ok"] else "FAILS")
                print(f"{name:12} {case['type']:17} {version:8} requires {case['requires']:7} {status}"
                      f"{'' if works == expected else '  <-- unexpected'}", flush=True)
    return report(cases, table, problems, args.out)


if __name__ == "__main__":
    sys.exit(main())

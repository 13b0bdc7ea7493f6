#!/usr/bin/env python3
"""Do hybrid (linear-attention) exports decode the same under onnxruntime-genai's CUDA graph capture as without it?

builder/capture.py leaves capture off for hybrids until this is measured: genai 0.18 double-buffers their conv and
recurrent state under capture. For each export folder given (made with `-p fp16 -e cuda --extra_options
enable_cuda_graph=true`), a twin with "enable_cuda_graph": "0" is written beside it (genai_config.json edited, every
other file hard-linked), and both generate greedily through onnxruntime-genai from a few prompts; the tokens must be
equal; so must a right-padded batch of the three prompts (tests/batching.py's genai batching). Needs
onnxruntime-genai-cuda and onnxruntime-gpu only.

    python scripts/gpu_hybrid_capture.py OUT_DIR EXPORT [EXPORT ...]     # writes OUT_DIR/hybrid_capture.json
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
PROMPTS = [[5, 17, 99, 3, 250, 7, 8, 300, 11, 12, 13, 14], [42, 7, 19], list(range(3, 80))]
NEW_TOKENS = 48


def uncaptured_twin(folder: Path) -> Path:
    twin = folder.parent / f"{folder.name}-uncaptured"
    shutil.rmtree(twin, ignore_errors=True)
    twin.mkdir()
    for f in folder.iterdir():
        if f.name != "genai_config.json":
            os.link(f, twin / f.name)
    config = json.loads((folder / "genai_config.json").read_text())
    for entry in config["model"]["decoder"]["session_options"]["provider_options"]:
        entry.get("cuda", {})["enable_cuda_graph"] = "0"
    (twin / "genai_config.json").write_text(json.dumps(config, indent=4))
    return twin


def greedy(og, folder: Path) -> tuple[list[list[int]], float]:
    model = og.Model(str(folder))
    outputs, start = [], time.perf_counter()
    for ids in PROMPTS:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + NEW_TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        outputs.append(tokens)
        del generator
    return outputs, time.perf_counter() - start


def main() -> int:
    import torch  # noqa: F401  (loads the CUDA libraries before onnxruntime, as on the GPU machine)
    import onnxruntime_genai as og

    out, folders = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
    results, ok = {}, True
    for folder in folders:
        captured_cfg = json.loads((folder / "genai_config.json").read_text())
        flags = [e.get("cuda", {}).get("enable_cuda_graph")
                 for e in captured_cfg["model"]["decoder"]["session_options"]["provider_options"]]
        try:
            import batching  # tests/batching.py: numpy and onnxruntime_genai only

            twin = uncaptured_twin(folder)
            plain, t_plain = greedy(og, twin)
            captured, t_captured = greedy(og, folder)
            try:  # a right-padded batch: genai's static prompt mask is wider than the prompt
                plain.append(batching.genai_batch_greedy(twin, PROMPTS, NEW_TOKENS))
                captured.append(batching.genai_batch_greedy(folder, PROMPTS, NEW_TOKENS))
            except Exception as error:  # noqa: BLE001 - recorded, the batch-1 comparison stands
                results[f"{folder.name}-batch"] = {"error": f"{type(error).__name__}: {error}"[:300]}
            same = [a == b for a, b in zip(plain, captured)]
            first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                          for a, b in zip(plain, captured)]
            results[folder.name] = {"capture_flag": flags, "equal": same, "first_difference": first_diff,
                                    "tokens": [len(t) for t in captured], "seconds": [t_plain, t_captured]}
            ok &= all(same)
        except Exception as error:  # noqa: BLE001 - a failure is the finding
            results[folder.name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            ok = False
        print(folder.name, json.dumps(results[folder.name]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_capture.json").write_text(json.dumps(results, indent=1) + "\n")
    print("all equal" if ok else "DIFFERENCES OR FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Where ONNX Runtime ran the nodes of a session, from a profiled run (numpy + onnxruntime only).

Used by scripts/gpu_check.py and scripts/gpu_hybrid_check.py to turn a silent CPU-EP fallback into a failure.
The session option session.disable_cpu_ep_fallback=1 cannot do it for these graphs: ONNX Runtime then rejects a session
with *any* node on the CPU EP (onnxruntime/core/session/inference_session.cc), and the CUDA EP deliberately leaves
shape computations (Shape, small int64 arithmetic feeding Reshape / Slice / Range inputs, total_sequence_length) on
the CPU; ONNX Runtime's own CUDA-graph check accepts CPU nodes as long as no Memcpy is needed. So the first run of a
session is profiled, and each kernel event names its node's provider and output types:
- the session runs on the CPU EP alone (the CUDA EP failed to load or to initialise, and the Python API retried on the
  CPU, printing "Falling back to ['CPUExecutionProvider']"): failure;
- a node on the CPU EP with a floating-point output is compute that fell back (a shape computation outputs integers);
  each such op type must be one the export is known to place there (GroupQueryAttention for float32 activations:
  its CUDA kernel is float16/bfloat16 only), else failure;
- Memcpy nodes (data crossing between the devices) are counted; they are expected exactly when compute falls back.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path


def profiled_options(ort, log_severity: int = 3):
    """SessionOptions that profile the session's runs (into a temporary folder) until end_profiling()."""
    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="ortprof-")) / "run")
    return options


def _floating(event: dict) -> bool:
    return any("float" in dtype.lower() for out in event["args"].get("output_type_shape", []) for dtype in out)


def placement(session, profile: str | Path, provider: str, allowed_cpu_ops=()) -> dict:
    """The placement verdict of a session whose first run(s) were profiled into `profile` (end_profiling()'s path)."""
    events = [e for e in json.loads(Path(profile).read_text()) if e.get("cat") == "Node" and "args" in e]
    by_provider = Counter(e["args"].get("provider", "?") for e in events)
    cpu_compute = Counter(e["args"].get("op_name", "?") for e in events
                          if e["args"].get("provider") == "CPUExecutionProvider" and _floating(e))
    memcpy = sum(e["args"].get("op_name", "").startswith("Memcpy") for e in events)
    used = session.get_providers()[0]
    problems = []
    if used != provider:
        problems.append(f"the session runs on {used}, not {provider}")
    elif provider != "CPUExecutionProvider":
        unexpected = sorted(op for op in cpu_compute if op not in set(allowed_cpu_ops))
        if unexpected:
            problems.append("compute fell back to the CPU EP: " + ", ".join(f"{op} x{cpu_compute[op]}"
                                                                            for op in unexpected))
    return {"session_provider": used, "kernels_by_provider": dict(by_provider), "cpu_compute": dict(cpu_compute),
            "memcpy_kernels": memcpy, "placement_ok": not problems, "placement_problems": problems}

"""Every family in every precision it may be exported in: the half-precision and int8 CPU exports run and track
transformers, and the CUDA exports (fp16, bf16) are graphs ONNX Runtime accepts.

The per-family tests prove fp32 parity in depth; this sweep catches what only another dtype shows: an op without a
float16 CPU kernel or reduction (Gemma 4's ScatterND add), a bfloat16 input to an op whose schema has no bfloat16
(TopK in a router).  Tiny models: the whole sweep takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

import parity
from factory import ARCHS

FAMILIES = sorted(ARCHS)


@pytest.fixture(scope="module")
def hf_prompt_logits(tiny_checkpoint):
    return parity.hf_prompt_cache(tiny_checkpoint)


@pytest.mark.parametrize("arch", FAMILIES)
def test_fp16_cpu_export_runs_and_tracks_transformers(arch, tiny_checkpoint, hf_prompt_logits, tmp_path):
    out = parity.export(tiny_checkpoint(arch), tmp_path / "model", "fp16", "cpu")
    logits = parity.run_onnx(out, decode_steps=2).prompt_logits
    full = hf_prompt_logits(arch)
    agree = (logits.argmax(-1) == full.argmax(-1)).mean()
    assert parity.max_abs(logits, full) < 0.1 and agree >= 0.75, (parity.max_abs(logits, full), agree)


@pytest.mark.parametrize("arch", FAMILIES)
def test_int8_cpu_export_runs(arch, tiny_checkpoint, hf_prompt_logits, tmp_path):
    out = parity.export(tiny_checkpoint(arch), tmp_path / "model", "int8", "cpu")
    run = parity.run_onnx(out, decode_steps=2)
    assert all(np.isfinite(x).all() for x in [run.prompt_logits, *run.step_logits])
    corr = np.corrcoef(run.prompt_logits.ravel(), hf_prompt_logits(arch).ravel())[0, 1]
    assert corr >= 0.9, corr


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_cuda_export_is_a_graph_onnxruntime_accepts(arch, precision, tiny_checkpoint, tmp_path):
    """Loaded on the CPU EP: the graph check (types against each op's schema) runs before kernels are placed, so
    an invalid graph fails with INVALID_GRAPH here as on a GPU; a valid one fails at most for a missing CPU kernel."""
    import onnxruntime as ort

    out = parity.export(tiny_checkpoint(arch), tmp_path / "model", precision, "cuda")
    try:
        ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - only the graph check's failure is a failure here
        assert "INVALID_GRAPH" not in str(error) and "Type Error" not in str(error), str(error)

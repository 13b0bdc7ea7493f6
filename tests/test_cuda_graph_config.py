"""CUDA-graph capture in genai_config.json (builder/capture.py): on for -e cuda where ONNX Runtime can capture the
graph and it was measured, off with a note where not, overridable by enable_cuda_graph."""

from __future__ import annotations

import json

import onnx
import pytest

from builder.errors import UsageError
from builder.export import export, prepare
from builder.genai_config import genai_config


def _config(ckpt, ep="cuda", precision="fp16", extra=()):
    prepared = prepare(str(ckpt), precision, ep, list(extra))
    config = genai_config(prepared.spec, prepared.settings, prepared.config, None, "model.onnx")
    return config["model"]["decoder"]["session_options"]["provider_options"], prepared.notes


def test_dense_cuda_export_turns_capture_on(tiny_checkpoint, tmp_path):
    out = export(str(tiny_checkpoint("qwen3")), tmp_path / "m", "fp16", "cuda")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]
    assert config["search"]["past_present_share_buffer"] is True  # genai refuses capture without it
    assert json.loads((out / "ortbuild.json").read_text())["cuda_graph"] is True
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert not {"If", "Loop", "Scan"} & ops  # control flow: ONNX Runtime would refuse to capture


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "gemma3"])
def test_other_attention_families_capture(tiny_checkpoint, arch):
    options, notes = _config(tiny_checkpoint(arch))
    assert options == [{"cuda": {"enable_cuda_graph": "1"}}]
    assert not any("CUDA graph" in n for n in notes)


def test_longrope_switch_keeps_capture_off_with_a_note(tiny_checkpoint):
    options, notes = _config(tiny_checkpoint("phi3"))
    assert options == [{"cuda": {"enable_cuda_graph": "0"}}]
    assert any("CUDA graph capture is off" in n and "longrope" in n and "If node" in n for n in notes), notes


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "qwen3_next"])
def test_hybrids_capture(tiny_checkpoint, arch):
    """Measured on an H200 after the linear layers' token count followed genai's static mask: captured and
    uncaptured generation give the same tokens (scripts/results/gpu_hybrid_capture_h200.json)."""
    options, notes = _config(tiny_checkpoint(arch))
    assert options == [{"cuda": {"enable_cuda_graph": "1"}}]
    assert not any("CUDA graph" in n for n in notes), notes


def test_option_turns_capture_off(tiny_checkpoint):
    options, notes = _config(tiny_checkpoint("qwen3"), extra=["enable_cuda_graph=false"])
    assert options == [{"cuda": {"enable_cuda_graph": "0"}}]
    assert any("enable_cuda_graph=false" in n for n in notes)


def test_cpu_export_has_no_cuda_options(tiny_checkpoint):
    options, notes = _config(tiny_checkpoint("qwen3"), ep="cpu", precision="fp32")
    assert options == []
    assert not any("CUDA graph" in n for n in notes)


def test_refused_requests_are_usage_errors(tiny_checkpoint):
    with pytest.raises(UsageError, match="longrope.*Drop the option"):
        _config(tiny_checkpoint("phi3"), extra=["enable_cuda_graph=true"])
    with pytest.raises(UsageError, match="enable_cuda_graph=true needs -e cuda"):
        _config(tiny_checkpoint("qwen3"), ep="cpu", precision="fp32", extra=["enable_cuda_graph=true"])

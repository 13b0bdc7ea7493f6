"""scripts/graph_twin.py's unfuse_gate_up: the twin the GPU driver benches against an export (one GEMM per half of the
fused gate|up projection, no Split) computes the export's logits exactly, float and 4-bit, and refuses a graph it
cannot rewrite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import parity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import graph_twin  # noqa: E402
from strip_padding import CannotStrip  # noqa: E402


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("twin")
    ckpt = tiny_checkpoint("llama")  # intermediate 128: gate_up has 256 rows
    return {precision: parity.export(ckpt, root / precision, precision) for precision in ("fp32", "int4")}


@pytest.mark.parametrize("precision,op", [("fp32", "MatMul"), ("int4", "MatMulNBits")])
def test_unfuse_gate_up_gives_the_same_logits(exports, precision, op, tmp_path):
    folder = exports[precision]
    twin = tmp_path / "unfused"
    figures = graph_twin.make_twin("unfuse_gate_up", folder, twin)
    assert figures["unfused"] == [f"/model/layers.{i}/mlp/gate_up_proj/{op}" for i in range(2)]
    before = {n.name: n for n in parity.load_graph(folder).graph.node}
    after = {n.name: n for n in parity.load_graph(twin).graph.node}
    assert set(before) - set(after) == {f"/model/layers.{i}/mlp/{name}" for i in range(2)
                                        for name in (f"gate_up_proj/{op}", "Split")}
    assert set(after) - set(before) == {f"/model/layers.{i}/mlp/{half}_proj/{op}" for i in range(2)
                                        for half in ("gate", "up")}
    split = before["/model/layers.0/mlp/Split"]
    assert list(after[f"/model/layers.0/mlp/gate_proj/{op}"].output) == [split.output[0]]
    assert list(after[f"/model/layers.0/mlp/up_proj/{op}"].output) == [split.output[1]]
    if op == "MatMulNBits":
        n = {a.name: a.i for a in before[f"/model/layers.0/mlp/gate_up_proj/{op}"].attribute}["N"]
        assert {a.name: a.i for a in after[f"/model/layers.0/mlp/up_proj/{op}"].attribute}["N"] == n // 2
    a, b = parity.run_onnx(folder, decode_steps=3), parity.run_onnx(twin, decode_steps=3)
    assert a.step_tokens == b.step_tokens
    assert parity.max_abs(a.prompt_logits, b.prompt_logits) == 0.0
    assert max(parity.max_abs(x, y) for x, y in zip(a.step_logits, b.step_logits)) == 0.0


def test_unfuse_gate_up_refuses_a_graph_without_one(exports, tmp_path):
    graph_twin.make_twin("unfuse_gate_up", exports["fp32"], tmp_path / "once")
    with pytest.raises(CannotStrip, match="no MLP gate_up projection followed by a Split"):
        graph_twin.make_twin("unfuse_gate_up", tmp_path / "once", tmp_path / "twice")
    assert not (tmp_path / "twice").exists()

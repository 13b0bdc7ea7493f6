"""ortbuild.json records the oldest onnxruntime / onnxruntime-genai the written graph needs, derived from the contrib
ops, inputs and attributes it uses; the table behind it agrees with the measured schema facts; `verify` warns when
the installed runtime is older, and a load failure there is "cannot run here" (exit 7), not a failed verification.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from builder.cli import main
from builder.export import export
from builder.runtime_requirements import (CPU_VALUE_SINCE, GENAI_KEY_SINCE, ORT_BASE, ORT_SINCE, older_than_required,
                                          requirements, version_key)

FACTS = Path(__file__).resolve().parent.parent / "scripts" / "results" / "ort_op_facts.json"
FLOOR = Path(__file__).resolve().parent.parent / "scripts" / "results" / "runtime_floor.json"
GENAI_FLOOR = Path(__file__).resolve().parent.parent / "scripts" / "results" / "genai_floor.json"
IDS = ["--prompt-ids", "5,17,99,3", "--steps", "1", "--no-genai"]


def requires(out: Path) -> dict:
    return json.loads((out / "ortbuild.json").read_text())["requires"]


@pytest.fixture(scope="module")
def made(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("requires")
    cases = {"qwen3-fp32": ("qwen3", {}, "fp32", "cpu", []),
             "qwen3-int4-cuda": ("qwen3", {}, "int4", "cuda", []),
             "qwen3-int4-embeddings": ("qwen3", {}, "int4", "cpu", ["quantize_embeddings=true"]),
             "gpt_oss-fp32": ("gpt_oss", {}, "fp32", "cpu", []),
             "qwen2_moe-int4": ("qwen2_moe", {}, "int4", "cpu", [])}
    return {name: export(str(tiny_checkpoint(arch, **kw)), root / name, p, ep, extra)
            for name, (arch, kw, p, ep, extra) in cases.items()}


def test_the_manifest_records_what_the_graph_needs(made):
    assert requires(made["qwen3-fp32"]) == {"onnxruntime": ORT_BASE, "onnxruntime-genai": "0.8.1",
                                            "because": ["model type qwen3 (onnxruntime-genai 0.8.1)"]}
    cuda = requires(made["qwen3-int4-cuda"])
    assert cuda["onnxruntime"] == "1.28" and "GroupQueryAttention input q_norm_weight (onnxruntime 1.28)" in \
        cuda["because"]
    assert requires(made["qwen3-int4-embeddings"])["because"][0] == \
        "GatherBlockQuantized attribute bits (onnxruntime 1.23)"
    gpt = requires(made["gpt_oss-fp32"])
    assert (gpt["onnxruntime"], gpt["onnxruntime-genai"]) == ("1.23", "0.9.1")
    assert "GroupQueryAttention input head_sink (onnxruntime 1.23)" in gpt["because"]
    moe = requires(made["qwen2_moe-int4"])  # no top-k renormalisation: QMoE's router_weights input
    assert moe["onnxruntime"] == "1.25" and moe["because"][0] == "QMoE input router_weights (onnxruntime 1.25)"
    assert "QMoE expert_weight_bits=4 on the CPU kernel (onnxruntime 1.24)" in moe["because"]


def test_the_table_is_what_the_wheels_said():
    """Every schema entry of ORT_SINCE is the first release whose dumped schema (scripts/ort_op_facts.py over the
    1.20.1..1.32.0 wheels) has that op/input/attribute/CPU kernel, and an op without an "op" entry is in the oldest."""
    facts = json.loads(FACTS.read_text())
    assert version_key(facts[0]["onnxruntime"])[:2] == version_key(ORT_BASE)
    for op, table in ORT_SINCE.items():
        schemas = [(f["onnxruntime"], f["ops"][f"com.microsoft.{op}"]) for f in facts]
        first_op = next(version for version, schema in schemas if schema is not None)
        assert version_key(first_op)[:2] == version_key(table.get("op", ORT_BASE)), (op, first_op)
        for feature, since in table.items():
            kind, _, name = feature.partition(":")
            if kind == "op":
                continue
            field, value = {"input": ("inputs", name), "attr": ("attributes", name),
                            "cpu": ("kernels", "CPUExecutionProvider")}[kind]
            first = next(version for version, schema in schemas if schema is not None and value in schema[field])
            assert version_key(first)[:2] == version_key(since), (op, feature, first, since)


def test_the_recorded_minimums_were_run_on_real_wheels():
    """scripts/check_runtime_floor.py's last run: every model works from its minimum on, and not one release below."""
    floor = json.loads(FLOOR.read_text())
    assert floor["problems"] == []
    versions = sorted({r["onnxruntime"] for r in floor["runs"]}, key=version_key)
    assert versions[0].startswith("1.20") and version_key(versions[-1]) >= (1, 32)
    for row in floor["runs"]:
        assert row["works"] == (version_key(row["onnxruntime"])[:2] >= version_key(row["requires"])[:2]), row
    needed = {r["requires"] for r in floor["runs"]}
    assert set(CPU_VALUE_SINCE.values()) <= needed  # the CPU-kernel limits were found, and are covered, by the run


def test_the_recorded_genai_minimums_were_run_on_real_wheels():
    """scripts/check_genai_floor.py's last run (onnxruntime-genai 0.14.0..0.18.0 wheels): every model gives
    transformers' greedy tokens from its recorded minimum on and not below it, and those minimums are the tables'."""
    floor = json.loads(GENAI_FLOOR.read_text())
    assert floor["problems"] == []
    versions = sorted({r["onnxruntime-genai"] for r in floor["runs"]}, key=version_key)
    assert versions[0] == "0.14.0" and versions[-1] == "0.18.0"
    for row in floor["runs"]:
        assert row["works"] == (version_key(row["onnxruntime-genai"]) >= version_key(row["requires"])), row
        hybrid = row["model"] in ("qwen3_5", "qwen3_5_moe", "qwen3_next")
        keys = list(GENAI_KEY_SINCE) if hybrid else []
        assert requirements([], "cpu", row["type"], keys)["onnxruntime-genai"] == row["requires"], row


def test_older_runtime_warnings():
    need = {"onnxruntime": "1.25", "onnxruntime-genai": "0.9.1",
            "because": ["QMoE input router_weights (onnxruntime 1.25)", "model type gptoss (onnxruntime-genai 0.9.1)"]}
    assert older_than_required(need, {"onnxruntime": "1.25.0", "onnxruntime-genai": "0.18.0"}) == []
    assert older_than_required(need, {"onnxruntime": "1.24.4", "onnxruntime-genai": None}) == [
        "this model needs onnxruntime >= 1.25 for QMoE input router_weights (onnxruntime 1.25); the installed "
        "onnxruntime is 1.24.4: expect it to fail to load. Upgrade it."]
    assert "onnxruntime-genai >= 0.9.1 for model type gptoss" in \
        older_than_required(need, {"onnxruntime-genai": "0.9.0"})[0]
    assert version_key("0.18.0.dev1") == (0, 18, 0) and version_key("1.31.1+cu13") == (1, 31, 1)


def test_verify_warns_when_the_installed_onnxruntime_is_older(made, monkeypatch, capsys):
    monkeypatch.setattr(ort, "__version__", "1.22.1")
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(made["qwen3-int4-embeddings"]), *IDS, "--min-top1", "-1"])
    out, err = capsys.readouterr()
    assert exc.value.code == 0
    assert err.startswith("ortbuild: warning: this model needs onnxruntime >= 1.23 for GatherBlockQuantized "
                          "attribute bits (onnxruntime 1.23); the installed onnxruntime is 1.22.1")
    assert "note: this model needs onnxruntime >= 1.23" in out


def test_a_load_failure_on_a_too_old_runtime_is_cannot_run_here(made, monkeypatch, capsys):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph

    def old_runtime(*args, **kwargs):
        raise InvalidGraph("Unrecognized attribute: bits for operator GatherBlockQuantized")

    monkeypatch.setattr(ort, "__version__", "1.22.1")
    monkeypatch.setattr(ort, "InferenceSession", old_runtime)
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(made["qwen3-int4-embeddings"]), *IDS])
    err = capsys.readouterr().err
    assert exc.value.code == 7
    assert "ortbuild: cannot run here: onnxruntime cannot load" in err and "Unrecognized attribute: bits" in err
    assert err.rstrip().endswith("the installed onnxruntime is 1.22.1: expect it to fail to load. Upgrade it.")


def test_a_foreign_export_without_a_manifest_is_judged_from_its_graph(made, tmp_path, monkeypatch):
    import shutil

    from builder.runtime import Runtime, version_warnings

    copy = tmp_path / "foreign"
    shutil.copytree(made["gpt_oss-fp32"], copy)
    (copy / "ortbuild.json").unlink()
    old = Runtime("onnxruntime", "1.22.1", ("CPUExecutionProvider",))
    warnings = version_warnings(old, None, copy / "model.onnx", "cpu")
    assert len(warnings) == 1 and warnings[0].startswith("this model needs onnxruntime >= 1.23")
    assert requirements([], "cpu", "gptoss")["onnxruntime-genai"] == "0.9.1"

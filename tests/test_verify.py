"""`ortbuild verify`: the figures it prints are real measurements, and the exit code follows the precision's policy.

A correct export passes with near-zero error; the same export judged against another seed's checkpoint (a wrong
reference, i.e. what a broken weight mapping looks like) fails with exit 6 and says by how much.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import sys

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builder.cli import main
from builder.errors import OutputError, UsageError
from builder.export import export
from builder.verify import _as_float32, _genai_prefix, _reference_stack, common_prefix, describe_output, verify
from builder.verify_report import Policy

STEPS = 4


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    """Exports of tiny qwen3 (fp32, fp16, int4) and llama (int4), plus a second-seed qwen3 as a wrong reference."""
    root = tmp_path_factory.mktemp("verify")
    qwen3, llama = tiny_checkpoint("qwen3"), tiny_checkpoint("llama")
    out = {"qwen3": qwen3, "llama": llama, "qwen3_other_seed": tiny_checkpoint("qwen3", seed=1)}
    for name, ckpt, precision in (("fp32", qwen3, "fp32"), ("fp16", qwen3, "fp16"), ("int4", llama, "int4")):
        out[name] = export(str(ckpt), root / name, precision, "cpu")
    return out


def figure(text: str, label: str) -> str:
    match = re.search(rf"^{label}:\s+(\S+)", text, re.M)
    assert match, f"no '{label}' line in:\n{text}"
    return match.group(1)


def test_correct_fp32_export_passes_and_prints_the_figures(exports, capsys, tmp_path):
    report_path = tmp_path / "parity.json"
    code, out, err = run_cli(capsys, "verify", str(exports["fp32"]), "--reference", str(exports["qwen3"]),
                             "--steps", str(STEPS), "--json", str(report_path))
    assert code == 0, err
    assert float(figure(out, "max-abs logit error")) < 1e-4
    assert figure(out, "top-1 agreement") == "100.0%"
    prompts = len(re.findall(r"^  prompt \d+ ", out, re.M))
    assert prompts == 4  # the default text prompts, tokenized with the export's tokenizer
    assert f"onnxruntime {prompts * STEPS}/{prompts * STEPS}, onnxruntime-genai {prompts * STEPS}/{prompts * STEPS}" \
        in out
    assert "PASS (fp32: max-abs <= 0.001)" in out
    data = json.loads(report_path.read_text())
    assert data["passed"] and data["failures"] == []
    assert data["max_abs_error"] == max(data["prompt_max_abs_error"], data["decode_max_abs_error"]) < 1e-4
    # every prompt position and every decode step was compared
    assert all(p["positions"] == len(p["ids"]) + STEPS for p in data["prompts"])
    assert data["greedy_onnxruntime_genai"] == {"matched": prompts * STEPS, "total": prompts * STEPS}


def test_reference_defaults_to_the_source_recorded_by_the_export(exports, capsys):
    manifest = json.loads((exports["fp32"] / "ortbuild.json").read_text())
    assert manifest["source"] == str(exports["qwen3"].resolve()) and manifest["precision"] == "fp32"
    code, out, err = run_cli(capsys, "verify", str(exports["fp32"]), "--prompt-ids", "5,17,99,3", "--steps", "2",
                             "--no-genai")
    assert code == 0, err
    assert f"against {exports['qwen3'].resolve()}" in out
    assert "onnxruntime-genai skipped" in out


def test_wrong_reference_fails_with_exit_6_and_says_by_how_much(exports, capsys, tmp_path):
    report_path = tmp_path / "parity.json"
    code, out, err = run_cli(capsys, "verify", str(exports["fp32"]), "--reference",
                             str(exports["qwen3_other_seed"]), "--steps", str(STEPS), "--json", str(report_path))
    assert code == 6
    data = json.loads(report_path.read_text())  # written even though verification failed
    assert not data["passed"] and data["max_abs_error"] > 0.5
    excess = data["max_abs_error"] - 1e-3
    assert "verification failed" in err
    assert f"max-abs logit error {data['max_abs_error']:.3g} exceeds the fp32 tolerance 0.001 by {excess:.3g}" in err
    assert "FAIL" in out


def test_tolerance_flag_overrides_the_default(exports, capsys):
    args = ["verify", str(exports["fp32"]), "--reference", str(exports["qwen3_other_seed"]), "--prompt-ids", "1 2 3",
            "--steps", "1", "--no-genai"]
    assert run_cli(capsys, *args, "--tolerance", "100")[0] == 0
    assert run_cli(capsys, *args, "--tolerance", "1e-9")[0] == 6


def test_fp16_export_is_judged_by_the_looser_fp16_tolerance(exports):
    report = verify(exports["fp16"], str(exports["qwen3"]), steps=STEPS, use_genai=False)
    assert report.precision == "fp16"
    # too large for fp32's tolerance, within fp16's: the default must depend on the precision
    assert 1e-3 < report.max_abs_error < report.policy.tolerance == 0.1
    assert report.passed


def test_int4_export_is_judged_by_top1_agreement(exports):
    good = verify(exports["int4"], str(exports["llama"]), steps=STEPS, use_genai=False)
    assert good.policy.tolerance is None and good.policy.min_top1 == 0.5
    assert good.max_abs_error > 0.1  # quantization moves logits by O(1): a max-abs gate would reject it
    assert good.top1_agreement >= 0.5 and good.passed
    wrong = verify(exports["int4"], str(exports["qwen3"]), steps=STEPS, use_genai=False)
    assert wrong.top1_agreement < 0.1
    assert wrong.failures() and "top-1 agreement" in wrong.failures()[0] and "below the int4 minimum" in \
        wrong.failures()[0]


def test_precision_is_read_from_the_graph_when_the_manifest_is_missing(exports, capsys, tmp_path):
    copy = tmp_path / "int4-no-manifest"
    shutil.copytree(exports["int4"], copy)
    (copy / "ortbuild.json").unlink()
    assert describe_output(copy)["precision"] == "int4"
    fp16 = tmp_path / "fp16-no-manifest"
    shutil.copytree(exports["fp16"], fp16)
    (fp16 / "ortbuild.json").unlink()
    assert describe_output(fp16)["precision"] == "fp16"
    code, _, err = run_cli(capsys, "verify", str(copy))
    assert code == 2 and "--reference" in err


def test_not_an_export_folder_is_an_output_error(tmp_path, capsys):
    with pytest.raises(OutputError, match="not an exported model folder"):
        describe_output(tmp_path)
    code, _, err = run_cli(capsys, "verify", str(tmp_path), "--reference", str(tmp_path))
    assert code == OutputError.exit_code and "genai_config.json" in err


def test_prompt_ids_outside_the_vocabulary_are_rejected(exports, capsys):
    code, _, err = run_cli(capsys, "verify", str(exports["fp32"]), "--prompt-ids", "1,2,100000")
    assert code == 2 and "outside the vocabulary" in err and "100000" in err
    code, _, err = run_cli(capsys, "verify", str(exports["fp32"]), "--prompt-ids", "1,x")
    assert code == 2 and "--prompt-ids" in err


def test_zero_steps_compares_the_prompt_only(exports):
    report = verify(exports["fp32"], str(exports["qwen3"]), prompt_ids=[[5, 17, 99]], steps=0)
    (p,) = report.prompts
    assert p.positions == 3 and p.reference_tokens == [] and p.decode_error == 0.0
    assert report.passed and report.max_abs_error < 1e-4


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(UsageError, match=r"pip install 'ortbuild\[verify\]'"):
        _reference_stack()


def test_policy_defaults_and_overrides():
    assert Policy.for_precision("fp32") == Policy("fp32", 1e-3, None)
    assert Policy.for_precision("int8").min_top1 == 0.85 and Policy.for_precision("int8").tolerance is None
    assert Policy.for_precision("fp32", tolerance=0.5, min_top1=0.9) == Policy("fp32", 0.5, 0.9)
    assert Policy.for_precision("int4", min_top1=-1) == Policy("int4", None, None)  # negative: report only
    with pytest.raises(UsageError, match="fp8"):
        Policy.for_precision("fp8")


def test_greedy_prefix_counting():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([], [1]) == 0
    # genai stops at an end-of-sequence token the reference also chose: agreement to the end
    assert _genai_prefix([7, 2], [7, 2, 5, 5], eos={2}) == 4
    assert _genai_prefix([7, 3], [7, 2, 5, 5], eos={2}) == 1
    assert _genai_prefix([7, 2, 5], [7, 2, 5], eos=set()) == 3


def test_bfloat16_outputs_are_read_through_their_bytes():
    values = np.array([[1.5, -2.25, 3.0e5], [0.0, 1e-3, -7.0]], np.float32)
    as_bf16 = values.astype(ml_dtypes.bfloat16)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(values.shape), onnx.TensorProto.BFLOAT16)
    ctypes.memmove(value.data_ptr(), as_bf16.tobytes(), as_bf16.nbytes)
    np.testing.assert_array_equal(_as_float32(value), as_bf16.astype(np.float32))
    halves = np.array([[1.5, -2.25, 6.0e4]], np.float16)
    np.testing.assert_array_equal(_as_float32(ort.OrtValue.ortvalue_from_numpy(halves)), halves.astype(np.float32))


@pytest.mark.parametrize("arch, kwargs", [("gpt_oss", {"mxfp4": True}), ("qwen3_moe", {}), ("gemma3_vlm", {})])
def test_the_zoo_families_verify_including_mxfp4_and_multimodal_references(tiny_checkpoint, tmp_path, arch, kwargs):
    """The reference loader copes with what examples/zoo.yaml ships: MXFP4 experts (dequantized by transformers),
    MoE, and a multimodal checkpoint whose text decoder is the export."""
    checkpoint = tiny_checkpoint(arch, **kwargs)
    out = export(str(checkpoint), tmp_path / arch, "fp32", "cpu")
    report = verify(out, steps=STEPS)
    assert report.passed and report.max_abs_error < 1e-4 and report.top1_agreement == 1.0
    assert report.greedy("onnxruntime-genai") == report.greedy("onnxruntime") == (4 * STEPS, 4 * STEPS)

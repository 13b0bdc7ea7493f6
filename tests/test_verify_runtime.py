"""`ortbuild verify` and the runtime installed here: a CUDA export on a machine without the CUDA provider is "cannot
run here" (exit 7, saying what needs CUDA and where to run it), not a traceback (exit 1) nor a failed verification
(exit 6); the CUDA provider is used when onnxruntime offers it; a missing onnxruntime names the extra to install.

This machine has no GPU: the CUDA provider's presence is simulated by wrapping onnxruntime (a CPU session that
reports the providers it was asked for), which proves the choice of providers, not CUDA numerics (those are
checked by scripts/gpu_check.py on a GPU).
"""

from __future__ import annotations

import json
import sys

import onnxruntime as ort
import pytest

from builder import runtime
from builder.cli import main
from builder.errors import RuntimeUnavailableError
from builder.export import export
from builder.runtime import CPU_EP, CUDA_EP, Runtime, cuda_only_features
from builder.verify import verify

IDS = ["--prompt-ids", "5,17,99,3", "--steps", "1", "--no-genai"]
REAL_SESSION = ort.InferenceSession


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def cuda_exports(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-exports")
    qwen3, moe = tiny_checkpoint("qwen3"), tiny_checkpoint("qwen3_moe", moe_intermediate_size=64)  # CUDA QMoE: K % 64
    made = {}
    for name, ckpt, precision, extra in (
            ("int4", qwen3, "int4", []),  # q/k norm fused into GroupQueryAttention: the cuda default
            ("bf16", qwen3, "bf16", ["fuse_qk_norm_gqa=false"]),
            ("fp16_unfused", qwen3, "fp16", ["fuse_qk_norm_gqa=false"]),
            ("moe_prepacked", moe, "int4", ["fuse_qk_norm_gqa=false"]),
            ("moe_raw", moe, "int4", ["fuse_qk_norm_gqa=false", "qmoe_weights_prepacked=0", "lm_head_prepacked=false"])):
        made[name] = export(str(ckpt), root / name, precision, "cuda", extra)
    return made


def test_cuda_export_without_cuda_provider_is_cannot_run_here_not_a_traceback(cuda_exports, capsys, tmp_path):
    assert CUDA_EP not in ort.get_available_providers()  # the premise: this machine's onnxruntime is CPU-only
    report = tmp_path / "parity.json"
    code, out, err = run_cli(capsys, "verify", str(cuda_exports["int4"]), "--json", str(report))
    assert code == RuntimeUnavailableError.exit_code == 7
    assert out == "" and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"ortbuild: cannot run here: {cuda_exports['int4']} was exported for CUDA (-e cuda) and "
                          "needs the CUDA execution provider for: GroupQueryAttention with fused q/k norm")
    assert "nothing was compared" in err and "pip install 'ortbuild[gpu]'" in err and "-e cpu" in err
    assert not report.exists()  # no figures: nothing ran


def test_bf16_cuda_export_is_cannot_run_here_not_verification_failed(cuda_exports, capsys):
    code, _, err = run_cli(capsys, "verify", str(cuda_exports["bf16"]), *IDS)
    assert code == 7, err
    assert "bfloat16 tensors" in err and "verification failed" not in err
    assert "GroupQueryAttention" not in err  # exported unfused: only what is really there is named


def test_prepacked_qmoe_needs_cuda_and_raw_qmoe_runs_on_cpu_with_a_note(cuda_exports, capsys):
    code, _, err = run_cli(capsys, "verify", str(cuda_exports["moe_prepacked"]), *IDS)
    assert code == 7 and "QMoE experts in the CUDA prepacked (SM80 CUTLASS) layout" in err
    # its untied 4-bit lm_head is prepacked too (lm_head_prepacked's default on cuda)
    assert "MatMulNBits weights in the CUDA prepacked (fpA_intB) layout" in err
    # qmoe_weights_prepacked=0 ships raw experts, which the CPU kernel reads, and lm_head_prepacked=false a plain head:
    # that export verifies here.
    code, out, err = run_cli(capsys, "verify", str(cuda_exports["moe_raw"]), *IDS, "--min-top1", "-1")
    assert code == 0, err
    assert f"(int4, cuda; run on cpu with {runtime.installed_runtime().describe()})" in out
    assert "has no CUDA provider, so it ran on the CPU provider (it uses no CUDA-only feature)" in out


def test_cuda_only_features_are_read_from_the_graph(cuda_exports, tiny_checkpoint, tmp_path):
    assert cuda_only_features(cuda_exports["fp16_unfused"] / "model.onnx", "cuda") == []
    assert len(cuda_only_features(cuda_exports["bf16"] / "model.onnx", "cuda")) == 1
    # a cpu export of the same MoE has QMoE too, but in the layout the CPU kernel reads
    cpu_moe = export(str(tiny_checkpoint("qwen3_moe")), tmp_path / "cpu-moe", "int4", "cpu")
    assert cuda_only_features(cpu_moe / "model.onnx", "cpu") == []


class FakeCudaSession:
    """A CPU InferenceSession that reports the CUDA provider as active when `starts` (as onnxruntime-gpu would)."""

    asked: list = []

    def __init__(self, path, options=None, providers=None, starts=True):
        FakeCudaSession.asked.append(list(providers))
        self._session = REAL_SESSION(path, options, providers=[CPU_EP])
        self._providers = list(providers) if starts else [CPU_EP]

    def get_providers(self):
        return self._providers

    def __getattr__(self, name):
        return getattr(self._session, name)


def _pretend_cuda(monkeypatch, starts: bool):
    FakeCudaSession.asked = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda path, options=None, providers=None: FakeCudaSession(path, options, providers, starts))


def test_cuda_provider_is_used_when_onnxruntime_has_it(cuda_exports, monkeypatch):
    _pretend_cuda(monkeypatch, starts=True)
    report = verify(cuda_exports["fp16_unfused"], prompt_ids=[[5, 17, 99]], steps=1, use_genai=False)
    assert FakeCudaSession.asked == [[CUDA_EP, CPU_EP]]
    assert report.provider == "cuda" and report.notes == []
    assert report.runtime.endswith("(CUDA, CPU)") and report.to_json()["runtime"] == report.runtime
    assert report.passed


def test_cuda_provider_that_does_not_start_is_reported(cuda_exports, monkeypatch, capsys):
    """onnxruntime-gpu on a machine without a GPU lists the CUDA provider and silently falls back to CPU."""
    _pretend_cuda(monkeypatch, starts=False)
    code, _, err = run_cli(capsys, "verify", str(cuda_exports["int4"]), *IDS)
    assert code == 7 and "lists it but it did not start" in err
    report = verify(cuda_exports["fp16_unfused"], prompt_ids=[[5, 17, 99]], steps=1, use_genai=False)
    assert report.provider == "cpu" and "could not start the CUDA provider" in report.notes[0]


def test_missing_onnxruntime_names_both_extras(cuda_exports, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    code, out, err = run_cli(capsys, "verify", str(cuda_exports["fp16_unfused"]), *IDS)
    assert code == 7 and out == ""
    assert "`ortbuild verify` needs ONNX Runtime, which is not installed (exporting does not)" in err
    assert "pip install 'ortbuild[cpu]'" in err and "pip install 'ortbuild[gpu]'" in err


def test_two_runtime_packages_sharing_one_folder_are_pointed_out(monkeypatch):
    versions = {"onnxruntime": ort.__version__, "onnxruntime-gpu": "1.31.1"}

    def version(name):
        if name not in versions:
            raise runtime.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(runtime.metadata, "version", version)
    found = runtime.installed_runtime()
    assert found.package == "onnxruntime" and found.also_installed == ("onnxruntime-gpu",)
    assert "the last one installed wins" in found.conflict_note()
    assert Runtime("onnxruntime-gpu", "1.31.1", (CUDA_EP, CPU_EP)).describe() == "onnxruntime-gpu 1.31.1 (CUDA, CPU)"


def test_the_exit_code_is_documented_everywhere():
    from pathlib import Path

    from builder.cli import EXIT_CODES_HELP
    from builder.errors import EXIT_CODES

    assert EXIT_CODES["cannot run here"] == 7
    assert "7 cannot run here" in EXIT_CODES_HELP
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "7 cannot run here" in readme
    assert json.dumps(EXIT_CODES)  # plain data, for scripts


def test_batch_records_a_cuda_export_it_cannot_verify_here_as_unavailable(tiny_checkpoint, tmp_path, capsys):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(f"recipes:\n  int4-cuda: {{precision: int4, ep: cuda, verify: true}}\n"
                   f"models:\n  - model: {tiny_checkpoint('qwen3')}\n    name: qwen3\n")
    code, _, err = run_cli(capsys, "batch", str(zoo), "--out-root", str(tmp_path / "out"))
    assert code == 7, err
    assert f"[batch] verifying with {runtime.installed_runtime().describe()}: cpu exports; cuda exports only where" \
        in err
    result = json.loads((tmp_path / "out" / "summary.json").read_text())["exports"][0]
    assert result["status"] == "exported" and result["verify"] == "unavailable"
    assert result["error"].startswith("ortbuild: cannot run here: ") and "GroupQueryAttention" in result["error"]
    assert "1 of 1 exports could not be verified here (qwen3-int4-cuda)" in err


def test_batch_verify_without_onnxruntime_fails_before_any_export(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(f"recipes:\n  fp32: {{precision: fp32}}\nmodels:\n  - model: {tiny_checkpoint('qwen3')}\n")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = run_cli(capsys, "batch", str(zoo), "--out-root", str(tmp_path / "out"), "--verify")
    assert code == 7 and "`ortbuild batch --verify` needs ONNX Runtime" in err and "'ortbuild[cpu]'" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ quiet, clean output


def _run(args: list[str], **kwargs):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_verify_q_prints_the_verdict_only_and_nothing_on_stderr(tiny_checkpoint, tmp_path):
    """No transformers deprecation warnings, no progress bars: stderr stays empty on a passing run."""
    out = export(str(tiny_checkpoint("qwen3")), tmp_path / "fp32", "fp32", "cpu")
    done = _run(["-m", "builder", "verify", str(out), "-q", "--steps", "2"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "PASS (fp32: max-abs <= 0.001)\n"
    assert done.stderr == ""


def test_generate_script_errors_are_one_line_with_ortbuilds_codes(cuda_exports, tmp_path):
    from pathlib import Path

    script = str(Path(__file__).resolve().parent.parent / "scripts" / "generate.py")
    missing = _run([script, str(tmp_path / "nowhere")])
    assert missing.returncode == 5 and "Traceback" not in missing.stderr
    assert missing.stderr == f"generate.py: {tmp_path / 'nowhere'} does not exist: pass the -o folder of an " \
                             "`ortbuild` export.\n"
    cuda = _run([script, str(cuda_exports["int4"])])
    assert cuda.returncode == 7 and "Traceback" not in cuda.stderr and len(cuda.stderr.splitlines()) == 1
    assert "was exported for CUDA (-e cuda)" in cuda.stderr and "pip install 'ortbuild[gpu]'" in cuda.stderr

"""The command line as a new user meets it: where a model comes from (and why it could not be fetched), one set of
options for export/inspect, extra options as people type them, notes for options that change nothing, the closing
summary of what was written, and `--version`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import builder
from builder.cli import cli, main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-qwen3"  # 2 layers: int8_mixed_layers covers every layer


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def run_module(*args, cwd=None, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env,
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=120)


# ------------------------------------------------------------------------------------------ where the model is


def test_a_missing_folder_with_an_existing_parent_is_no_such_folder_and_names_the_real_hub_cause(tmp_path):
    """HF_HUB_OFFLINE unset and the Hub unreachable: the message names the network, not HF_HUB_OFFLINE."""
    (tmp_path / "examples").mkdir()
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    os.environ.pop("HF_HUB_OFFLINE", None)
    done = run_module("-m", "examples/no-such-model", "-o", str(tmp_path / "out"), "-q", cwd=tmp_path, **env)
    assert done.returncode == 4
    assert done.stderr.startswith("ortbuild: bad checkpoint: -m examples/no-such-model: no such folder (there is a "
                                  "folder examples, but it holds no no-such-model), and as a Hub id: cannot reach "
                                  "the Hugging Face Hub (")
    assert "HF_HUB_OFFLINE" not in done.stderr and "Traceback" not in done.stderr
    verbose = run_module("-m", "examples/no-such-model", "-o", str(tmp_path / "out"), "-v", cwd=tmp_path, **env)
    assert "Traceback" in verbose.stderr and "LocalEntryNotFoundError" in verbose.stderr  # the Hub's own error


@pytest.mark.parametrize("value", ["./no/such", "/no/such/folder", "a/b/c", "~/no-such-ortbuild-folder"])
def test_a_value_that_can_only_be_a_path_is_no_such_folder(value, tmp_path, capsys):
    code, _, err = run_cli(capsys, "-m", value, "-o", str(tmp_path / "out"))
    assert code == 4 and f"-m {value}: no such folder (" in err and "Hub" not in err.split("Check")[0]


def _hub_error(kind: str):
    from huggingface_hub import errors

    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub < 2
        import httpx
    response = httpx.Response({"gated": 401, "missing": 404, "server": 503}[kind],
                              request=httpx.Request("GET", "https://huggingface.co/api/models/org/model"))
    cls = {"gated": errors.GatedRepoError, "missing": errors.RepositoryNotFoundError,
           "server": errors.HfHubHTTPError}[kind]
    return cls(f"{kind} for url", response=response)


@pytest.mark.parametrize("kind, says", [
    ("gated", "the model is gated on the Hugging Face Hub. Accept its terms at https://huggingface.co/org/model"),
    ("missing", "no such model on the Hugging Face Hub (or it is private: log in"),
    ("server", "the Hugging Face Hub answered 503: server for url."),
])
def test_hub_failures_name_their_cause(kind, says, monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise _hub_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    code, _, err = run_cli(capsys, "-m", "org/model", "-o", str(tmp_path / "out"), "-q")
    assert code == 4 and err.startswith(f"ortbuild: bad checkpoint: org/model: {says}"), err
    code, _, err = run_cli(capsys, "-m", "org/model", "-o", str(tmp_path / "out"), "-v")
    assert "The above exception was the direct cause" in err and f"{kind} for url" in err


# ------------------------------------------------------------------------------------------ one set of options


def _options(command) -> dict:
    return {tuple(sorted(p.opts)): (p.default, p.multiple) for p in command.params}


def test_inspect_takes_exports_options_with_the_same_defaults():
    export_only = {("--output", "-o"), ("--overwrite",), ("--dry-run",)}
    exported = {k: v for k, v in _options(cli.commands["export"]).items() if k not in export_only}
    assert _options(cli.commands["inspect"]) == exported
    assert exported[("--precision", "-p")][0] == "fp32"


def test_inspect_equals_dry_run_and_q_drops_the_notes(capsys, tmp_path):
    extra = ["--extra_options", "int4_algo_config=k_quant_mixed"]
    code, inspected, _ = run_cli(capsys, "inspect", "-i", str(TINY), "-p", "int4", *extra)
    assert code == 0
    code, dry, _ = run_cli(capsys, "-i", str(TINY), "-o", str(tmp_path / "o"), "-p", "int4", "--dry-run", *extra)
    assert code == 0 and dry == inspected and "note: int4_algo_config=k_quant_mixed is deprecated" in dry
    code, quiet, _ = run_cli(capsys, "inspect", "-i", str(TINY), "-p", "int4", "-q", *extra)
    assert code == 0 and quiet == "".join(line + "\n" for line in inspected.splitlines() if
                                         not line.startswith("note:"))
    code, default, _ = run_cli(capsys, "inspect", "-m", str(TINY))
    assert "precision: fp32" in default


def test_version_is_the_package_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"ortbuild {builder.__version__}\n"


# ------------------------------------------------------------------------------------------ extra options


def test_comma_separated_pairs_are_accepted(capsys):
    code, out, err = run_cli(capsys, "inspect", "-i", str(TINY), "-p", "int4",
                             "--extra_options", "int4_algo_config=k_quant,int4_block_size=64")
    assert code == 0, err
    assert "quantization: int4 base k_quant block 64 asym" in out
    # commas inside a value (matmul_mixed_precision's list) stay in the value
    code, out, err = run_cli(capsys, "inspect", "-i", str(TINY), "-p", "int4", "--extra_options",
                             "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8,int4_block_size=64")
    assert code == 0, err
    assert "int8 for lm_head + layers 0,1 projections" in out and "block 64" in out


def test_pairs_glued_by_another_separator_say_how_to_separate_them(capsys):
    code, _, err = run_cli(capsys, "inspect", "-i", str(TINY), "--extra_options",
                           "int4_algo_config=k_quant;int4_block_size=64")
    assert code == 2
    assert err == ("ortbuild: usage error: extra option int4_algo_config='k_quant;int4_block_size=64': the value holds "
                   "another '='; separate key=value pairs with spaces or commas "
                   "(int4_algo_config=k_quant,int4_block_size=64).\n")


def test_int4_only_options_with_a_float_precision_are_noted(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", "-i", str(TINY), "-p", "fp32",
                           "--extra_options", "int4_block_size=64", "int4_is_symmetric=false", "qmoe_block_size=0")
    assert code == 0
    assert ("note: -p fp32 keeps every weight in float; ignoring int4_block_size=64, int4_is_symmetric=False, "
            "qmoe_block_size=0.") in out
    code, _, err = run_cli(capsys, "-i", str(TINY), "-o", str(tmp_path / "o"), "-p", "fp16",
                           "--extra_options", "int4_algo_config=rtn")
    assert code == 0 and "note: -p fp16 keeps every weight in float; ignoring int4_algo_config=rtn." in err


def _nbits_by_width(model_dir: Path) -> dict[int, int]:
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    counts: dict[int, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next(a.i for a in node.attribute if a.name == "bits")
            counts[bits] = counts.get(bits, 0) + 1
    return counts


def test_the_closing_line_says_what_was_written(capsys, tmp_path):
    """k_quant_mixed on a 2-layer model: every projection is in a mixed layer, so nothing is int4."""
    out = tmp_path / "mixed"
    code, _, err = run_cli(capsys, "-i", str(TINY), "-o", str(out), "-p", "int4",
                           "--extra_options", "int4_algo_config=k_quant_mixed")
    assert code == 0, err
    widths = _nbits_by_width(out)
    assert widths == {8: 9}  # 8 projections + the tied lm_head, all 8-bit
    last = err.splitlines()[-1]
    match = re.search(r"done: (.+): ([\d.]+) MiB in ([\d.]+) s, peak RSS (\d+) MiB; weights written: "
                      r"0 int4 \(0\.0 MiB\), (\d+) int8 \(([\d.]+) MiB\), (\d+) float tensors", last)
    assert match, last
    assert match.group(1) == str(out) and int(match.group(5)) == widths[8]
    size = sum(p.stat().st_size for p in out.iterdir())
    assert float(match.group(2)) == pytest.approx(size / 2**20, abs=0.051)
    assert 20 < int(match.group(4)) < 4096
    quoted = last[last.index("weights written: "):]
    assert f"`{quoted}`" in (REPO / "quantization.md").read_text()  # the docs quote this very run
    code, plan, _ = run_cli(capsys, "inspect", "-i", str(TINY), "-p", "int4",
                            "--extra_options", "int4_algo_config=k_quant_mixed")
    assert "weights by format: 0 int4, 9 int8, 1 float (of 10 in the plan below)" in plan

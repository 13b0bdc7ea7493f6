#!/usr/bin/env python3
"""Run the onnxruntime-dependent tests on both ends of the supported runtime range (called by .ci/run).

The ends: the oldest onnxruntime pyproject.toml's `cpu` extra allows (its `>=` pin) and the newest on the package
index. Each runs in its own virtual environment layered over the running one, a venv or not (a .pth file adds this
interpreter's site-packages after the venv's own: torch, transformers, onnxruntime-genai and ortbuild come from here,
and the venv's onnxruntime shadows the installed one). A version equal to the installed onnxruntime is skipped: the
main test run covers it. When the newest release lies above the pinned range
and passes, the pin can be widened; when it fails, the pin keeps users off it.

    python3 scripts/runtime_range.py            # floor and newest
    python3 scripts/runtime_range.py 1.30.0     # any versions
Exit 1 when a version's tests fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Test modules that run onnxruntime or onnxruntime-genai (tests/test_packaging.py checks this list is complete).
ORT_TESTS = ("test_batched_generation.py", "test_consumption.py", "test_decoder_families.py", "test_deepseek.py",
             "test_dense.py", "test_factory.py", "test_family_sweep.py", "test_fp8.py", "test_gemma.py",
             "test_gpt_oss.py", "test_gpu_scripts.py", "test_granite_olmo_nemotron_ernie.py", "test_graph_twin.py",
             "test_hybrid.py", "test_last_token_logits.py", "test_left_padding_option.py", "test_longrope.py",
             "test_moe_families.py", "test_plan_matches_model.py", "test_qmoe_cuda_routing.py",
             "test_quant_blockwise.py", "test_quant_moe.py", "test_recipes.py", "test_router_compute.py",
             "test_routing_families.py", "test_routing_graph.py", "test_routing_op.py", "test_runtime_requirements.py",
             "test_strip_padding.py", "test_verify.py", "test_verify_runtime.py")


def pinned_range() -> tuple[str, str | None]:
    """(floor, upper bound or None) of the `cpu` extra's onnxruntime requirement."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    spec = next(d for d in extras["cpu"] if re.match(r"onnxruntime\s*[<>=!~]", d))
    floor = re.search(r">=\s*([\w.]+)", spec).group(1)
    upper = re.search(r"<\s*([\w.]+)", spec)
    return floor, upper.group(1) if upper else None


def newest() -> str:
    listed = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "onnxruntime"], capture_output=True,
                            text=True, timeout=300)
    found = re.search(r"^onnxruntime \(([\w.]+)\)", listed.stdout, re.M)
    if not found:
        raise SystemExit(f"cannot list onnxruntime versions: {listed.stderr.strip()[-300:]}")
    return found.group(1)


def installed() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def run_tests(version: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        parents = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
        # addsitedir also runs the parent's .pth files (editable installs)
        (Path(own) / "_runtime_range_parent.pth").write_text(
            "".join(f"import site; site.addsitedir({path!r})\n" for path in parents))
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--ignore-installed", f"onnxruntime=={version}"], check=True)
        got = subprocess.run([python, "-c", "import onnxruntime; print(onnxruntime.__version__)"], capture_output=True,
                             text=True, cwd=tmp).stdout.strip()
        if got != version:
            print(f"runtime_range: the venv imports onnxruntime {got}, not {version}", file=sys.stderr)
            return 1
        tests = [str(ROOT / "tests" / name) for name in ORT_TESTS]
        return subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT).returncode


def main() -> int:
    floor, upper = pinned_range()
    versions = sys.argv[1:] or list(dict.fromkeys([floor, newest()]))
    current, failed = installed(), []
    for version in versions:
        if version == current:
            print(f"runtime_range: onnxruntime {version} is the installed one; the main test run covers it")
            continue
        print(f"runtime_range: onnxruntime {version} ...", flush=True)
        if run_tests(version):
            failed.append(version)
    top = versions[-1]
    if upper and tuple(map(int, re.findall(r"\d+", top)[:2])) >= tuple(map(int, re.findall(r"\d+", upper)[:2])):
        print(f"runtime_range: the newest onnxruntime {top} is above the pinned range (<{upper}): "
              f"{'it fails, keep the pin' if top in failed else 'it passes, widen the pin in pyproject.toml'}")
    if failed:
        print(f"runtime_range: tests failed on onnxruntime {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"runtime_range: passed on onnxruntime {', '.join(versions)} (pinned: >={floor}"
          f"{f',<{upper}' if upper else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

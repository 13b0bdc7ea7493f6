"""The package as users get it: a clean build (SPDX license, no warnings, one version), onnxruntime only as an extra,
and a built wheel that installs into a fresh virtual environment (no source tree, no system packages: its
dependencies come from the package index) and exports the bundled model there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import builder

REPO = Path(__file__).resolve().parent.parent
PACKAGED = ("builder", "builders", "pyproject.toml", "README.md")


def clean_env(**extra) -> dict:
    """This environment without the source tree on the path (and with byte-compiling allowed, whose absence makes
    setuptools warn)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")}
    return {**env, **extra}


def test_the_runtime_is_an_extra_and_the_version_has_one_home():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(re.match(r"onnxruntime", d) for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert [d for d in extras["cpu"] if d.startswith("onnxruntime>")] == ["onnxruntime>=1.31.1,<1.33"]
    assert [d for d in extras["gpu"] if d.startswith("onnxruntime-gpu>")] == ["onnxruntime-gpu>=1.31.1,<1.33"]
    assert not any("onnxruntime" in d and "gpu" not in d and "cuda" not in d for d in extras["gpu"])  # no CPU wheel
    assert "ortbuild[verify,cpu]" in extras["test"]
    assert project["dynamic"] == ["version"] and "version" not in project
    assert project["license"] == "MIT"


def test_exporting_never_imports_onnxruntime_or_torch():
    code = ("import sys; sys.modules['onnxruntime'] = sys.modules['torch'] = None; "
            "from builder.cli import main; main(sys.argv[1:])")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"ortbuild-no-ort-{os.getpid()}"
    try:
        done = subprocess.run([sys.executable, "-c", code, "-m", str(REPO / "examples" / "tiny-qwen3"), "-o",
                               str(out), "-p", "int4", "-q", "--overwrite"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_the_built_wheel_installs_in_a_fresh_venv_and_exports_the_bundled_model(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in PACKAGED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, env=clean_env(), timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    warnings = [line for line in (built.stdout + built.stderr).splitlines() if re.search(r"warn", line, re.I)]
    assert warnings == []
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"ortbuild-{builder.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"ortbuild-{builder.__version__}.dist-info/METADATA").decode()
        names = archive.namelist()
    assert "License-Expression: MIT" in metadata and f"Version: {builder.__version__}" in metadata
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "examples/"))]
    runtime = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: onnxruntime")]
    assert runtime and all("; extra ==" in line for line in runtime)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env(), timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                         capture_output=True, text=True, env=clean_env(), timeout=900)
    assert pip.returncode == 0, pip.stderr
    work = tmp_path / "work"  # outside the source tree
    shutil.copytree(REPO / "examples" / "tiny-qwen3", work / "tiny-qwen3")
    ortbuild = str(venv / "bin" / "ortbuild")

    def run(*args):
        return subprocess.run(args, cwd=work, capture_output=True, text=True, env=clean_env(), timeout=300)

    where = run(str(venv / "bin" / "python"), "-c", "import builder, importlib.util as u; print(builder.__file__); "
                "print(u.find_spec('onnxruntime'), u.find_spec('torch'))")
    assert where.stdout.splitlines() == [str(next((venv / "lib").glob("python3*/site-packages/builder/__init__.py"))),
                                         "None None"]
    assert run(ortbuild, "--version").stdout == f"ortbuild {builder.__version__}\n"
    exported = run(ortbuild, "-m", "tiny-qwen3", "-o", "out", "-p", "int4")
    assert exported.returncode == 0, exported.stderr
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "ortbuild.json"} <= \
        {p.name for p in (work / "out").iterdir()}
    verify = run(ortbuild, "verify", "out")
    assert verify.returncode == 7
    assert "pip install 'ortbuild[cpu]'" in verify.stderr and "pip install 'ortbuild[gpu]'" in verify.stderr


def test_the_runtime_range_script_covers_every_test_module_that_runs_onnxruntime():
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtime_range", REPO / "scripts" / "runtime_range.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    uses_runtime = re.compile(r"^\s*(import (onnxruntime|parity)|from (onnxruntime|parity)\b)|"
                              r"importorskip\(\"onnxruntime", re.M)
    modules = {p.name for p in (REPO / "tests").glob("test_*.py") if uses_runtime.search(p.read_text())}
    assert modules == set(module.ORT_TESTS)
    assert module.pinned_range() == ("1.31.1", "1.33")
    assert "scripts/runtime_range.py" in (REPO / ".ci" / "run").read_text()

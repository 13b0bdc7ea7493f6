"""Every command in README.md and quantization.md runs as written.

The `ortbuild ...` (and `python3 scripts/...`) commands of every code block are extracted, in document order, and
run in one working folder that holds the repository's examples/ and a `checkpoint/` folder (the README's `-i
./checkpoint`). Hub ids resolve offline to tiny factory checkpoints laid out as a Hugging Face cache, so exports
named after real models run for real on tiny stand-ins; `ortbuild batch` runs with --dry-run (the zoo names big
models); quantization.md's `-m ...`/`-o ...` placeholders become a Hub id and a fresh folder. Install and pytest
commands are not run here (.ci/run runs them).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import factory
from builder.cli import main

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "quantization.md")
# Hub ids the docs name -> (factory architecture, overrides) of the tiny stand-in in the offline cache.
HUB_STAND_INS = {
    "Qwen/Qwen3-30B-A3B": ("qwen3_moe", {}),
    "Qwen/Qwen3-8B": ("qwen3", {}),
    "Qwen/Qwen3-0.6B": ("qwen3", {}),
    "google/gemma-3-1b-it": ("gemma3", {}),
    "openai/gpt-oss-20b": ("gpt_oss", {"intermediate_size": 64}),  # CUDA QMoE wants K % 64 == 0
}
PLACEHOLDER_MODEL = "Qwen/Qwen3-0.6B"
NOT_RUN = ("python3 -m pip", "python3 -m pytest")


def doc_commands() -> list[tuple[str, list[str]]]:
    """(document, argv) of every command in the docs' code blocks, `&&` chains split, `\\` continuations joined."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", (REPO / doc).read_text(), re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                while tokens:
                    cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                    command, tokens = tokens[:cut], tokens[cut + 1:]
                    text = " ".join(command)
                    if command and (command[0] == "ortbuild" or text.startswith("python3 scripts/")) or \
                            text.startswith(NOT_RUN):
                        found.append((doc, command))
    return found


def test_the_docs_name_the_commands_this_test_runs():
    commands = [" ".join(c) for _, c in doc_commands()]
    assert len(commands) >= 12
    assert any(c.startswith("ortbuild verify out/tiny-qwen3-fp32") for c in commands)  # the quick-start hint
    assert any("qmoe_weights_prepacked" in c for c in commands)  # the GPT-OSS example


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("docs")
    (root / "examples").symlink_to(REPO / "examples")
    shutil.copytree(tiny_checkpoint("llama"), root / "checkpoint")
    cache = root / "hf-cache"
    for repo_id, (arch, overrides) in HUB_STAND_INS.items():
        factory.make_hub_cache(tiny_checkpoint(arch, **overrides), cache, repo_id)
    return root, cache


def _prepared(argv: list[str], index: int) -> list[str]:
    argv = list(argv)
    for flag, value in (("-m", PLACEHOLDER_MODEL), ("-o", f"out/placeholder-{index}")):
        for i in range(len(argv) - 1):
            if argv[i] == flag and argv[i + 1] == "...":
                argv[i + 1] = value
    if argv[:2] == ["ortbuild", "batch"] and "--dry-run" not in argv:
        argv.append("--dry-run")
    return argv


def test_every_documented_command_runs(workdir, monkeypatch, capsys):
    from huggingface_hub import constants

    root, cache = workdir
    monkeypatch.chdir(root)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ran = []
    for index, (doc, command) in enumerate(doc_commands()):
        text = " ".join(command)
        if text.startswith(NOT_RUN):
            continue
        argv = _prepared(command, index)
        for flag, value in zip(argv, argv[1:]):
            if flag in ("-m", "--model", "--reference") and not Path(value).exists() and "-i" not in argv:
                assert value in HUB_STAND_INS, f"{doc}: `{text}` names Hub id {value}: add a tiny stand-in above"
        if argv[0] == "python3":
            done = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:]], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{doc}: `{text}` exited {done.returncode}:\n{done.stderr}"
        else:
            with pytest.raises(SystemExit) as exit_info:
                main(argv[1:])
            out, err = capsys.readouterr()
            assert exit_info.value.code == 0, f"{doc}: `{text}` exited {exit_info.value.code}:\n{err}"
            if argv[1] == "verify":
                assert out.splitlines()[-1].startswith("PASS"), out
        ran.append(text)
    assert len(ran) >= 10
    assert (root / "out" / "gpt-oss-int4" / "model.onnx").is_file()
    assert (root / "out" / "tiny-qwen3-fp32" / "ortbuild.json").is_file()


def _paragraph(text: str, start: str) -> str:
    at = text.index(start)
    return text[at:text.find("\n\n", at)]


def test_readme_lists_exactly_the_files_an_export_writes_and_every_exit_code(tmp_path):
    from builder.cli import EXIT_CODES_HELP
    from builder.errors import ERRORS, INTERRUPTED, TERMINATED
    from builder.export import export
    from builder.output import TOKENIZER_FILES

    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"`([\w.-]+\.\w+)`", _paragraph(readme, "The output folder holds")))
    written = {p.name for p in export(str(REPO / "examples" / "tiny-qwen3"), tmp_path / "o", "int4", "cpu").iterdir()}
    assert written <= named, f"written but not listed: {written - named}"
    assert named - written <= set(TOKENIZER_FILES), "listed files that no export writes"
    assert set(TOKENIZER_FILES) <= named
    codes = _paragraph(readme, "Exit codes:").replace("\n", " ")
    for text in (codes, EXIT_CODES_HELP):
        for cls in ERRORS:
            assert f"{cls.exit_code} {cls.kind}" in text
        assert f"{INTERRUPTED} interrupted" in text and f"{TERMINATED} terminated" in text and "1 some exports" in text

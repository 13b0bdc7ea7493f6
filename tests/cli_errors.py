"""Helpers of the bad-input tests (tests/test_errors.py, tests/test_errors_options_output.py): run the real CLI, check
the one-line message, the exit code per class and that nothing is left on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from builder.cli import main

USAGE, UNSUPPORTED, CHECKPOINT, OUTPUT = 2, 3, 4, 5
KINDS = {USAGE: "usage error", UNSUPPORTED: "unsupported model", CHECKPOINT: "bad checkpoint", OUTPUT: "I/O error"}
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------- helpers


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def leftovers(out: Path) -> list[str]:
    """Siblings an export may create next to `out` (temporary or previous-output folders)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_refused(capsys, args: list[str], code: int, *fragments: str, out: Path | None = None,
                   traceback_with_verbose: bool = True) -> str:
    """Run `args` plain and with --verbose; check exit code, the one-line message, tracebacks and leftovers."""
    existed = out is not None and out.exists()
    got, stdout, err = run_cli(capsys, args)
    assert got == code, f"exit {got}, wanted {code}; stderr:\n{err}"
    assert stdout == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    message = lines[0]
    assert message.startswith(f"ortbuild: {KINDS[code]}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"

    got, _, verbose_err = run_cli(capsys, [*args, "--verbose"])
    assert got == code
    if traceback_with_verbose:
        assert "Traceback (most recent call last)" in verbose_err
    assert verbose_err.splitlines()[-1] == message

    if out is not None:
        assert out.exists() == existed
        assert leftovers(out) == []
    return message


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A private, writable copy of a sharded tiny Qwen3 checkpoint (so each test may break it its own way)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen3", shards=2), folder)
    return folder


def export_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["-i", str(checkpoint), "-o", str(out), "-q", *extra]


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def shard_of(checkpoint: Path, tensor: str) -> str:
    return json.loads((checkpoint / INDEX).read_text())["weight_map"][tensor]

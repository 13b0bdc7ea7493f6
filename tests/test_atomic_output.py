"""Atomic output: a failed or interrupted export leaves nothing behind and never touches an existing good output.

Failures are injected at the moment they hurt most, while model.onnx.data is being written: a full disk (the
writer's file starts raising ENOSPC after some bytes), a checkpoint that shrinks under the export, a failed
final rename, and real SIGINT/SIGTERM sent to a `python -m builder`-equivalent subprocess (its weight writer is
paused from the test's own driver script once the first tensors are on disk; the product has no test hooks).
Each test compares the parent folder (hidden entries included) before and after, byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from builder.cli import main
from builder.graph import StreamedTensor

REPO = Path(__file__).resolve().parent.parent
CORE_FILES = {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"}


# ---------------------------------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (hidden ones too): relative path -> (kind, mode, sha256 of the content)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(folder))] = ("dir" if path.is_dir() else "file", st.st_mode, digest)
    return out


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


def partials(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if ".partial-" in p.name)


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3", shards=2)


@pytest.fixture
def good_output(checkpoint, tmp_path, capsys) -> Path:
    """A finished export in tmp_path/work/out: what a failed --overwrite run must leave byte-identical."""
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    code, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(out), "-q"])
    assert code == 0, err
    return out


def assert_one_line_error(err: str, prefix: str, *fragments: str) -> None:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


class FullDisk:
    """Wraps the external-data file: writes what still fits, then fails like write(2) on a full disk."""

    def __init__(self, file, state: dict):
        self._file, self._state = file, state

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        room = self._state["room"]
        if len(view) > room:
            self._file.write(view[:room])
            self._state["room"] = 0
            self._state["failed_writing"] = Path(self._file.name)
            self._state["partials_at_failure"] = partials(self._state["parent"])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._state["room"] = room - len(view)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)


def fill_disk_after(monkeypatch, parent: Path, room: int) -> dict:
    real = StreamedTensor.tofile
    state = {"room": room, "parent": parent}
    monkeypatch.setattr(StreamedTensor, "tofile", lambda self, file: real(self, FullDisk(file, state)))
    return state


# ---------------------------------------------------------------------------------------------------- success


def test_success_leaves_exactly_the_output_with_normal_permissions(checkpoint, tmp_path, capsys):
    parent = tmp_path / "work"
    parent.mkdir()
    (parent / "neighbour.txt").write_text("untouched")
    before = snapshot(parent)
    out = parent / "out"
    code, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(out), "-q"])
    assert code == 0 and err == ""
    after = snapshot(parent)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before
    # nothing hidden inside either: ir.save's own temporary data file was renamed or removed inside the folder
    names = set(os.listdir(out))
    assert CORE_FILES <= names and not [n for n in names if n.startswith(".")]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # like mkdir, not tempfile's private 0700


# ---------------------------------------------------------------------------------------------------- disk full


def test_too_little_free_space_is_refused_before_writing(checkpoint, tmp_path, capsys, monkeypatch):
    """The weights' size is known once the graph is built: an -o on a disk without that much room fails then, not
    after writing most of it (hours, for a large model). The size it names is what a real export writes."""
    import re

    import builder.output

    parent = tmp_path / "work"
    parent.mkdir()
    before = snapshot(parent)
    out = parent / "out"
    real = shutil.disk_usage
    monkeypatch.setattr(builder.output.shutil, "disk_usage", lambda path: real(path)._replace(free=3 * 2**20 // 100))
    code, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(out), "-q"])
    assert code == 5
    found = re.fullmatch(rf"ortbuild: I/O error: not enough disk space for {re.escape(str(out))}: the model's weights "
                         rf"take [0-9.]+ MiB \((\d+) bytes\) and {re.escape(str(parent.resolve()))} has 0\.0 MiB free\. "
                         r"Free space or choose another -o\.", err.strip())
    assert found, err
    assert snapshot(parent) == before  # nothing written, nothing left behind
    monkeypatch.undo()
    code, _ = run_cli(capsys, ["-i", str(checkpoint), "-o", str(out), "-q"])
    assert code == 0
    written = (out / "model.onnx.data").stat().st_size
    assert written <= int(found.group(1)) <= written + 64 * 1024  # the small initializers live in model.onnx


def test_disk_full_while_writing_weights(checkpoint, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "work"
    parent.mkdir()
    before = snapshot(parent)
    out = parent / "out"
    state = fill_disk_after(monkeypatch, parent, room=100_000)
    code, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(out), "-q"])
    assert code == 5
    assert_one_line_error(err, "ortbuild: I/O error: ", f"disk full while writing {out}", "Free space")
    # the failure really hit model.onnx.data mid-write, inside the atomic folder (ir.save's temp file included)
    failed = state["failed_writing"]
    assert failed.name == "model.onnx.data"
    assert state["partials_at_failure"] and state["partials_at_failure"][0] in failed.parents
    assert snapshot(parent) == before


def test_disk_full_keeps_the_previous_output(checkpoint, good_output, capsys, monkeypatch):
    parent = good_output.parent
    before = snapshot(parent)
    state = fill_disk_after(monkeypatch, parent, room=200_000)
    code, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(good_output), "-q", "--overwrite"])
    assert code == 5
    assert_one_line_error(err, "ortbuild: I/O error: ", "disk full")
    assert state["failed_writing"].name == "model.onnx.data"
    assert snapshot(parent) == before


def test_disk_full_after_the_model_while_writing_genai_config(checkpoint, good_output, capsys, monkeypatch):
    parent = good_output.parent
    before = snapshot(parent)
    real = Path.write_text
    hit = []

    def full(self, *args, **kwargs):
        if self.name == "genai_config.json":
            hit.append(sorted(os.listdir(self.parent)))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    code, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(good_output), "-q", "--overwrite"])
    assert code == 5
    assert_one_line_error(err, "ortbuild: I/O error: ", "disk full")
    assert hit and {"model.onnx", "model.onnx.data"} <= set(hit[0])  # the model was complete in the temp folder
    assert snapshot(parent) == before


# ---------------------------------------------------------------------------------------------------- other failures


def test_checkpoint_shrinking_mid_export_is_a_checkpoint_error(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A shard truncated after its header was read fails while writing weights; exit 4 names the file."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen3", shards=2), ckpt)
    parent = tmp_path / "work"
    parent.mkdir()
    before = snapshot(parent)
    real = StreamedTensor.tofile

    def shrink_then_write(self, file):
        for shard in ckpt.glob("*.safetensors"):
            with open(shard, "r+b") as f:
                f.truncate(200)
        return real(self, file)

    monkeypatch.setattr(StreamedTensor, "tofile", shrink_then_write)
    code, err = run_cli(capsys, ["-i", str(ckpt), "-o", str(parent / "out"), "-q"])
    assert code == 4
    assert_one_line_error(err, "ortbuild: bad checkpoint: ", ".safetensors: tensor ", "is truncated",
                          "Re-download")
    assert snapshot(parent) == before


def test_failed_final_rename_restores_the_previous_output(checkpoint, good_output, capsys, monkeypatch):
    parent = good_output.parent
    before = snapshot(parent)
    real = Path.rename
    attempts = []

    def rename(self, target):
        if ".partial-" in self.name:
            attempts.append((self.name, Path(target).name))
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    code, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(good_output), "-q", "--overwrite"])
    assert code == 5
    assert_one_line_error(err, "ortbuild: I/O error: ", f"cannot write {good_output}: Input/output error")
    assert attempts and attempts[0][1] == "out"  # the swap was reached: the old output had been moved aside
    assert snapshot(parent) == before


def test_successful_overwrite_replaces_the_output_whole(checkpoint, good_output, capsys):
    (good_output / "stale.txt").write_text("from an older export")
    code, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(good_output), "-q", "--overwrite",
                                 "--extra_options", "filename=decoder.onnx"])
    assert code == 0, err
    names = set(os.listdir(good_output))
    assert {"decoder.onnx", "decoder.onnx.data", "genai_config.json"} <= names
    assert not names & {"stale.txt", "model.onnx", "model.onnx.data"}
    assert sorted(os.listdir(good_output.parent)) == ["out"]


# ---------------------------------------------------------------------------------------------------- signals

# Runs the real CLI entry point; only the weight writer is slowed: after the third tensor is on disk it records
# where it is writing (argv[1]) and sleeps until a signal arrives.
DRIVER = textwrap.dedent('''
    import signal, sys, time
    from pathlib import Path

    # A terminal delivers Ctrl-C; pytest may run us from a shell that ignores SIGINT, so restore Python's default.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from builder.graph import StreamedTensor
    from builder.cli import main

    marker, args = Path(sys.argv[1]), sys.argv[2:]
    real, count = StreamedTensor.tofile, [0]

    def paused(self, file):
        real(self, file)
        count[0] += 1
        if count[0] == 3:
            file.flush()
            marker.write_text(file.name)
            time.sleep(120)

    StreamedTensor.tofile = paused
    main(args)
''')


def run_until_paused(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        if proc.poll() is not None:
            raise AssertionError(f"export ended before it paused (exit {proc.returncode}):\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("export did not reach the weight writer in 120 s")
        time.sleep(0.05)
    return proc, Path(marker.read_text())


@pytest.mark.parametrize("sig, code, says", [(signal.SIGINT, 130, "ortbuild: interrupted; unfinished output was removed (finished outputs are kept)."),
                                             (signal.SIGTERM, 143,
                                              "ortbuild: terminated (SIGTERM); unfinished output was removed (finished outputs are kept).")])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_signal_while_writing_weights_leaves_nothing(checkpoint, tmp_path, capsys, sig, code, says, existing):
    parent = tmp_path / "work"
    parent.mkdir()
    out = parent / "out"
    args = ["-i", str(checkpoint), "-o", str(out), "-q"]
    if existing:
        code0, err0 = run_cli(capsys, args)
        assert code0 == 0, err0
        args.append("--overwrite")
    before = snapshot(parent)

    proc, writing = run_until_paused(tmp_path, args)
    try:
        # paused mid-model.onnx.data, inside the sibling temporary folder (ir.save's own temp file included)
        partial = partials(parent)
        assert len(partial) == 1 and partial[0] in writing.parents and writing.name == "model.onnx.data"
        assert writing.stat().st_size > 0
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == says
    assert snapshot(parent) == before

"""Bad input through the real CLI, continued (tests/test_errors.py has the checkpoint defects): option and output-folder
errors, each with a one-line message, its exit code, and nothing left on disk."""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.checkpoint import read_header
from builder.errors import CheckpointError
from cli_errors import (OUTPUT, USAGE, assert_refused, checkpoint, export_args, leftovers,  # noqa: F401
                        run_cli)  # (checkpoint: a fixture)


# ---------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("extra, says", [
    ("int4_block_size=48", "extra option int4_block_size='48' is not allowed; choose one of: 16, 32, 64, 128, 256."),
    ("int4_block_size=big", "extra option int4_block_size='big': expected an integer."),
    ("int4_is_symmetric=maybe", "extra option int4_is_symmetric='maybe': expected true/false (or 1/0)."),
    ("int4_algo_config=gptq", "choose one of: default, rtn, k_quant"),
    ("qmoe_block_size=48", "extra option qmoe_block_size='48': use one of 16, 32, 64, 128, 256"),
    ("matmul_mixed_precision=lm_head:int8", "matmul_mixed_precision"),
    ("int4_blok_size=32", "unknown extra option 'int4_blok_size'. Did you mean 'int4_block_size'?"),
    ("fuse_qk_norm_gqa=true", "fuse_qk_norm_gqa=true needs -e cuda"),
    ("filename=../escaped.onnx", "extra option filename='../escaped.onnx': give a plain file name"),
    ("filename=genai_config.json", "genai_config.json is one of the files ortbuild writes beside the model"),
])
def test_invalid_extra_option(checkpoint, tmp_path, capsys, extra, says):
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out, "-p", "int4", "--extra_options", extra), USAGE, says,
                   out=out)


def test_extra_option_given_twice(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out, "--extra_options", "int4_block_size=32",
                                       "int4_block_size=64"),
                   USAGE, "extra option 'int4_block_size' is given twice", out=out)


def test_extra_options_flag_without_pairs(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out, "--extra_options", "int4_block_size"), USAGE,
                   "--extra_options needs at least one key=value", out=out)


def test_usage_errors_win_over_checkpoint_errors(tmp_path, capsys):
    """Options are validated before the checkpoint is opened: a typo costs no download and reports code 2."""
    out = tmp_path / "out"
    assert_refused(capsys, export_args(tmp_path / "nowhere", out, "--extra_options", "int4_blok_size=32"), USAGE,
                   "Did you mean 'int4_block_size'?", out=out)


def test_bf16_on_cpu_is_a_usage_error(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out, "-p", "bf16"), USAGE, "-p bf16 needs -e cuda", out=out)


def test_click_rejects_unknown_precision_with_usage_code(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, export_args(checkpoint, out, "-p", "int3"))
    assert code == USAGE
    assert "Invalid value for '-p'" in err and "'int3' is not one of" in err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(out) == []


def test_missing_output_flag(checkpoint, capsys):
    assert_refused(capsys, ["-i", str(checkpoint), "-q"], USAGE, "missing -o/--output")


def test_flags_without_model_are_a_usage_error_not_help(tmp_path, capsys):
    """A batch job that forgot -m must fail, not print help and exit 0."""
    out = tmp_path / "out"
    assert_refused(capsys, ["-o", str(out), "-p", "int4"], USAGE, "missing -m/--model", out=out)


def test_bare_command_prints_help_and_succeeds(capsys):
    code, out, _ = run_cli(capsys, [])
    assert code == 0 and "Usage: ortbuild" in out


# ---------------------------------------------------------------------------------------------------- output


def test_non_empty_output_is_refused_and_kept(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_refused(capsys, export_args(checkpoint, out), OUTPUT, f"output folder {out} exists and is not empty",
                   "Pass --overwrite", out=out)
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_empty_existing_output_folder_is_used(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(capsys, export_args(checkpoint, out))
    assert code == 0, err
    assert (out / "model.onnx").is_file() and leftovers(out) == []


def test_output_that_is_a_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    assert_refused(capsys, export_args(checkpoint, out, "--overwrite"), OUTPUT,
                   f"output path {out} exists and is not a folder", "choose another -o", out=out)
    assert out.read_text() == "a file"


def test_output_below_a_file(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "out"
    assert_refused(capsys, export_args(checkpoint, out), OUTPUT, f"{blocker} is a file, not a folder",
                   "Choose another -o")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the simulated case below")
def test_output_in_read_only_folder(checkpoint, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        out = parent / "out"
        assert_refused(capsys, export_args(checkpoint, out), OUTPUT, f"cannot write to {parent}",
                       "Choose a writable -o", out=out)
    finally:
        parent.chmod(0o755)


def test_output_folder_cannot_be_created(checkpoint, tmp_path, capsys, monkeypatch):
    """Permission checks can pass (root, ACLs, read-only mounts) and mkdir still fail: still a clean I/O error."""
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".out.partial-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), OUTPUT, f"cannot write {out}: Permission denied",
                   "choose another -o", out=out)


# ---------------------------------------------------------------------------------------------------- fuzzing


def _file_with_header(tmp_path: Path, header: bytes, payload: bytes = bytes(64)) -> Path:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return path


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=12)
_entry = st.fixed_dictionaries({}, optional={"dtype": st.sampled_from(["F32", "BF16", "U8", "F4", 3]) | _json,
                                             "shape": st.lists(st.integers(-2, 20), max_size=3) | _json,
                                             "data_offsets": st.lists(st.integers(-8, 80), max_size=3) | _json})


@st.composite
def _consistent_header(draw) -> dict:
    """Well-formed entries (sometimes with gaps, sometimes past the 64-byte payload): the parses that must succeed."""
    header, offset = {}, 0
    for name in draw(st.lists(st.text(max_size=6), unique=True, max_size=3)):
        dtype, itemsize = draw(st.sampled_from([("F32", 4), ("BF16", 2), ("U8", 1)]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        start = offset + draw(st.integers(0, 4))
        offset = start + itemsize * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, offset]}
    return header


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_consistent_header() | st.dictionaries(st.text(max_size=6), _entry, max_size=3) | _json)
def test_any_json_header_parses_or_raises_checkpoint_error(tmp_path, header):
    """Whatever JSON a (corrupt) file holds, the parser answers with tensors inside the file or a CheckpointError."""
    path = _file_with_header(tmp_path, json.dumps(header).encode())
    size = path.stat().st_size
    try:
        refs = read_header(path)
    except CheckpointError as exc:
        assert str(path.name) in str(exc)
        return
    for ref in refs.values():
        assert 0 <= ref.offset and ref.offset + ref.nbytes <= size
        assert ref.read().shape == ref.shape


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64), declared=st.integers(0, 2**64 - 1) | st.integers(0, 80))
def test_any_bytes_parse_or_raise_checkpoint_error(tmp_path, raw, declared):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", declared) + raw)
    try:
        read_header(path)
    except CheckpointError as exc:
        assert str(path.name) in str(exc)

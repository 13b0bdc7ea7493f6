"""Bad input through the real CLI: one-paragraph message, distinct exit code per class, nothing left on disk.

Every case runs `builder.cli.main([...])` twice: plain (exactly one stderr line `ortbuild: <kind>: <message>`
naming what, where and how to fix, no traceback) and with --verbose (the same message after a traceback).
Each checkpoint defect is made on a copy of a tiny factory checkpoint; after the failure the output folder
must not exist and no `.NAME.partial-*` / `.NAME.old-*` sibling may be left behind.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from builder.checkpoint import read_header
from builder.cli import main
from builder.errors import CheckpointError
from builders import supported_architectures

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


# ---------------------------------------------------------------------------------------------------- sanity


def test_the_unbroken_checkpoint_exports(checkpoint, tmp_path, capsys):
    """The baseline every other test breaks: without the defect the same command succeeds."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, export_args(checkpoint, out))
    assert code == 0, err
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_truncated_shard_is_named(checkpoint, tmp_path, capsys):
    shard = checkpoint / SHARD2
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, SHARD2, "truncated", "Re-download", out=out)


def test_shard_truncated_inside_its_header(checkpoint, tmp_path, capsys):
    shard = checkpoint / SHARD1
    shard.write_bytes(shard.read_bytes()[:50])
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, str(shard), "corrupt safetensors header",
                   "truncated", "re-download", out=out)


@pytest.mark.parametrize("header, says", [
    (b"\xff\xfe not json at all", "corrupt safetensors header"),
    (b'["a", "list"]', "corrupt safetensors header (a JSON list"),
    (b'{"w": {"dtype": "F32", "shape": [2]}}', "the entry for tensor 'w' lacks a valid dtype/shape/data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "do not fit its shape"),
    (b'{"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}', "has dtype Q4_K, which ortbuild cannot read"),
])
def test_corrupt_header_is_named(checkpoint, tmp_path, capsys, header, says):
    shard = checkpoint / SHARD1
    shard.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, SHARD1, says, out=out)


def test_tensor_listed_in_index_but_missing_from_its_shard(checkpoint, tmp_path, capsys):
    name = "model.layers.1.mlp.down_proj.weight"
    shard = checkpoint / shard_of(checkpoint, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT,
                   f"tensor {name} missing from {shard.name} (index says it is there)", "re-download", out=out)


def test_shard_listed_in_index_but_absent(checkpoint, tmp_path, capsys):
    (checkpoint / SHARD2).unlink()
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, f"lists shard {SHARD2}, which is missing",
                   "Download every shard", out=out)


def test_tensor_the_config_needs_is_absent(checkpoint, tmp_path, capsys):
    """Gone from both the index and the shard: the layer that needs it names the checkpoint tensor."""
    name = "model.layers.1.mlp.down_proj.weight"
    shard = checkpoint / shard_of(checkpoint, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((checkpoint / INDEX).read_text())
    del index["weight_map"][name]
    (checkpoint / INDEX).write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, f"tensor {name} missing from the checkpoint",
                   "Qwen3ForCausalLM", out=out)


def test_invalid_index_json(checkpoint, tmp_path, capsys):
    (checkpoint / INDEX).write_text('{"weight_map": ')
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, str(checkpoint / INDEX),
                   "not a valid safetensors index", "Re-download", out=out)


def test_shape_mismatch_against_config(checkpoint, tmp_path, capsys):
    edit_json(checkpoint / "config.json", intermediate_size=96)  # the tensors say 128
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT,
                   "tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64] but the config implies [96, 64]",
                   "config.json", out=out)


def test_unused_tensor_is_refused(checkpoint, tmp_path, capsys):
    """A tensor no mapping consumed would be silently dropped from the model: refuse and name it."""
    tensors = load_file(checkpoint / SHARD1)
    tensors["model.layers.0.mlp.mystery.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    save_file(tensors, str(checkpoint / SHARD1), metadata={"format": "pt"})
    edit_json(checkpoint / INDEX, weight_map={**json.loads((checkpoint / INDEX).read_text())["weight_map"],
                                              "model.layers.0.mlp.mystery.weight": SHARD1})
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, "model.layers.0.mlp.mystery.weight",
                   "not used by the export", out=out)


def test_missing_config_json(checkpoint, tmp_path, capsys):
    (checkpoint / "config.json").unlink()
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, f"{checkpoint}: no config.json",
                   "Point -m/-i at the folder", out=out)


@pytest.mark.parametrize("text, says", [("{not json", "invalid JSON"), ("[1, 2]", "found a JSON list")])
def test_unreadable_config_json(checkpoint, tmp_path, capsys, text, says):
    (checkpoint / "config.json").write_text(text)
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, str(checkpoint / "config.json"), says,
                   "Re-download", out=out)


def test_config_without_architectures(checkpoint, tmp_path, capsys):
    edit_json(checkpoint / "config.json", architectures=[])
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, "has no 'architectures' entry",
                   'Add the model class transformers saves there, e.g. "architectures": ["LlamaForCausalLM"]', out=out)


def test_unsupported_architecture_lists_the_supported_ones(checkpoint, tmp_path, capsys):
    edit_json(checkpoint / "config.json", architectures=["MambaForCausalLM"])
    out = tmp_path / "out"
    supported = supported_architectures()
    assert {"LlamaForCausalLM", "Qwen3ForCausalLM"} <= set(supported)
    assert_refused(capsys, export_args(checkpoint, out), UNSUPPORTED,
                   "architecture MambaForCausalLM is not supported",
                   f"Supported architectures: {', '.join(supported)}.", out=out)


def _remote_code(checkpoint: Path, marker: Path) -> None:
    """Give the checkpoint auto_map modelling code that would create `marker` if it were ever imported."""
    (checkpoint / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (checkpoint / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_json(checkpoint / "config.json", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def test_remote_code_of_an_unknown_architecture_is_refused_and_never_run(checkpoint, tmp_path, capsys):
    """auto_map means trust_remote_code: an architecture ortbuild does not implement is refused; its module is
    never imported."""
    marker = tmp_path / "remote-code-ran"
    _remote_code(checkpoint, marker)
    edit_json(checkpoint / "config.json", architectures=["EvilForCausalLM"])
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), UNSUPPORTED, str(checkpoint / "config.json"),
                   "architecture EvilForCausalLM is not one ortbuild implements",
                   "auto_map: ['AutoConfig', 'AutoModelForCausalLM']", "trust_remote_code",
                   "never runs checkpoint code", out=out)
    assert not marker.exists()


def test_remote_code_of_a_builtin_architecture_exports_with_our_code(checkpoint, tmp_path, capsys):
    """A supported (transformers built-in) architecture whose config also names custom code, as DeepSeek-V3 and
    Kimi-K2 do, exports with ortbuild's own implementation, says so, and never imports the checkpoint's code."""
    marker = tmp_path / "remote-code-ran"
    _remote_code(checkpoint, marker)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, ["-i", str(checkpoint), "-o", str(out)])
    assert code == 0, err
    assert (out / "model.onnx").is_file()
    assert ("config.json names custom code (auto_map: AutoConfig, AutoModelForCausalLM); it is not imported: "
            "Qwen3ForCausalLM is exported with ortbuild's own implementation of the transformers architecture.") in err
    assert not marker.exists()


def test_every_supported_architecture_is_a_transformers_class():
    """What lets a supported architecture with auto_map export: transformers implements every one of them."""
    import transformers

    assert [arch for arch in supported_architectures() if not hasattr(transformers, arch)] == []


class _PickleBomb:
    """Unpickling this creates a file: proof that a .bin checkpoint was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_refused_unloaded(checkpoint, tmp_path, capsys):
    marker = tmp_path / "pickle-ran"
    for f in [*checkpoint.glob("*.safetensors"), checkpoint / INDEX]:
        f.unlink()
    torch.save({"model.embed_tokens.weight": _PickleBomb(marker)}, checkpoint / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, str(checkpoint),
                   "only pickle weights (pytorch_model.bin)", "refuses them", "Convert the checkpoint to safetensors",
                   out=out)
    assert not marker.exists()


def test_folder_without_weights(checkpoint, tmp_path, capsys):
    for f in [*checkpoint.glob("*.safetensors"), checkpoint / INDEX]:
        f.unlink()
    out = tmp_path / "out"
    assert_refused(capsys, export_args(checkpoint, out), CHECKPOINT, "no *.safetensors weights found",
                   "Point -m/-i at the folder that holds the checkpoint's weights", out=out)


def test_input_folder_that_does_not_exist(tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, export_args(tmp_path / "nowhere", out), CHECKPOINT,
                   f"input folder {tmp_path / 'nowhere'} does not exist", out=out)


def test_model_that_is_neither_folder_nor_hub_id(tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, ["-m", "./no/such/folder", "-o", str(out), "-q"], CHECKPOINT,
                   "-m ./no/such/folder: no such folder", "Check the path", out=out)


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

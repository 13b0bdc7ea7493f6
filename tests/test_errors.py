"""Bad input through the real CLI: one-paragraph message, distinct exit code per class, nothing left on disk.

Every case runs `builder.cli.main([...])` twice: plain (exactly one stderr line `ortbuild: <kind>: <message>`
naming what, where and how to fix, no traceback) and with --verbose (the same message after a traceback).
Each checkpoint defect is made on a copy of a tiny factory checkpoint; after the failure the output folder
must not exist and no `.NAME.partial-*` / `.NAME.old-*` sibling may be left behind.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import supported_architectures
from cli_errors import (CHECKPOINT, INDEX, SHARD1, SHARD2, UNSUPPORTED, assert_refused, checkpoint,  # noqa: F401
                        edit_json, export_args, leftovers, run_cli, shard_of)  # (checkpoint: a fixture)


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

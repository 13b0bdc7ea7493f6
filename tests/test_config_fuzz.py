"""A broken config.json is a one-line error with the documented exit code, never a traceback.

Hypothesis deletes a field of a tiny checkpoint's config (at any depth: rope_parameters.factor, text_config.hidden_size
...) or gives it a value of another JSON type, for every family recipe in tests/factory.py, and runs the real CLI's
`inspect` (which reads tensor headers, never tensor data). The answer is a plan (exit 0: the field was optional or
unused), or exactly one stderr line `ortbuild: bad checkpoint: ...` (exit 4: missing / ill-typed) or `ortbuild:
unsupported model: ...` (exit 3: a value we do not compute) that names the field it is about (after a deletion,
possibly the field the deletion made inconsistent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factory
from builder.cli import main

KINDS = {3: "unsupported model", 4: "bad checkpoint"}
# Values of every JSON type; a mutation picks one whose type differs from the field's current value.
VALUES = ["text", 3, -1, 0, 2.5, True, False, [], [1, "a"], {}, {"k": 1}, None]


def _type(value) -> str:
    return "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else type(value).__name__


def paths(config: dict, prefix: tuple = (), depth: int = 3) -> list[tuple[str, ...]]:
    """Every field path into nested objects, up to `depth` keys deep."""
    out = []
    for key, value in config.items():
        out.append((*prefix, key))
        if isinstance(value, dict) and depth > 1:
            out += paths(value, (*prefix, key), depth - 1)
    return out


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint) -> dict[str, Path]:
    return {arch: tiny_checkpoint(arch) for arch in factory.ARCHS}


def _mutated(src: Path, dst: Path, path: tuple[str, ...], value, delete: bool) -> None:
    """dst: links to src's files, with config.json edited."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    node = config
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    (dst / "config.json").write_text(json.dumps(config))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_broken_config_fields_give_one_line_and_the_right_exit_code(checkpoints, tmp_path, capsys, data):
    arch = data.draw(st.sampled_from(sorted(checkpoints)), label="arch")
    src = checkpoints[arch]
    config = json.loads((src / "config.json").read_text())
    path = data.draw(st.sampled_from(paths(config)), label="field")
    node = config
    for key in path:
        node = node[key]
    delete = data.draw(st.booleans(), label="delete")
    value = None if delete else data.draw(st.sampled_from([v for v in VALUES if _type(v) != _type(node)]),
                                          label="value")
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    _mutated(src, folder, path, value, delete)

    with pytest.raises(SystemExit) as info:
        main(["inspect", "-m", str(folder), "-p", "int4"])
    code = info.value.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and code in (0, 3, 4), f"exit {code}:\n{err}"
    if code == 0:
        assert "plan:" in out and err == ""
        return
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ortbuild: {KINDS[code]}: "), lines[0]
    # the message names the field; or the field the change made inconsistent (no partial_rotary_factor: Phi-4's
    # short_factor no longer fits; no text_config: the decoder's fields are missing); or, when the field decided
    # which tensors exist (Qwen's mlp_only_layers), the tensor the config now implies
    named = (path[-1] in lines[0] or "does not match its config" in lines[0]
             or (delete and "config.json field '" in lines[0]))
    assert named, f"{'.'.join(path)} {'deleted' if delete else f'= {value!r}'}: {lines[0]}"


def test_missing_required_field_names_field_file_and_architecture(checkpoints, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    _mutated(checkpoints["gemma3_vlm"], folder, ("text_config", "hidden_size"), None, delete=True)
    with pytest.raises(SystemExit) as info:
        main(["inspect", "-m", str(folder)])
    assert info.value.code == 4
    assert capsys.readouterr().err == (
        "ortbuild: bad checkpoint: Gemma3ForConditionalGeneration: config.json field "
        "'text_config.hidden_size' is missing (or null); this architecture needs it. The checkpoint's config is "
        "incomplete: re-download it or add the field.\n")


def test_ill_typed_field_is_a_checkpoint_error(checkpoints, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    _mutated(checkpoints["qwen3_moe"], folder, ("num_experts",), "four", delete=False)
    with pytest.raises(SystemExit) as info:
        main(["inspect", "-m", str(folder)])
    assert info.value.code == 4
    assert capsys.readouterr().err == (
        "ortbuild: bad checkpoint: Qwen3MoeForCausalLM: config.json field 'num_experts' is 'four' (a "
        "string); expected an integer. Fix the checkpoint's config.\n")

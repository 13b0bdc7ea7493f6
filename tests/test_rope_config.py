"""One rope parser (builders/common.py rope_spec): every family reads its rope through it, so a rope type's
parameters are typed and checked the same way everywhere.

- the parameter table and the rotary layer know the same rope types;
- a required parameter that is missing exits 4 naming the field, for every rope type and for the families that used
  to copy rope fields unchecked (HunYuan, SmolLM3, the multimodal text decoders: a linear rope without `factor`
  crashed in builder/layers/rotary.py);
- partial_rotary_factor where a family rotates whole heads is refused by name instead of silently ignored;
- the aliases a family declares (Phi-3's su / yarn, mRoPE for text positions, HunYuan's ntk alpha) resolve to the
  type transformers computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import factory
from builder.cli import main
from builder.errors import CheckpointError
from builders import family_for, text_config
from builders.common import ROPE_PARAMETERS, rope_spec
from builders.config import Config

VALID = {"float": 2.0, "int": 8, "bool": True, "factors": [1.0] * 8}  # rotary_dim 16 -> 8 factors
REQUIRED = [(kind, name) for kind, table in ROPE_PARAMETERS.items() for name, (_, required) in table.items()
            if required]


def test_the_parameter_table_and_the_rotary_layer_know_the_same_rope_types():
    from builder.layers.rotary import SUPPORTED_ROPE_TYPES

    assert set(ROPE_PARAMETERS) == set(SUPPORTED_ROPE_TYPES)


@pytest.mark.parametrize("rope_type, missing", REQUIRED, ids=[f"{t}-{n}" for t, n in REQUIRED])
def test_a_missing_required_rope_parameter_names_the_field(rope_type, missing):
    table = ROPE_PARAMETERS[rope_type]
    params = {name: VALID[kind] for name, (kind, required) in table.items() if required and name != missing}
    cfg = Config({"rope_parameters": {"rope_type": rope_type, "rope_theta": 1e4, **params}}, "TestForCausalLM")
    with pytest.raises(CheckpointError) as info:
        rope_spec(cfg, 16, types=tuple(ROPE_PARAMETERS))
    assert str(info.value) == (f"TestForCausalLM: config.json field 'rope_parameters.{missing}' is missing (or null); "
                               "this architecture needs it. The checkpoint's config is incomplete: re-download it or "
                               "add the field.")
    # control: with the parameter the same settings parse
    params[missing] = VALID[table[missing][0]]
    rope = rope_spec(Config({"rope_parameters": {"rope_type": rope_type, **params}}, "T"), 16,
                     types=tuple(ROPE_PARAMETERS))
    assert rope.rope_type == rope_type and rope.param(missing) is not None


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (config.get("text_config") or config).update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _inspect(capsys, folder: Path) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["inspect", "-m", str(folder), "-p", "fp32"])
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case, rope, field", [
    ("hunyuan", {"rope_type": "linear", "rope_theta": 1e4}, "rope_parameters.factor"),
    ("smollm3", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64}, "rope_parameters.low_freq_factor"),
    ("mistral3", {"rope_type": "yarn", "rope_theta": 1e9}, "text_config.rope_parameters.factor"),
    ("phi3", {k: v for k, v in factory.PHI3_LONGROPE.items() if k != "long_factor"}, "rope_parameters.long_factor"),
])
def test_cli_exits_4_naming_a_missing_rope_parameter(case, rope, field, tiny_checkpoint, tmp_path, capsys):
    code, err = _inspect(capsys, _with_config(tiny_checkpoint(case), tmp_path / "ckpt", rope_parameters=rope))
    assert code == 4, err
    assert err.startswith("ortbuild: bad checkpoint: ") and f"field '{field}' is missing (or null)" in err, err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("case", ["smollm3", "hunyuan", "qwen2_5_vl", "llama"])
def test_partial_rotary_where_the_family_rotates_whole_heads_is_refused(case, tiny_checkpoint, tmp_path, capsys):
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    code, err = _inspect(capsys, _with_config(tiny_checkpoint(case), tmp_path / "ckpt", rope_parameters=rope))
    assert code == 3, err
    assert "rope_parameters.partial_rotary_factor'=0.5 is not supported (this architecture rotates whole heads)" in err


def _rope(arch: str, **changes):
    recipe = factory.ARCHS[arch]
    config = factory._config_json(arch, factory.build_config(arch), {})
    (config["text_config"] if recipe.text_config_key else config).update(changes)
    family = family_for(recipe.architecture)
    spec = family.make_spec(text_config(family, config, recipe.architecture))
    return next(layer.attention.rope for layer in spec.layers if getattr(layer.attention, "rope", None))


def test_aliases_resolve_to_the_type_transformers_computes():
    longrope = {k: v for k, v in factory.PHI3_LONGROPE.items() if k != "rope_type"}
    for legacy in ("su", "yarn"):  # Phi-3's legacy names of longrope
        assert _rope("phi3", rope_parameters={**longrope, "type": legacy}) == _rope("phi3")
    for arch in ("qwen2_5_vl", "qwen3_5"):  # mRoPE with text positions is the default rope
        given = factory.build_config(arch).to_dict()
        rope = (given.get("text_config") or given)["rope_parameters"]
        assert _rope(arch, rope_parameters={**rope, "rope_type": "mrope"}) == _rope(arch)
    # HunYuan: "dynamic" with alpha is the static ntk-alpha stretch, without it plain dynamic NTK
    assert _rope("hunyuan").rope_type == "ntk_alpha"
    assert _rope("hunyuan", rope_parameters={"rope_type": "dynamic", "factor": 2.0}).rope_type == "dynamic"

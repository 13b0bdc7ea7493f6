"""FP8 block-scaled checkpoints (DeepSeek-V3 / Kimi-K2 layout: float8_e4m3fn weights, `*_scale_inv` per block).

What is proved here:
- `Fp8BlockWeight` decodes exactly what transformers' own FP8 dequantization produces, for any row range (partial
  edge blocks, ranges that start and stop inside a block), with float32, bf16 and e8m0 scales;
- a tiny DeepSeek-V3 written in FP8 (blocks of 16 x 32, partial blocks included) exports to the same bytes as its
  dequantized bf16 twin, in fp32 and in int4; the twin matches transformers, and so does the FP8 export against
  transformers loading the FP8 checkpoint itself;
- an int4 export of an FP8 checkpoint dequantizes row block by row block (never a whole tensor at once when the
  block budget is smaller than the tensor);
- an FP8 tensor whose scale tensor is missing or mis-shaped, or whose config names no FP8 quantization, exits 4
  naming both tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import parity
from builder.checkpoint import Checkpoint
from builder.cli import main
from builder.fp8 import Fp8BlockWeight
from fp8_checkpoint import make_fp8_checkpoint

BLOCK = (16, 32)
RNG = np.random.default_rng(11)
TOL = 1e-4


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture(scope="module")
def fp8_pair(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(FP8 checkpoint, its dequantized bf16 twin) of the tiny DeepSeek-V3."""
    root = tmp_path_factory.mktemp("fp8")
    fp8 = make_fp8_checkpoint(tiny_checkpoint("deepseek_v3"), root / "fp8", BLOCK, twin=root / "twin")
    return fp8, root / "twin"


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    save_file(tensors, str(folder / "model.safetensors"))
    return Checkpoint(folder)


# --------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float8_e8m0fnu])
def test_decoding_matches_transformers_for_any_row_range(scale_dtype, tmp_path):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    n, k = 45, 70  # partial edge blocks on both axes
    weight = torch.from_numpy(RNG.standard_normal((n, k)).astype(np.float32) * 100).to(torch.float8_e4m3fn)
    scales = torch.from_numpy(RNG.uniform(0.01, 3.0, (3, 3)).astype(np.float32)).to(scale_dtype)
    ckpt = _write(tmp_path / "ckpt", {"w": weight, "w_scale_inv": scales})
    lazy = Fp8BlockWeight(ckpt.tensor("w"), ckpt.tensor("w_scale_inv"), BLOCK)
    reference = _dequantize_fp8_weight(weight.clone(), scales.float(), list(BLOCK), torch.float32).numpy()
    np.testing.assert_array_equal(lazy.rows(), reference)
    for start, stop in [(0, 1), (5, 21), (15, 17), (16, 32), (40, 45), (31, 45)]:
        np.testing.assert_array_equal(lazy.rows(start, stop), reference[start:stop])


def test_e8m0_scales_are_powers_of_two(tmp_path):
    scales = torch.tensor([[0.25, 8.0]]).to(torch.float8_e8m0fnu)
    ckpt = _write(tmp_path / "ckpt", {"w": torch.ones(4, 40).to(torch.float8_e4m3fn), "w_scale_inv": scales})
    rows = Fp8BlockWeight(ckpt.tensor("w"), ckpt.tensor("w_scale_inv"), BLOCK).rows()
    assert rows.dtype == np.float32 and (rows[:, :32] == 0.25).all() and (rows[:, 32:] == 8.0).all()
    assert np.dtype(ml_dtypes.float8_e8m0fnu).itemsize == 1


# --------------------------------------------------------------------------------------------- exports


def test_the_fp8_checkpoint_is_really_fp8(fp8_pair):
    fp8, twin = fp8_pair
    tensors = load_file(str(fp8 / "model.safetensors"))
    name = "model.layers.0.self_attn.q_b_proj.weight"  # [128, 24]: partial column blocks
    assert tensors[name].dtype == torch.float8_e4m3fn and list(tensors[name + "_scale_inv"].shape) == [8, 1]
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["lm_head.weight"].dtype == torch.bfloat16 and "lm_head.weight_scale_inv" not in tensors
    assert load_file(str(twin / "model.safetensors"))[name].dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_fp8_exports_the_bytes_of_its_bf16_twin(precision, fp8_pair, tmp_path):
    fp8, twin = fp8_pair
    a = parity.export(fp8, tmp_path / "fp8", precision)
    b = parity.export(twin, tmp_path / "twin", precision)
    for name in ("model.onnx", "model.onnx.data"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_the_bf16_twin_matches_transformers(fp8_pair, tmp_path):
    _, twin = fp8_pair
    prompt_err, decode_err, _, full = parity.compare_with_hf(parity.export(twin, tmp_path / "twin"), twin)
    assert np.ptp(full, axis=0).max() > 100 * TOL
    assert prompt_err <= TOL and decode_err <= TOL, (prompt_err, decode_err)


def test_int4_export_dequantizes_row_blocks(fp8_pair, tmp_path, monkeypatch):
    import builder.weights

    reads: dict[str, list[tuple[int, int]]] = {}
    original = Fp8BlockWeight.rows

    def recording(self, start=0, stop=None):
        out = original(self, start, stop)
        reads.setdefault(self.weight.name, []).append((start, start + out.shape[0]))
        return out

    monkeypatch.setattr(Fp8BlockWeight, "rows", recording)
    monkeypatch.setattr(builder.weights, "ROW_BLOCK_BYTES", 4 * 64 * 16)  # 16 rows of a 64-wide weight
    parity.export(fp8_pair[0], tmp_path / "out", "int4")
    assert reads
    name = "model.layers.0.mlp.gate_proj.weight"  # [128, 64]
    assert sorted(reads[name]) == [(start, start + 16) for start in range(0, 128, 16)]  # once each, any order
    assert max(stop - start for spans in reads.values() for start, stop in spans) < 128


# --------------------------------------------------------------------------------------------- bad input


def _broken(fp8: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(fp8, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _refused(capsys, folder: Path, tmp_path: Path, *fragments: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-m", str(folder), "-o", str(out), "-q")
    assert code == 4 and not out.exists(), err
    assert err.startswith("ortbuild: bad checkpoint: ") and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


NAME = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [48, 64]: scales [3, 2]


def test_a_missing_scale_tensor_is_named(fp8_pair, tmp_path, capsys):
    folder = _broken(fp8_pair[0], tmp_path, lambda t: t.pop(NAME + "_scale_inv"))
    _refused(capsys, folder, tmp_path, f"FP8 tensor {NAME} (F8_E4M3 [48, 64]) has no scale tensor "
                                       f"{NAME}_scale_inv", "blocks of 16 x 32")


def test_a_misshaped_scale_tensor_is_named(fp8_pair, tmp_path, capsys):
    def edit(tensors):
        tensors[NAME + "_scale_inv"] = torch.ones(3, 3)

    folder = _broken(fp8_pair[0], tmp_path, edit)
    _refused(capsys, folder, tmp_path, f"FP8 tensor {NAME} (F8_E4M3 [48, 64]) and its scales {NAME}_scale_inv "
                                       "(F32 [3, 3]) do not match: blocks of 16 x 32",
             "need float scales of shape [3, 2]")


def test_fp8_without_its_quantization_config_is_refused(fp8_pair, tmp_path, capsys):
    folder = tmp_path / "noconfig"
    shutil.copytree(fp8_pair[0], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    _refused(capsys, folder, tmp_path, "FP8 tensor model.layers.0.", "config.json has no quantization_config with "
                                       "quant_method 'fp8'")


def test_the_fp8_export_matches_transformers_loading_the_fp8_checkpoint(fp8_pair, tmp_path):
    fp8, _ = fp8_pair
    prompt_err, decode_err, _, full = parity.compare_with_hf(parity.export(fp8, tmp_path / "fp8"), fp8)
    assert np.ptp(full, axis=0).max() > 100 * TOL
    assert prompt_err <= TOL and decode_err <= TOL, (prompt_err, decode_err)

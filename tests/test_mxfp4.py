"""Expert weights for fused-expert checkpoints: the expert-major transform and lazy MXFP4 decoding.

What is proved here:
- `to_expert_major` turns HF's `x @ gate_up_proj[e]` / `x @ down_proj[e]` into MoE's [E, N, K] rows with gate on
  even rows and up on odd rows (swiglu_fusion=1), checked against an independent numpy HF GPT-OSS expert forward;
- `Mxfp4Experts` decodes exactly what transformers' own MXFP4 dequantizer produces (every code, extreme scales,
  the tiny GPT-OSS checkpoint's experts), and reads only the experts asked for, so float exports and QMoE
  quantization stream expert by expert;
- a blocks/scales pair that does not fit together is refused with a message naming both tensors.
The end-to-end GPT-OSS tests are in test_gpt_oss.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.checkpoint import Checkpoint, TensorRef
from builder.errors import CheckpointError
from builder.mxfp4 import FP4_E2M1_VALUES, Mxfp4Experts, dequantize_mxfp4
from builder.quant.plan import WeightFormat
from builder.weights import Constant, row_blocks, to_expert_major

RNG = np.random.default_rng(7)


# ------------------------------------------------------------------------------------- expert layout


def test_to_expert_major_matches_the_hf_expert_forward():
    e, h, inter, tokens, limit, alpha = 3, 16, 6, 5, 0.8, 1.702
    gate_up = RNG.standard_normal((e, h, 2 * inter)).astype(np.float32)  # HF: [E, H, 2I], gate/up alternate
    down = RNG.standard_normal((e, inter, h)).astype(np.float32)  # HF: [E, I, H]
    bias_gu = RNG.standard_normal((e, 2 * inter)).astype(np.float32)
    bias_down = RNG.standard_normal((e, h)).astype(np.float32)
    x = RNG.standard_normal((tokens, h)).astype(np.float32)

    fc1, fc2 = to_expert_major(Constant(gate_up)), to_expert_major(Constant(down))
    assert fc1.shape == (e, 2 * inter, h) and fc2.shape == (e, h, inter)
    fc1_all, fc2_all = fc1.rows(), fc2.rows()
    assert fc1_all.flags.c_contiguous
    np.testing.assert_array_equal(fc1.rows(1, 3), fc1_all[1:3])
    for expert in range(e):
        # transformers GptOssExperts: gate_up = x @ W + b; gate = [..., ::2]; up = [..., 1::2]
        hf = x @ gate_up[expert] + bias_gu[expert]
        hf_gate, hf_up = hf[:, ::2], hf[:, 1::2]
        hf_gate = np.minimum(hf_gate, limit)
        hf_up = np.clip(hf_up, -limit, limit)
        hf_out = ((hf_up + 1) * hf_gate / (1 + np.exp(-alpha * hf_gate))) @ down[expert] + bias_down[expert]

        # MoE with swiglu_fusion=1: rows of fc1 are output features, even rows gate, odd rows up
        ours = x @ fc1_all[expert].T + bias_gu[expert]
        np.testing.assert_allclose(ours[:, 0::2], hf[:, ::2], rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ours[:, 1::2], hf[:, 1::2], rtol=1e-6, atol=1e-5)
        g, u = np.minimum(ours[:, 0::2], limit), np.clip(ours[:, 1::2], -limit, limit)
        out = (g / (1 + np.exp(-alpha * g)) * (u + 1)) @ fc2_all[expert].T + bias_down[expert]
        np.testing.assert_allclose(out, hf_out, rtol=1e-5, atol=1e-4)


def test_to_expert_major_rejects_unstacked_weights():
    with pytest.raises(ValueError, match=r"expected stacked experts \[E, K, N\], got shape \[4, 8\]"):
        to_expert_major(Constant(np.zeros((4, 8), np.float32)))


# ------------------------------------------------------------------------------------- MXFP4


def _write_pair(folder: Path, blocks: np.ndarray, scales: np.ndarray) -> tuple[TensorRef, TensorRef]:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w_blocks": blocks, "w_scales": scales}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["GptOssForCausalLM"]}))
    ckpt = Checkpoint(folder)
    return ckpt.tensor("w_blocks"), ckpt.tensor("w_scales")


def test_mxfp4_decodes_every_code_and_scale_like_transformers(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    e, n, groups = 3, 5, 4
    blocks = RNG.integers(0, 256, (e, n, groups, 16), dtype=np.uint8)
    blocks[0, 0, 0] = np.arange(256, dtype=np.uint8)[::16] + np.arange(16, dtype=np.uint8)  # every nibble pair
    scales = RNG.integers(100, 150, (e, n, groups), dtype=np.uint8)
    scales[0, 0, :] = [0, 1, 127, 254]  # 2**-127 (float32 subnormal), 2**-126, 1, 2**127 (6 * 2**127 -> inf)
    weight = Mxfp4Experts(*_write_pair(tmp_path, blocks, scales))
    assert weight.shape == (e, n, groups * 32)

    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    theirs = theirs.transpose(1, 2).numpy()  # transformers returns the `x @ W` orientation [E, K, N]
    ours = weight.rows()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)
    assert (ours[0, 0, :32] != 0).sum() == 28  # codes 0 and 8 are +-0, 2**-127 * 0.5 is still a subnormal
    np.testing.assert_array_equal(weight.rows(1, 3), theirs[1:3])
    np.testing.assert_array_equal(np.unique(np.abs(dequantize_mxfp4(blocks[:1, :1, :1], np.full((1, 1, 1), 127,
                                                                                            np.uint8)))),
                                  np.unique(np.abs(FP4_E2M1_VALUES)))


def test_mxfp4_checkpoint_experts_match_transformers(tiny_checkpoint):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ckpt = Checkpoint(tiny_checkpoint("gpt_oss", mxfp4=True))
    for i in range(2):
        for proj, shape in (("gate_up_proj", (4, 64, 64)), ("down_proj", (4, 64, 32))):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            blocks, scales = ckpt.tensor(name + "_blocks"), ckpt.tensor(name + "_scales")
            ours = Mxfp4Experts(blocks, scales)
            assert ours.shape == shape
            theirs = convert_moe_packed_tensors(torch.from_numpy(blocks.read().copy()),
                                                torch.from_numpy(scales.read().copy()), dtype=torch.float32)
            np.testing.assert_array_equal(ours.rows(), theirs.transpose(1, 2).numpy(), err_msg=name)


@dataclass(frozen=True)
class RecordingRef(TensorRef):
    reads: list = field(default_factory=list, compare=False, hash=False)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        self.reads.append((start, stop))
        return super().read(start, stop)


def _recording(ref: TensorRef) -> RecordingRef:
    return RecordingRef(ref.name, ref.path, ref.dtype, ref.shape, ref.offset)


def test_mxfp4_experts_stream_one_expert_at_a_time(tiny_checkpoint, monkeypatch):
    """Float export (row_blocks) and QMoE quantization both ask for one expert per read when one is all that fits."""
    from builder.layers import moe as moe_layer

    ckpt = Checkpoint(tiny_checkpoint("gpt_oss", mxfp4=True))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    blocks, scales = _recording(ckpt.tensor(name + "_blocks")), _recording(ckpt.tensor(name + "_scales"))
    weight = Mxfp4Experts(blocks, scales)
    one_expert = 4 * 64 * 64
    whole = np.concatenate([rows for _, rows in row_blocks(weight, block_bytes=one_expert)])
    assert blocks.reads == scales.reads == [(0, 1), (1, 2), (2, 3), (3, 4)]
    blocks.reads.clear(), scales.reads.clear()

    monkeypatch.setattr(moe_layer, "EXPERT_BLOCK_BYTES", one_expert)
    source = moe_layer.expert_source(weight, WeightFormat(4, "default", 32), "fc1", None)
    packed = np.concatenate(list(source.blocks("packed")))
    assert blocks.reads == [(0, 1), (1, 2), (2, 3), (3, 4)]
    from builder.quant.moe import quantize_experts

    expected = quantize_experts(whole, bits=4, block_size=32, name="fc1")
    np.testing.assert_array_equal(packed, expected.packed)
    np.testing.assert_array_equal(source.whole("scales"), expected.scales)
    assert source.passes == 1


def test_mxfp4_pair_with_mismatched_shapes_is_rejected(tmp_path):
    blocks, scales = _write_pair(tmp_path, np.zeros((2, 4, 3, 16), np.uint8), np.zeros((2, 4, 2), np.uint8))
    with pytest.raises(CheckpointError) as err:
        Mxfp4Experts(blocks, scales)
    assert str(err.value) == (
        "model.safetensors: MXFP4 tensors w_blocks (U8 [2, 4, 3, 16]) and w_scales (U8 [2, 4, 2]) do not form an "
        "MXFP4 pair: expected uint8 blocks [E, N, K/32, 16] and uint8 scales [E, N, K/32]. The checkpoint is corrupt "
        "or uses another quantization format.")

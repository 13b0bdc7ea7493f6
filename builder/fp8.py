"""FP8 block-scaled weights (DeepSeek-V3/R1, Kimi-K2: quantization_config quant_method "fp8", fmt "e4m3",
weight_block_size [128, 128]).

A quantized linear weight W [N, K] is stored as two tensors:
    `<name>`            float8_e4m3fn [N, K]
    `<name>_scale_inv`  float32 (bf16, or e8m0 powers of two) [ceil(N / bn), ceil(K / bk)]: one factor per block
and W[n, k] = fp8[n, k] * scale_inv[n // bn, k // bk] (transformers' finegrained_fp8 dequantization: despite its
name the factor multiplies; edge blocks are partial).

`Fp8BlockWeight` is a lazy Weight that reads any row range: the fp8 rows and the scale rows of the blocks they touch,
decoded to float32. A streaming export therefore holds a row block of one dequantized weight at a time, never a
dequantized tensor set. An fp8 value times a float32 scale is computed in float32, as transformers does before it
casts to the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from builder.checkpoint import TensorRef
from builder.errors import CheckpointError, UnsupportedModelError

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors tags of 8-bit float tensors
SCALE_SUFFIX = "_scale_inv"  # `<weight name>_scale_inv` holds its block scales
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")
# float32 value of every e4m3 byte: indexing this table is ~1.7x faster than ml_dtypes' astype
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The block-scale shape of an [N, K] weight: [ceil(N / bn), ceil(K / bk)]."""
    n, k = shape
    return -(-n // block[0]), -(-k // block[1])


def dequantize_fp8_blocks(weight: np.ndarray, scales: np.ndarray, block: tuple[int, int], row0: int = 0) -> np.ndarray:
    """fp8 rows [rows, K] (starting at row `row0` of the whole weight) times the scales of their blocks -> float32.

    `scales` holds the scale rows from block row0 // bn on, at least up to the block of the last row.
    """
    bn, bk = block
    rows, k = weight.shape
    first = row0 // bn
    row_blocks = (np.arange(row0, row0 + rows) // bn) - first  # scale row of each weight row
    per_row = scales.astype(np.float32)[row_blocks]  # [rows, ceil(K / bk)]
    out = _E4M3_VALUES[weight.view(np.uint8)]
    full, rem = divmod(k, bk)
    if full:
        view = out[:, : full * bk].reshape(rows, full, bk)
        view *= per_row[:, :full, None]
    if rem:
        out[:, full * bk:] *= per_row[:, full:full + 1]
    return out


@dataclass(frozen=True)
class Fp8BlockWeight:
    """A lazy float32 [N, K] weight decoded from an fp8 tensor and its block scales."""

    weight: TensorRef
    scales: TensorRef
    block: tuple[int, int]  # (bn, bk): rows and columns per scale

    def __post_init__(self):
        w, s = self.weight, self.scales
        both = f"{w.name} ({w.dtype} {list(w.shape)}) and its scales {s.name} ({s.dtype} {list(s.shape)})"
        if w.dtype != "F8_E4M3":
            raise UnsupportedModelError(f"{w.path.name}: FP8 tensor {both}: only float8_e4m3fn weights are read "
                                        "(the fmt 'e4m3' of DeepSeek-V3 / Kimi-K2 checkpoints).")
        if len(w.shape) != 2:
            raise CheckpointError(f"{w.path.name}: FP8 tensor {both}: expected a 2-D [out, in] linear weight.")
        if s.dtype not in SCALE_DTYPES or tuple(s.shape) != scale_shape(w.shape, self.block):
            expected = list(scale_shape(w.shape, self.block))
            raise CheckpointError(
                f"{w.path.name}: FP8 tensor {both} do not match: blocks of {self.block[0]} x {self.block[1]} "
                f"(quantization_config.weight_block_size) need float scales of shape {expected}. The checkpoint is "
                "corrupt or its config names another block size.")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        bn = self.block[0]
        scales = self.scales.read(start // bn, -(-stop // bn))
        return dequantize_fp8_blocks(self.weight.read(start, stop), scales, self.block, start)

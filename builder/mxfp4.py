"""MXFP4 expert weights (OCP microscaling FP4, the format openai/gpt-oss checkpoints ship their experts in).

On disk a stacked expert weight W [E, N, K] (rows = output features, already the expert-major layout MoE/QMoE
read) is two tensors:
    `<name>_blocks`  uint8 [E, N, K/32, 16]: fp4 e2m1 codes, element 2j in the low nibble, 2j+1 in the high one;
    `<name>_scales`  uint8 [E, N, K/32]:     e8m0 exponents with bias 127, one per block of 32 elements.
so W[e, n, 32*g + j] = FP4[code] * 2**(scale[e, n, g] - 127).

`Mxfp4Experts` is a lazy Weight over the two tensors that decodes only the experts it is asked for: a
gpt-oss-120b layer holds 128 experts of 5760 x 2880, 8 GiB once decoded to float32, while one expert is 66 MiB.
Every fp4 value times a power of two is exact in float32, so decoding loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from builder.checkpoint import TensorRef
from builder.errors import CheckpointError

MXFP4_BLOCK = 32  # elements per shared exponent
E8M0_BIAS = 127

# e2m1 values indexed by the 4-bit code: bit 3 is the sign, bits 0-2 index the magnitude (OCP MX v1.0, table 5).
FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


# The float pair (low nibble, high nibble) for every byte: one gather decodes two elements in place.
_BYTE_TO_PAIR = np.stack([FP4_E2M1_VALUES[np.arange(256) & 0x0F], FP4_E2M1_VALUES[np.arange(256) >> 4]], axis=-1)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., G, 16] + scales uint8 [..., G] -> float32 [..., G*32].

    Multiplying by 2**(scale - 127) is exact in float32 (fp4 values have two significant bits; the smallest products
    are subnormals well above 2**-149), and 6 * 2**127 overflows to inf as in transformers' ldexp. Code 255, the
    e8m0 NaN, is not produced by real quantizers. One byte-to-pair gather is ~3x faster than decoding nibbles apart.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
                         f"(blocks must be scales.shape + [{MXFP4_BLOCK // 2}])")
    values = np.take(_BYTE_TO_PAIR, blocks, axis=0).reshape(*blocks.shape[:-1], MXFP4_BLOCK)
    factor = np.ldexp(np.float32(1), scales.astype(np.int32) - E8M0_BIAS)
    with np.errstate(over="ignore"):
        np.multiply(values, factor[..., None], out=values)
    return values.reshape(*blocks.shape[:-2], -1)


@dataclass(frozen=True)
class Mxfp4Experts:
    """Lazy [E, N, K] float32 expert weights decoded from `*_blocks` / `*_scales`, a few experts at a time."""

    blocks: TensorRef
    scales: TensorRef

    def __post_init__(self):
        b, s = self.blocks, self.scales
        ok = (b.dtype == "U8" and s.dtype == "U8" and len(b.shape) == 4 and b.shape[-1] == MXFP4_BLOCK // 2
              and tuple(b.shape[:-1]) == tuple(s.shape))
        if not ok:
            raise CheckpointError(
                f"{b.path.name}: MXFP4 tensors {b.name} ({b.dtype} {list(b.shape)}) and {s.name} ({s.dtype} "
                f"{list(s.shape)}) do not form an MXFP4 pair: expected uint8 blocks [E, N, K/32, 16] and uint8 "
                "scales [E, N, K/32]. The checkpoint is corrupt or uses another quantization format.")

    @property
    def shape(self) -> tuple[int, ...]:
        e, n, groups, _ = self.blocks.shape
        return (e, n, groups * MXFP4_BLOCK)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Experts [start:stop) decoded to float32 [stop-start, N, K]."""
        return dequantize_mxfp4(self.blocks.read(start, stop), self.scales.read(start, stop))

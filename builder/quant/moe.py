"""Symmetric int4/int8 quantization of stacked MoE expert weights for com.microsoft QMoE.

QMoE reads expert weights as uint8 ``[E, N, K*bits/8]`` (rows are output features, the
input-feature axis K is packed, even k in the low nibble) plus float scales ``[E, N]``
(one per row) or ``[E, N, K/block_size]`` (block-wise along K), and dequantizes
``W = (q - zp) * scale`` with the op's default zero point ``zp = 2^(bits-1)`` (8 or 128)
when no zero-point input is given. We therefore emit no zero-point tensor.

The grid is ONNX Runtime's MatMulNBits symmetric grid, computed by the one implementation
both layouts share, :func:`builder.quant.blockwise.quantize_symmetric_mlas` (MLAS
``range2scale`` in onnxruntime/core/mlas/lib/q4_dq.cpp): per block the anchor is the element
of largest magnitude *with its sign* (ties go to the negative one) and
``scale = anchor / -2^(bits-1)``. The anchor then lands exactly on code 0, so the full code
range [-8, 7] / [-128, 127] is used and the extreme is reproduced without error. About half
the scales are negative; that sign is load-bearing. Taking ``abs()`` of the scale (a bug that
looks like "int4 quality loss") flips every block whose anchor is negative.

Codes are ``roundf(w * (1/scale) + zp)`` in float32, clipped to [0, 2^bits - 1], and packed
by the same nibble packer as MatMulNBits, which is bit-identical to
``onnxruntime.capi._pybind_state.quantize_matmul_{4,8}bits`` (measured, see
tests/test_quant_moe.py). The CPU QMoE kernel, the CUDA PrePack hook
(``weights_prepacked=0``) and :func:`builder.quant.cuda_layout.prepack_for_cuda` all
consume this raw layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from builder.quant import BLOCK_SIZES
from builder.quant.blockwise import pack_codes, quantize_symmetric_mlas, unpack_codes

SUPPORTED_BITS = (4, 8)
__all__ = ["QuantizedExperts", "quantize_experts", "dequantize_experts", "unpack_codes"]

# Rows (over all experts) quantized per vectorised pass: bounds temporaries to ~64 MiB of
# float32 for K=2880 while keeping each numpy call large enough to amortise its overhead.
_ROW_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class QuantizedExperts:
    """Quantized expert weights in QMoE's raw (un-prepacked) layout.

    packed: uint8 [E, N, K*bits//8], rows = output features, even k in the low nibble (4-bit).
    scales: float32 [E, N] (per-channel, block_size == 0) or [E, N, K // block_size].
    bits:   4 or 8. Codes are unsigned with the implicit zero point 2^(bits-1).
    block_size: 0 for per-channel, else the block length along K.
    """

    packed: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int

    @property
    def zero_point(self) -> int:
        """The implicit zero point QMoE assumes when no zero-point input is wired."""
        return 1 << (self.bits - 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Logical float shape [E, N, K] of the weights this object encodes."""
        e, n, kb = self.packed.shape
        return e, n, kb * 8 // self.bits


def quantize_experts(w: np.ndarray, *, bits: int, block_size: int, name: str = "experts") -> QuantizedExperts:
    """Quantize expert-major weights ``w`` [E, N, K] (any float dtype) symmetrically.

    ``block_size <= 0`` gives one scale per output row (per-channel); otherwise one scale per
    ``block_size`` consecutive k. Raises ValueError naming ``name`` for shapes QMoE cannot take.
    """
    w = np.asarray(w)
    _validate(w, bits=bits, block_size=block_size, name=name)
    e, n, k = w.shape
    block = k if block_size <= 0 else block_size
    blocks_per_row = k // block

    rows = w.reshape(e * n, k)
    packed = np.empty((e * n, k * bits // 8), dtype=np.uint8)
    scales = np.empty((e * n, blocks_per_row), dtype=np.float32)
    step = max(1, _ROW_CHUNK_ELEMENTS // k)
    for start in range(0, e * n, step):
        chunk = rows[start:start + step].astype(np.float32, copy=False).reshape(-1, blocks_per_row, block)
        codes, chunk_scales = quantize_symmetric_mlas(chunk, bits)
        scales[start:start + step] = chunk_scales
        packed[start:start + step] = pack_codes(codes.reshape(codes.shape[0], k), bits)

    if not np.isfinite(scales).all():
        bad = np.argwhere(~np.isfinite(scales.reshape(e, n, blocks_per_row)))[0]
        raise ValueError(
            f"{name}: weight block at expert {bad[0]}, row {bad[1]}, block {bad[2]} contains inf/NaN, "
            "so its scale is not finite; clean the checkpoint tensor before quantizing."
        )
    scales = scales.reshape(e, n) if block_size <= 0 else scales.reshape(e, n, blocks_per_row)
    return QuantizedExperts(packed=packed.reshape(e, n, -1), scales=scales, bits=bits,
                            block_size=max(block_size, 0))


def dequantize_experts(q: QuantizedExperts) -> np.ndarray:
    """Reconstruct float32 [E, N, K] exactly as QMoE does: (code - zp) * scale."""
    e, n, k = q.shape
    codes = unpack_codes(q.packed, q.bits).astype(np.float32)
    codes -= np.float32(q.zero_point)
    if q.block_size <= 0:
        return codes * q.scales.astype(np.float32)[:, :, None]
    blocks = codes.reshape(e, n, k // q.block_size, q.block_size)
    blocks *= q.scales.astype(np.float32)[..., None]
    return blocks.reshape(e, n, k)


def _validate(w: np.ndarray, *, bits: int, block_size: int, name: str) -> None:
    """Reject inputs QMoE cannot represent, saying what, where and how to fix."""
    if w.ndim != 3:
        raise ValueError(
            f"{name}: expected expert-major weights [E, N, K] (3-D), got shape {tuple(w.shape)}; "
            "stack the experts first (e.g. np.stack of per-expert [N, K] matrices)."
        )
    if not np.issubdtype(w.dtype, np.floating) and w.dtype.kind != "V":
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {w.dtype}; cast it to float32.")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: bits={bits} is not supported by QMoE int quantization; use 4 or 8.")
    e, n, k = w.shape
    if block_size > 0 and block_size not in BLOCK_SIZES:
        raise ValueError(
            f"{name}: block_size={block_size} is not supported; use one of {BLOCK_SIZES} "
            "or 0 for per-channel scales."
        )
    if (k * bits) % 8 != 0:
        raise ValueError(
            f"{name}: K={k} (shape [E, N, K]={list(w.shape)}) cannot be packed at {bits} bits into whole "
            "bytes; K must be even for 4-bit. Pad K or use bits=8."
        )
    if block_size > 0 and k % block_size != 0:
        raise ValueError(
            f"{name}: K={k} (shape [E, N, K]={list(w.shape)}) is not a multiple of block_size={block_size}; "
            "choose a block_size that divides K or use block_size=0 (per-channel)."
        )
    if e == 0 or n == 0 or k == 0:
        raise ValueError(f"{name}: empty weight tensor of shape {list(w.shape)}; nothing to quantize.")

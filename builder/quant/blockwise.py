"""Blockwise int4/int8 quantization of a Linear weight into the MatMulNBits / GatherBlockQuantized layout.

A weight ``w`` arrives in Hugging Face orientation ``[N, K]`` (out_features, in_features). MatMulNBits wants it
quantized along K in blocks of ``block_size``: ``W[n, k] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs]``.
K is zero-padded to a multiple of the block size, exactly as ONNX Runtime's own quantizers do, so padded codes
equal the zero point and contribute nothing.

Two methods, each reproducing an ONNX Runtime quantizer so models built here match models quantized there:

- ``default``: MLAS ``quantize_matmul_{4,8}bits`` (what ``DefaultWeightOnlyQuantConfig`` runs). Symmetric uses a
  *signed* scale, ``-(largest-magnitude element) / 2^(bits-1)``, so that element maps to code 0 (the wider half
  of the unsigned range) whichever its sign; asymmetric widens [min, max] to include 0. float32 arithmetic and
  ``roundf`` (ties away from zero), like the C++ code.
- ``rtn``: the round-to-nearest quantizer behind ``RTNWeightOnlyQuantConfig`` (``quant_tensor`` in ORT's
  vendored neural_compressor): positive scales from ``2*max|x| / (2^bits - 1)`` (symmetric) or ``(max-min) /
  (2^bits - 1)`` (asymmetric, range not widened to 0), float64 arithmetic, ties to even.

Every row is quantized independently, so callers may stream row blocks and concatenate the results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from builder.quant import BLOCK_SIZES

VALID_BITS = (4, 8)
VALID_METHODS = ("default", "rtn")


@dataclass(frozen=True)
class QuantizedMatrix:
    """A blockwise-quantized ``[N, K]`` weight in MatMulNBits input layout.

    ``zero_points`` is None for symmetric quantization: the ops then use their default zero point
    ``2^(bits-1)`` (8 for int4, 128 for int8), which is what the codes were produced with.
    """

    packed: np.ndarray  # uint8 [N, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)]
    bits: int
    block_size: int
    k: int  # K before padding to a multiple of block_size

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.packed.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# validation and layout helpers (shared with kquant.py)


def check_args(fn: str, w, bits: int, block_size: int) -> np.ndarray:
    """Validate a weight and the quantization parameters; return the weight as a float32 ``[N, K]`` array."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(
            f"{fn}: expected a 2-D weight [N, K] (out_features, in_features), got shape {tuple(w.shape)}; "
            "reshape or slice it to 2-D first (experts: quantize one [N, K] matrix at a time)"
        )
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{fn}: weight of shape {tuple(w.shape)} is empty; N and K must both be >= 1")
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype.name == "bfloat16"):
        raise ValueError(f"{fn}: weight dtype {w.dtype} of shape {tuple(w.shape)} is not floating point")
    if bits not in VALID_BITS:
        raise ValueError(f"{fn}: bits={bits!r} not supported for weight {tuple(w.shape)}; valid: {VALID_BITS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"{fn}: block_size={block_size!r} not supported for weight {tuple(w.shape)}; valid: {BLOCK_SIZES}"
        )
    w = np.ascontiguousarray(w, dtype=np.float32)
    finite = np.isfinite(w)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise ValueError(
            f"{fn}: weight of shape {tuple(w.shape)} contains NaN/Inf (first at row {r}, column {c}); "
            "fix the checkpoint or keep this weight in floating point"
        )
    return w


def to_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """``[N, K]`` float32 -> ``[N, n_blocks, block_size]``, zero-padding K like ORT's quantizers do."""
    n, k = w.shape
    pad = -k % block_size
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    return w.reshape(n, -1, block_size)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``[..., block_size]`` -> MatMulNBits bytes; int4: element 2i in the low nibble of byte i."""
    codes = codes.astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(codes)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """uint8 zero points ``[N, n_blocks]`` -> ``[N, ceil(n_blocks * bits / 8)]``.

    For int4 an odd block count leaves a spare high nibble; MLAS fills it with 8, and so do we, so the bytes match.
    """
    zp = zp.astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(zp)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.full((zp.shape[0], 1), 8, np.uint8)], axis=1)
    return zp[:, 0::2] | (zp[:, 1::2] << 4)


def unpack_zero_points(packed_zp: np.ndarray, bits: int, n_blocks: int) -> np.ndarray:
    """Inverse of :func:`pack_zero_points`, trimmed to ``n_blocks``."""
    if bits == 8:
        return packed_zp[:, :n_blocks]
    return unpack_codes(packed_zp, 4)[:, :n_blocks]


def round_half_away(x: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """C ``roundf``: nearest integer, ties away from zero (``np.rint`` breaks ties to even); the one implementation
    every quantizer here uses.

    Exact: ``|x|`` splits into its integer part and a fraction without rounding error, and the fraction alone
    decides (``floor(|x| + 0.5)`` would be wrong for 0.49999997 in float32). `in_place` reuses x's buffer for the
    fraction (x is then lost), which saves a full-size temporary in the quantizers' hot loops.
    """
    negative = np.signbit(x)
    fraction = np.abs(x, out=x if in_place else None)
    whole = np.floor(fraction)
    fraction -= whole
    whole += fraction >= 0.5
    if negative.any():  # rare in codes, which are offset to be non-negative
        np.negative(whole, out=whole, where=negative)
    return whole


# ----------------------------------------------------------------------------------------------------------------
# the two methods: blocks [N, nb, bs] float32 -> codes (float array of integers), scales f32, zero points or None


def quantize_symmetric_mlas(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The MLAS symmetric grid (``quantize_matmul_{4,8}bits``, q4_dq.cpp ``range2scale``), shared by MatMulNBits and
    QMoE weights: float32 blocks ``[..., block]`` -> (uint8 codes ``[..., block]``, float32 signed scales ``[...]``).

    Per block the anchor is the element of largest magnitude *with its sign* (ties go to the negative one) and
    ``scale = -anchor / 2^(bits-1)``, so the anchor lands on code 0 and the whole code range is used. Codes are
    ``roundf(w * (1/scale) + 2^(bits-1))`` in float32, clipped to [0, 2^bits - 1]; an all-zero block gets scale
    -0.0, reciprocal 0 and every code at the zero point. Blocks holding inf/NaN give non-finite scales (the caller
    reports them); numpy stays quiet about them.
    """
    mid = np.float32(2 ** (bits - 1))
    mx = blocks.max(axis=-1)
    mn = blocks.min(axis=-1)
    scales = (-np.where(np.abs(mx) > np.abs(mn), mx, mn) / mid).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        recip = np.zeros_like(scales)
        np.divide(np.float32(1), scales, out=recip, where=scales != 0)
        codes = blocks * recip[..., None]
        codes += mid
        codes = round_half_away(codes, in_place=True)
        np.clip(codes, 0, 2**bits - 1, out=codes)
        return codes.astype(np.uint8), scales


def _default_mlas(blocks: np.ndarray, bits: int, symmetric: bool):
    """MLAS BlockwiseQuantizer maths, in float32."""
    if symmetric:
        codes, scales = quantize_symmetric_mlas(blocks, bits)
        return codes, scales, None
    qmax = np.float32(2**bits - 1)
    mn = np.minimum(blocks.min(axis=-1), np.float32(0))
    mx = np.maximum(blocks.max(axis=-1), np.float32(0))
    scales = ((mx - mn) / qmax).astype(np.float32)
    nonzero = scales != 0
    zp_raw = np.where(nonzero, np.float32(0) - mn / np.where(nonzero, scales, np.float32(1)), mn)
    zero_points = np.clip(round_half_away(zp_raw.astype(np.float32)), 0, qmax).astype(np.uint8)
    recip = np.zeros_like(scales)
    np.divide(np.float32(1), scales, out=recip, where=scales != 0)
    codes = round_half_away(blocks * recip[..., None] + zero_points.astype(np.float32)[..., None])
    np.clip(codes, 0, qmax, out=codes)
    return codes, scales, zero_points


def _rtn(blocks: np.ndarray, bits: int, symmetric: bool):
    """ORT neural_compressor ``quant_tensor(..., dtype="uint")`` maths: float64, ties to even."""
    qmax = 2**bits - 1
    mx = blocks.max(axis=-1)
    mn = blocks.min(axis=-1)
    if symmetric:
        peak = np.maximum(np.abs(mn), np.abs(mx))
        scales64 = np.where(peak > 0, (peak * np.float32(2)).astype(np.float64) / qmax, 1.0)
        zp_f = np.full(scales64.shape, float(2 ** (bits - 1)))
        zero_points = None
    else:
        span = (mx - mn).astype(np.float64)  # float32 subtraction first, as the reference does
        scales64 = np.where(mn != mx, span / qmax, 1.0)
        zero_points = np.clip(np.rint(-mn.astype(np.float64) / scales64), 0, qmax).astype(np.uint8)
        zp_f = zero_points.astype(np.float64)
    codes = np.rint(blocks / scales64[..., None] + zp_f[..., None])
    np.clip(codes, 0, qmax, out=codes)
    return codes, scales64.astype(np.float32), zero_points


_METHODS = {"default": _default_mlas, "rtn": _rtn}


def quantize_blockwise(
    w: np.ndarray, *, bits: int = 4, block_size: int = 32, symmetric: bool = True, method: str = "default"
) -> QuantizedMatrix:
    """Quantize a ``[N, K]`` weight along K; see the module docstring for what each method reproduces."""
    if method not in _METHODS:
        raise ValueError(
            f"quantize_blockwise: method={method!r} unknown for weight {tuple(np.shape(w))}; "
            f"valid: {', '.join(VALID_METHODS)} (k_quant lives in builder.quant.kquant.quantize_kquant)"
        )
    w = check_args("quantize_blockwise", w, bits, block_size)
    codes, scales, zero_points = _METHODS[method](to_blocks(w, block_size), bits, symmetric)
    return QuantizedMatrix(
        packed=pack_codes(codes, bits),
        scales=np.ascontiguousarray(scales, dtype=np.float32),
        zero_points=None if zero_points is None else pack_zero_points(zero_points, bits),
        bits=bits,
        block_size=block_size,
        k=w.shape[1],
    )


def dequantize_blockwise(q: QuantizedMatrix) -> np.ndarray:
    """``(code - zero_point) * scale`` as float32 ``[N, K]``: what MatMulNBits multiplies by (accuracy_level 0)."""
    codes = unpack_codes(q.packed, q.bits).astype(np.float32)
    if q.zero_points is None:
        zp = np.float32(2 ** (q.bits - 1))
    else:
        zp = unpack_zero_points(q.zero_points, q.bits, q.n_blocks).astype(np.float32)[..., None]
    w = (codes - zp) * q.scales[..., None]
    return w.reshape(q.n, -1)[:, : q.k]

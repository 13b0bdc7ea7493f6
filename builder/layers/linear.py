"""Linear projections: float MatMul, or MatMulNBits with weights quantized block by block while they stream.

The format of each weight (float / int4 method / int8) comes from the QuantPlan; this module only realises it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext
from builder.quant.plan import WeightFormat
from builder.weights import Weight, block_spans, ordered_map


class QuantizedSource:
    """Quantizes a [N, K] weight in row blocks once; the packed codes stream to disk, scales/zero points are kept.

    The packed initializer is registered (and so written) before its scales, so each weight is read and quantized
    exactly once; the scales (1/4 of the packed size at 4 bits) are held until the writer reaches them and then
    dropped, so held scales never add up over the layers.
    Row blocks are read and quantized by `ordered_map` workers (one per core) and come back in order, so the bytes
    do not depend on the thread count.
    """

    block_bytes: int | None = None  # rows per block: weights.ROW_BLOCK_BYTES unless a subclass says otherwise

    def __init__(self, weight: Weight, fmt: WeightFormat):
        self.weight = weight
        self.fmt = fmt
        self._held: dict[str, list[np.ndarray]] = {}  # "scales"/"zero_points" of the last pass, not yet written

    def _quantize(self, rows: np.ndarray):
        from builder.quant.blockwise import quantize_blockwise
        from builder.quant.kquant import quantize_kquant

        if self.fmt.method == "k_quant":
            return quantize_kquant(rows, bits=self.fmt.bits, block_size=self.fmt.block_size)
        return quantize_blockwise(rows, bits=self.fmt.bits, block_size=self.fmt.block_size,
                                  symmetric=self.fmt.symmetric, method=self.fmt.method)

    def _quantize_rows(self, span: tuple[int, int]):
        return self._quantize(self.weight.rows(*span))

    def packed_blocks(self):
        scales, zero_points = [], []
        for q in ordered_map(self._quantize_rows, block_spans(self.weight, self.block_bytes)):
            scales.append(q.scales)
            if q.zero_points is not None:
                zero_points.append(q.zero_points)
            yield q.packed
        self._held = {"scales": scales, "zero_points": zero_points}

    def _take(self, kind: str) -> np.ndarray:
        """Hand over the scales or zero points of the last pass and forget them (re-quantizes if none is held)."""
        if kind not in self._held:
            for _ in self.packed_blocks():
                pass
        return np.concatenate(self._held.pop(kind), axis=0)

    def scales(self) -> np.ndarray:
        return self._take("scales")

    def zero_points(self) -> np.ndarray:
        return self._take("zero_points")

    def release(self) -> None:
        self._held = {}


def quantized_shapes(n: int, k: int, fmt: WeightFormat) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """MatMulNBits B, scales and packed zero-point shapes for an [N, K] weight."""
    blocks = -(-k // fmt.block_size)
    return (n, blocks, fmt.block_size * fmt.bits // 8), (n, blocks), (n, -(-blocks * fmt.bits // 8))


def add_quantized_weight(ctx: LayerContext, name: str, weight: Weight, fmt: WeightFormat, *, flat: bool = False):
    """Register packed codes, scales (model dtype) and zero points (if asymmetric); returns the three Values.

    `flat` stores the codes 2-D [N, blocks * block_size * bits / 8] (the GatherBlockQuantized layout: same bytes).
    """
    n, k = weight.shape
    source = QuantizedSource(weight, fmt)
    b_shape, s_shape, zp_shape = quantized_shapes(n, k, fmt)
    if flat:
        b_shape = (n, b_shape[1] * b_shape[2])
    g = ctx.g
    packed = g.streamed(f"{name}.qweight", ir.DataType.UINT8, b_shape, source.packed_blocks)
    numpy_dtype = ctx.settings.numpy_dtype
    scales = g.streamed(f"{name}.scales", ctx.settings.ir_dtype, s_shape,
                        lambda: iter([source.scales().astype(numpy_dtype)]))
    zero_points = None
    if not fmt.symmetric:
        zero_points = g.streamed(f"{name}.zero_points", ir.DataType.UINT8, zp_shape,
                                 lambda: iter([source.zero_points()]))
    return packed, scales, zero_points


def matmul_nbits(ctx: LayerContext, x: ir.Value, quantized, n: int, k: int, fmt: WeightFormat) -> ir.Value:
    """MatMulNBits over already registered (packed [N, blocks, bytes], scales, zero points or None) Values."""
    packed, scales, zero_points = quantized
    inputs = [x, packed, scales] + ([zero_points] if zero_points is not None else [])
    return ctx.g.ms("MatMulNBits", inputs, K=k, N=n, bits=fmt.bits, block_size=fmt.block_size,
                    accuracy_level=fmt.accuracy_level)


def linear(ctx: LayerContext, x: ir.Value, name: str, weight: Weight, fmt: WeightFormat,
           bias: Weight | None = None) -> ir.Value:
    """y = x @ W.T (+ b) for a weight in HF orientation [N, K]."""
    g = ctx.g
    n, k = weight.shape
    if fmt.is_float:
        w = ctx.float_initializer(f"{name}.weight", weight, transpose=True)
        y = g.op("MatMul", [x, w])
    else:
        y = matmul_nbits(ctx, x, add_quantized_weight(ctx, name, weight, fmt), n, k, fmt)
    if bias is not None:
        y = g.op("Add", [y, ctx.float_initializer(f"{name}.bias", bias)])
    return y

"""Linear projections: float MatMul, or MatMulNBits with weights quantized block by block while they stream.

The format of each weight (float / int4 method / int8) comes from the QuantPlan; this module only realises it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import onnx_ir as ir

from builder.layers import LayerContext
from builder.quant.plan import WeightFormat
from builder.weights import Weight, block_spans, ordered_map


class QuantizedWeight:
    """One weight's quantization: a single pass over its rows hands out packed codes, scales and zero points.

    Quantizing a row block yields all three at once, but each is stored in its own initializer, and the writer
    saves initializers in an order of its choosing. Whichever output is asked for first runs the pass, streaming its
    own blocks as they come; the other outputs of that pass are kept until their initializers take them, then
    forgotten. So a weight is read and quantized once whatever the write order, and only what is not yet written is
    held: the scales (1/4 of the packed size at 4 bits) when the codes go first, the codes if scales go first.
    Row blocks are read and quantized by `ordered_map` workers (one per core) and come back in order, so the bytes
    do not depend on the thread count.
    """

    OUTPUTS = ("packed", "scales", "zero_points")

    def __init__(self, weight: Weight, quantize: Callable[[np.ndarray], Any], block_bytes: int | None = None):
        self.weight = weight
        self._quantize = quantize  # float32 rows -> object with .packed, .scales, .zero_points (None if symmetric)
        self.block_bytes = block_bytes  # rows per block: weights.ROW_BLOCK_BYTES unless given
        self._held: dict[str, list[np.ndarray]] = {}  # outputs of the last pass that nobody has taken yet
        self.passes = 0  # quantization passes run (one, unless an output is asked for twice)

    def _quantize_rows(self, span: tuple[int, int]):
        return self._quantize(self.weight.rows(*span))

    def blocks(self, kind: str) -> Iterator[np.ndarray]:
        """The blocks of one output, in row order: from the pass that already ran, else from a new pass."""
        if kind in self._held:
            held = self._held.pop(kind)
            held.reverse()
            while held:  # each block is forgotten once handed over: what is held shrinks as the writer takes it
                yield held.pop()
            return
        self.passes += 1
        others: dict[str, list[np.ndarray]] = {k: [] for k in self.OUTPUTS if k != kind}
        for q in ordered_map(self._quantize_rows, block_spans(self.weight, self.block_bytes)):
            for other, parts in others.items():
                if getattr(q, other) is not None:
                    parts.append(getattr(q, other))
            if getattr(q, kind) is not None:
                yield getattr(q, kind)
        self._held.update(others)

    def whole(self, kind: str) -> np.ndarray:
        """One output as a single array (scales and zero points: small enough to hand over at once)."""
        return np.concatenate(list(self.blocks(kind)), axis=0)


def quantize_rows(fmt: WeightFormat) -> Callable[[np.ndarray], Any]:
    """The MatMulNBits quantizer of `fmt`: float32 [N, K] rows -> packed codes, scales, zero points."""
    from builder.quant.blockwise import quantize_blockwise
    from builder.quant.kquant import quantize_kquant

    if fmt.method == "k_quant":
        return lambda rows: quantize_kquant(rows, bits=fmt.bits, block_size=fmt.block_size)
    return lambda rows: quantize_blockwise(rows, bits=fmt.bits, block_size=fmt.block_size, symmetric=fmt.symmetric,
                                           method=fmt.method)


def quantized_shapes(n: int, k: int, fmt: WeightFormat) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """MatMulNBits B, scales and packed zero-point shapes for an [N, K] weight."""
    blocks = -(-k // fmt.block_size)
    return (n, blocks, fmt.block_size * fmt.bits // 8), (n, blocks), (n, -(-blocks * fmt.bits // 8))


def add_quantized_weight(ctx: LayerContext, name: str, weight: Weight, fmt: WeightFormat, *, flat: bool = False,
                         prepacked: bool = False):
    """Register packed codes, scales (model dtype) and zero points (if asymmetric); returns the three Values.

    `flat` stores the codes 2-D [N, blocks * block_size * bits / 8] (the GatherBlockQuantized layout: same bytes).
    `prepacked` stores them in the CUDA fpA_intB layout that MatMulNBits weight_prepacked=1 reads (same shape).
    """
    n, k = weight.shape
    source = QuantizedWeight(weight, quantize_rows(fmt))
    b_shape, s_shape, zp_shape = quantized_shapes(n, k, fmt)
    if flat:
        b_shape = (n, b_shape[1] * b_shape[2])
    g = ctx.g
    codes = lambda: source.blocks("packed")  # noqa: E731
    if prepacked:
        from builder.quant.cuda_layout import prepack_matmul_nbits_blocks

        codes = lambda: prepack_matmul_nbits_blocks(source.blocks("packed"), n, k, fmt.bits)  # noqa: E731
    packed = g.streamed(f"{name}.qweight", ir.DataType.UINT8, b_shape, codes)
    numpy_dtype = ctx.settings.numpy_dtype
    scales = g.streamed(f"{name}.scales", ctx.settings.ir_dtype, s_shape,
                        lambda: (block.astype(numpy_dtype, copy=False) for block in source.blocks("scales")))
    zero_points = None
    if not fmt.symmetric:
        zero_points = g.streamed(f"{name}.zero_points", ir.DataType.UINT8, zp_shape,
                                 lambda: source.blocks("zero_points"))
    return packed, scales, zero_points


def matmul_nbits(ctx: LayerContext, x: ir.Value, quantized, n: int, k: int, fmt: WeightFormat,
                 bias: ir.Value | None = None, prepacked: bool = False) -> ir.Value:
    """MatMulNBits over already registered (packed [N, blocks, bytes], scales, zero points or None) Values; a bias
    goes in the op's own bias input (one node instead of MatMulNBits + Add: ORT folds the pair on its CPU EP only).
    `prepacked`: the packed bytes are in the CUDA fpA_intB SM80 layout (weight_prepacked=1)."""
    packed, scales, zero_points = quantized
    inputs = [x, packed, scales, zero_points, None, bias]
    while inputs[-1] is None:
        inputs.pop()
    layout = {"weight_prepacked": 1} if prepacked else {}
    return ctx.g.ms("MatMulNBits", inputs, K=k, N=n, bits=fmt.bits, block_size=fmt.block_size,
                    accuracy_level=fmt.accuracy_level, **layout)


def linear(ctx: LayerContext, x: ir.Value, name: str, weight: Weight, fmt: WeightFormat,
           bias: Weight | None = None, dtype: ir.DataType | None = None, prepacked: bool = False) -> ir.Value:
    """y = x @ W.T (+ b) for a weight in HF orientation [N, K]; a float weight (and bias) in `dtype` when given (x
    must then be in it too), else in the model dtype. `prepacked`: a quantized weight in the CUDA fpA_intB layout."""
    g = ctx.g
    n, k = weight.shape
    if not fmt.is_float:
        quantized = add_quantized_weight(ctx, name, weight, fmt, prepacked=prepacked)
        b = ctx.float_initializer(f"{name}.bias", bias) if bias is not None else None
        return matmul_nbits(ctx, x, quantized, n, k, fmt, b, prepacked)
    y = g.op("MatMul", [x, ctx.float_initializer(f"{name}.weight", weight, transpose=True, dtype=dtype)])
    if bias is not None:
        y = g.op("Add", [y, ctx.float_initializer(f"{name}.bias", bias, dtype=dtype)])
    return y

"""Weight quantizers: pure numpy functions from a float weight to packed codes, scales and zero points.

They know nothing about graphs or checkpoints, so each can be tested against ONNX Runtime's own quantizers and
reused by any layer that consumes the MatMulNBits / GatherBlockQuantized / QMoE layouts.
"""

# The block sizes (along K) that every blockwise layout here takes: MatMulNBits, GatherBlockQuantized, QMoE. Kept in
# this light module so the options table can name them without importing numpy code.
BLOCK_SIZES = (16, 32, 64, 128, 256)

"""Weight quantizers: pure numpy functions from a float weight to packed codes, scales and zero points.

They know nothing about graphs or checkpoints, so each can be tested against ONNX Runtime's own quantizers and
reused by any layer that consumes the MatMulNBits / GatherBlockQuantized / QMoE layouts.
"""

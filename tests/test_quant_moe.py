"""QMoE expert quantization and the CUDA mixed-GEMM prepack, checked against independent references.

References used: ONNX Runtime's own MatMulNBits quantizers (``quantize_matmul_{4,8}bits`` pybind),
ONNX Runtime's CPU QMoE kernel fed our bytes (vs a float64 numpy MoE), ORT 1.31.1's PyTorch port of
the CUDA packer (``_pack_weights_for_cuda_mixed_gemm``), and small cases worked out by hand from
the CUTLASS preprocessor's definition.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.quant import cuda_layout
from builder.quant.cuda_layout import prepack_for_cuda, unprepack_from_cuda
from builder.quant.moe import QuantizedExperts, dequantize_experts, quantize_experts, unpack_codes

RNG = np.random.default_rng(1234)


def _weights(e: int, n: int, k: int, scale: float = 0.2) -> np.ndarray:
    # Per-row magnitudes spread over three decades so scales differ row to row.
    return (RNG.standard_normal((e, n, k)) * RNG.uniform(0.01, 3.0, (e, n, 1)) * scale).astype(np.float32)


# --------------------------------------------------------------------------- quantize / dequantize

def _ort_quantize(w2d: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w2d.shape
    nb = k // block
    q = np.zeros((n, nb, block * bits // 8), np.uint8)
    s = np.zeros((n, nb), np.float32)
    zp = np.zeros((n, (nb + 1) // 2 if bits == 4 else nb), np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(q, np.ascontiguousarray(w2d.T), s, zp, block, n, k, True)
    return q.reshape(n, -1), s


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 128, 0])
def test_bit_exact_with_ort_matmulnbits_quantizer(bits, block_size):
    e, n, k = 3, 40, 256
    w = _weights(e, n, k)
    w[0, 0, :16] = 0.0                       # all-zero block: scale -0.0, every code = zero point
    w[0, 1, :] = 0.01
    w[0, 1, 3], w[0, 1, 5] = 1.0, -1.0       # magnitude tie: MLAS picks the negative anchor
    w[1, 2, 7] = 0.5 * np.abs(w[1, 2]).max() * 3  # lone positive anchor -> negative scale
    q = quantize_experts(w, bits=bits, block_size=block_size)
    block = k if block_size == 0 else block_size
    for i in range(e):
        ref_q, ref_s = _ort_quantize(w[i], bits, block)
        np.testing.assert_array_equal(q.packed[i], ref_q)
        ours = q.scales[i].reshape(n, -1)
        np.testing.assert_array_equal(ours, ref_s)
    assert q.packed.shape == (e, n, k * bits // 8) and q.packed.dtype == np.uint8
    assert q.scales.shape == ((e, n) if block_size == 0 else (e, n, k // block_size))
    assert q.scales.dtype == np.float32 and q.block_size == block_size
    assert (q.scales < 0).mean() > 0.3  # signed scales really are emitted


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [32, 0])
def test_round_trip_error_bound(bits, block_size):
    e, n, k = 2, 16, 128
    w = _weights(e, n, k)
    w[0, 0, 0] = 2 * np.abs(w[0, 0]).max()
    w[0, 0, 1] = -w[0, 0, 0]  # tie -> negative anchor, so the positive twin clips one step
    q = quantize_experts(w, bits=bits, block_size=block_size)
    back = dequantize_experts(q)
    assert back.shape == w.shape and back.dtype == np.float32
    block = k if block_size == 0 else block_size
    s = np.abs(q.scales.reshape(e, n, -1, 1))
    err = np.abs(back - w).reshape(e, n, -1, block)
    # Grid step is |scale|; the only value that can clip is one step above the top code.
    assert (err <= s * (1 + 1e-5)).all()
    half = 1 << (bits - 1)
    ratio = w.reshape(e, n, -1, block) / q.scales.reshape(e, n, -1, 1)  # code offset before rounding
    inside = ratio <= half - 0.5  # everything except the clipped top half-step
    assert (err <= np.where(inside, s * 0.5 * (1 + 1e-5), s * (1 + 1e-5))).all()
    assert (~inside).any()  # the clipped side was exercised
    # Overall relative RMS error stays at the level of the grid (Gaussian rows: ~0.09 int4, ~0.005 int8).
    rel = np.sqrt(((back - w) ** 2).mean()) / np.sqrt((w ** 2).mean())
    assert rel < (0.12 if bits == 4 else 0.008)


@pytest.mark.parametrize("bits", [4, 8])
def test_signed_scales_are_not_abs(bits):
    """Guards the sign of the scale: abs() would flip every block with a positive anchor."""
    k = 32
    w = np.full((1, 2, k), 0.25, np.float32)
    w[0, 0, 4] = 3.0    # positive largest magnitude
    w[0, 0, 9] = -2.5
    w[0, 1, 4] = -3.0   # negative largest magnitude
    w[0, 1, 9] = 2.5
    q = quantize_experts(w, bits=bits, block_size=32)
    half = 1 << (bits - 1)
    assert q.scales[0, 0, 0] == np.float32(3.0 / -half) < 0
    assert q.scales[0, 1, 0] == np.float32(3.0 / half) > 0
    codes = unpack_codes(q.packed, bits)
    assert codes[0, 0, 4] == 0 and codes[0, 1, 4] == 0  # anchor sits on the lowest code
    back = dequantize_experts(q)
    assert back[0, 0, 4] == np.float32(3.0) and back[0, 1, 4] == np.float32(-3.0)
    flipped = QuantizedExperts(q.packed, np.abs(q.scales), bits, 32)
    assert dequantize_experts(flipped)[0, 0, 4] == np.float32(-3.0)  # what abs() would do


def test_dequantize_matches_codes_formula():
    w = _weights(2, 8, 64)
    q = quantize_experts(w, bits=4, block_size=16)
    codes = np.stack([q.packed & 15, q.packed >> 4], -1).reshape(2, 8, 64).astype(np.float32)
    expected = (codes - 8) * np.repeat(q.scales, 16, axis=-1)
    np.testing.assert_array_equal(dequantize_experts(q), expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_accepts_half_and_bfloat16_inputs(dtype):
    import ml_dtypes

    low = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    w = _weights(2, 8, 64).astype(low)
    ref = quantize_experts(w.astype(np.float32), bits=4, block_size=32)
    got = quantize_experts(w, bits=4, block_size=32)
    np.testing.assert_array_equal(got.packed, ref.packed)
    np.testing.assert_array_equal(got.scales, ref.scales)


def test_integer_weights_are_rejected():
    with pytest.raises(ValueError) as err:
        quantize_experts(np.zeros((2, 8, 64), np.int8), bits=4, block_size=32, name="fc1")
    assert str(err.value) == "fc1: expected a floating-point tensor, got dtype int8; cast it to float32."


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((8, 64), dict(bits=4, block_size=32),
         "fc1: expected expert-major weights [E, N, K] (3-D), got shape (8, 64); "
         "stack the experts first (e.g. np.stack of per-expert [N, K] matrices)."),
        ((2, 8, 64), dict(bits=3, block_size=32),
         "fc1: bits=3 is not supported by QMoE int quantization; use 4 or 8."),
        ((2, 8, 64), dict(bits=4, block_size=48),
         "fc1: block_size=48 is not supported; use one of (16, 32, 64, 128, 256) or 0 for per-channel scales."),
        ((2, 8, 96), dict(bits=4, block_size=64),
         "fc1: K=96 (shape [E, N, K]=[2, 8, 96]) is not a multiple of block_size=64; "
         "choose a block_size that divides K or use block_size=0 (per-channel)."),
        ((2, 8, 33), dict(bits=4, block_size=0),
         "fc1: K=33 (shape [E, N, K]=[2, 8, 33]) cannot be packed at 4 bits into whole bytes; "
         "K must be even for 4-bit. Pad K or use bits=8."),
    ],
)
def test_quantize_validation_messages(shape, kwargs, message):
    with pytest.raises(ValueError) as err:
        quantize_experts(np.zeros(shape, np.float32), name="fc1", **kwargs)
    assert str(err.value) == message


def test_non_finite_weights_are_named():
    w = np.zeros((2, 4, 64), np.float32)
    w[1, 3, 40] = np.inf
    with pytest.raises(ValueError) as err:
        quantize_experts(w, bits=8, block_size=32, name="layers.3.fc2")
    assert str(err.value) == (
        "layers.3.fc2: weight block at expert 1, row 3, block 1 contains inf/NaN, so its scale is not "
        "finite; clean the checkpoint tensor before quantizing."
    )


# --------------------------------------------------------------------------- QMoE on ORT's CPU EP

def _qmoe_session(q1: QuantizedExperts, q2: QuantizedExperts, tokens: int, experts: int, top_k: int):
    hidden = q2.shape[1]
    attrs = dict(activation_type="swiglu", expert_weight_bits=q1.bits, k=top_k, normalize_routing_weights=1,
                 swiglu_fusion=1, activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0)
    if q1.block_size > 0:
        attrs["block_size"] = q1.block_size
    node = helper.make_node("QMoE", ["x", "logits", "w1", "s1", "", "w2", "s2"], ["y"],
                            domain="com.microsoft", **attrs)
    inits = [numpy_helper.from_array(q1.packed, "w1"), numpy_helper.from_array(q1.scales, "s1"),
             numpy_helper.from_array(q2.packed, "w2"), numpy_helper.from_array(q2.scales, "s2")]
    graph = helper.make_graph(
        [node], "qmoe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [tokens, experts])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _int8_activations(v: np.ndarray, block: int) -> np.ndarray:
    """ORT's CPU kernel quantizes activations to int8 per K block for 8-bit block-wise experts."""
    b = v.reshape(-1, block)
    s = np.abs(b).max(axis=1, keepdims=True) / 127.0
    s[s == 0] = 1.0
    return (np.clip(np.round(b / s), -127, 127) * s).reshape(v.shape)


def _moe_reference(x, logits, w1, w2, top_k, act_block=None):
    """float64 MoE: softmax -> top-k -> renormalise; fc1 rows interleave gate (even) / linear (odd)."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    weight = np.take_along_axis(p, top, axis=1)
    weight /= weight.sum(axis=1, keepdims=True)
    quant = (lambda v: _int8_activations(v, act_block)) if act_block else (lambda v: v)
    out = np.zeros((x.shape[0], w2.shape[1]))
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = top[t, j]
            h = w1[e].astype(np.float64) @ quant(x[t].astype(np.float64))
            gate = np.minimum(h[0::2], 7.0)
            lin = np.clip(h[1::2], -7.0, 7.0)
            act = gate / (1.0 + np.exp(-1.702 * gate)) * (lin + 1.0)
            out[t] += weight[t, j] * (w2[e].astype(np.float64) @ quant(act))
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [0, 32, 64])
def test_cpu_qmoe_consumes_our_layout(bits, block_size):
    experts, hidden, inter, tokens, top_k = 4, 64, 64, 6, 2
    w1 = _weights(experts, 2 * inter, hidden)
    w2 = _weights(experts, hidden, inter)
    q1 = quantize_experts(w1, bits=bits, block_size=block_size, name="fc1")
    q2 = quantize_experts(w2, bits=bits, block_size=block_size, name="fc2")
    x = RNG.standard_normal((tokens, hidden)).astype(np.float32)
    logits = RNG.standard_normal((tokens, experts)).astype(np.float32)
    y = _qmoe_session(q1, q2, tokens, experts, top_k).run(None, {"x": x, "logits": logits})[0]
    act_block = block_size if (bits == 8 and block_size > 0) else None
    ref = _moe_reference(x, logits, dequantize_experts(q1), dequantize_experts(q2), top_k, act_block)
    scale = np.abs(ref).max()
    assert scale > 0.05
    assert np.abs(y - ref).max() <= 2e-5 * max(1.0, scale)
    # The quantized model also stays close to the float one (catches a grid that is exact but wrong).
    float_ref = _moe_reference(x, logits, w1, w2, top_k)
    assert np.abs(y - float_ref).max() <= (0.25 if bits == 4 else 0.05) * scale


# --------------------------------------------------------------------------- CUDA prepack

def test_ldsm_permutation_matches_mma_fragment_rule():
    # Re-derived from the PTX m16n8k16 B-fragment rule the map encodes: a thread's register
    # holds 2 consecutive k; g = 16/bits 8-row groups of k are interleaved pairwise.
    for bits in (4, 8):
        groups = 16 // bits
        rows = 8 * groups
        derived = [(p % groups) * 8 + (p // groups) * 2 + j for p in range(rows // 2) for j in (0, 1)]
        np.testing.assert_array_equal(cuda_layout.ldsm_row_permutation(bits), derived)
    np.testing.assert_array_equal(cuda_layout.ldsm_row_permutation(8)[:6], [0, 1, 8, 9, 2, 3])


def test_register_interleave_by_hand():
    # One 32-bit register of int4 elements e0..e7 = 0..7 (e0 in the low nibble of byte 0).
    # add_bias_and_interleave_int4s writes dest nibble d from src 2d (d<4) or 2(d-4)+1.
    flat = np.arange(8, dtype=np.uint8)
    out = cuda_layout.interleave_registers(flat, 4)
    packed = out[0::2] | (out[1::2] << 4)
    assert packed.tolist() == [0x20, 0x64, 0x31, 0x75]
    # int8: swap bytes 1 and 2 of every register.
    assert cuda_layout.interleave_registers(np.array([10, 11, 12, 13, 20, 21, 22, 23]), 8).tolist() == \
        [10, 12, 11, 13, 20, 22, 21, 23]


def test_column_interleave_by_hand():
    # 8-bit: ColumnsInterleaved=2, tile 64 rows of k. Tag element (n, k) as 1000*n + k.
    n, k = 4, 128
    tags = (np.arange(n)[:, None] * 1000 + np.arange(k)[None, :])[None]
    out = cuda_layout.interleave_columns(tags, 8)[0]
    expected = np.concatenate([
        np.arange(0, 64), 1000 + np.arange(0, 64), np.arange(64, 128), 1000 + np.arange(64, 128),
        2000 + np.arange(0, 64), 3000 + np.arange(0, 64), 2000 + np.arange(64, 128), 3000 + np.arange(64, 128),
    ])
    np.testing.assert_array_equal(out, expected)
    assert cuda_layout.columns_interleaved(4) == 4 and cuda_layout.columns_interleaved(8) == 2


def test_tiny_prepack_by_hand():
    """E=1, N=8, K=64, 8-bit, arch 90: only the k-permutation and byte swap apply."""
    n, k = 8, 64
    codes = (np.arange(n)[:, None] * 64 + np.arange(k)[None, :]).astype(np.uint8)[None]  # unique bytes
    q = QuantizedExperts(codes, np.ones((1, n), np.float32), 8, 0)
    out = prepack_for_cuda(q, arch=90)
    assert out.shape == (1, k, n)
    flat = out.reshape(-1)
    # Column n=0 first (column-major), first tile of 16 k: rows 0,1,8,9,2,3,10,11 ... then register swap.
    assert flat[:8].tolist() == [0, 8, 1, 9, 2, 10, 3, 11]
    assert flat[64:68].tolist() == [64, 72, 65, 73]  # column n=1 starts after 64 elements


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", [80, 90])
def test_prepack_is_a_permutation(bits, arch):
    """Run the element-level layout on position tags: every position appears exactly once."""
    e, n, k = 2, 32, 128
    tags = np.arange(e * n * k, dtype=np.int64).reshape(e, n, k)
    x = cuda_layout.permute_k_for_ldsm(tags, bits)
    x = cuda_layout.interleave_columns(x, bits) if arch == 80 else x.reshape(e, -1)
    x = cuda_layout.interleave_registers(x, bits)
    assert np.array_equal(np.sort(x.reshape(-1)), np.arange(e * n * k))
    assert (x.reshape(-1) != np.arange(e * n * k)).any()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", [80, 90])
def test_fast_prepack_equals_the_element_level_steps(bits, arch):
    e, n, k = 2, 32, 192
    codes = RNG.integers(0, 1 << bits, (e, n, k), dtype=np.uint8)
    packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
    x = cuda_layout.permute_k_for_ldsm(codes, bits)
    x = cuda_layout.interleave_columns(x, bits) if arch == 80 else x.reshape(e, -1)
    x = cuda_layout.interleave_registers(x, bits)
    expected = x if bits == 8 else x[:, 0::2] | (x[:, 1::2] << 4)
    q = QuantizedExperts(packed, np.ones((e, n), np.float32), bits, 0)
    np.testing.assert_array_equal(prepack_for_cuda(q, arch=arch).reshape(e, -1), expected)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", [80, 90])
def test_unprepack_inverts_prepack(bits, arch):
    e, n, k = 3, 48, 192
    packed = RNG.integers(0, 256, (e, n, k * bits // 8), dtype=np.uint8)
    q = QuantizedExperts(packed, np.ones((e, n), np.float32), bits, 0)
    pre = prepack_for_cuda(q, arch=arch)
    assert pre.shape == (e, k, n * bits // 8) and pre.dtype == np.uint8
    assert not np.array_equal(pre.reshape(-1), packed.reshape(-1))
    np.testing.assert_array_equal(unprepack_from_cuda(pre, n=n, k=k, bits=bits, arch=arch), packed)
    # A permutation of codes keeps the code histogram.
    np.testing.assert_array_equal(np.bincount(unpack_codes(pre, bits).ravel(), minlength=256),
                                  np.bincount(unpack_codes(packed, bits).ravel(), minlength=256))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", [80, 90])
def test_prepack_matches_ort_reference_packer(bits, arch):
    """Byte-identical to ORT 1.31.1's PyTorch port of the CUDA packer (run here on CPU)."""
    cq = pytest.importorskip("onnxruntime.quantization.cuda_quantizer")
    pytest.importorskip("torch")
    ref_pack = getattr(cq, "_pack_weights_for_cuda_mixed_gemm", None)
    if ref_pack is None:
        pytest.skip("this onnxruntime has no PyTorch mixed-GEMM packer")
    e, n, k = 2, 64, 128
    q = quantize_experts(_weights(e, n, k), bits=bits, block_size=32)
    ours = prepack_for_cuda(q, arch=arch)
    for i in range(e):
        theirs = np.asarray(ref_pack(q.packed[i], n, k, bits, arch)).view(np.uint8).reshape(k, -1)
        np.testing.assert_array_equal(ours[i], theirs)


@pytest.mark.parametrize(
    "bits, shape, arch, message",
    [
        (4, (1, 32, 128), 75,
         "prepack_for_cuda: arch=75 is not supported; use 80 (the layout CUDA QMoE reads on SM80 and SM90 "
         "alike) or 90 (MatMulNBits weight_prepacked=2 layout)."),
        (4, (2, 32, 96), 80,
         "prepack_for_cuda: K=96 (weights [E, N, K]=[2, 32, 96]) is not a multiple of 64, the CUTLASS "
         "interleave K tile that ORT's CUDA QMoE requires for hidden_size and inter_size; this layer cannot "
         "run on CUDA QMoE unpadded."),
        (4, (2, 24, 64), 80,
         "prepack_for_cuda: N=24 (weights [E, N, K]=[2, 24, 64]) is not a multiple of 16; the 4-bit "
         "mixed-GEMM layout needs N*bits/8 to fill whole 8-byte MMA columns."),
    ],
)
def test_prepack_validation_messages(bits, shape, arch, message):
    e, n, k = shape
    q = QuantizedExperts(np.zeros((e, n, k * bits // 8), np.uint8), np.ones((e, n), np.float32), bits, 0)
    with pytest.raises(ValueError) as err:
        prepack_for_cuda(q, arch=arch)
    assert str(err.value) == message

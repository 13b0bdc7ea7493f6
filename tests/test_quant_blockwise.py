"""Blockwise quantizers against ONNX Runtime: its own quantizers (bytes) and its own kernels (outputs).

References used, all independent of the code under test:
- MLAS ``quantize_matmul_{4,8}bits`` (pybind) for ``method="default"``: bytes, scales and zero points must match;
- ORT's ``MatMulNBitsQuantizer`` with ``RTNWeightOnlyQuantConfig`` for ``method="rtn"``: the initializers it writes;
- ORT's k_quant (``quant_tensor_k_quant_cpu``) for the error bar ``quantize_kquant`` must clear;
- the MatMulNBits and GatherBlockQuantized CPU kernels, which must agree with ``dequantize_blockwise``.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from builder.quant.blockwise import QuantizedMatrix, dequantize_blockwise, quantize_blockwise
from builder.quant import kquant
from builder.quant.kquant import quantize_kquant

mlas = pytest.importorskip("onnxruntime.capi._pybind_state")


# ---------------------------------------------------------------------------------------------------------------
# test-side helpers (written independently of builder.quant so that they can catch its mistakes)


def _mlas_reference(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """What DefaultWeightOnlyQuantizer does: pad K with zeros, hand MLAS the MatMul B matrix [K, N]."""
    n, k = w.shape
    n_blocks = -(-k // block_size)
    b = np.zeros((n_blocks * block_size, n), np.float32)
    b[:k] = w.T
    packed = np.zeros((n, n_blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, n_blocks), np.float32)
    zp = np.zeros((n, -(-n_blocks * bits // 8)), np.uint8)
    fn = mlas.quantize_matmul_4bits if bits == 4 else mlas.quantize_matmul_8bits
    fn(packed, b, scales, zp, block_size, n, n_blocks * block_size, symmetric)
    return packed, scales, zp


def _codes(q: QuantizedMatrix) -> np.ndarray:
    """[N, n_blocks * block_size] integer codes, read straight from the bytes."""
    p = q.packed.astype(np.int64)
    if q.bits == 8:
        return p.reshape(q.n, -1)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.int64)
    out[..., 0::2] = p & 15
    out[..., 1::2] = p >> 4
    return out.reshape(q.n, -1)


def _zero_points(q: QuantizedMatrix) -> np.ndarray:
    """[N, n_blocks] zero points (the op's default when symmetric)."""
    nb = q.scales.shape[1]
    if q.zero_points is None:
        return np.full((q.n, nb), 2 ** (q.bits - 1), np.int64)
    z = q.zero_points.astype(np.int64)
    if q.bits == 8:
        return z[:, :nb]
    return np.stack([z & 15, z >> 4], axis=-1).reshape(q.n, -1)[:, :nb]


def _rel_rmse(w: np.ndarray, approx: np.ndarray) -> float:
    w, approx = w.astype(np.float64), approx.astype(np.float64)  # float32 squares of 1e-30 underflow
    return float(np.sqrt(np.mean((approx - w) ** 2) / np.mean(w**2)))


def _session(nodes, inputs, outputs, inits) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _gaussian(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def _quarter_grid(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Multiples of 1/4: many elements land exactly on rounding ties, which separates roundf from rint."""
    return (np.random.default_rng(seed).integers(-8, 8, (n, k)) * 0.25).astype(np.float32)


QUANTIZERS = {
    "default": lambda w, bits, bs, sym: quantize_blockwise(w, bits=bits, block_size=bs, symmetric=sym),
    "rtn": lambda w, bits, bs, sym: quantize_blockwise(w, bits=bits, block_size=bs, symmetric=sym, method="rtn"),
    "kquant": lambda w, bits, bs, sym: quantize_kquant(w, bits=bits, block_size=bs),
}


# ---------------------------------------------------------------------------------------------------------------
# default == MLAS, byte for byte


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("n", "k", "block_size", "make"),
    [
        (24, 256, 32, _gaussian),
        (7, 200, 32, _gaussian),  # K not a multiple of the block; 7 blocks (odd: spare zero-point nibble)
        (5, 45, 16, _quarter_grid),  # rounding ties
        (3, 300, 128, _gaussian),
        (2, 512, 256, _quarter_grid),
        (4, 10, 64, _gaussian),  # K smaller than one block
    ],
)
def test_default_matches_mlas(bits, symmetric, n, k, block_size, make):
    w = make(n, k)
    w[0, :block_size] = 0.0  # an all-zero block: scale 0, must still match
    ref_packed, ref_scales, ref_zp = _mlas_reference(w, bits, block_size, symmetric)
    q = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)
    assert q.packed.dtype == np.uint8 and q.scales.dtype == np.float32
    np.testing.assert_array_equal(q.packed, ref_packed)
    np.testing.assert_array_equal(q.scales.view(np.uint32), ref_scales.view(np.uint32))  # bit-exact
    if symmetric:
        assert q.zero_points is None
    else:
        np.testing.assert_array_equal(q.zero_points, ref_zp)
    assert (q.bits, q.block_size, q.k) == (bits, block_size, k)


def test_default_symmetric_scale_is_signed_peak():
    """The convention from the reference notes: scale = signed largest-magnitude element / -2^(bits-1)."""
    w = np.array([[0.5, -3.0] + [0.0] * 30, [2.0, -1.0] + [0.0] * 30], np.float32)
    q4 = quantize_blockwise(w, bits=4)
    np.testing.assert_array_equal(q4.scales[:, 0], [3.0 / 8, -2.0 / 8])
    np.testing.assert_array_equal(_codes(q4)[:, :2], [[9, 0], [0, 12]])  # -3 -> code 0; 2 -> code 0 too
    q8 = quantize_blockwise(w, bits=8)
    np.testing.assert_array_equal(q8.scales[:, 0], [3.0 / 128, -2.0 / 128])


# ---------------------------------------------------------------------------------------------------------------
# rtn == ORT's RTN quantizer (MatMulNBitsQuantizer + RTNWeightOnlyQuantConfig)


def _ort_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> dict[str, np.ndarray]:
    """Quantize a one-MatMul model with ORT's RTN path and return its new initializers by suffix."""
    mnq = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    config = mnq.RTNWeightOnlyQuantConfig(customized_weight_config={"mm": {"bits": bits}})
    logging.disable(logging.WARNING)
    try:
        quantizer = mnq.MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric, algo_config=config)
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    inits = {i.name: numpy_helper.to_array(i) for i in quantizer.model.model.graph.initializer}
    out = {"packed": inits[f"B_Q{bits}G{block_size}"], "scales": inits["B_scale"]}
    if "B_zp" in inits:
        out["zp"] = inits["B_zp"]
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block_size", "make"), [(256, 32, _gaussian), (192, 16, _quarter_grid)])
def test_rtn_matches_ort_rtn_quantizer(bits, symmetric, k, block_size, make, capsys):
    # ORT packs int4 zero points across rows, so its bytes are only valid when the block count is even: keep it so.
    w = make(12, k, seed=3)
    ref = _ort_rtn(w, bits, block_size, symmetric)
    capsys.readouterr()  # ORT prints a progress bar
    q = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric, method="rtn")
    np.testing.assert_array_equal(q.packed, ref["packed"])
    np.testing.assert_array_equal(q.scales, ref["scales"])
    if symmetric:
        assert q.zero_points is None and "zp" not in ref
    else:
        np.testing.assert_array_equal(q.zero_points, ref["zp"])


def test_rtn_matches_ort_quant_tensor_with_padding():
    """K not a multiple of the block (and an odd block count), against the maths function ORT's RTN calls."""
    wo = pytest.importorskip("onnxruntime.quantization.neural_compressor.weight_only")
    w = _gaussian(6, 77, seed=4)
    padded = np.pad(w, ((0, 0), (0, 96 - 77)))
    for symmetric in (True, False):
        codes, scales, zp = wo.quant_tensor(padded, 4, 32, "sym" if symmetric else "asym", "uint", 1.0)
        q = quantize_blockwise(w, bits=4, block_size=32, symmetric=symmetric, method="rtn")
        np.testing.assert_array_equal(_codes(q), codes.reshape(6, 96))
        np.testing.assert_array_equal(q.scales, scales.reshape(6, 3).astype(np.float32))
        np.testing.assert_array_equal(_zero_points(q), np.broadcast_to(zp.reshape(6, -1), (6, 3)))


# ---------------------------------------------------------------------------------------------------------------
# k-quant: at least as accurate as ORT's k_quant


@pytest.mark.parametrize("bits", [4, 8])
def test_kquant_error_not_worse_than_ort_kquant(bits):
    wo = pytest.importorskip("onnxruntime.quantization.neural_compressor.weight_only")
    if not hasattr(wo, "quant_tensor_k_quant_cpu"):
        pytest.skip("this onnxruntime has no k_quant quantizer")
    w = _gaussian(256, 512, seed=5)
    codes, scales, zp = wo.quant_tensor_k_quant_cpu(w, bits, 32)
    ort_err = _rel_rmse(w, (scales * (codes - zp)).reshape(w.shape))
    rtn_err = _rel_rmse(w, dequantize_blockwise(quantize_blockwise(w, bits=bits, symmetric=False, method="rtn")))
    q = quantize_kquant(w, bits=bits)
    ours = _rel_rmse(w, dequantize_blockwise(q))
    assert ours <= ort_err * 1.001, (ours, ort_err)
    assert ours < rtn_err * 0.97, (ours, rtn_err)  # measured ~5% (int4) and ~12% (int8) below RTN
    assert q.zero_points is not None and q.zero_points.shape == (256, 16 * bits // 8)
    assert _codes(q).max() <= 2**bits - 1


def test_kquant_handles_degenerate_blocks():
    """All-zero, constant, one-spike, tiny and huge blocks: finite scales, exact zeros, small relative error."""
    w = np.zeros((5, 64), np.float32)
    w[1] = 3.0
    w[2, 5] = -7.0
    w[3] = np.linspace(-1, 1, 64, dtype=np.float32) * 1e-30
    w[4] = np.linspace(-1, 1, 64, dtype=np.float32) * 1e30
    q = quantize_kquant(w)
    assert np.isfinite(q.scales).all()
    d = dequantize_blockwise(q)
    np.testing.assert_array_equal(d[0], 0.0)
    np.testing.assert_allclose(d[1], 3.0, rtol=1e-6)
    np.testing.assert_allclose(d[2], w[2], atol=1e-6)
    for row in (3, 4):
        assert _rel_rmse(w[row], d[row]) < 0.1


# ---------------------------------------------------------------------------------------------------------------
# the bytes drive ORT's kernels to the same numbers as dequantize_blockwise


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("method", "symmetric"), [("default", True), ("default", False), ("rtn", True),
                                                    ("rtn", False), ("kquant", False)])
def test_matmulnbits_agrees_with_dequantize(bits, method, symmetric):
    n, k, block_size = 24, 200, 32  # K not a multiple of the block; 7 blocks
    w = _gaussian(n, k, seed=6)
    q = QUANTIZERS[method](w, bits, block_size, symmetric)
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "scales")]
    names = ["x", "B", "scales"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "zp"))
        names.append("zp")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block_size, accuracy_level=0)
    sess = _session([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    x = np.random.default_rng(7).standard_normal((3, k)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    deq = dequantize_blockwise(q)
    assert deq.shape == (n, k)
    expected = x.astype(np.float64) @ deq.T.astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert _rel_rmse(w, deq) < (0.1 if bits == 4 else 0.01)  # and it is a quantization of w, not of noise


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_block_quantized_agrees_with_dequantize(bits, symmetric):
    vocab, hidden, block_size = 11, 128, 32
    w = _gaussian(vocab, hidden, seed=8)
    q = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)
    inits = [numpy_helper.from_array(q.packed.reshape(vocab, -1), "data"), numpy_helper.from_array(q.scales, "s")]
    names = ["data", "ids", "s"]
    if not symmetric:
        inits.append(numpy_helper.from_array(q.zero_points, "zp"))
        names.append("zp")
    node = helper.make_node("GatherBlockQuantized", names, ["y"], domain="com.microsoft", gather_axis=0,
                            quantize_axis=1, block_size=block_size, bits=bits)
    sess = _session([node], [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    ids = np.array([3, 0, 10, 3], np.int64)
    y = sess.run(None, {"ids": ids})[0]
    # independent dequantization from the raw bytes
    expected = (_codes(q) - np.repeat(_zero_points(q), block_size, axis=1)) * np.repeat(q.scales, block_size, axis=1)
    np.testing.assert_array_equal(y, expected[ids].astype(np.float32))
    np.testing.assert_array_equal(dequantize_blockwise(q), expected.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# streaming: row blocks quantize exactly like the whole matrix


@pytest.mark.parametrize("method", ["default", "rtn", "kquant"])
@pytest.mark.parametrize("bits", [4, 8])
def test_row_blocks_equal_whole_matrix(method, bits, monkeypatch):
    monkeypatch.setattr(kquant, "_CHUNK_BLOCKS", 7)  # chunk boundaries fall mid-row, unlike the row slices
    w = _gaussian(40, 144, seed=9)  # 144 = 4.5 blocks of 32
    whole = QUANTIZERS[method](w, bits, 32, False)
    for r0, r1 in [(0, 1), (1, 17), (17, 40), (39, 40)]:
        part = QUANTIZERS[method](w[r0:r1], bits, 32, False)
        np.testing.assert_array_equal(part.packed, whole.packed[r0:r1])
        np.testing.assert_array_equal(part.scales, whole.scales[r0:r1])
        np.testing.assert_array_equal(part.zero_points, whole.zero_points[r0:r1])


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantize_blockwise(np.zeros((2, 3, 4), np.float32)),
         "quantize_blockwise: expected a 2-D weight [N, K] (out_features, in_features), got shape (2, 3, 4)"),
        (lambda: quantize_kquant(np.zeros(8, np.float32)),
         "quantize_kquant: expected a 2-D weight [N, K] (out_features, in_features), got shape (8,)"),
        (lambda: quantize_blockwise(np.zeros((4, 64), np.float32), bits=3),
         "quantize_blockwise: bits=3 not supported for weight (4, 64); valid: (4, 8)"),
        (lambda: quantize_kquant(np.zeros((4, 64), np.float32), block_size=48),
         "quantize_kquant: block_size=48 not supported for weight (4, 64); valid: (16, 32, 64, 128, 256)"),
        (lambda: quantize_blockwise(np.zeros((4, 64), np.float32), method="gptq"),
         "quantize_blockwise: method='gptq' unknown for weight (4, 64); valid: default, rtn"),
        (lambda: quantize_blockwise(np.zeros((0, 64), np.float32)),
         "quantize_blockwise: weight of shape (0, 64) is empty"),
        (lambda: quantize_blockwise(np.ones((4, 64), np.int32)),
         "quantize_blockwise: weight dtype int32 of shape (4, 64) is not floating point"),
        (lambda: quantize_blockwise(np.where(np.arange(128).reshape(2, 64) == 70, np.nan, 1.0)),
         "quantize_blockwise: weight of shape (2, 64) contains NaN/Inf (first at row 1, column 6)"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# ---------------------------------------------------------------------------------------------------------------
# property: round trip within half a step, codes in range


@st.composite
def _weights(draw):
    n = draw(st.integers(1, 4))
    k = draw(st.integers(1, 80))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    values = draw(st.lists(st.floats(-1, 1, width=32, allow_subnormal=False), min_size=n * k, max_size=n * k))
    return (np.array(values, np.float32) * np.float32(magnitude)).reshape(n, k)


@settings(max_examples=40, deadline=None)
@given(w=_weights(), bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 64]),
       method=st.sampled_from(["default", "rtn"]))
def test_round_trip_error_within_half_a_step(w, bits, block_size, method):
    q = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=True, method=method)
    codes = _codes(q)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    err = np.abs(dequantize_blockwise(q) - w)
    step = np.abs(np.repeat(q.scales, block_size, axis=1)[:, : w.shape[1]])
    blocks = np.pad(np.abs(w), ((0, 0), (0, -w.shape[1] % block_size))).reshape(w.shape[0], -1, block_size)
    peak = np.repeat(blocks.max(axis=2), block_size, axis=1)[:, : w.shape[1]]
    eps = 1e-6 * peak
    half = 2 ** (bits - 1)
    if method == "rtn":
        expected_step = np.where(peak > 0, peak * 2 / (2**bits - 1), 1.0)  # ORT uses 1 for an all-zero block
        np.testing.assert_allclose(step, expected_step, rtol=1e-6)
        assert (err <= step / 2 + eps).all()
    else:
        # MLAS maps the peak to code 0; the opposite end only reaches +(2^(bits-1) - 1) steps, so elements of the
        # other sign beyond 2^(bits-1) - 0.5 steps clip, by at most one step. Everything else is within half.
        np.testing.assert_allclose(step, peak / half, rtol=1e-6)
        clipped = codes[:, : w.shape[1]] == 2**bits - 1
        assert (err[~clipped] <= step[~clipped] / 2 + eps[~clipped]).all()
        assert (err[clipped] <= step[clipped] + eps[clipped]).all()

"""Property tests of the quantize/dequantize round trips (builder/quant/blockwise.py, kquant.py, moe.py).

tests/test_quant_blockwise.py already checks symmetric default/rtn against ONNX Runtime and their half-a-step
bound; tests/test_quant_moe.py checks QMoE bytes against ORT on fixed weights. Here hypothesis searches for
inputs that break laws every method should obey whatever the weights:

- exact zeros come back exactly zero (pruned or padded weights stay zero);
- scaling a weight by a power of two scales its scales by the same factor and leaves codes alone (no method
  depends on absolute magnitude, so tiny or huge layers quantize alike);
- asymmetric round trips stay within half a step where the grid covers the block;
- the MLAS signed-peak grid is a fixed point (quantizing the dequantized weight gives the same bytes), and the
  QMoE expert quantizer and the MatMulNBits quantizer, written separately, agree on it bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.quant.blockwise import dequantize_blockwise, quantize_blockwise, unpack_codes, unpack_zero_points
from builder.quant.kquant import quantize_kquant
from builder.quant.moe import dequantize_experts, quantize_experts

METHODS = ["default", "rtn", "kquant"]


def quantize(w, *, method: str, bits: int, block_size: int, symmetric: bool):
    if method == "kquant":
        return quantize_kquant(w, bits=bits, block_size=block_size)  # always asymmetric
    return quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric, method=method)


def codes_of(q) -> np.ndarray:
    return unpack_codes(q.packed, q.bits).reshape(q.n, -1)


@st.composite
def matrices(draw, max_n: int = 4, max_k: int = 96, zeros: bool = True) -> np.ndarray:
    """[N, K] float32 with magnitudes from 1e-3 to 1e3, some exact zeros, no subnormals (so 2^±8 scaling is exact)."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    unit = st.floats(-1, 1, width=32).filter(lambda x: x == 0 or abs(x) >= 1e-3)
    values = np.array(draw(st.lists(unit, min_size=n * k, max_size=n * k)), np.float32).reshape(n, k)
    if zeros:
        values[np.array(draw(st.lists(st.booleans(), min_size=n * k, max_size=n * k))).reshape(n, k)] = 0
    magnitude = np.float32(draw(st.sampled_from([1e-3, 1.0, 1e3])))
    return values * magnitude


quant_args = dict(bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 64]),
                  method=st.sampled_from(METHODS), symmetric=st.booleans())


# ------------------------------------------------------------------------------------------------ all methods


@settings(max_examples=60, deadline=None)
@given(w=matrices(), **quant_args)
def test_codes_and_zero_points_in_range_and_zeros_exact(w, bits, block_size, method, symmetric):
    q = quantize(w, method=method, bits=bits, block_size=block_size, symmetric=symmetric)
    n_blocks = -(-w.shape[1] // block_size)
    assert q.packed.shape == (w.shape[0], n_blocks, block_size * bits // 8) and q.packed.dtype == np.uint8
    assert q.scales.shape == (w.shape[0], n_blocks) and q.scales.dtype == np.float32
    assert np.isfinite(q.scales).all()
    codes = codes_of(q)
    assert codes.max() <= 2**bits - 1
    if q.zero_points is not None:
        assert unpack_zero_points(q.zero_points, bits, n_blocks).max() <= 2**bits - 1
    back = dequantize_blockwise(q)
    assert back.shape == w.shape and back.dtype == np.float32
    assert (back[w == 0] == 0).all(), "an exact zero did not come back as zero"


@settings(max_examples=60, deadline=None)
@given(w=matrices(), shift=st.integers(-8, 8), **quant_args)
def test_power_of_two_scaling_only_scales_the_scales(w, shift, bits, block_size, method, symmetric):
    factor = np.float32(2.0**shift)
    a = quantize(w, method=method, bits=bits, block_size=block_size, symmetric=symmetric)
    b = quantize(w * factor, method=method, bits=bits, block_size=block_size, symmetric=symmetric)
    np.testing.assert_array_equal(b.packed, a.packed)
    blocks = _blocks(w, block_size)
    # an all-zero block's scale is an arbitrary placeholder (its codes all mean 0), and ORT's rtn gives any
    # constant block the placeholder 1; every other scale must scale
    constant = blocks.min(axis=2) == blocks.max(axis=2)
    scaled = ~constant if method == "rtn" else ~(constant & (blocks.max(axis=2) == 0))
    np.testing.assert_array_equal(b.scales[scaled], a.scales[scaled] * factor)
    if a.zero_points is None:
        assert b.zero_points is None
    else:
        np.testing.assert_array_equal(b.zero_points, a.zero_points)
    if scaled.all():
        np.testing.assert_array_equal(dequantize_blockwise(b), dequantize_blockwise(a) * factor)


@settings(max_examples=60, deadline=None)
@given(top=matrices(max_n=3), bottom=matrices(max_n=3), **quant_args)
def test_rows_quantize_independently(top, bottom, bits, block_size, method, symmetric):
    """The writer streams row blocks: quantizing [A; B] must equal quantizing A and B apart."""
    k = min(top.shape[1], bottom.shape[1])
    top, bottom = top[:, :k], bottom[:, :k]
    whole = quantize(np.concatenate([top, bottom]), method=method, bits=bits, block_size=block_size,
                     symmetric=symmetric)
    parts = [quantize(x, method=method, bits=bits, block_size=block_size, symmetric=symmetric) for x in (top, bottom)]
    np.testing.assert_array_equal(whole.packed, np.concatenate([p.packed for p in parts]))
    np.testing.assert_array_equal(whole.scales, np.concatenate([p.scales for p in parts]))
    if whole.zero_points is not None:
        np.testing.assert_array_equal(whole.zero_points, np.concatenate([p.zero_points for p in parts]))


# ------------------------------------------------------------------------------------------------ asymmetric


def _blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, -x.shape[1] % block_size))).reshape(x.shape[0], -1, block_size)


@settings(max_examples=60, deadline=None)
@given(w=matrices(zeros=False), bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 64]),
       method=st.sampled_from(["default", "rtn"]))
def test_asymmetric_round_trip_within_half_a_step(w, bits, block_size, method):
    """Where the block's [min, max] holds 0, both asymmetric grids cover it: every element within half a step.

    (default widens every block's range to include 0; rtn, like ORT's, does not: see the xfail below.)
    """
    blocks = _blocks(w, block_size)
    straddles = np.repeat((blocks.min(axis=2) <= 0) & (blocks.max(axis=2) >= 0), block_size, axis=1)[:, :w.shape[1]]
    if method == "default":
        straddles[:] = True
    q = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=False, method=method)
    step = np.repeat(q.scales, block_size, axis=1)[:, :w.shape[1]]
    assert (step >= 0).all()
    peak = np.repeat(np.abs(blocks).max(axis=2), block_size, axis=1)[:, :w.shape[1]]
    err = np.abs(dequantize_blockwise(q) - w)
    assert (err[straddles] <= step[straddles] / 2 + 1e-6 * peak[straddles]).all()


@pytest.mark.xfail(strict=True, reason="rtn asymmetric copies ORT's quant_tensor, whose zero point is clipped to 0 "
                                       "when a block does not contain 0, so such blocks saturate")
def test_rtn_asymmetric_handles_blocks_that_do_not_contain_zero():
    w = np.linspace(10, 11, 32, dtype=np.float32)[None]  # one block, all positive
    q = quantize_blockwise(w, bits=4, block_size=32, symmetric=False, method="rtn")
    assert np.abs(dequantize_blockwise(q) - w).max() <= q.scales.max() / 2 * (1 + 1e-5)


@settings(max_examples=60, deadline=None)
@given(w=matrices(zeros=False), bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 64]))
def test_kquant_fit_never_worse_than_zeroing_the_block(w, bits, block_size):
    """The scale is a least-squares fit for the chosen codes, so no block's error exceeds the block's energy."""
    q = quantize_kquant(w, bits=bits, block_size=block_size)
    err = _blocks(dequantize_blockwise(q) - w, block_size).astype(np.float64)
    energy = _blocks(w, block_size).astype(np.float64)
    assert ((err**2).sum(axis=2) <= (energy**2).sum(axis=2) * (1 + 1e-5)).all()


# ------------------------------------------------------------------------------------------------ MLAS grid


@settings(max_examples=60, deadline=None)
@given(w=matrices(), bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 64]))
def test_signed_peak_grid_is_a_fixed_point(w, bits, block_size):
    """Re-quantizing a symmetric-default model's own weights reproduces its bytes (re-exports are stable)."""
    q = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=True, method="default")
    again = quantize_blockwise(dequantize_blockwise(q), bits=bits, block_size=block_size, symmetric=True,
                               method="default")
    np.testing.assert_array_equal(again.packed, q.packed)
    np.testing.assert_array_equal(again.scales, q.scales)


@st.composite
def experts(draw) -> tuple[np.ndarray, int]:
    """[E, N, K] float32 with K a multiple of the block size, plus the block size (0 = per channel)."""
    block_size = draw(st.sampled_from([0, 16, 32, 64]))
    k = (block_size or 16) * draw(st.integers(1, 4))
    e, n = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    unit = st.floats(-1, 1, width=32).filter(lambda x: x == 0 or abs(x) >= 1e-3)
    values = np.array(draw(st.lists(unit, min_size=e * n * k, max_size=e * n * k)), np.float32)
    return values.reshape(e, n, k) * np.float32(draw(st.sampled_from([1e-3, 1.0, 1e3]))), block_size


@settings(max_examples=60, deadline=None)
@given(case=experts(), bits=st.sampled_from([4, 8]))
def test_qmoe_and_matmulnbits_quantizers_agree(case, bits):
    """Two implementations of the MLAS symmetric grid: per expert, QMoE's bytes equal MatMulNBits' codes."""
    w, block_size = case
    e, n, k = w.shape
    q = quantize_experts(w, bits=bits, block_size=block_size)
    for i in range(e):
        ref = quantize_blockwise(w[i], bits=bits, block_size=block_size or k, symmetric=True, method="default") \
            if (block_size or k) in (16, 32, 64, 128, 256) else None
        if ref is None:
            continue
        np.testing.assert_array_equal(q.packed[i], ref.packed.reshape(n, -1))
        np.testing.assert_array_equal(q.scales[i].reshape(n, -1), ref.scales)


@settings(max_examples=60, deadline=None)
@given(case=experts(), bits=st.sampled_from([4, 8]), shift=st.integers(-8, 8))
def test_qmoe_round_trip_laws(case, bits, shift):
    w, block_size = case
    q = quantize_experts(w, bits=bits, block_size=block_size)
    back = dequantize_experts(q)
    assert back.shape == w.shape and back.dtype == np.float32
    assert (back[w == 0] == 0).all()
    # within one step everywhere (only the clipped top half-step can exceed half a step)
    step = np.abs(q.scales[..., None] if block_size == 0 else np.repeat(q.scales, block_size, axis=-1))
    peak = np.abs(w).max()
    assert (np.abs(back - w) <= step * (1 + 1e-6) + 1e-7 * peak).all()
    # fixed point: the dequantized experts quantize to the same bytes
    again = quantize_experts(back, bits=bits, block_size=block_size)
    np.testing.assert_array_equal(again.packed, q.packed)
    np.testing.assert_array_equal(again.scales, q.scales)
    # scale-free: 2^shift * w has the same codes and 2^shift times the scales
    factor = np.float32(2.0**shift)
    scaled = quantize_experts(w * factor, bits=bits, block_size=block_size)
    np.testing.assert_array_equal(scaled.packed, q.packed)
    np.testing.assert_array_equal(scaled.scales, q.scales * factor)


@settings(max_examples=40, deadline=None)
@given(case=experts(), bits=st.sampled_from([4, 8]), negative=st.integers(-1000, -1))
def test_qmoe_any_non_positive_block_size_means_per_channel(case, bits, negative):
    """The option table documents `qmoe_block_size <= 0` as per-channel; the quantizer must agree."""
    w, _ = case
    a = quantize_experts(w, bits=bits, block_size=0)
    b = quantize_experts(w, bits=bits, block_size=negative)
    np.testing.assert_array_equal(a.packed, b.packed)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert b.block_size == 0 and b.scales.shape == w.shape[:2]

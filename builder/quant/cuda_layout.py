"""Offline CUTLASS fpA_intB ("mixed GEMM") weight layout for ONNX Runtime's CUDA QMoE, in numpy.

Why: ORT's CUDA QMoE runs a CUTLASS grouped GEMM that reads int4/int8 expert weights in a
tile-interleaved order. With ``weights_prepacked=0`` the kernel builds that order itself in its
PrePack hook at session load (GPU work, per expert, every load); with the attribute omitted
(default -1) or 1 it expects the initializer to be in that order already. This module produces
the order offline so exports can ship it.

Sources (read for facts; nothing copied):
- microsoft/onnxruntime onnxruntime/contrib_ops/cuda/llm/cutlass_preprocessors.cc
  (commit 0e0aece17b5a413162816db09b169421fef1e317) and its GPU twin
  onnxruntime/contrib_ops/cuda/llm/fpA_intB_gemm_preprocessors_impl.cu
  (commit 011d9bed37f236d864f91223999e7769360eade2): ``preprocess_weights_for_mixed_gemm`` =
  permute_B_rows_for_mixed_gemm -> subbyte_transpose -> interleave_column_major_tensor (skipped
  when arch == 90) -> add_bias_and_interleave_quantized_tensor_inplace. Both descend from
  FasterTransformer / NVIDIA TensorRT-LLM ``cutlass_preprocessors.cpp``.
- onnxruntime/contrib_ops/cuda/llm/cutlass_extensions/gemm/kernel/mixed_gemm_B_layout.h
  (commit 595c2fcc5bd9ce32e3c341926212acb3c2bfed20): for fp16/bf16 activations and any SM >= 75
  (SM90 included) B is ``ColumnMajorTileInterleave<ThreadblockK=64, ColumnsInterleaved>`` with
  ColumnsInterleaved = 4 (uint4) / 2 (uint8) and the ``OpMultiplyAddDequantizeInterleavedBToA``
  operator, so the LDSM row permutation always applies.
- onnxruntime/contrib_ops/cuda/moe/moe_quantization.cc (commit
  00d47b6c74ce878cdb2ee23b1a4190a93c2f9a8e), ``QMoE::QMoE`` and ``PrePackIntExpertWeights``:
  the int4/int8 QMoE GEMM always dispatches to the SM80 grouped GEMM, even on SM90, so QMoE
  always consumes the **arch 80** layout; weights_prepacked -1 (default) and 1 both mean "already
  in the SM80 layout", 0 means raw ``[E, N, K/pack]``. The raw tensor is per expert unpacked,
  transposed to a ``[K, N]`` matrix of signed codes (code - zp), fed to the transform with
  shape {K, N}, and stored as ``[E, K, N/pack]``.
- onnxruntime 1.31.1 wheel, onnxruntime/quantization/cuda_quantizer.py
  (``_pack_weights_for_cuda_mixed_gemm``, a PyTorch port stated byte-identical to the CUDA
  packer) confirms the front end and the SM90 differences; the tests compare against it.

Conventions the prepacked QMoE node needs (ORT 1.31.x CUDA EP):
- weights: uint8 ``[E, K, N*bits/8]`` (the kernel-facing shape ORT's own helpers emit;
  ``moe_helper::CheckInputs`` accepts it as the "legacy" layout next to ``[E, N, K*bits/8]``;
  byte count is the same). fc1: K = hidden, N = 2*inter (swiglu_fusion=1, gate/up interleaved
  rows); fc2: K = inter, N = hidden.
- scales unchanged: ``[E, N]`` or ``[E, N, K/block_size]``, dtype = activation dtype (fp16/bf16);
  CUDA QMoE registers only fp16/bf16. No zero-point inputs (kernel default 8 / 128).
- attribute ``weights_prepacked`` omitted or 1 for these bytes; 0 for raw ``QuantizedExperts``.
- hidden and inter must be multiples of 64 (the interleave K tile; ORT rejects others).
- SM90 layout (``arch=90``, interleave step skipped) is what ORT's MatMulNBits
  ``weight_prepacked=2`` reads; QMoE does not read it. It is provided for that use and parity.

Measured on an H100 (SM90) with onnxruntime-gpu 1.31.1 (scripts/gpu_qmoe_check.py, fp16 io):
arch-80 bytes with the attribute omitted or 1, in either shape, match the float reference
(rel err <= 3e-3) for int4/int8, per-channel and block 32/64/128, 1 to 64 tokens, up to
hidden = inter = 2880; raw bytes with the attribute omitted and arch-90 bytes do not (rel err > 1).
Raw bytes with weights_prepacked=0 also match (ORT prepacks them at load).

Net effect: the bias step adds back exactly the zero point the front end subtracted, so the
transform is a pure permutation of the unsigned codes; :func:`unprepack_from_cuda` inverts it.
"""

from __future__ import annotations

import numpy as np

from builder.quant.blockwise import pack_codes, unpack_codes
from builder.quant.moe import QuantizedExperts

SUPPORTED_ARCHS = (80, 90)
# ThreadblockK of ColumnMajorTileInterleave for 16-bit activations: 128 bytes * 8 / 16 bits.
INTERLEAVE_K_TILE = 64


def ldsm_row_permutation(bits: int) -> np.ndarray:
    """Source row (k within a tile) for each destination row, from ``get_permutation_map``.

    The tile is 8 * (16 / bits) rows: 32 for W4_A16, 16 for W8_A16. It counteracts the
    narrower element width so each thread's fragment ends up in the right place after LDSM.
    """
    if bits == 4:
        return np.array([0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
                         4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31], dtype=np.intp)
    if bits == 8:
        return np.array([0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15], dtype=np.intp)
    raise ValueError(f"bits={bits} has no LDSM permutation; use 4 or 8.")


def columns_interleaved(bits: int) -> int:
    """ColumnsInterleaved of the B layout: elements per 128-byte line / ThreadblockK (4 or 2)."""
    return (128 * 8 // bits) // INTERLEAVE_K_TILE


def register_order(bits: int) -> np.ndarray:
    """Element order inside one 32-bit register after ``add_bias_and_interleave``.

    int4: [e7 e6 e5 e4 e3 e2 e1 e0] -> [e7 e5 e3 e1 e6 e4 e2 e0] (low nibble first: e0 e2 e4 e6 e1 e3 e5 e7)
    int8: [e3 e2 e1 e0] -> [e3 e1 e2 e0] (low byte first: e0 e2 e1 e3); no speed benefit, it only
    keeps int8 registers shaped like int4 ones so one converter layout serves both.
    """
    if bits == 4:
        return np.array([0, 2, 4, 6, 1, 3, 5, 7], dtype=np.intp)
    if bits == 8:
        return np.array([0, 2, 1, 3], dtype=np.intp)
    raise ValueError(f"bits={bits} has no register interleave; use 4 or 8.")


def permute_k_for_ldsm(codes: np.ndarray, bits: int) -> np.ndarray:
    """Steps 1+2 seen from the [.., N, K] side.

    The transform permutes rows of the [K, N] matrix then transposes it to column-major, so on
    our [.., N, K] codes it is a permutation along K inside tiles of len(ldsm_row_permutation).
    """
    perm = ldsm_row_permutation(bits)
    *lead, k = codes.shape
    return codes.reshape(*lead, k // perm.size, perm.size)[..., perm].reshape(codes.shape)


def interleave_columns(codes: np.ndarray, bits: int) -> np.ndarray:
    """Step 3 (arch 80 only): [E, N, K] column-major -> [E, N/I, K/64, I, 64] tile interleave.

    ``interleave_column_major_tensor`` writes, for every group of I consecutive columns (n),
    their 64-row k-tiles side by side: tile t of columns n0..n0+I-1, then tile t+1, ...
    """
    e, n, k = codes.shape
    inter = columns_interleaved(bits)
    tiles = codes.reshape(e, n // inter, inter, k // INTERLEAVE_K_TILE, INTERLEAVE_K_TILE)
    return tiles.transpose(0, 1, 3, 2, 4).reshape(e, n * k)


def interleave_registers(flat: np.ndarray, bits: int) -> np.ndarray:
    """Step 4: reorder elements inside each 32-bit register (see register_order)."""
    order = register_order(bits)
    return flat.reshape(-1, order.size)[:, order].reshape(flat.shape)


def prepack_for_cuda(q: QuantizedExperts, *, arch: int) -> np.ndarray:
    """Raw QMoE codes -> CUTLASS mixed-GEMM bytes, uint8 [E, K, N*bits/8].

    arch=80 is the layout ORT's CUDA QMoE reads on every GPU (SM80 grouped GEMM, also on
    Hopper); arch=90 skips the column interleave (MatMulNBits weight_prepacked=2 layout).
    Works on bytes, not nibbles: step 1 keeps k pairs together, so steps 1 and 3 are one
    transpose of a byte view and step 4 is two delta swaps on little-endian 32-bit words.
    That is several times faster than the element-level steps above, which stay as the readable spec
    (the tests assert both agree).
    """
    e, n, k = _check_prepackable(q, arch)
    kb = k * q.bits // 8
    if q.bits == 4:
        # k-tile of 32 nibbles = 16 bytes viewed as [4][4]; the LDSM map is its transpose.
        if arch == 80:
            view = q.packed.reshape(e, n // 4, 4, kb // 32, 2, 4, 4)
            order = (0, 1, 3, 2, 4, 6, 5)  # column interleave I=4 + per-tile transpose
        else:
            view = q.packed.reshape(e, n, kb // 16, 4, 4)
            order = (0, 1, 2, 4, 3)
    else:
        # k-tile of 16 bytes viewed as [2][4] byte pairs; the LDSM map is its transpose.
        if arch == 80:
            view = q.packed.reshape(e, n // 2, 2, kb // 64, 4, 2, 4, 2)
            order = (0, 1, 3, 2, 4, 6, 5, 7)  # column interleave I=2 + per-tile transpose
        else:
            view = q.packed.reshape(e, n, kb // 16, 2, 4, 2)
            order = (0, 1, 2, 4, 3, 5)
    out = np.ascontiguousarray(view.transpose(order)).reshape(-1)
    words = out.view("<u4")
    if q.bits == 4:
        _delta_swap(words, 0x00F000F0, 4)  # nibbles e0 e1 e2 e3 .. -> e0 e2 e1 e3 ..
    _delta_swap(words, 0x0000FF00, 8)  # int4: -> e0 e2 e4 e6 e1 e3 e5 e7; int8: bytes 1 <-> 2
    return out.reshape(e, k, n * q.bits // 8)


def head_prepack_blocker(ep: str, io_dtype: str, fmt, vocab: int, hidden: int, bias: bool, shares_embedding: bool):
    """Why the lm_head's MatMulNBits cannot (or should not) be stored prepacked; None when it can.

    The conditions are onnxruntime-gpu 1.31.1's (its fpA_intB build: "prepacked weights for FP16/BF16 activations
    with ... INT4 or INT8 (block_size=32) weights ... scale-only quantization without zero points, bias, or g_idx,
    the SM80 weight layout"; N a multiple of 64 for 4 bits) plus this module's K tile (64). 8-bit heads are left out:
    only 4-bit heads were measured in this layout (scripts/gpu_speed_driver.py, variant steps)."""
    if ep != "cuda":
        return "it is a CUDA execution provider layout (-e cuda)"
    if io_dtype not in ("float16", "bfloat16"):
        return "the fpA_intB kernels take float16/bfloat16 activations"
    if fmt.is_float:
        return "the lm_head is not quantized"
    if fmt.bits != 4:
        return f"the lm_head is {fmt.bits}-bit (only 4-bit heads are measured in this layout)"
    if fmt.block_size != 32:
        return f"block size {fmt.block_size} (onnxruntime-gpu 1.31's prepacked MatMulNBits takes 32)"
    if not fmt.symmetric:
        return "the lm_head has zero points (asymmetric; the prepacked kernel is scale-only)"
    if bias:
        return "the lm_head has a bias (the prepacked kernel takes none)"
    if vocab % 64 or hidden % INTERLEAVE_K_TILE:
        return f"vocabulary {vocab} and hidden size {hidden} must be multiples of 64"
    if shares_embedding:
        return "the tied lm_head shares the embedding's quantized table (a prepacked head would need a second copy)"
    return None


def prepack_matmul_nbits_blocks(blocks, n: int, k: int, bits: int):
    """MatMulNBits B bytes in row blocks (each [rows, K*bits/8] or [rows, blocks, bytes], rows in order) -> the same
    weight in the fpA_intB SM80 layout that weight_prepacked=1 reads, still in row blocks of the schema shape
    [rows, K/block, block*bits/8] (ONNX Runtime's onnxruntime/quantization/cuda_quantizer.py keeps that shape for
    prepacked MatMulNBits initializers). The transform only mixes rows within groups of columns_interleaved(bits), so
    blocks are regrouped to whole groups of 64 rows (what prepack_for_cuda checks, and what the fpA_intB kernel needs
    of N anyway) and stream through without the whole matrix in memory."""
    group = 64
    row_bytes = k * bits // 8
    pending = np.empty((0, row_bytes), np.uint8)
    for block in blocks:
        pending = np.concatenate([pending, np.asarray(block, np.uint8).reshape(-1, row_bytes)])
        whole = len(pending) - len(pending) % group
        if whole:
            yield _prepack_rows(pending[:whole], bits)
            pending = pending[whole:]
    if len(pending):
        raise ValueError(f"prepack_matmul_nbits_blocks: {n} rows are not a multiple of {group}")


def _prepack_rows(rows: np.ndarray, bits: int) -> np.ndarray:
    q = QuantizedExperts(packed=rows[None], scales=np.empty((1, len(rows)), np.float32), bits=bits, block_size=0)
    return prepack_for_cuda(q, arch=80).reshape(len(rows), -1)


def _delta_swap(words: np.ndarray, mask: int, shift: int) -> None:
    """In place: swap the bits selected by ``mask`` with the bits ``shift`` positions above."""
    t = ((words >> np.uint32(shift)) ^ words) & np.uint32(mask)
    words ^= t
    words ^= t << np.uint32(shift)


def unprepack_from_cuda(prepacked: np.ndarray, *, n: int, k: int, bits: int, arch: int) -> np.ndarray:
    """Inverse of prepack_for_cuda: uint8 [E, K, N*bits/8] -> raw packed [E, N, K*bits/8].

    Exists to prove the transform loses nothing and to inspect exported models.
    """
    e = prepacked.shape[0]
    flat = unpack_codes(np.ascontiguousarray(prepacked).reshape(e, -1), bits)  # [E, N*K] elements
    flat = flat.reshape(-1, register_order(bits).size)[:, np.argsort(register_order(bits))].reshape(e, n * k)
    if arch != 90:
        inter = columns_interleaved(bits)
        tiles = flat.reshape(e, n // inter, k // INTERLEAVE_K_TILE, inter, INTERLEAVE_K_TILE)
        codes = tiles.transpose(0, 1, 3, 2, 4).reshape(e, n, k)
    else:
        codes = flat.reshape(e, n, k)
    inverse = np.argsort(ldsm_row_permutation(bits))
    tile = inverse.size
    codes = codes.reshape(e, n, k // tile, tile)[..., inverse].reshape(e, n, k)
    return pack_codes(codes, bits)


def _check_prepackable(q: QuantizedExperts, arch: int) -> tuple[int, int, int]:
    """Shape rules of the transform and of ORT's QMoE kernel, with fixes in the message."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"prepack_for_cuda: arch={arch} is not supported; use 80 (the layout CUDA QMoE reads on "
            "SM80 and SM90 alike) or 90 (MatMulNBits weight_prepacked=2 layout)."
        )
    if q.bits not in (4, 8):
        raise ValueError(f"prepack_for_cuda: bits={q.bits} has no CUDA mixed-GEMM layout; use 4 or 8.")
    if q.packed.ndim != 3 or q.packed.dtype != np.uint8:
        raise ValueError(
            f"prepack_for_cuda: packed weights must be uint8 [E, N, K*bits/8], got {q.packed.dtype} "
            f"{list(q.packed.shape)}; build them with quantize_experts."
        )
    e, n, k = q.shape
    if k % INTERLEAVE_K_TILE != 0:
        raise ValueError(
            f"prepack_for_cuda: K={k} (weights [E, N, K]={[e, n, k]}) is not a multiple of "
            f"{INTERLEAVE_K_TILE}, the CUTLASS interleave K tile that ORT's CUDA QMoE requires for "
            "hidden_size and inter_size; this layer cannot run on CUDA QMoE unpadded."
        )
    n_align = 16 if q.bits == 4 else 8
    if n % n_align != 0:
        raise ValueError(
            f"prepack_for_cuda: N={n} (weights [E, N, K]={[e, n, k]}) is not a multiple of {n_align}; "
            f"the {q.bits}-bit mixed-GEMM layout needs N*bits/8 to fill whole 8-byte MMA columns."
        )
    return e, n, k

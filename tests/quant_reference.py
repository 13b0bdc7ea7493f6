"""A transformers model whose Linear/embedding weights are replaced by their quantize -> dequantize round trip.

Why: on tiny random models int4 noise is large (logit errors near 1 on logits of size 3), so comparing an int4
export with the fp32 model says little about whether the graph is right. Comparing it with transformers running the
*same* dequantized weights does: with accuracy_level 0 the two must agree to float rounding, and a weight stored
with the wrong bits, method, symmetry or block size shows up as a large difference.

The formats are given by the caller as a function (kind, layer) -> Fmt, written independently of the QuantPlan;
kind is one of q, k, v, o, gate, up, down, embed, lm_head. The quantizers themselves (builder.quant.blockwise /
kquant) are tested against ONNX Runtime's own in test_quant_blockwise.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Fmt:
    bits: int | None  # None: keep float
    method: str = "default"  # default | rtn | k_quant
    block_size: int = 32
    symmetric: bool = True


def round_trip(w: np.ndarray, fmt: Fmt) -> np.ndarray:
    """w [N, K] float32 -> dequantized float32 [N, K] as MatMulNBits / GatherBlockQuantized see it."""
    from builder.quant.blockwise import dequantize_blockwise, quantize_blockwise
    from builder.quant.kquant import quantize_kquant

    if fmt.bits is None:
        return w
    if fmt.method == "k_quant":
        q = quantize_kquant(w, bits=fmt.bits, block_size=fmt.block_size)
    else:
        q = quantize_blockwise(w, bits=fmt.bits, block_size=fmt.block_size, symmetric=fmt.symmetric,
                               method=fmt.method)
    return dequantize_blockwise(q)


def dequantized_model(checkpoint: Path, fmt_of: Callable[[str, int | None], Fmt], errors: list | None = None):
    """fp32 transformers model (llama-like module names) with every projection/embedding replaced by its round trip.

    `errors`, when given, receives (kind, layer, relative RMS error of the weight) for every quantized weight.
    """
    import torch

    from parity import load_hf

    model = load_hf(checkpoint)
    inner = model.model
    embed_w = inner.embed_tokens.weight.detach().numpy().copy()
    head_w = model.lm_head.weight.detach().numpy().copy()  # the embedding itself when tied

    def swap(module, kind: str, layer: int | None, w: np.ndarray) -> None:
        fmt = fmt_of(kind, layer)
        back = round_trip(w, fmt)
        if errors is not None and fmt.bits is not None:
            errors.append((kind, layer, float(np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2)))))
        put(module, back)

    def put(module, array: np.ndarray) -> None:
        module.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, np.float32)),
                                           requires_grad=False)

    with torch.no_grad():
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for kind, module in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                                 ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
                swap(module, kind, i, module.weight.detach().numpy())
        # separate Parameters: a tied head may be stored differently from the embedding (e.g. float embed)
        swap(inner.embed_tokens, "embed", None, embed_w)
        swap(model.lm_head, "lm_head", None, head_w)
    return model.eval()

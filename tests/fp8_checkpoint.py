"""FP8 block-scaled copies of tiny checkpoints, in the layout DeepSeek-V3 / Kimi-K2 ship.

Every 2-D linear weight of the decoder layers (attention projections, dense MLPs, routed and shared experts) becomes
float8_e4m3fn `<name>` plus float32 `<name>_scale_inv` [ceil(N / bn), ceil(K / bk)]; embeddings, norms, routers,
correction biases and the lm_head stay as they were, as in the released checkpoints; config.json gets their
quantization_config with the block size. `twin` writes the dequantized model in bf16 next to it.

Scales are powers of two, so every dequantized value (an e4m3 value, 4 significant bits, times 2^k) is exact in bf16:
the FP8 checkpoint and its bf16 twin hold the same numbers, and an export must not tell them apart.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
KEEP = ("embed_tokens", "lm_head", "norm", "layernorm", "mlp.gate.")  # tensors released FP8 checkpoints keep in bf16


def quantize_fp8_blocks(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, K] -> (w / scale per block [N, K], still float32: casting it to float8_e4m3fn rounds it; float32
    scales [ceil(N / bn), ceil(K / bk)]), each block's scale the power of two that fits its max into e4m3."""
    bn, bk = block
    n, k = w.shape
    scales = np.ones((-(-n // bn), -(-k // bk)), np.float32)
    q = np.empty_like(w)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            amax = float(np.abs(tile).max())
            scales[i, j] = 2.0 ** np.ceil(np.log2(amax / E4M3_MAX)) if amax > 0 else 1.0
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = tile / scales[i, j]
    return q, scales


def _quantized(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and name.startswith("model.layers.") and not any(k in name for k in KEEP)


def make_fp8_checkpoint(src: Path, dst: Path, block: tuple[int, int], twin: Path | None = None) -> Path:
    """Copy the checkpoint folder `src` to `dst` with its linear weights in FP8 (and the bf16 twin to `twin`)."""
    dst = Path(dst)
    for folder in (dst, twin):
        if folder is not None:
            shutil.copytree(src, folder, dirs_exist_ok=True)
    tensors = load_file(str(Path(src) / "model.safetensors"))
    fp8, dequantized = {}, {}
    for name, tensor in sorted(tensors.items()):
        if not _quantized(name, tensor):
            fp8[name] = dequantized[name] = tensor
            continue
        q, scales = quantize_fp8_blocks(tensor.float().numpy(), block)
        codes = torch.from_numpy(q).to(torch.float8_e4m3fn)
        fp8[name] = codes
        fp8[name + "_scale_inv"] = torch.from_numpy(scales)
        per_row = np.repeat(np.repeat(scales, block[0], 0), block[1], 1)[: q.shape[0], : q.shape[1]]
        exact = codes.float().numpy() * per_row
        dequantized[name] = torch.from_numpy(exact).to(torch.bfloat16)
        assert np.array_equal(dequantized[name].float().numpy(), exact), f"{name}: not exact in bf16"
    save_file(fp8, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if twin is not None:
        save_file(dequantized, str(Path(twin) / "model.safetensors"), metadata={"format": "pt"})
    return dst

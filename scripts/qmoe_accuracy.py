#!/usr/bin/env python3
"""QMoE accuracy tables for quantization.md: per-expert reconstruction error and end-to-end logit agreement.

1. Per-expert relative reconstruction error ||W - deq(q(W))|| / ||W|| of every expert matrix (fc1 and fc2 of
   every MoE layer) of the tiny GPT-OSS and Qwen3-MoE test checkpoints, for int4/int8 x block sizes x per-channel
   (block sizes larger than K do not apply to the tiny experts), plus a heavy-tailed synthetic expert stack
   [4, 512, 1024] (Student-t, df=5) for every block size.
2. Exports of the same checkpoints at int4/int8 with several qmoe_block_size values: max-abs logit error and top-1
   agreement with transformers fp32 over the 12-token test prompt.

    python scripts/qmoe_accuracy.py            # prints Markdown
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import factory  # noqa: E402
import parity  # noqa: E402
from builder.export import prepare  # noqa: E402
from builder.quant.moe import dequantize_experts, quantize_experts  # noqa: E402
from builder.spec import MoeSpec  # noqa: E402

BLOCKS = [0, 16, 32, 64, 128, 256]  # 0 = per-channel


def relative_errors(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Per-expert relative Frobenius error of a quantize/dequantize round trip."""
    deq = dequantize_experts(quantize_experts(w, bits=bits, block_size=block))
    return np.linalg.norm((w - deq).reshape(len(w), -1), axis=1) / np.linalg.norm(w.reshape(len(w), -1), axis=1)


def expert_stacks(checkpoint: Path) -> list[np.ndarray]:
    prepared = prepare(str(checkpoint), "fp32", "cpu")
    stacks = []
    for i, layer in enumerate(prepared.spec.layers):
        if isinstance(layer.ffn, MoeSpec):
            for part in ("fc1", "fc2"):
                stacks.append(prepared.weights.get(f"layers.{i}.moe.{part}.weight").rows())
    return stacks


def reconstruction_table(sources: dict[str, list[np.ndarray]]) -> str:
    rows = ["| experts | bits | " + " | ".join("per-channel" if b == 0 else f"block {b}" for b in BLOCKS) + " |",
            "|---|---|" + "---|" * len(BLOCKS)]
    for name, stacks in sources.items():
        for bits in (4, 8):
            cells = []
            for block in BLOCKS:
                usable = [w for w in stacks if block == 0 or w.shape[2] % block == 0]
                if not usable:
                    cells.append("n/a")
                    continue
                errs = np.concatenate([relative_errors(w, bits, block) for w in usable])
                cells.append(f"{errs.mean():.4f} (max {errs.max():.4f})")
            rows.append(f"| {name} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def logits_table(checkpoints: dict[str, Path], work: Path) -> str:
    recipes = [("int4", ["qmoe_block_size=32"]), ("int4", ["qmoe_block_size=16"]), ("int4", ["qmoe_block_size=0"]),
               ("int4", ["qmoe_block_size=32", "int4_accuracy_level=0"]), ("int8", ["qmoe_block_size=32"]),
               ("int8", ["qmoe_block_size=0"]), ("int8", ["qmoe_block_size=32", "int4_accuracy_level=0"])]
    rows = ["| model | precision | options | max-abs logit error | top-1 agreement |", "|---|---|---|---|---|"]
    for name, ckpt in checkpoints.items():
        model = parity.load_hf(ckpt)
        reference = parity.hf_logits(model, parity.PROMPT_IDS)
        for precision, extra in recipes:
            out = work / f"{name}-{precision}-{'-'.join(extra)}"
            parity.export(ckpt, out, precision, "cpu", extra)
            run = parity.run_onnx(out, parity.PROMPT_IDS, decode_steps=0)
            agree = int((run.prompt_logits.argmax(-1) == reference.argmax(-1)).sum())
            rows.append(f"| {name} | {precision} | {' '.join(extra)} | "
                        f"{parity.max_abs(run.prompt_logits, reference):.3f} | {agree}/{len(reference)} |")
    return "\n".join(rows)


def main() -> int:
    work = Path(tempfile.mkdtemp())
    checkpoints = {"gpt_oss": factory.make_checkpoint("gpt_oss", work / "gpt_oss"),
                   "qwen3_moe": factory.make_checkpoint("qwen3_moe", work / "qwen3_moe")}
    rng = np.random.default_rng(0)
    synthetic = [rng.standard_t(5, size=(4, 512, 1024)).astype(np.float32) * 0.02]
    sources = {f"tiny {name} (fc1+fc2, all layers)": expert_stacks(ckpt) for name, ckpt in checkpoints.items()}
    sources["synthetic Student-t [4, 512, 1024]"] = synthetic
    print("Per-expert relative reconstruction error, mean over experts (max):\n")
    print(reconstruction_table(sources))
    print("\nLogits of the tiny MoE exports against transformers fp32 (12-token prompt):\n")
    print(logits_table(checkpoints, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure every quantization recipe against fp32 transformers on the tiny test models; print a Markdown table.

Why a script: quantization.md quotes these figures, and they must be reproducible by anyone
(`python scripts/recipe_accuracy.py > figures.md`). For each model it builds the tiny factory checkpoint, takes the
transformers fp32 logits of the test prompt plus a 4-token greedy continuation (16 positions), exports each recipe
with ortbuild (-e cpu), runs it with onnxruntime (prompt pass, then KV-cache decode steps fed the same tokens), and
reports the largest absolute logit difference and at how many of the 16 positions the arg-max token agrees.
A last column compares the same run with transformers running the export's own dequantized weights (formats taken
from the QuantPlan): what is left there is not weight rounding but runtime arithmetic (accuracy_level 4 rounds
activations to int8 per block).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import factory  # noqa: E402
import parity  # noqa: E402
from quant_reference import Fmt, dequantized_model  # noqa: E402

# QuantPlan role of each transformers projection (q/k/v are one fused qkv weight in the export)
ROLE = {"q": "attn.q", "k": "attn.q", "v": "attn.q", "o": "attn.o", "gate": "mlp.gate", "up": "mlp.gate",
        "down": "mlp.down", "embed": "embed", "lm_head": "lm_head"}

DECODE_STEPS = 4
# (label, precision, extra options); int4 base methods x symmetry x placement flags, then int8 and embeddings.
FLAG_SETS = {"": [], "+last": ["last_matmul_weight_int8=true"], "+mixed": ["int8_mixed_layers=true"],
             "+last+mixed": ["last_matmul_weight_int8=true", "int8_mixed_layers=true"]}


def recipes() -> list[tuple[str, str, list[str]]]:
    out = [("fp32 (harness floor)", "fp32", [])]
    for method in ("default", "rtn", "k_quant"):
        for sym in (("sym", "asym") if method != "k_quant" else ("asym",)):
            for flag_label, flags in FLAG_SETS.items():
                extra = [f"int4_algo_config={method}", f"int4_is_symmetric={'true' if sym == 'sym' else 'false'}"]
                out.append((f"int4 {method} {sym}{flag_label}", "int4", extra + flags))
    out += [("int4 default sym, accuracy_level 0", "int4", ["int4_accuracy_level=0"]),
            ("int4 default sym block 16", "int4", ["int4_block_size=16"]),
            ("int4 default sym block 64", "int4", ["int4_block_size=64"]),
            ("int4 default sym +quantize_embeddings", "int4", ["quantize_embeddings=true"]),
            ("int8 sym", "int8", []),
            ("int8 sym, accuracy_level 0", "int8", ["int4_accuracy_level=0"]),
            ("int8 asym", "int8", ["int4_is_symmetric=false"]),
            ("int8 sym +quantize_embeddings", "int8", ["quantize_embeddings=true"])]
    # rows without "+quantize_embeddings" keep a float embedding table (the default before int4 shared a tied one)
    return [(label, precision, extra if "quantize_embeddings=true" in extra or precision == "fp32" else
             [*extra, "quantize_embeddings=false"]) for label, precision, extra in out]


def reference(checkpoint: Path) -> tuple[list[int], np.ndarray]:
    """(continuation tokens, [16, V] fp32 transformers logits of prompt + continuation)."""
    model = parity.load_hf(checkpoint)
    continuation = parity.hf_greedy(model, parity.PROMPT_IDS, DECODE_STEPS)
    return continuation, parity.hf_logits(model, parity.PROMPT_IDS + continuation)


def onnx_logits(model_dir: Path, continuation: list[int]) -> np.ndarray:
    run = parity.run_onnx(model_dir, parity.PROMPT_IDS, DECODE_STEPS, feed_tokens=continuation)
    return np.concatenate([run.prompt_logits, np.stack(run.step_logits)])


def dequantized_logits(checkpoint: Path, precision: str, extra: list[str], continuation: list[int]
                       ) -> tuple[np.ndarray, float]:
    """(transformers logits with the plan's dequantized weights, mean relative RMS error of those weights)."""
    from builder.export import prepare

    plan = prepare(str(checkpoint), precision, "cpu", extra).settings.plan

    def fmt_of(kind: str, layer: int | None) -> Fmt:
        f = plan.format_for(ROLE[kind], layer)
        return Fmt(f.bits, f.method, f.block_size, f.symmetric)

    errors: list = []
    logits = parity.hf_logits(dequantized_model(checkpoint, fmt_of, errors), parity.PROMPT_IDS + continuation)
    return logits, float(np.mean([e for _, _, e in errors])) if errors else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen3", "llama"], help="factory architectures")
    parser.add_argument("--layers", type=int, default=8, help="num_hidden_layers of the tiny models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("| model | recipe | weight rel. RMS error | max abs logit error | rms logit error | top-1 agreement "
              "| max abs error vs same dequantized weights |")
        print("|---|---|---|---|---|---|---|")
        for arch in args.models:
            checkpoint = factory.make_checkpoint(arch, tmp / f"ckpt-{arch}", num_hidden_layers=args.layers)
            continuation, full = reference(checkpoint)
            positions = full.shape[0]
            label = f"{arch} ({args.layers} layers, logits max abs {np.max(np.abs(full)):.2f})"
            for i, (name, precision, extra) in enumerate(recipes()):
                out = tmp / f"{arch}-{i}"
                start = time.monotonic()
                parity.export(checkpoint, out, precision, "cpu", extra)
                ours = onnx_logits(out, continuation)
                err = float(np.max(np.abs(ours - full)))
                rms = float(np.sqrt(np.mean((ours - full) ** 2)))
                agree = int(np.sum(ours.argmax(-1) == full.argmax(-1)))
                reference_logits, weight_err = dequantized_logits(checkpoint, precision, extra, continuation)
                floor = float(np.max(np.abs(ours - reference_logits)))
                print(f"| {label} | {name} | {weight_err:.4f} | {err:.3f} | {rms:.3f} | {agree}/{positions} | {floor:.3f} |", flush=True)
                print(f"  {name}: {time.monotonic() - start:.1f} s", file=sys.stderr)
                label = ""


if __name__ == "__main__":
    main()

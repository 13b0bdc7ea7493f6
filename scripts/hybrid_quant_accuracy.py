"""What int8_linear_attn buys on a hybrid model: fp32 / int4 / int4 + int8_linear_attn / int8 against fp32
transformers, on the tiny random test models (factory recipes qwen3_5 and qwen3_5_moe_vlm, default 3:1 layer
pattern), over several prompts; prints a Markdown table (quantization.md quotes it).

For each prompt: transformers fp32 logits of the prompt plus a greedy continuation, the export run with onnxruntime
on CPU (prompt pass, then decode steps fed the same tokens through the conv / recurrent state and KV cache), and
per position the max-abs and RMS logit difference and whether the arg-max agrees. Random tiny models amplify
quantization noise (their q/k vectors are short, and the L2 normalisation of q and k turns small projection errors
into direction errors), so read the rows relative to each other, not as real-model figures.

    python scripts/hybrid_quant_accuracy.py > figures.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import factory  # noqa: E402
import parity  # noqa: E402

RECIPES = [("fp32", "fp32", []), ("int4", "int4", []), ("int4 + int8_linear_attn", "int4", ["int8_linear_attn=true"]),
           ("int8", "int8", [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen3_5", "qwen3_5_moe_vlm"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per prompt")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 500, size=args.prompt_length).tolist() for _ in range(args.prompts)]
    print("| model | recipe | output MB | max abs logit error | rms logit error | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch in args.models:
            checkpoint = factory.make_checkpoint(arch, tmp / arch, num_hidden_layers=args.layers, layer_types=None)
            model = parity.load_hf(checkpoint)
            references = []
            for ids in prompts:
                tokens = parity.hf_greedy(model, ids, args.steps)
                references.append((ids, tokens, parity.hf_logits(model, ids + tokens)))
            label = f"{arch} ({args.layers} layers)"
            for name, precision, extra in RECIPES:
                out = parity.export(checkpoint, tmp / f"{arch}-{precision}-{len(extra)}", precision, "cpu", extra)
                size = sum(f.stat().st_size for f in out.glob("model.onnx*")) / 2**20
                worst, squares, agree, count = 0.0, 0.0, 0, 0
                for ids, tokens, full in references:
                    run = parity.run_onnx(out, ids, len(tokens), feed_tokens=tokens)  # generate stops at EOS
                    ours = np.concatenate([run.prompt_logits, np.stack(run.step_logits)])[: len(full)]
                    diff = ours - full
                    worst = max(worst, float(np.abs(diff).max()))
                    squares += float((diff ** 2).sum())
                    agree += int((ours.argmax(-1) == full.argmax(-1)).sum())
                    count += full.shape[0]
                rms = (squares / (count * full.shape[1])) ** 0.5
                print(f"| {label} | {name} | {size:.2f} | {worst:.3f} | {rms:.3f} | {agree}/{count} |", flush=True)
                label = ""


if __name__ == "__main__":
    main()

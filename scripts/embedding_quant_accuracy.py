#!/usr/bin/env python3
"""What quantizing a tied embedding costs: logits of int4 exports with a float vs a quantized (shared) embedding table.

For tied models the int4 lm_head already reads a quantized copy of the embedding; `quantize_embeddings=true` makes the
lookup read that same table (GatherBlockQuantized) instead of a separate float one, so the output loses the float
table (Qwen3-0.6B shape, fp16: 627 -> ~330 MB). The only numerical change is the embedding rows fed to layer 0. This
script measures it on the CPU EP (fp32 activations), one prompt pass over the same random token ids:

- `quantized vs float embedding`: int4 with quantize_embeddings=true against int4 with =false (everything else equal);
- `int4 vs fp32 (context)`: int4 with a float embedding against the fp32 export: the int4 noise of the rest of the
  model, the yardstick for the line above.

Each line: top-1 agreement over the positions, relative RMS of the logit difference (||a - b|| / ||b||), max-abs.

    PYTHONPATH=$PWD python scripts/embedding_quant_accuracy.py            # tiny factory Qwen3 + Qwen3-0.6B-shaped probe
    PYTHONPATH=$PWD python scripts/embedding_quant_accuracy.py --probe-layers 4 --positions 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"top1_agree": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "rel_rms": float(np.linalg.norm(a - b) / np.linalg.norm(b)), "max_abs": float(np.abs(a - b).max())}


def logits(folder: Path, ids: list[int]) -> np.ndarray:
    import parity

    return parity.run_onnx(folder, ids, decode_steps=0).prompt_logits


def measure(name: str, checkpoint: Path, work: Path, vocab: int, positions: int, seed: int = 0) -> dict:
    from builder.export import export

    ids = np.random.default_rng(seed).integers(10, vocab, size=positions).tolist()
    runs = {}
    for tag, precision, extra in [("fp32", "fp32", []), ("int4_float_embed", "int4", ["quantize_embeddings=false"]),
                                  ("int4_quant_embed", "int4", ["quantize_embeddings=true"])]:
        folder = export(str(checkpoint), work / f"{name}-{tag}", precision, "cpu", extra, overwrite=True)
        runs[tag] = logits(folder, ids)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
        print(f"  {name} {tag}: {size / 2**20:.1f} MiB", flush=True)
    return {"positions": positions, "quantized_vs_float_embedding": compare(runs["int4_quant_embed"],
                                                                             runs["int4_float_embed"]),
            "int4_vs_fp32_context": compare(runs["int4_float_embed"], runs["fp32"]),
            "quantized_embedding_vs_fp32": compare(runs["int4_quant_embed"], runs["fp32"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--probe-layers", type=int, default=28, help="layers of the Qwen3-0.6B-shaped probe")
    parser.add_argument("--skip-probe", action="store_true")
    args = parser.parse_args(argv)
    import factory
    import make_probe_checkpoint as probes

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = factory.make_checkpoint("qwen3", work / "tiny-qwen3")
        results["tiny qwen3 (factory, tied)"] = measure("tiny", tiny, work, factory.build_config("qwen3").vocab_size,
                                                        min(args.positions, 32))
        if not args.skip_probe:
            from dataclasses import replace

            shape = replace(probes.PRESETS["qwen3-0.6b"], layers=args.probe_layers, lm_head_copy=False)
            probe = probes.write_checkpoint(shape, work / "probe-qwen3-0.6b")
            results[f"Qwen3-0.6B-shaped probe, {args.probe_layers} layers, random weights (tied)"] = measure(
                "probe", probe, work, shape.vocab, args.positions)
    for model, r in results.items():
        print(f"\n{model}, {r['positions']} positions:")
        for key in ("quantized_vs_float_embedding", "int4_vs_fp32_context", "quantized_embedding_vs_fp32"):
            m = r[key]
            print(f"  {key:30s} top-1 {m['top1_agree'] * 100:5.1f}%  rel-RMS {m['rel_rms']:.2e}  "
                  f"max-abs {m['max_abs']:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

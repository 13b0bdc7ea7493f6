"""Print how long QMoE expert quantization and the CUDA prepack take on a GPT-OSS-20B-shaped layer.

Usage: python scripts/time_qmoe_quant.py [--experts 32] [--hidden 2880] [--inter 2880]
Prints one line per (tensor, bits, block_size): quantize seconds, prepack seconds, rel-RMSE.
Not a test: timings depend on the machine; run it when you change builder/quant/moe.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.quant.cuda_layout import prepack_for_cuda  # noqa: E402
from builder.quant.moe import dequantize_experts, quantize_experts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--inter", type=int, default=2880)
    parser.add_argument("--configs", default="4:32,4:0", help="comma list of bits:block_size")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shapes = {"fc1": (args.experts, 2 * args.inter, args.hidden), "fc2": (args.experts, args.hidden, args.inter)}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32)
        for cfg in args.configs.split(","):
            bits, block = (int(v) for v in cfg.split(":"))
            t0 = time.perf_counter()
            q = quantize_experts(w, bits=bits, block_size=block, name=name)
            t1 = time.perf_counter()
            prepack_for_cuda(q, arch=80)
            t2 = time.perf_counter()
            sample = slice(0, 2)  # error on two experts keeps the report cheap
            sub = type(q)(q.packed[sample], q.scales[sample], q.bits, q.block_size)
            err = dequantize_experts(sub) - w[sample]
            rel = float(np.sqrt((err ** 2).mean() / (w[sample] ** 2).mean()))
            print(f"{name} {list(shape)} bits={bits} block={block}: quantize {t1 - t0:.2f} s, "
                  f"prepack(sm80) {t2 - t1:.2f} s, rel-RMSE {rel:.4f}", flush=True)
        del w


if __name__ == "__main__":
    main()

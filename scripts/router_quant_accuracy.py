#!/usr/bin/env python3
"""What quantizing an MoE router would change: expert selections of a float router against the same router stored
int4 / int8 (block 32, symmetric, the MatMulNBits quantizer ortbuild uses for projections), for quantization.md's
"MoE routers stay float" paragraph. The reference builder stores GPT-OSS's router int4 (MatMulNBits); ortbuild keeps
it float (ALWAYS_FLOAT_ROLES), which makes a GPT-OSS-20B int4 export ~3 MB (0.03%) larger.

Routers come from a checkpoint folder (each layer's `model.layers.N.mlp.router.weight` / `.bias`, e.g. a
scripts/make_probe_checkpoint.py probe) or are drawn at random; the router input is RMS-normalised token rows (the
checkpoint's embedding rows for random token ids, scaled by the layer's post_attention_layernorm weight), i.e. what a
router reads after the norm, with the real hidden states' statistics replaced by the embedding's. Per router: the
fraction of tokens whose top-k expert set changes, whose top-1 changes, and the largest change of a selected expert's
renormalised softmax weight.

    PYTHONPATH=$PWD python scripts/router_quant_accuracy.py /tmp/probe-gptoss --top-k 4 --tokens 4096
    PYTHONPATH=$PWD python scripts/router_quant_accuracy.py --random 128x2048 --top-k 8
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.quant.blockwise import dequantize_blockwise, quantize_blockwise  # noqa: E402


def _tensors(folder: Path, names: set[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    found = {}
    for shard in sorted(glob.glob(str(folder / "*.safetensors"))):
        with safe_open(shard, "pt") as f:
            for key in names & set(f.keys()):
                found[key] = f.get_tensor(key).float().numpy()
    return found


def _selection(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    top = np.argsort(-logits, axis=-1)[:, :k]
    chosen = np.take_along_axis(logits, top, axis=-1)
    weights = np.exp(chosen - chosen.max(-1, keepdims=True))
    return np.sort(top, axis=-1), weights / weights.sum(-1, keepdims=True)


def compare(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, k: int) -> dict[str, dict]:
    """Float router vs the same router quantized at 4 and 8 bits: selection changes over the rows of x."""
    ref_top, ref_w = _selection(x @ weight.T + bias, k)
    ref_top1 = np.argmax(x @ weight.T + bias, axis=-1)
    out = {}
    for bits in (4, 8):
        q = quantize_blockwise(weight.astype(np.float32), bits=bits, block_size=32, symmetric=True, method="default")
        w = dequantize_blockwise(q)
        logits = x @ w.T + bias
        top, sel_w = _selection(logits, k)
        same = (top == ref_top).all(-1)
        out[f"int{bits}"] = {"top_k_set_changed": float(1 - same.mean()),
                             "top1_changed": float((np.argmax(logits, -1) != ref_top1).mean()),
                             "max_weight_change_where_same": float(np.abs(sel_w - ref_w)[same].max()) if same.any()
                             else None}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path)
    parser.add_argument("--random", help="EXPERTSxHIDDEN: a random router (normal, std 0.02) and random unit-RMS rows")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    routers = []
    if args.random:
        e, h = (int(v) for v in args.random.split("x"))
        x = rng.standard_normal((args.tokens, h)).astype(np.float32)
        routers.append(("random", rng.normal(0, 0.02, (e, h)).astype(np.float32), np.zeros(e, np.float32), x))
    else:
        import json

        config = json.loads((args.checkpoint / "config.json").read_text())
        layers, vocab = config["num_hidden_layers"], config["vocab_size"]
        names = {"model.embed_tokens.weight"} | {f"model.layers.{i}.{n}" for i in range(layers) for n in
                                                 ("mlp.router.weight", "mlp.router.bias",
                                                  "post_attention_layernorm.weight")}
        t = _tensors(args.checkpoint, names)
        rows = t["model.embed_tokens.weight"][rng.integers(0, vocab, args.tokens)]
        rows = rows / np.sqrt((rows ** 2).mean(-1, keepdims=True) + 1e-5)
        for i in range(layers):
            w = t.get(f"model.layers.{i}.mlp.router.weight")
            if w is None:
                continue
            b = t.get(f"model.layers.{i}.mlp.router.bias", np.zeros(w.shape[0], np.float32))
            routers.append((f"layer {i}", w, b, rows * t[f"model.layers.{i}.post_attention_layernorm.weight"]))
    print(f"| router | experts x hidden | top-k | tokens | int4: top-k set changed / top-1 changed | "
          f"int8: top-k set changed / top-1 changed |")
    print("|---|---|---:|---:|---:|---:|")
    for name, w, b, x in routers:
        r = compare(w, b, x, args.top_k)
        cells = [f"{100 * r[q]['top_k_set_changed']:.1f}% / {100 * r[q]['top1_changed']:.1f}%" for q in ("int4", "int8")]
        print(f"| {name} | {w.shape[0]} x {w.shape[1]} | {args.top_k} | {len(x)} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

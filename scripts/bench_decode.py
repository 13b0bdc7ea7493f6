#!/usr/bin/env python3
"""Decode speed of exported models through onnxruntime-genai, and the cost of the padding reorder on its own.

    # tok/s of one or more exports side by side (runs interleaved, medians), batch 1 and a batch of uneven prompts
    python scripts/bench_decode.py generate out/a out/b --batch 1 4 --new-tokens 64 --repeat 5
    # microseconds per run of the padding subgraph alone (builder/layers/padding.py) for some batch/length shapes
    python scripts/bench_decode.py padding-ops --hidden 1024

`generate` times every generate_next_token call after the first (the first one runs the prompt), so the figure is
pure decode: tokens per second = batch / median step time. Prompts are random ids (seeded) of different lengths per
row, so a batch is padded; onnxruntime-genai 0.18 pads them on the right.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _step_times(model, prompts: list[list[int]], new_tokens: int) -> list[float]:
    import onnxruntime_genai as og

    pad = og.Tokenizer(model).pad_token_id
    width = max(map(len, prompts))
    ids = np.array([p + [pad] * (width - len(p)) for p in prompts], np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, num_beams=1, batch_size=len(prompts), max_length=width + new_tokens,
                              min_length=width + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - start)
    return times[1:]


def generate(args) -> None:
    import onnxruntime_genai as og

    models = {folder: og.Model(folder) for folder in args.models}
    rng = np.random.default_rng(0)
    for batch in args.batch:
        lengths = [args.prompt_length - (args.prompt_length // 2) * b // max(batch - 1, 1) for b in range(batch)]
        prompts = [rng.integers(10, 1000, size=n).tolist() for n in lengths]
        medians: dict[str, list[float]] = {folder: [] for folder in models}
        for _ in range(args.repeat):
            for folder, model in models.items():  # interleaved, so load changes hit every model alike
                medians[folder].append(statistics.median(_step_times(model, prompts, args.new_tokens)))
        for folder, runs in medians.items():
            step = statistics.median(runs)
            print(f"batch {batch} (prompts {lengths}) {folder}: median {step * 1e3:.2f} ms/step, "
                  f"{batch / step:.1f} tok/s; "
                  f"best {min(runs) * 1e3:.2f} ms/step, {batch / min(runs):.1f} tok/s "
                  f"(repeats {', '.join(f'{r * 1e3:.2f}' for r in runs)} ms)")


def _padding_graph(hidden_size: int, reorder: bool):
    """The step inputs exactly as the decoder emits them for a model without recurrent layers (which alone add the
    token mask), hidden states as an input; without `reorder`, only the seqlens_k / total_sequence_length part every
    export had before the reorder (the baseline)."""
    import onnx_ir as ir

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from builder.graph import GraphBuilder
    from builder.layers.padding import restore_order, step_inputs

    g = GraphBuilder()
    input_ids = g.input("input_ids", ir.DataType.INT64, ["batch", "seq"])
    mask = g.input("attention_mask", ir.DataType.INT64, ["batch", "total"])
    hidden = g.input("hidden", ir.DataType.FLOAT, ["batch", "seq", hidden_size])
    aligned, step, rank = step_inputs(g, input_ids, mask)
    g.output(step.seqlens_k, "seqlens_k", ir.DataType.INT32, ["batch"])
    g.output(step.total_sequence_length, "total", ir.DataType.INT32, [])
    if reorder:
        g.output(aligned, "aligned_ids", ir.DataType.INT64, ["batch", "seq"])
        g.output(restore_order(g, hidden, rank), "restored", ir.DataType.FLOAT, ["batch", "seq", hidden_size])
    else:
        g.output(g.op("Identity", [hidden]), "restored", ir.DataType.FLOAT, ["batch", "seq", hidden_size])
        used = {v for node in g.graph for v in node.inputs} | set(g.graph.outputs)
        while True:  # drop the reorder nodes nothing reads
            dead = [n for n in g.graph if not any(o in used for o in n.outputs)]
            if not dead:
                break
            for node in dead:
                g.graph.remove(node, safe=True)
            used = {v for node in g.graph for v in node.inputs} | set(g.graph.outputs)
    return ir.Model(g.graph, ir_version=10)


def padding_ops(args) -> None:
    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    sessions = {}
    for reorder in (False, True):
        path = Path(args.tmp) / f"padding_ops_{int(reorder)}.onnx"
        ir.save(_padding_graph(args.hidden, reorder), path)
        sessions[reorder] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch, seq, total in [(1, 1, 512), (8, 1, 512), (1, 512, 512), (8, 512, 512)]:
        feed = {"input_ids": np.ones((batch, seq), np.int64), "attention_mask": np.ones((batch, total), np.int64),
                "hidden": np.ones((batch, seq, args.hidden), np.float32)}
        feed["attention_mask"][:, : total // 3] = 0
        runs = {False: [], True: []}
        for _ in range(args.repeat):
            for reorder, session in sessions.items():  # interleaved
                for _ in range(20):
                    session.run(None, feed)
                start = time.perf_counter()
                for _ in range(200):
                    session.run(None, feed)
                runs[reorder].append((time.perf_counter() - start) / 200)
        old, new = min(runs[False]), min(runs[True])  # best of the repeats: least disturbed by other load
        print(f"batch {batch}, new tokens {seq}, mask {total}, hidden {args.hidden}: step inputs {old * 1e6:.1f} us "
              f"-> with reorder {new * 1e6:.1f} us per run (+{(new - old) * 1e6:.1f} us; best of {args.repeat})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="decode tok/s of model folders through onnxruntime-genai")
    gen.add_argument("models", nargs="+")
    gen.add_argument("--batch", type=int, nargs="+", default=[1])
    gen.add_argument("--prompt-length", type=int, default=32, help="longest prompt; the others get shorter")
    gen.add_argument("--new-tokens", type=int, default=64)
    gen.add_argument("--repeat", type=int, default=5)
    ops = sub.add_parser("padding-ops", help="microseconds per run of the padding reorder subgraph")
    ops.add_argument("--hidden", type=int, default=1024)
    ops.add_argument("--repeat", type=int, default=5)
    ops.add_argument("--threads", type=int, default=0)
    ops.add_argument("--tmp", default="/tmp")
    args = parser.parse_args()
    (generate if args.command == "generate" else padding_ops)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

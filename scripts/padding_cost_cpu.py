#!/usr/bin/env python3
"""The padding bundle's cost per decode step at batch 1 on the CPU EP, end to end: an export against its twin without
the reorder (scripts/strip_padding.py), with an identical copy of the export as the control.

Two sessions in one process differ by more than their graphs: on this project's 2-core machine the session opened
first ran ~1 ms/step (~5% of a 19 ms step) slower, whatever its graph. So each measurement is a pair of sessions
timed in alternating rounds (A B B A ...: the order within a round cancels), done in both opening orders in separate
processes; with d1 = t(A) - t(B) when A opens first and d2 = t(B) - t(A) when B opens first, the opening bias is
(d1 + d2) / 2 and A's extra cost (d1 - d2) / 2. The control (the export against a byte-identical copy of its
model.onnx) shows what the estimator gives for no difference at all: the noise floor.

Every round runs `--steps` decode steps (one token, the cache after a 32-token prompt, the growing mask) after 3
warm-up runs; a process's figure is the median over its `--rounds` rounds.

    PYTHONPATH=$PWD python scripts/padding_cost_cpu.py out/probe-int4 --repeat 6 --threads 1

On the 1.40 GiB Qwen3-0.6B-shaped probe (make_probe_checkpoint.py qwen3-0.6b, -p int4 -e cpu, 375.7 MiB), 1 thread,
defaults (6 min on the shared 2-core machine): bundle +5 us/step (per process pair -269..+235), control +12 us/step
(-317..+184), opening bias ~1.2 ms, on 18.9 ms steps: no cost above the noise (the bundle alone, bench_decode.py
padding-ops, is +3.6 us).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def _time_pair(a: str, b: str, rounds: int, steps: int, threads: int) -> dict:
    """{folder: median ms per decode step} of two sessions opened in this order, rounds alternating A B B A."""
    import numpy as np
    import onnxruntime as ort

    sessions, feeds = {}, {}
    for folder in (a, b):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        session = sessions[folder] = ort.InferenceSession(str(Path(folder) / "model.onnx"), options,
                                                          providers=["CPUExecutionProvider"])
        pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        ids = np.arange(10, 42, dtype=np.int64)[None]
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for p in pasts:
            feed[p.name] = np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32)
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        step = {"input_ids": np.array([[7]], np.int64), "attention_mask": np.ones((1, 33), np.int64)}
        for p in pasts:
            step[p.name] = out["present." + p.name.removeprefix("past_key_values.")]
        feeds[folder] = step
    times: dict[str, list[float]] = {a: [], b: []}
    for r in range(rounds):
        for folder in ((a, b) if r % 2 == 0 else (b, a)):
            session, feed = sessions[folder], feeds[folder]
            for _ in range(3):
                session.run(["logits"], feed)
            start = time.perf_counter()
            for _ in range(steps):
                session.run(["logits"], feed)
            times[folder].append((time.perf_counter() - start) / steps * 1e3)
    return {folder: statistics.median(t) for folder, t in times.items()}


def _pair_in_process(a: Path, b: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--pair", str(a), str(b), "--rounds", str(args.rounds), "--steps",
           str(args.steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate(a: Path, b: Path, args) -> dict:
    """A's extra ms per step over B and the opening bias, from `repeat` processes per opening order."""
    d1, d2, ms = [], [], {str(a): [], str(b): []}
    for _ in range(args.repeat):
        first = _pair_in_process(a, b, args)
        d1.append(first[str(a)] - first[str(b)])
        second = _pair_in_process(b, a, args)
        d2.append(second[str(b)] - second[str(a)])
        for run in (first, second):
            for k, v in run.items():
                ms[k].append(v)
    costs = [(x - y) / 2 for x, y in zip(d1, d2)]
    return {"cost_ms": statistics.mean(costs), "cost_ms_each": [round(c, 3) for c in costs],
            "cost_ms_spread": statistics.stdev(costs) if len(costs) > 1 else None,
            "opening_bias_ms": statistics.mean((x + y) / 2 for x, y in zip(d1, d2)),
            "step_ms": {Path(k).name: statistics.median(v) for k, v in ms.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, nargs="?")
    parser.add_argument("--repeat", type=int, default=6, help="processes per opening order")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--pair", nargs=2, help=argparse.SUPPRESS)  # internal: one process' measurement
    args = parser.parse_args(argv)
    if args.pair:
        print(json.dumps(_time_pair(*args.pair, args.rounds, args.steps, args.threads)))
        return 0
    if args.export is None:
        parser.error("an export folder is needed")
    sys.path.insert(0, str(SCRIPTS))
    from strip_padding import strip_folder

    with tempfile.TemporaryDirectory(dir=args.export.parent) as tmp:  # same file system: hard links
        twin, copy = Path(tmp) / f"{args.export.name}-nopad", Path(tmp) / f"{args.export.name}-copy"
        strip = strip_folder(args.export, twin)
        copy.mkdir()
        for item in args.export.iterdir():
            if item.is_file():
                (shutil.copy2 if item.name == "model.onnx" else os.link)(item, copy / item.name)
        result = {"export": str(args.export), "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                  "repeat": args.repeat, "nodes_removed": strip["nodes_before"] - strip["nodes_after"],
                  "bundle": estimate(args.export, twin, args), "control": estimate(args.export, copy, args)}
    for name in ("bundle", "control"):
        r = result[name]
        each = ", ".join(f"{c * 1e3:+.0f}" for c in r["cost_ms_each"])
        steps = ", ".join(f"{k} {v:.2f} ms" for k, v in r["step_ms"].items())
        print(f"{name:8s}: {r['cost_ms'] * 1e3:+.0f} us/step (each {each}; opening bias "
              f"{r['opening_bias_ms'] * 1e3:+.0f} us) on steps of {steps}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

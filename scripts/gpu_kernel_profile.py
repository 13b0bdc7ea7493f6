"""Kernels per decode step and per prompt pass of a scripts/gpu_decode_bench.py harness, from a torch.profiler (CUPTI)
trace: launch counts and device time per kernel name (template arguments kept, parameter lists cut)."""

from __future__ import annotations

import re

import numpy as np


def _kernel_name(name: str) -> str:
    """A kernel's name without its parameter list (CUPTI gives the demangled signature), cut to 160 characters."""
    name = re.sub(r"^void ", "", name)
    depth, out = 0, []
    for ch in name:
        depth += ch == "("
        if depth == 0:
            out.append(ch)
        depth -= ch == ")"
    return "".join(out).strip()[:160] or name[:160]


def kernels_per_step(h, prompt: np.ndarray, steps: int) -> dict:
    """CUDA kernels and memcpys per decode step (growing mode), ORT's alone (harness' torch ops subtracted), with
    each kernel's device time: `by_kernel` lists kernel names (template arguments cut) by µs per step, largest first,
    and `kernel_us` is their sum, the GPU time of one step when nothing waits for the host (as under capture); the
    same for one prompt pass (`prefill_by_kernel`, `prefill_kernel_us`: launches and µs of the whole pass)."""
    from torch.profiler import ProfilerActivity, profile

    def count(hook) -> tuple[int, int, dict]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            h.decode("growing", prompt, steps, step_hook=hook)
        return _tally(prof)

    with_ort = count(None)
    harness = count(lambda session, io: None)  # the same loop without the model (prefill counted in both)
    h.prefill(prompt)  # warm (a kernel's first launch may profile tactics: QMoE, fpA_intB)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        h.prefill(prompt)
    prefill = _tally(prof)[2]
    by_kernel = {}
    for name, (n, us) in with_ort[2].items():
        base = harness[2].get(name, [0, 0.0])
        if n - base[0] > 0:
            by_kernel[name] = [round((n - base[0]) / steps, 2), round((us - base[1]) / steps, 2)]
    by_kernel = dict(sorted(by_kernel.items(), key=lambda kv: -kv[1][1]))
    prefill_by_kernel = dict(sorted(((k, [n, round(us, 1)]) for k, (n, us) in prefill.items()),
                                    key=lambda kv: -kv[1][1]))
    return {"kernels": (with_ort[0] - harness[0]) / steps, "memcpys": (with_ort[1] - harness[1]) / steps,
            "kernel_us": round(sum(v[1] for v in by_kernel.values()), 1),
            "by_kernel": by_kernel, "by_kernel_columns": ["launches per step", "µs per step"],
            "prefill_kernel_us": round(sum(v[1] for v in prefill_by_kernel.values()), 1),
            "prefill_by_kernel": prefill_by_kernel,
            "method": "torch.profiler (CUPTI), uncaptured growing-mask steps, harness loop subtracted; prefill: one "
                      "prompt pass after a warm one (the harness' own logits argmax included)"}


def _tally(prof) -> tuple[int, int, dict]:
    """(kernels, memcpys/memsets, {kernel name: [launches, device µs]}) of a torch.profiler run."""
    kernels = memcpys = 0
    names: dict = {}
    for evt in prof.events():
        if evt.device_type.name != "CUDA":
            continue
        if evt.name.startswith(("Memcpy", "Memset")):
            memcpys += 1
            continue
        kernels += 1
        entry = names.setdefault(_kernel_name(evt.name), [0, 0.0])
        entry[0] += 1
        entry[1] += evt.time_range.elapsed_us()
    return kernels, memcpys, names



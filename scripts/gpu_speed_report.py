"""The tables of scripts/gpu_speed_driver.py's report (gpu_speed.md) from its step results: exports, decode speed per
mode, ours vs the reference, and the padding bundle's cost at batch 1 (each export against its stripped twin)."""

from __future__ import annotations

from gpu_speed_driver import EXPORTS, NOPAD, PAIRS, REF_FULL_GPTOSS, VARIANTS


def _mode(entry: dict, mode: str, field_name: str):
    if mode == "genai":
        return entry.get("genai", {}).get(field_name)
    return entry.get("ort", {}).get("modes", {}).get(mode, {}).get(field_name)


def _steps(state: dict, kind: str):
    """(export, its `kind` step's record or None) for every export, the optional full-depth reference only once run."""
    for e in EXPORTS + [REF_FULL_GPTOSS]:
        record = state.get(f"{kind}-{e.key}")
        if record or e is not REF_FULL_GPTOSS:
            yield e, record


def markdown(state: dict) -> str:
    lines = ["# GPU decode speed (scripts/gpu_speed_driver.py)", ""]
    env = state.get("env", {}).get("result", {})
    if env:
        lines.append(f"Machine: {env.get('gpu')}, {env.get('cores')} cores; torch {env.get('torch')}, onnxruntime "
                     f"{env.get('onnxruntime')}, onnxruntime-genai {env.get('genai')}, transformers "
                     f"{env.get('transformers')}, onnx-ir {env.get('onnx_ir')}.")
        lines.append("")
    lines += ["## Exports", "", "| export | probe | precision | wall s | CPU s | peak RSS MB | output MB | status |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for e, s in _steps(state, "export"):
        if not s:
            lines.append(f"| {e.key} | {e.probe} | {e.precision} | | | | | not run |")
            continue
        r = s["result"]
        lines.append(f"| {e.key} | {e.probe} | {r.get('precision')} | {r.get('wall_s')} | {r.get('cpu_s')} | "
                     f"{r.get('peak_rss_mb')} | {r.get('output_mb')} | {s['status']} |")
    modes = ("growing", "static", "captured", "genai")
    lines += ["", "## Decode speed", "",
              "Prompt, steps and repeats as in the JSON (1024-token prompt, 128 greedy steps, median of 3 after a "
              "warm-up on the GPU). tok/s per mode; `genai` runs the folder's own genai_config.json.", "",
              "| export | prefill ms | growing tok/s | static tok/s | captured tok/s | "
              "genai tok/s (capture in config) | kernels / step | memcpy / step | nodes per EP (Memcpy nodes) | tokens vs growing (static / captured / "
              "genai) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for e, s in _steps(state, "bench"):
        if not s:
            lines.append(f"| {e.key} | | | | | | | | | not run |")
            continue
        r = s["result"]
        cells = []
        for mode in modes:
            value = _mode(r, mode, "decode_tok_s")
            error = (r.get("genai", {}) if mode == "genai" else
                     r.get("ort", {}).get("modes", {}).get(mode, {})).get("error")
            cells.append(f"{value}" if value is not None else ("error" if error else ""))
        genai_opts = r.get("genai", {}).get("provider_options")
        capture = ""
        if isinstance(genai_opts, list):
            flags = [o.get("cuda", {}).get("enable_cuda_graph") for o in genai_opts if "cuda" in o]
            capture = f" ({'on' if '1' in flags else 'off'})" if flags else " (cpu)"
        cells[3] += capture
        per_step = r.get("ort", {}).get("per_step", {})
        placement = r.get("ort", {}).get("placement", {})
        agree = " / ".join(str(_mode(r, m, "tokens_agree_with_growing") or "-")
                           for m in ("static", "captured", "genai"))
        prefill = _mode(r, "growing", "prefill_ms")
        lines.append(f"| {e.key} | {prefill if prefill is not None else ''} | {' | '.join(cells)} | "
                     f"{per_step.get('kernels', '')} | {per_step.get('memcpys', '')} | "
                     f"{placement.get('nodes_per_ep', '')} ({placement.get('memcpy_nodes', '')}) | {agree} |")
    lines += ["", "## Ours vs reference (decode tok/s ratio)", "", "| probe / precision | " +
              " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    for probe, precision in (("dense", "int4"), ("dense", "fp16"), ("gptoss", "int4"), ("gptoss_cmp", "int4")):
        ours, ref = state.get(f"bench-ours-{probe}-{precision}"), state.get(f"bench-ref-{probe}-{precision}")
        if not (ours and ref):
            continue
        cells = []
        for mode in modes:
            a, b = _mode(ours["result"], mode, "decode_tok_s"), _mode(ref["result"], mode, "decode_tok_s")
            cells.append(f"{a / b:.2f}x" if a and b else "")
        lines.append(f"| {probe} {precision} | {' | '.join(cells)} |")
    lines += padding_cost_table(state)
    lines += paired_table(state)
    failed = {k: v for k, v in state.items() if v.get("status") not in ("done", None)}
    if failed:
        lines += ["", "## Not done", ""] + [f"- {k}: {v['status']} {v.get('error', '')}" for k, v in failed.items()]
    return "\n".join(lines) + "\n"


def _per_call(a: dict, b: dict, orders, mode: str, cell) -> list[str]:
    """One cell per opening order of a paired run: cell(tok/s A, tok/s B) of that call, "-" where a side has none."""
    values = [(_mode(a[order], mode, "decode_tok_s"), _mode(b[order], mode, "decode_tok_s")) for order in orders]
    return [cell(x, y) if x and y else "-" for x, y in values]


def _pooled(run: dict, mode: str) -> list[float]:
    """Every pass's decode tok/s of `mode` in one side of a padding-cost run (both orders pooled)."""
    return [x for order in run.values() for x in (_mode(order, mode, "decode_tok_s_passes") or [])]


def padding_cost_table(state: dict) -> list[str]:
    """Issue 19: per mode, decode tok/s with and without the padding bundle and the microseconds per step it costs."""
    import statistics

    done = [(key, state[f"bench-{key}-nopad"]) for key in NOPAD if f"bench-{key}-nopad" in state]
    if not done:
        return []
    lines = ["", "## Padding bundle cost at batch 1", "",
             "Each export against its twin without the padding reorder (scripts/strip_padding.py: exact for unpadded "
             "input), both open in one gpu_decode_bench.py --interleave call with passes alternating A B B A, and "
             "again with the other session opened first; tok/s are medians of all passes of both calls. Δ µs/step = "
             "10^6/with - 10^6/without (positive: what the bundle costs per decode step), also per call (with opened "
             "first / without opened first: they differ by twice the bias of the opening order, plus noise); Δ % = "
             "(without - with) / without.", "",
             "| export | mode | tok/s with bundle | tok/s without | Δ µs/step | Δ % | Δ µs/step per call | "
             "passes |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    notes = []
    for key, s in done:
        r = s["result"]
        orders = r.get("orders", {})
        with_ = {o: v.get("with", {}) for o, v in orders.items()}
        without = {o: v.get("without", {}) for o, v in orders.items()}
        for mode in ("growing", "static", "captured", "captured_fpa", "genai"):
            pa, pb = _pooled(with_, mode), _pooled(without, mode)
            if not (pa or pb):
                continue
            a = statistics.median(pa) if pa else None
            b = statistics.median(pb) if pb else None
            delta = f"{1e6 / a - 1e6 / b:+.1f} | {100 * (b - a) / b:+.2f}" if a and b else " | "
            per_call = _per_call(with_, without, orders, mode, lambda x, y: f"{1e6 / x - 1e6 / y:+.1f}")
            lines.append(f"| {key} | {mode} | {round(a, 1) if a else 'error'} | {round(b, 1) if b else 'error'} | "
                         f"{delta} | {' / '.join(per_call)} | {len(pa)} / {len(pb)} |")
        strip = r.get("strip", {})
        removed = ", ".join(f"{op} {n}" for op, n in strip.get("removed", {}).items())
        first_with, first_without = with_.get("with_first", {}), without.get("with_first", {})
        kernels = [x.get("ort", {}).get("per_step", {}).get("kernels") for x in (first_with, first_without)]
        placement = [x.get("ort", {}).get("placement", {}).get("nodes_per_ep") for x in (first_with, first_without)]
        same = [first_with.get(k, {}).get("tokens") == first_without.get(k, {}).get("tokens") for k in ("ort", "genai")]
        note = f"- {key}: {strip.get('nodes_before', 0) - strip.get('nodes_after', 0)} graph nodes removed ({removed})"
        if any(k is not None for k in kernels):
            note += f"; kernels/step {kernels[0]} with, {kernels[1]} without"
        if any(placement):
            note += f"; nodes per EP {placement[0]} with, {placement[1]} without"
        notes.append(f"{note}; greedy tokens identical with/without (ORT growing, genai): {same[0]}, {same[1]}; "
                     f"status {s['status']}")
    return lines + [""] + notes


def paired_table(state: dict) -> list[str]:
    """Ours against the reference (pair-*) and exports against their graph_twin.py twins (variant-*), each pair
    benched interleaved in both opening orders: pooled tok/s, their ratio, the µs per step between them, and the
    profile's GPU kernel time per step (the sum of kernel durations, what a captured step cannot go below)."""
    import statistics

    rows = [(f"pair-{k}", ("ours", "ref")) for k in PAIRS]
    rows += [(f"variant-{k}-{r}", ("export", "twin")) for k, rewrites in VARIANTS.items() for r in rewrites]
    rows = [(name, labels, state[name]) for name, labels in rows if name in state]
    if not rows:
        return []
    lines = ["", "## Paired runs (ours / reference; export / graph_twin.py twin)", "",
             "Both folders open in one gpu_decode_bench.py --interleave call, passes alternating A B B A, then again "
             "with B opened first; tok/s are medians of all passes of both calls. ratio = A / B tok/s; Δ µs/step = "
             "10^6/A - 10^6/B (negative: A is faster); kernel µs = the sum of kernel durations per uncaptured step "
             "(torch.profiler), launches per step beside it.", "",
             "| pair | mode | tok/s A | tok/s B | ratio | Δ µs/step | ratio per call | kernel µs A / B | "
             "launches A / B |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    for name, (la, lb), s in rows:
        orders = s["result"].get("orders", {})
        side_a = {o: v.get(la, {}) for o, v in orders.items()}
        side_b = {o: v.get(lb, {}) for o, v in orders.items()}
        profiled = next(iter(orders.values()), {})
        steps = [profiled.get(x, {}).get("ort", {}).get("per_step", {}) for x in (la, lb)]
        kernel_us = " / ".join(str(p.get("kernel_us", "-")) for p in steps)
        launches = " / ".join(str(p.get("kernels", "-")) for p in steps)
        for mode in ("growing", "static", "captured", "captured_fpa", "genai"):
            pa, pb = _pooled(side_a, mode), _pooled(side_b, mode)
            if not (pa and pb):
                continue
            a, b = statistics.median(pa), statistics.median(pb)
            per_call = _per_call(side_a, side_b, orders, mode, lambda x, y: f"{x / y:.3f}")
            lines.append(f"| {name} | {mode} | {a:.1f} | {b:.1f} | {a / b:.3f} | {1e6 / a - 1e6 / b:+.1f} | "
                         f"{' / '.join(per_call)} | {kernel_us} | {launches} |")
    lines += _prefill_lines(rows)
    rewritten = ("prepacked", "unfused")  # graph_twin.py's lists of the nodes a rewrite changed
    notes = [f"- {name}: twin logits vs export {s['result']['logits']}; "
             f"{next((s['result']['twin'][k] for k in rewritten if k in s['result']['twin']), '')}"
             for name, _, s in rows if "logits" in s.get("result", {})]
    return lines + ([""] + notes if notes else [])


def _prefill_lines(rows) -> list[str]:
    """The paired runs' prompt pass: ms per side (the median of every ORT mode's median, both orders), and the
    profiled pass's kernel time with the kernels whose time differs most between the sides."""
    import statistics

    lines = ["", "Prompt pass of the paired runs (1024 tokens): ms = median over the ORT modes and both orders; kernel "
             "µs = one profiled pass; the three kernel names whose µs differ most (A - B).", "",
             "| pair | prefill ms A | prefill ms B | ratio | kernel µs A / B | largest differences (µs) |",
             "|---|---:|---:|---:|---|---|"]
    for name, labels, s in rows:
        orders = s["result"].get("orders", {})
        modes = [[m for o in orders.values() for m in o.get(side, {}).get("ort", {}).get("modes", {}).values()]
                 for side in labels]
        ms = [[m["prefill_ms"] for m in side if m.get("prefill_ms")] for side in modes]
        if not all(ms):
            continue
        a, b = statistics.median(ms[0]), statistics.median(ms[1])
        profiled = next(iter(orders.values()), {})
        steps = [profiled.get(x, {}).get("ort", {}).get("per_step", {}) for x in labels]
        kernels = [p.get("prefill_by_kernel", {}) for p in steps]
        deltas = {k: kernels[0].get(k, [0, 0.0])[1] - kernels[1].get(k, [0, 0.0])[1]
                  for k in set(kernels[0]) | set(kernels[1])}
        top = sorted(deltas.items(), key=lambda kv: -abs(kv[1]))[:3]
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.3f} | "
                     f"{' / '.join(str(p.get('prefill_kernel_us', '-')) for p in steps)} | "
                     f"{'; '.join(f'{k[:60]} {v:+.0f}' for k, v in top) if any(kernels) else '-'} |")
    return lines if len(lines) > 5 else []

"""scripts/gpu_speed_driver.py's paired steps: two exports benched side by side in one scripts/gpu_decode_bench.py
--interleave call (both sessions open, passes alternating A B B A in every mode) and again with the other opened
first, so that the few percent between them are not lost in the drift between separate runs (10-25% between leases)
or in the bias of the opening order (the session opened first ran a few percent slower whatever its graph)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gpu_speed_driver import PAIR_REPEAT, SCRIPTS, Driver, StepFailed, run_logged


def padding_cost_step(d: Driver, key: str) -> dict:
    """Issue 19's batch-1 cost of the padding bundle: scripts/strip_padding.py's twin of export `key` (the reorder
    removed; exact for unpadded inputs) against the export itself. Two gpu_decode_bench.py --interleave calls, both
    sessions open in each and their passes alternating A B B A, so the few microseconds the bundle costs per step are
    not lost in the drift between separate runs; the second call opens the two in the other order, because on the CPU
    machine the session opened first ran 1-2 ms/step (~4%) slower whatever its graph (an export against an identical
    copy of itself showed it), which one order alone would book as the bundle's cost."""
    from strip_padding import strip_folder

    source, twin = d.export_dir(key), d.export_dir(f"{key}-nopad")
    strip = strip_folder(source, twin, overwrite=True)
    return {"strip": strip, **paired_bench(d, f"{key}-nopad", source, twin, ("with", "without"))}


def paired_bench(d: Driver, name: str, a: Path, b: Path, labels: tuple[str, str]) -> dict:
    """Two exports benched together: two gpu_decode_bench.py --interleave calls (A opened first, then B), their
    passes alternating A B B A in every mode; the kernel profile runs in the first call only."""
    entry: dict = {"orders": {}, "bench_wall_s": 0.0}
    for order, folders, extra in ((f"{labels[0]}_first", [a, b], []),
                                  (f"{labels[1]}_first", [b, a], ["--profile-steps", "0"])):
        out_json = d.work / "bench" / f"{name}.{order}.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.unlink(missing_ok=True)
        log = d.work / "logs" / f"bench-{name}.{order}.log"
        cmd = [sys.executable, str(SCRIPTS / "gpu_decode_bench.py"), *map(str, folders), "--interleave", "--json",
               str(out_json), "--repeat", str(PAIR_REPEAT[d.smoke]), *extra]
        if d.smoke:
            cmd += ["--provider", "cpu", "--prompt", "32", "--steps", "8"]
        wall, _, _, rc = run_logged(cmd, d.env(repo=False), d.work, log, d.left_s())
        results = json.loads(out_json.read_text()) if out_json.exists() else {}
        entry["orders"][order] = {labels[0]: results.get(a.name, {}), labels[1]: results.get(b.name, {})}
        entry["bench_wall_s"] += round(wall, 1)
        if rc or not (results.get(a.name) and results.get(b.name)):
            entry["tail"] = log.read_text()[-1500:]
            raise StepFailed("timeout" if rc == 124 else f"exit {rc} ({order})", entry)
    return entry


def pair_step(d: Driver, ours: str, ref: str) -> dict:
    """Ours against the reference on the same probe, interleaved (issue 20's "equal settings" comparison without
    the drift between separate runs)."""
    return paired_bench(d, f"pair-{ours}", d.export_dir(ours), d.export_dir(ref), ("ours", "ref"))


def variant_step(d: Driver, key: str, rewrite: str) -> dict:
    """An export against its scripts/graph_twin.py twin (one layout choice changed, the same logits up to the
    kernels' own rounding): their prompt logits compared on the device, then the paired bench."""
    from graph_twin import make_twin

    source, twin = d.export_dir(key), d.export_dir(f"{key}-{rewrite}")
    figures = make_twin(rewrite, source, twin, overwrite=True)
    cmd = [sys.executable, str(SCRIPTS / "graph_twin.py"), "compare", str(source), str(twin)]
    proc = subprocess.run(cmd, env=d.env(repo=True), cwd=d.work, capture_output=True, text=True,
                          timeout=max(d.left_s(), 1))
    logits = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
              {"error": proc.stderr[-800:]})
    return {"twin": figures, "logits": logits,
            **paired_bench(d, f"{key}-{rewrite}", source, twin, ("export", "twin"))}



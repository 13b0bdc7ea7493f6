#!/usr/bin/env python3
"""Issue 20's GPU measurements in one resumable driver: probe checkpoints -> exports by ortbuild and by the reference
builder (wall time, peak RSS, size) -> scripts/gpu_decode_bench.py on every export -> one JSON + a Markdown table.

Runs on the GPU machine (Python 3.12, torch, transformers, CUDA 13; nothing can be downloaded there). Every step
keeps its result under --work (default /tmp/gsd, which survives between calls while the machine stays warm); a
finished step is skipped on the next call, and a step is only started when its estimated duration fits in what is
left of --budget seconds, so the same command can be repeated until it reports "all steps done". Each call rewrites
gpu_speed.json and gpu_speed.md in --out from everything finished so far.

Steps, in this order, and their estimated durations on the H200 machine (16 cores):
    env                         versions, GPU, cores, disk                                          ~5 s
    probe-dense                 Qwen3-0.6B-shaped bf16 probe, 28 layers, tied (1.40 GiB)            ~15 s
    export-{ours,ref}-dense-*   int4 and fp16, -e cuda                                              20-40 s each
    bench-*-dense-*             gpu_decode_bench.py: growing / static / captured (/ captured_fpa)
                                ORT modes + genai with the folder's config + kernel profile          ~40 s each
    pair-ours-*                 ours against the reference on the same probe, benched side by side (both
                                sessions open, passes A B B A, then the other opened first) with a kernel
                                profile of each: the "equal settings" ratios without lease-to-lease drift  ~60-90 s
    variant-ours-*-REWRITE      an export against its scripts/graph_twin.py twin (one layout choice changed),
                                their logits compared on the device, then benched side by side       ~70-90 s
    bench-ours-dense-*-nopad    issue 19: the padding bundle's cost at batch 1. scripts/strip_padding.py writes
                                the export's twin without the reorder (<1 s, weights hard-linked), then two
                                gpu_decode_bench.py --interleave calls (either session opened first) bench
                                both, 6 passes per mode and call in A B B A order (int4 and fp16)   ~100 s each
    probe-gptoss_cmp            GPT-OSS-20B's shape, MXFP4 experts, 4 layers (4.3 GiB)              ~30 s
    export-ours-gptoss_cmp      ortbuild int4 -e cuda                                               ~30 s
    export-ref-gptoss_cmp       reference int4 -e cuda (dequantizes through transformers)           ~180 s
    bench-*-gptoss_cmp          the same comparison as the dense one, GPT-OSS layers                ~60 s each
    probe-gptoss                GPT-OSS-20B's shape at full depth, 24 layers (12.8 GiB)             ~90 s
    export-ours-gptoss          ortbuild int4 -e cuda: full-depth export wall time and peak RSS     ~150 s
    bench-ours-gptoss           full-depth decode speed                                             ~150 s
About 20 minutes in all (these estimates are deliberately high: the recorded H200 run, scripts/results/
gpu_speed_h200.json, took 8-25 s per dense export or bench). The reference builder does not get the full-depth
probe by default: on this project's CPU machine it took ~41 s of CPU (mostly one core) and ~4 GB of RSS per GPT-OSS-20B
layer (1 layer: 192 s wall, 10.1 GB; 2 layers: 359 s, 14.1 GB), so 24 layers need ~17 minutes and ~100 GB, more than
one 10-minute call; --ref-full-gptoss adds it anyway (a step killed at the end of a call is retried once from
scratch in the next, then given up). The GPT-OSS probe is deleted once its exports are done.

Device plan (each `run` within 30 s of the previous one, so /tmp survives; onnxruntime-gpu as shared/gpu/README.md):
    here:   mkdir -p .gpuwheels && cp /tmp/gw/onnx_ir-1.1.0-py3-none-any.whl \\
                /tmp/gw/onnxruntime_genai_cuda-0.18.0-cp312-cp312-manylinux_2_28_x86_64.whl .gpuwheels/
    run 1-4 carry [".ortgpu/partN"]: mkdir -p /tmp/ortgpu && cp .ortgpu/partN /tmp/ortgpu/           (N = 0..3)
    run 5   carry [".ortgpu/part4", ".gpuwheels"] (56 MB with the repository), timeout_s 600:
            mkdir -p /tmp/ortgpu && cp .ortgpu/part4 /tmp/ortgpu/ && \\
            W=/tmp/ortgpu/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl && \\
            cat /tmp/ortgpu/part* > $W && \\
            python3 -m pip install -q --no-deps --target /tmp/ortsite $W && \\
            PYTHONPATH=/tmp/ortsite python3 scripts/gpu_speed_driver.py --wheels .gpuwheels --out $OUT --budget 480
    run 6+  timeout_s 600: PYTHONPATH=/tmp/ortsite python3 scripts/gpu_speed_driver.py --out $OUT --budget 560
            (repeat until it prints "all steps done"; `--list` shows what is left, `--only NAME ...` picks steps)
Each call brings back two files: $OUT/gpu_speed.json (every step's result, failures with their log tails) and
$OUT/gpu_speed.md (the tables).

What the GPU machine lacks and must be carried as wheels (pip download lines; `--wheels DIR` installs each with
`pip install --no-deps --target /tmp/ortsite`, which must be on PYTHONPATH with onnxruntime-gpu 1.31.1):
    onnx-ir 1.1 (ortbuild needs onnx-ir>=1.1; the machine has 1.0.0; the reference builder runs on 1.1 too):
        pip download --no-deps --only-binary=:all: -d .gpuwheels onnx-ir==1.1.0
    onnxruntime-genai-cuda 0.18.0 (the reference builder ships inside it; its runtime for the genai mode):
        pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
            --platform manylinux_2_28_x86_64 -d .gpuwheels onnxruntime-genai-cuda==0.18.0
Everything else either side imports is in the machine's image (checked against its package list, KINDS.md):
ortbuild needs numpy, onnx, onnx-ir, safetensors, ml_dtypes, click, huggingface_hub, PyYAML, tqdm; the reference
builder needs torch, transformers, onnx, onnx-ir, onnxruntime (its quantizer: onnxruntime-gpu's python package
provides it), numpy, safetensors, tqdm, huggingface_hub, and for MXFP4 GPT-OSS accelerate; make_probe_checkpoint's
tokenizer needs transformers (tests/factory.py); the bench needs numpy, onnx, onnxruntime-gpu, torch.

    # on the GPU machine, in the repository root, with onnxruntime-gpu installed in /tmp/ortsite:
    PYTHONPATH=/tmp/ortsite python3 scripts/gpu_speed_driver.py --wheels .gpuwheels --out $OUT
    # the same command again resumes; --only NAME... runs some steps; --smoke: the CPU dry run (few layers, CPU EP,
    # -p fp32 for fp16, a 32-token prompt, no capture)
    PYTHONPATH=$PWD python3 scripts/gpu_speed_driver.py --smoke --work /tmp/gsd-smoke --out /tmp/gsd-smoke/out
    # the dense subset alone (probe, ours/ref int4+fp16 exports and benches, the two padding-cost pairs): ~5 min on
    # the H200 by the last run's timings (its estimates add up to 490 s, but that run took about half of them, so
    # one --budget 480 call should do; if it stops early, the same command resumes):
    PYTHONPATH=/tmp/ortsite python3 scripts/gpu_speed_driver.py --out $OUT --budget 480 --only env probe-dense \
        export-ours-dense-int4 export-ref-dense-int4 export-ours-dense-fp16 export-ref-dense-fp16 \
        bench-ours-dense-int4 bench-ref-dense-int4 bench-ours-dense-fp16 bench-ref-dense-fp16 \
        bench-ours-dense-int4-nopad bench-ours-dense-fp16-nopad          # or the same as: --only env '*dense*'
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path[:0] = [str(SCRIPTS), str(REPO)]  # the variant steps' twins use ortbuild's own layout code
# run as a script, this module is __main__: gpu_speed_pairs / gpu_speed_report import it by name and must get this
# very module (one StepFailed class, one set of tables)
sys.modules.setdefault("gpu_speed_driver", sys.modules[__name__])


@dataclass
class Step:
    name: str
    estimate_s: float  # on the GPU machine (the smoke run divides by SMOKE_SPEEDUP where noted)
    run: object  # callable(driver) -> dict
    needs: tuple[str, ...] = ()
    smoke_estimate_s: float | None = None


@dataclass
class Export:
    key: str  # "ours-dense-int4"
    exporter: str  # ours | ref
    probe: str  # dense | gptoss
    precision: str  # as passed to the exporter
    estimate_s: float
    smoke_estimate_s: float = 60.0
    extra: tuple[str, ...] = ()  # --extra_options for ours


@dataclass
class Driver:
    work: Path
    out: Path
    budget_s: float
    smoke: bool
    ortsite: Path
    started: float = field(default_factory=time.perf_counter)

    # -- layout ------------------------------------------------------------------------------------------------
    @property
    def state(self) -> Path:
        return self.work / "state"

    def probe_dir(self, probe: str) -> Path:
        return self.work / "probes" / probe

    def export_dir(self, key: str) -> Path:
        return self.work / "exports" / key

    @property
    def ep(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def env(self, *, repo: bool) -> dict:
        """Child environment: /tmp/ortsite first (onnxruntime-gpu, onnx-ir 1.1, genai), the repo only for ortbuild,
        and the CUDA libraries of the image's nvidia-* packages for onnxruntime-genai-cuda."""
        env = dict(os.environ)
        paths = [str(self.ortsite)] if self.ortsite.is_dir() else []
        if repo:
            paths.append(str(REPO))
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != REPO]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + inherited))
        libs = cuda_library_dirs()
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        return env


def cuda_library_dirs() -> list[str]:
    """lib folders of the nvidia-* wheels (cublas, cufft, curand, cudart...) that torch brings."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(str(p) for p in Path(root).glob("*/lib") if p.is_dir())
        dirs += sorted(str(p) for p in Path(root).glob("cu*/lib") if p.is_dir())
    return list(dict.fromkeys(dirs))


# ------------------------------------------------------------------------------------------------------- steps


def run_logged(cmd: list[str], env: dict, cwd: Path, log: Path, timeout: float) -> tuple[float, float, float, int]:
    """(wall s, cpu s, peak RSS MB, return code) of a child whose output goes to `log`; killed after `timeout`."""
    from bench_export import measured

    start = time.perf_counter()
    try:
        wall, cpu, rss, rc, tail = measured(["timeout", "--signal=KILL", str(int(max(timeout, 1))), *cmd], env, cwd)
    except FileNotFoundError:  # no `timeout` binary
        wall, cpu, rss, rc, tail = measured(cmd, env, cwd)
    log.write_text(tail)
    if rc in (124, 137, -9) and time.perf_counter() - start >= timeout - 1:
        rc = 124
    return wall, cpu, rss, rc


def step_env(d: Driver) -> dict:
    info = {"python": sys.version.split()[0], "cores": os.cpu_count(), "work": str(d.work),
            "disk_free_gb": round(shutil.disk_usage(d.work).free / 2**30, 1)}
    probe = ("import json, torch, onnxruntime as o\n"
             "r = {'torch': torch.__version__, 'cuda': torch.cuda.is_available(), "
             "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "
             "'onnxruntime': o.__version__, 'providers': o.get_available_providers()}\n"
             "try:\n import onnxruntime_genai as g; r['genai'] = g.__version__ + ' ' + g.__id__\n"
             "except Exception as e: r['genai'] = 'not importable: ' + repr(e)[:200]\n"
             "import onnx_ir, transformers\n"
             "r.update(onnx_ir=onnx_ir.__version__, transformers=transformers.__version__)\n"
             "print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", probe], env=d.env(repo=False), capture_output=True, text=True,
                          cwd=d.work)
    info.update(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                {"probe_error": proc.stderr[-800:]})
    return info


def make_probe(d: Driver, probe: str) -> dict:
    from make_probe_checkpoint import PRESETS, checkpoint_bytes, param_count

    preset, layers = PROBES[probe][1 if d.smoke else 0]
    folder = d.probe_dir(probe)
    cmd = [sys.executable, str(SCRIPTS / "make_probe_checkpoint.py"), preset, str(folder)]
    cmd += ["--layers", str(layers)] if layers else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=d.env(repo=True), cwd=d.work, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"make_probe_checkpoint failed: {proc.stderr[-1500:]}")
    from dataclasses import replace

    shape = PRESETS[preset] if not layers else replace(PRESETS[preset], layers=layers)
    return {"preset": preset, "layers": shape.layers, "params_m": round(param_count(shape) / 1e6, 1),
            "gib": round(checkpoint_bytes(shape) / 2**30, 2), "seconds": round(time.perf_counter() - start, 1),
            "folder": str(folder)}


def export_step(d: Driver, e: Export) -> dict:
    from bench_export import folder_mb

    source, out = d.probe_dir(e.probe), d.export_dir(e.key)
    precision = {"fp16": "fp32"}.get(e.precision, e.precision) if d.smoke else e.precision
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = d.work / "logs" / f"{e.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if e.exporter == "ours":
        cmd = [sys.executable, "-m", "builder", "export", "-m", str(source), "-o", str(out), "-p", precision, "-e",
               d.ep, "--overwrite", *(["--extra_options", *e.extra] if e.extra else [])]
        env, cwd = d.env(repo=True), REPO
    else:
        cache = d.work / "ref-cache" / e.key
        shutil.rmtree(cache, ignore_errors=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out), "-p",
               precision, "-e", d.ep, "-c", str(cache)]
        # not from the repository root: the reference imports its own top-level `builders` package
        env, cwd = d.env(repo=False), d.work
    wall, cpu, rss, rc = run_logged(cmd, env, cwd, log, d.left_s())
    if e.exporter == "ref":
        shutil.rmtree(d.work / "ref-cache" / e.key, ignore_errors=True)
    result = {"exporter": e.exporter, "probe": e.probe, "precision": precision, "ep": d.ep, "wall_s": round(wall, 1),
              "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss), "rc": rc, "output_mb": round(folder_mb(out), 1),
              "cores": os.cpu_count(), "folder": str(out)}
    if rc:
        result["tail"] = log.read_text()[-1500:]
        raise StepFailed("timeout" if rc == 124 else f"exit {rc}", result)
    return result


def bench_step(d: Driver, key: str) -> dict:
    out_json = d.work / "bench" / f"{key}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.unlink(missing_ok=True)
    log = d.work / "logs" / f"bench-{key}.log"
    cmd = [sys.executable, str(SCRIPTS / "gpu_decode_bench.py"), str(d.export_dir(key)), "--json", str(out_json)]
    if d.smoke:
        cmd += ["--provider", "cpu", "--prompt", "32", "--steps", "8", "--repeat", "1"]
    wall, _, rss, rc = run_logged(cmd, d.env(repo=False), d.work, log, d.left_s())
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    entry = results.get(key, {"error": f"bench exit {rc}", "tail": log.read_text()[-1500:]})
    entry["bench_wall_s"] = round(wall, 1)
    if rc:
        entry["tail"] = log.read_text()[-1500:]
        raise StepFailed("timeout" if rc == 124 else f"exit {rc}", entry)
    return entry


class StepFailed(Exception):
    def __init__(self, why: str, result: dict):
        super().__init__(why)
        self.result = result


# (key, exporter, probe, precision, estimate s on the GPU machine, estimate s in the CPU smoke run)
EXPORTS = [
    Export("ours-dense-int4", "ours", "dense", "int4", 20, 40),
    Export("ref-dense-int4", "ref", "dense", "int4", 40, 90),
    Export("ours-dense-fp16", "ours", "dense", "fp16", 20, 40),
    Export("ref-dense-fp16", "ref", "dense", "fp16", 30, 90),
    Export("ours-gptoss-int4", "ours", "gptoss", "int4", 150, 120),
    Export("ours-gptoss_cmp-int4", "ours", "gptoss_cmp", "int4", 30, 60),
    Export("ref-gptoss_cmp-int4", "ref", "gptoss_cmp", "int4", 180, 150),
    # the head in the plain layout: the source of the prepacked-head variant (what lm_head_prepacked changes)
    Export("ours-gptoss_cmp-int4-plainhead", "ours", "gptoss_cmp", "int4", 30, 60, ("lm_head_prepacked=false",)),
    # logits of each row's last token only: the prompt pass runs the lm_head on one row (its prefill against the
    # reference's, which computes every position's)
    Export("ours-dense-fp16-last", "ours", "dense", "fp16", 20, 40, ("last_token_logits=true",)),
    Export("ours-gptoss_cmp-int4-last", "ours", "gptoss_cmp", "int4", 30, 60, ("last_token_logits=true",)),
]
REF_FULL_GPTOSS = Export("ref-gptoss-int4", "ref", "gptoss", "int4", 1200, 240)
# probe -> (preset, layers) on the GPU machine and in the smoke run (None: the preset's own depth)
PROBES = {"dense": (("qwen3-0.6b", None), ("qwen3-0.6b", 2)),
          "gptoss_cmp": (("gpt-oss-20b-mxfp4", 4), ("gpt-oss-2g-mxfp4", 1)),
          "gptoss": (("gpt-oss-20b-mxfp4", None), ("gpt-oss-2g-mxfp4", 2))}
PROBE_ESTIMATES = {"dense": (15, 30), "gptoss": (90, 40), "gptoss_cmp": (30, 25)}
BENCH_ESTIMATES = {"dense": (40, 40), "gptoss": (150, 60), "gptoss_cmp": (60, 50)}
# exports whose padding-free twin is benched against them (bench-KEY-nopad), and that step's estimates
NOPAD = ("ours-dense-int4", "ours-dense-fp16", "ours-gptoss_cmp-int4")
NOPAD_ESTIMATES = (100, 40)
# ours against the reference, interleaved (pair-KEY), and exports against a graph_twin.py twin (variant-KEY-REWRITE)
PAIRS = {"ours-dense-int4": "ref-dense-int4", "ours-dense-fp16": "ref-dense-fp16",
         "ours-gptoss_cmp-int4": "ref-gptoss_cmp-int4", "ours-dense-fp16-last": "ref-dense-fp16",
         "ours-gptoss_cmp-int4-last": "ref-gptoss_cmp-int4"}
VARIANTS = {"ours-dense-int4": ("prepack_lm_head", "prepack_all", "unfuse_gate_up"),
            "ours-dense-fp16": ("unfuse_gate_up",), "ours-gptoss_cmp-int4-plainhead": ("prepack_lm_head",)}
PAIR_REPEAT = {False: 6, True: 2}  # interleaved passes (A B B A ...) per mode and order, GPU / smoke run


def steps(ref_full_gptoss: bool = False) -> list[Step]:
    """In the order they run: the dense comparison (and the padding bundle's cost on ours), both exporters on the same
    4-layer GPT-OSS-20B-shaped probe, then GPT-OSS-20B at full depth (ours; the reference too with
    --ref-full-gptoss)."""
    from gpu_speed_pairs import padding_cost_step, pair_step, variant_step  # (they import this module's tools)

    exports = EXPORTS + ([REF_FULL_GPTOSS] if ref_full_gptoss else [])
    out = [Step("env", 5, step_env, smoke_estimate_s=10)]
    for probe in PROBES:
        gpu, smoke = PROBE_ESTIMATES[probe]
        out.append(Step(f"probe-{probe}", gpu, lambda d, p=probe: make_probe(d, p), smoke_estimate_s=smoke))
        mine = [e for e in exports if e.probe == probe]
        for e in mine:
            out.append(Step(f"export-{e.key}", e.estimate_s, lambda d, e=e: export_step(d, e), (f"probe-{probe}",),
                            e.smoke_estimate_s))
        gpu, smoke = BENCH_ESTIMATES[probe]
        for e in mine:
            out.append(Step(f"bench-{e.key}", gpu, lambda d, k=e.key: bench_step(d, k), (f"export-{e.key}",), smoke))
        for e in mine:
            if e.key in NOPAD:
                out.append(Step(f"bench-{e.key}-nopad", NOPAD_ESTIMATES[0], lambda d, k=e.key: padding_cost_step(d, k),
                                (f"export-{e.key}",), NOPAD_ESTIMATES[1]))
            if e.key in PAIRS:
                ref = PAIRS[e.key]
                out.append(Step(f"pair-{e.key}", NOPAD_ESTIMATES[0], lambda d, a=e.key, b=ref: pair_step(d, a, b),
                                (f"export-{e.key}", f"export-{ref}"), NOPAD_ESTIMATES[1]))
            for rewrite in VARIANTS.get(e.key, ()):
                out.append(Step(f"variant-{e.key}-{rewrite}", NOPAD_ESTIMATES[0],
                                lambda d, k=e.key, r=rewrite: variant_step(d, k, r), (f"export-{e.key}",),
                                NOPAD_ESTIMATES[1]))
    return out


# ---------------------------------------------------------------------------------------------------- report


def load_state(d: Driver) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.state.glob("*.json"))}


def write_report(d: Driver) -> None:
    from gpu_speed_report import markdown  # (it imports this module's tables)

    state = load_state(d)
    d.out.mkdir(parents=True, exist_ok=True)
    (d.out / "gpu_speed.json").write_text(json.dumps(state, indent=1) + "\n")
    (d.out / "gpu_speed.md").write_text(markdown(state))


# ------------------------------------------------------------------------------------------------------ main


def install_wheels(folder: Path, target: Path) -> None:
    for wheel in sorted(folder.glob("*.whl")):
        marker = target / f".installed-{wheel.name}"
        if marker.exists():
            continue
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(wheel)], check=True)
        marker.write_text("ok\n")
        print(f"installed {wheel.name} into {target}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gsd"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gsd/out")))
    parser.add_argument("--budget", type=float, default=540, help="seconds this call may use (steps that would not "
                                                                  "fit are left for the next call)")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: small probes, CPU EP, short prompt")
    parser.add_argument("--wheels", type=Path, help="install every wheel here into --ortsite first (--no-deps)")
    parser.add_argument("--ortsite", type=Path, default=Path("/tmp/ortsite"))
    parser.add_argument("--only", nargs="*", help="step names or shell patterns to run (others are skipped this "
                                                  "call), e.g. --only env '*dense*'")
    parser.add_argument("--redo", nargs="*", default=[], help="step names to run again although done")
    parser.add_argument("--list", action="store_true", help="list the steps and their state, run nothing")
    parser.add_argument("--ref-full-gptoss", action="store_true",
                        help="also export the 24-layer GPT-OSS probe with the reference builder (measured here on 1-2 "
                             "layers: ~41 s CPU and ~4 GB of RSS per layer, mostly one core: ~17 min and ~100 GB at "
                             "24 layers, past one 10-minute call)")
    args = parser.parse_args(argv)
    d = Driver(args.work, args.out, args.budget, args.smoke, args.ortsite)
    d.state.mkdir(parents=True, exist_ok=True)
    if args.wheels:
        install_wheels(args.wheels, args.ortsite)
    state = load_state(d)
    plan = steps(args.ref_full_gptoss)
    if args.list:
        for s in plan:
            print(f"{s.name:28s} ~{s.smoke_estimate_s if d.smoke else s.estimate_s:5.0f} s  "
                  f"{state.get(s.name, {}).get('status', 'pending')}")
        return 0
    stopped = None
    for s in plan:
        record = state.get(s.name)
        if record and record["status"] != "timeout" and s.name not in args.redo:
            continue  # done, gave up, or failed for a reason another try would not change (--redo retries)
        if args.only is not None and not any(fnmatch.fnmatchcase(s.name, pattern) for pattern in args.only):
            continue
        missing = [n for n in s.needs if state.get(n, {}).get("status") != "done"]
        if missing:
            print(f"{s.name}: waits for {', '.join(missing)}", flush=True)
            continue
        estimate = s.smoke_estimate_s if d.smoke and s.smoke_estimate_s else s.estimate_s
        if estimate > d.left_s():
            stopped = f"stopped before {s.name} (estimate {estimate:.0f} s, {d.left_s():.0f} s left of the budget)"
            break
        print(f"{s.name}: running (estimate {estimate:.0f} s, {d.left_s():.0f} s left)", flush=True)
        start = time.perf_counter()
        try:
            result, status, error = s.run(d), "done", None
        except StepFailed as exc:
            result, error = exc.result, str(exc)
            status = "gave up" if record and record.get("status") == "timeout" else str(exc)
            status = "timeout" if error == "timeout" and status != "gave up" else status
        except Exception as exc:  # a failed step is recorded and the rest goes on
            result, status, error = {}, "failed", f"{type(exc).__name__}: {exc}"[:1500]
        entry = {"status": status, "seconds": round(time.perf_counter() - start, 1), "result": result}
        if error:
            entry["error"] = error
        (d.state / f"{s.name}.json").write_text(json.dumps(entry, indent=1) + "\n")
        state[s.name] = entry
        print(f"{s.name}: {status} in {entry['seconds']} s" + (f" ({error[:300]})" if error else ""), flush=True)
        users = [f"export-{e.key}" for e in EXPORTS + [REF_FULL_GPTOSS] if e.probe == "gptoss"
                 and (e is not REF_FULL_GPTOSS or args.ref_full_gptoss)]
        if s.name in users and not d.smoke and all(state.get(u, {}).get("status") not in (None, "timeout")
                                                   for u in users):
            shutil.rmtree(d.probe_dir("gptoss"), ignore_errors=True)  # 12.8 GiB back once its exports are done
        write_report(d)
    write_report(d)
    pending = [s.name for s in plan if state.get(s.name, {}).get("status") in (None, "timeout")]
    print(stopped or ("all steps done" if not pending else f"not done: {', '.join(pending)}"), flush=True)
    print(f"report: {d.out / 'gpu_speed.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

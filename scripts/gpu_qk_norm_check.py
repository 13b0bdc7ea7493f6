"""Check the fused Q/K-norm GroupQueryAttention path on CUDA against transformers fp32.

ONNX Runtime's CPU GroupQueryAttention rejects q_norm_weight/k_norm_weight, so the fused form that `-e cuda`
exports by default (fuse_qk_norm_gqa) can only be verified on a GPU. For tiny Qwen3, Qwen3-MoE and Gemma 3
checkpoints (Gemma 3 only when its family is registered) this script exports

    fp16-fused    -p fp16 -e cuda  (q/k norm inside GroupQueryAttention)
    fp16-unfused  -p fp16 -e cuda --extra_options fuse_qk_norm_gqa=false   (control: separate norm nodes)
    bf16-fused    -p bf16 -e cuda

runs each with CUDAExecutionProvider (prompt, then decode steps feeding present -> past, the tokens being
transformers' greedy continuation) and compares with transformers fp32 logits of the same sequence: max-abs,
worst per-position relative error, top-1 agreement. A config that fails (export, session, run) is recorded
with its error and the run goes on. Results are printed and written to OUT/qk_norm_check.json.

The work is split so the GPU machine needs only numpy + onnxruntime-gpu (onnx optional, for graph facts):

    # where torch/transformers are installed: checkpoints, fp32 references and the exports
    python scripts/gpu_qk_norm_check.py --prepare-only --work .qkcheck
    # on the GPU machine (carry .qkcheck if git ignores it)
    python scripts/gpu_qk_norm_check.py --work .qkcheck --out $OUT

Run without --prepare-only, it prepares whatever is missing and then runs. --cpu smoke-tests the code path on
a machine without a GPU: fp32/cpu exports, plus the cuda exports run on CPUExecutionProvider (the fused ones are
expected to fail there: CPU rejects the fused inputs, and bf16 has no CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))

PROMPT_IDS = [5, 17, 99, 3, 250, 7, 8, 300, 11, 12, 13, 14]  # as tests/parity.py: longer than sliding windows (8)
ARCHS = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# Rough pass bounds on logits max-abs against fp32 (the tiny models' logits have std ~0.8): half precision
# rounding stays well inside; a wrong norm (w vs 1+w, missing norm, norm after rotary) is off by ~1.
MAX_ABS = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}
MIN_PROMPT_TOP1 = 0.9


@dataclass(frozen=True)
class Config:
    name: str
    precision: str
    ep: str
    extra: tuple[str, ...] = ()


GPU_CONFIGS = (
    Config("fp16-fused", "fp16", "cuda", ("fuse_qk_norm_gqa=true",)),
    Config("fp16-unfused", "fp16", "cuda", ("fuse_qk_norm_gqa=false",)),
    Config("bf16-fused", "bf16", "cuda", ("fuse_qk_norm_gqa=true",)),
)
CPU_CONFIGS = (Config("fp32-cpu", "fp32", "cpu"),) + GPU_CONFIGS


@dataclass
class Result:
    arch: str
    config: str
    precision: str
    ep: str
    extra: list[str]
    provider: str
    status: str = "not run"  # ok | failed
    verdict: str = ""  # pass | FAIL (ok runs only)
    error: str = ""
    stage: str = ""  # where it failed: reference, export, session, run
    fused_qk_norm: bool | None = None  # GroupQueryAttention fed q_norm_weight/k_norm_weight
    gqa_inputs: int | None = None
    providers: list[str] = field(default_factory=list)
    cpu_fallback: str = ""  # why nodes could not all be placed on the GPU, when they could not
    prompt_max_abs: float | None = None
    prompt_max_rel: float | None = None
    prompt_top1: float | None = None
    last_top1: bool | None = None
    decode_max_abs: float | None = None
    decode_top1: float | None = None
    decode_steps: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- preparation


def prepare_checkpoint(arch: str, folder: Path, rebuild: bool) -> Path:
    """A tiny factory checkpoint (needs torch + transformers the first time)."""
    ckpt = folder / "checkpoint"
    if rebuild or not (ckpt / "config.json").is_file():
        import factory

        factory.make_checkpoint(arch, ckpt)
    return ckpt


def prepare_reference(ckpt: Path, folder: Path, steps: int, rebuild: bool) -> Path:
    """transformers fp32 logits for the prompt + its greedy continuation, without a cache (the ground truth)."""
    path = folder / "reference.npz"
    if rebuild or not path.is_file():
        import torch

        import factory

        model = factory.load_reference(ckpt, torch.float32)
        ids = torch.tensor([PROMPT_IDS])
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=steps, do_sample=False, num_beams=1,
                                       attention_mask=torch.ones_like(ids), top_k=None, top_p=None, temperature=None)
            continuation = generated[0, len(PROMPT_IDS):].tolist()
            logits = model(torch.tensor([PROMPT_IDS + continuation])).logits[0].float().numpy()
        np.savez(path, prompt=np.array(PROMPT_IDS, np.int64), continuation=np.array(continuation, np.int64),
                 logits=logits)
    return path


def prepare_export(ckpt: Path, folder: Path, config: Config, rebuild: bool) -> Path:
    out = folder / config.name
    if rebuild or not (out / "model.onnx").is_file():
        from builder.export import export

        export(str(ckpt), out, config.precision, config.ep, list(config.extra), overwrite=True)
    return out


def family_registered(architecture: str) -> bool:
    from builders import supported_architectures

    return architecture in supported_architectures()


# --------------------------------------------------------------------------------------------- running


def graph_facts(model_dir: Path) -> tuple[bool | None, int | None]:
    """(q/k norm fed to GroupQueryAttention?, its input count), from the graph alone; (None, None) without onnx."""
    try:
        import onnx
    except ImportError:
        return None, None
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    fused = all(len(n.input) > 15 and n.input[14] and n.input[15] for n in gqa)
    return fused, max(len(n.input) for n in gqa)


_STORAGE = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.uint16}


# ONNX TensorProto element types (fixed by the ONNX spec; spelled out so the GPU machine needs no onnx package)
_ONNX_TYPES = {"tensor(float)": 1, "tensor(float16)": 10, "tensor(bfloat16)": 16, "tensor(int64)": 7}


def to_float32(array: np.ndarray, ort_type: str) -> np.ndarray:
    """Logits in float32; bfloat16 travels as its raw uint16 bits (numpy has no bfloat16)."""
    if ort_type == "tensor(bfloat16)":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def open_session(model_dir: Path, provider: str):
    """(session, why nodes fell back to CPU or ""). First tries with CPU fallback disabled, to learn whether every
    node runs on the GPU; if that is refused, opens it normally and keeps the refusal as the explanation."""
    import onnxruntime as ort

    def make(no_fallback: bool):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if no_fallback:
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=[provider])

    if provider == "CPUExecutionProvider":
        return make(False), ""
    try:
        return make(True), ""
    except Exception as exc:  # noqa: BLE001 - retried with fallback; the message is the finding
        session = make(False)
        return session, f"{type(exc).__name__}: {exc}"[:600]


def run_decoder(session, prompt: list[int], continuation: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prompt pass with an empty cache, then one pass per continuation token feeding present -> past.

    Everything goes through IO binding on CPU buffers so float32, float16 and bfloat16 models share one path.
    """
    import onnxruntime as ort

    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    pasts = [n for n in inputs if n.startswith("past_key_values.")]
    kv_type = inputs[pasts[0]].type
    heads, head_size = inputs[pasts[0]].shape[1], inputs[pasts[0]].shape[3]
    vocab = outputs["logits"].shape[2]
    if not isinstance(vocab, int):
        raise RuntimeError(f"logits vocab dimension is symbolic ({vocab}); cannot pre-allocate the output")

    def value(array: np.ndarray, ort_type: str):
        array = np.ascontiguousarray(array)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _ONNX_TYPES[ort_type])

    cache = {name: np.zeros((1, heads, 0, head_size), _STORAGE[kv_type]) for name in pasts}
    steps, total, prompt_logits = [], 0, None
    for chunk in [prompt] + [[t] for t in continuation]:
        total += len(chunk)
        feed = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, total), np.int64), **cache}
        binding, keep = session.io_binding(), []
        for name, array in feed.items():
            keep.append(value(array, inputs[name].type))
            binding.bind_ortvalue_input(name, keep[-1])
        results = {"logits": np.empty((1, len(chunk), vocab), _STORAGE[outputs["logits"].type])}
        for name in pasts:
            present = name.replace("past_key_values.", "present.")
            results[present] = np.empty((1, heads, total, head_size), _STORAGE[outputs[present].type])
        for name, array in results.items():
            keep.append(value(array, outputs[name].type))
            binding.bind_ortvalue_output(name, keep[-1])
        session.run_with_iobinding(binding)
        logits = to_float32(results["logits"][0], outputs["logits"].type)
        if prompt_logits is None:
            prompt_logits = logits
        else:
            steps.append(logits[-1])
        cache = {name: results[name.replace("past_key_values.", "present.")] for name in pasts}
    return prompt_logits, steps


def measure(result: Result, prompt_logits: np.ndarray, steps: list[np.ndarray], reference: np.ndarray) -> None:
    n = len(PROMPT_IDS)
    ref_prompt = reference[:n]
    diff = np.abs(prompt_logits - ref_prompt)
    result.prompt_max_abs = float(diff.max())
    result.prompt_max_rel = float((np.linalg.norm(prompt_logits - ref_prompt, axis=-1)
                                   / np.linalg.norm(ref_prompt, axis=-1)).max())
    result.prompt_top1 = float((prompt_logits.argmax(-1) == ref_prompt.argmax(-1)).mean())
    result.last_top1 = bool(prompt_logits[-1].argmax() == ref_prompt[-1].argmax())
    result.decode_steps = len(steps)
    if steps:
        result.decode_max_abs = float(max(np.abs(s - reference[n + k]).max() for k, s in enumerate(steps)))
        result.decode_top1 = float(np.mean([s.argmax() == reference[n + k].argmax() for k, s in enumerate(steps)]))
    bound = MAX_ABS[result.precision]
    good = (result.prompt_max_abs <= bound and (result.decode_max_abs or 0.0) <= bound
            and result.prompt_top1 >= MIN_PROMPT_TOP1 and result.last_top1)
    result.verdict = "pass" if good else "FAIL"


def check(arch: str, config: Config, folder: Path, provider: str, args) -> Result:
    result = Result(arch, config.name, config.precision, config.ep, list(config.extra), provider)
    start = time.time()
    try:
        result.stage = "reference"
        ckpt = prepare_checkpoint(arch, folder, args.rebuild)
        reference = np.load(prepare_reference(ckpt, folder, args.decode_steps, args.rebuild))
        result.stage = "export"
        model_dir = prepare_export(ckpt, folder, config, args.rebuild)
        result.fused_qk_norm, result.gqa_inputs = graph_facts(model_dir)
        if args.prepare_only:
            result.status, result.stage = "prepared", ""
            return result
        result.stage = "session"
        session, result.cpu_fallback = open_session(model_dir, provider)
        result.providers = session.get_providers()
        if provider not in result.providers:
            raise RuntimeError(f"{provider} is not available (session providers: {result.providers})")
        result.stage = "run"
        prompt_logits, steps = run_decoder(session, reference["prompt"].tolist(), reference["continuation"].tolist())
        measure(result, prompt_logits, steps, reference["logits"])
        result.status, result.stage = "ok", ""
    except Exception as exc:  # noqa: BLE001 - one config's failure must not stop the others
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        if args.verbose:
            traceback.print_exc()
    finally:
        result.seconds = round(time.time() - start, 2)
    return result


# --------------------------------------------------------------------------------------------- report


def environment() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, available_providers=ort.get_available_providers(),
                    device=ort.get_device())
    except Exception as exc:  # noqa: BLE001
        info["onnxruntime"] = f"unavailable: {exc}"
    return info


def _fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def table(results: list[Result]) -> str:
    head = (f"{'arch':10} {'config':13} {'status':8} {'verdict':7} {'fused':5} {'prompt_abs':>10} {'prompt_rel':>10} "
            f"{'top1':>5} {'last':>5} {'decode_abs':>10} {'dec_top1':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.arch:10} {r.config:13} {r.status:8} {r.verdict:7} {str(r.fused_qk_norm):5} "
                     f"{_fmt(r.prompt_max_abs, '10.3g')} {_fmt(r.prompt_max_rel, '10.3g')} "
                     f"{_fmt(r.prompt_top1, '5.2f')} {'-' if r.last_top1 is None else str(r.last_top1):>5} "
                     f"{_fmt(r.decode_max_abs, '10.3g')} "
                     f"{_fmt(r.decode_top1, '8.2f')}")
        if r.error:
            lines.append(f"    {r.stage} failed: {r.error.splitlines()[0][:300]}")
        if r.cpu_fallback:
            lines.append(f"    not all nodes on the GPU: {r.cpu_fallback.splitlines()[0][:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for qk_norm_check.json (required unless --prepare-only)")
    parser.add_argument("--work", type=Path, default=REPO / ".qkcheck",
                        help="checkpoints, references and exports (reused when present; default .qkcheck)")
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    parser.add_argument("--cpu", action="store_true", help="smoke test on CPUExecutionProvider (no GPU needed)")
    parser.add_argument("--prepare-only", action="store_true", help="build checkpoints/references/exports, run nothing")
    parser.add_argument("--rebuild", action="store_true", help="rebuild checkpoints, references and exports")
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    if not args.out and not args.prepare_only:
        parser.error("--out DIR is required (or --prepare-only)")
    provider = "CPUExecutionProvider" if args.cpu else "CUDAExecutionProvider"
    configs = CPU_CONFIGS if args.cpu else GPU_CONFIGS
    results, skipped = [], {}
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        if arch not in ARCHS:
            parser.error(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
        folder = args.work / arch
        try:
            registered = family_registered(ARCHS[arch])
        except Exception as exc:  # noqa: BLE001 - e.g. the GPU machine lacks the exporter's dependencies
            # prepared elsewhere (--prepare-only): the work folder is all this run needs
            registered = (folder / "checkpoint" / "config.json").is_file()
            if not registered:
                skipped[arch] = f"cannot import builders ({exc}) and {folder} was not prepared"
        if not registered:
            skipped.setdefault(arch, f"{ARCHS[arch]} has no registered family")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for config in configs:
            results.append(check(arch, config, folder, provider, args))
            print(f"{arch} {config.name}: {results[-1].status} {results[-1].verdict} "
                  f"({results[-1].seconds:.1f}s)", flush=True)
    print(table(results))
    for arch, why in skipped.items():
        print(f"skipped {arch}: {why}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"environment": environment(), "provider": provider, "prompt_ids": PROMPT_IDS,
                  "bounds": {"max_abs": MAX_ABS, "min_prompt_top1": MIN_PROMPT_TOP1}, "skipped": skipped,
                  "results": [asdict(r) for r in results]}
        (args.out / "qk_norm_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out / 'qk_norm_check.json'}")
    return 0 if all(r.status in ("ok", "prepared") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

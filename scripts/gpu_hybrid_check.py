#!/usr/bin/env python3
"""CUDA checks of the hybrid (Gated DeltaNet) exports: fp16/bf16/int4 parity against transformers fp32, and the
drift of the recurrent state over 256 decode steps with the state kept in float32 (default) or in the activation
dtype (linear_attn_fp32=false).

Two halves, like scripts/gpu_bundle.py + scripts/gpu_check.py: `prepare` runs on the CPU machine (tiny checkpoints
with real linear-attention head sizes, ortbuild exports for -e cuda, transformers fp32 references), `run` on the GPU
machine with numpy, onnx and onnxruntime-gpu only (torch, when present, just loads the CUDA libraries):

    python scripts/gpu_hybrid_check.py prepare --out .gpu_hybrid           # here
    python scripts/gpu_hybrid_check.py run .gpu_hybrid --out $OUT          # on the GPU machine

`run` prints a table and writes results.json: per export, prompt / 4-step decode max-abs logit error and top-1
agreement; over 256 teacher-forced decode steps, the max-abs logit error in step windows and the relative error of
every layer's recurrent state against transformers' at steps 1, 64, 128 and 256. The prompt pass is profiled
(scripts/ort_placement.py): a session on the CPU EP alone, or compute that fell back to the CPU EP (other than
GroupQueryAttention for float32 activations, whose CUDA kernel is float16/bfloat16 only), fails the export. int4
exports carry a `cpuref` folder (the same checkpoint exported -e cpu with int4_accuracy_level=0: the same quantized
weights, float activations) run on the CPU EP with the same tokens, which tells quantization noise (common to both)
from an error of the CUDA export. Verdict FAIL on placement, non-finite logits, top-1 vs transformers below 75% for
float exports, or (int4) top-1 vs cpuref below 85% / median relative logit error above 5%. `prepare --smoke` also
exports -e cpu fp32 copies, so `run --provider CPUExecutionProvider` can check the harness on a machine without a GPU.
`prepare --only MODEL ... --exports SUFFIX ...` bundles a subset; prepare exits 1 when any export fails.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from ort_placement import placement, profiled_options  # noqa: E402

FLOAT_TOP1_MIN, CPUREF_TOP1_MIN, CPUREF_MEDIAN_REL = 0.75, 0.85, 0.05  # as scripts/gpu_check.py
PROMPT = [5, 17, 99, 3, 250, 7, 8, 300, 11, 12, 13, 14]
DECODE_STEPS = 4
DRIFT_STEPS = 256
STATE_CHECKPOINTS = (1, 64, 128, 256)
WINDOWS = ((1, 16), (17, 64), (65, 128), (129, 256))
# Real linear-attention head sizes (128) and full-attention head size (256, 64-wide partial rotary) so the CUDA
# kernels take their production paths; hidden and expert sizes are multiples of 64 (CUDA QMoE).
# Small enough that the whole bundle stays under the device tool's 64 MiB carry limit (about 45 MiB).
PROBE = dict(hidden_size=128, intermediate_size=256, head_dim=256, num_attention_heads=2, num_key_value_heads=1,
             linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1, linear_num_value_heads=2,
             max_position_embeddings=512)
MOE = dict(moe_intermediate_size=64, shared_expert_intermediate_size=128)
MODELS = {  # name -> (factory architecture, overrides)
    "qwen3_5": ("qwen3_5", {**PROBE, "layer_types": ["linear_attention"] * 3 + ["full_attention"]}),
    "qwen3_5_moe": ("qwen3_5_moe_vlm", {**PROBE, **MOE}),
    "qwen3_next": ("qwen3_next", {**PROBE, **MOE}),
}
# (export name suffix, precision, extra options, also run the 256-step drift); int4 exports also get a cpuref
EXPORTS = [
    ("fp32", "fp32", [], False),
    ("fp16", "fp16", [], True),
    ("fp16-state16", "fp16", ["linear_attn_fp32=false"], True),
    ("bf16", "bf16", [], True),
    ("bf16-state16", "bf16", ["linear_attn_fp32=false"], True),
    ("int4", "int4", [], False),
]


# --------------------------------------------------------------------------------------------- prepare (CPU)


def _references(checkpoint: Path) -> dict[str, np.ndarray]:
    """transformers fp32: prompt + 4 greedy steps logits; 256 greedy steps with per-step logits and the recurrent
    states after the steps in STATE_CHECKPOINTS."""
    import torch
    import transformers

    model = getattr(transformers, json.loads((checkpoint / "config.json").read_text())["architectures"][0])
    model = model.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        result = model(torch.tensor([PROMPT]), use_cache=True)
        tokens, step_logits = [], []
        cache = result.past_key_values
        logits = result.logits[0, -1]
        for step in range(1, DRIFT_STEPS + 1):
            tokens.append(int(logits.argmax()))
            result = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache, logits = result.past_key_values, result.logits[0, -1]
            step_logits.append(logits.float().numpy())
            if step in STATE_CHECKPOINTS:
                for i, layer in enumerate(cache.layers):
                    if hasattr(layer, "recurrent_states"):
                        # a copy: the cache updates this tensor in place at the next step
                        out[f"recurrent.{i}.step{step}"] = layer.recurrent_states[0].float().clone().numpy()
        short = PROMPT + tokens[:DECODE_STEPS]
        out["parity_logits"] = model(torch.tensor([short]), use_cache=False).logits[0].float().numpy()
    out["drift_tokens"] = np.array(tokens, np.int64)
    out["drift_logits"] = np.stack(step_logits)  # row k: logits after feeding drift_tokens[k]
    return out


def probe_overrides(arch: str, overrides: dict) -> dict:
    """The probe's config overrides plus, for an mRoPE recipe, sections that fit the probe's rotary width: three
    sizes summing to rotary_dim / 2, split as Qwen3.5's own [11, 11, 10] is for rotary_dim 64 (the recipe's sections
    fit the recipe's smaller heads, and the checkpoint reader refuses a mismatch)."""
    import factory

    recipe = factory.ARCHS[arch]
    text = recipe.config.get(recipe.text_config_key, {}) if recipe.text_config_key else recipe.config
    rope = dict(overrides.get("rope_parameters", text.get("rope_parameters")) or {})
    if "mrope_section" not in rope:
        return overrides
    head_dim = overrides.get("head_dim", text.get("head_dim"))
    half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
    rope["mrope_section"] = [half // 3 + (i < half % 3) for i in range(3)]
    return {**overrides, "rope_parameters": rope}


def prepare(out: Path, smoke: bool, only: list[str] | None, suffixes: list[str] | None = None) -> int:
    """Export the bundle; the number of exports that failed."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import factory
    from builder.export import export

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest, work = [], Path(tempfile.mkdtemp())
    for model, (arch, overrides) in MODELS.items():
        if only and model not in only:
            continue
        checkpoint = factory.make_checkpoint(arch, work / model, **probe_overrides(arch, overrides))
        np.savez_compressed(out / f"{model}-reference.npz", **_references(checkpoint))
        exports = EXPORTS + ([("smoke-cpu-fp32", "fp32", [], True)] if smoke else [])
        for suffix, precision, extra, drift in exports:
            name = f"{model}-{suffix}"
            if suffixes and suffix not in suffixes and name not in suffixes:
                continue
            entry = {"name": name, "model": model, "precision": precision, "extra": extra, "drift": drift,
                     "ep": "cpu" if suffix.startswith("smoke") else "cuda"}
            try:
                export(str(checkpoint), out / name, precision, entry["ep"], extra)
                if precision == "int4" and entry["ep"] == "cuda":
                    export(str(checkpoint), out / name / "cpuref", precision, "cpu", extra + ["int4_accuracy_level=0"])
                entry["status"] = "exported"
            except Exception as exc:  # keep going: the GPU run reports what could not be exported
                entry.update(status="export failed", error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            print(f"{name}: {entry['status']}", flush=True)
            manifest.append(entry)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    failed = [e["name"] for e in manifest if e["status"] != "exported"]
    print(f"bundle: {out} ({size / 2**20:.1f} MiB, {len(manifest)} exports)"
          + (f"; export failed: {', '.join(failed)}" if failed else ""))
    return len(failed) if manifest else 1  # an empty selection is a mistake too


# --------------------------------------------------------------------------------------------- run (GPU)

_ELEM = {"tensor(float)": (1, 4), "tensor(float16)": (10, 2), "tensor(bfloat16)": (16, 2)}


def _to_float32(value) -> np.ndarray:
    """An OrtValue in CPU memory as float32 (bfloat16 read from its bytes: numpy has no bf16)."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy().astype(np.float32)
    shape = value.shape()
    raw = np.frombuffer(ctypes.string_at(value.data_ptr(), int(np.prod(shape)) * 2), np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def _state_inputs(session) -> list:
    return [i for i in session.get_inputs() if i.name.startswith(("past_key_values.", "past."))]


def _present(name: str) -> str:
    return "present." + name.split(".", 1)[1] if name.startswith("past_key_values.") else "present" + name[4:]


def _empty(ort, info):
    """KV caches of length 0 (axis 2), conv / recurrent state zeros."""
    shape = [1] + [0 if (info.name.startswith("past_key_values.") and axis == 2) else dim
                   for axis, dim in enumerate(info.shape)][1:]
    elem, size = _ELEM[info.type]
    value = ort.OrtValue.ortvalue_from_shape_and_type(shape, elem)
    count = int(np.prod(shape)) * size
    if count:
        ctypes.memset(value.data_ptr(), 0, count)
    return value


class Decoder:
    def __init__(self, ort, path: Path, provider: str, allowed_cpu_ops=()):
        self.ort = ort
        self.session = ort.InferenceSession(str(path), profiled_options(ort), providers=[provider])
        self.provider = self.session.get_providers()[0]
        self.states = _state_inputs(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.total = 0
        self.last: dict = {}
        self.wanted, self.allowed, self.placement = provider, allowed_cpu_ops, None

    def _ids(self, array) -> object:
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.int64))

    def prompt(self, ids: list[int]) -> np.ndarray:
        self.total = len(ids)
        feed = {"input_ids": self._ids([ids]), "attention_mask": self._ids(np.ones((1, self.total)))}
        feed.update({s.name: _empty(self.ort, s) for s in self.states})
        self.last = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feed)))
        if self.placement is None:  # the first prompt pass was profiled
            self.placement = placement(self.session, self.session.end_profiling(), self.wanted, self.allowed)
        return _to_float32(self.last["logits"])[0]

    def step(self, token: int) -> np.ndarray:
        self.total += 1
        feed = {"input_ids": self._ids([[token]]), "attention_mask": self._ids(np.ones((1, self.total)))}
        feed.update({s.name: self.last[_present(s.name)] for s in self.states})
        self.last = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feed)))
        return _to_float32(self.last["logits"])[0, -1]

    def recurrent_states(self) -> dict[int, np.ndarray]:
        return {int(name.split(".")[1]): _to_float32(value) for name, value in self.last.items()
                if name.endswith(".recurrent")}


def _float_logits_model(folder: Path, filename: str = "model.onnx") -> Path:
    """bf16 exports get a Cast to float32 on the logits in a side copy of the graph (numpy has no bf16)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(folder / filename), load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    if logits.type.tensor_type.elem_type != TensorProto.BFLOAT16:
        return folder / filename
    for node in model.graph.node:
        node.output[:] = ["logits_native" if o == "logits" else o for o in node.output]
    model.graph.node.append(helper.make_node("Cast", ["logits_native"], ["logits"], to=TensorProto.FLOAT))
    logits.type.tensor_type.elem_type = TensorProto.FLOAT
    path = folder / "model_fp32_logits.onnx"
    onnx.save(model, str(path))
    return path


def _short_run(decoder: Decoder, tokens: list[int], rows: int) -> np.ndarray:
    ours = [decoder.prompt(PROMPT)] + [decoder.step(t)[None] for t in tokens[:DECODE_STEPS]]
    return np.concatenate(ours)[:rows]


def run_one(ort, folder: Path, entry: dict, reference: dict, provider: str) -> dict:
    made = json.loads((folder / "ortbuild.json").read_text())
    allowed = ("GroupQueryAttention",) if made.get("io_dtype") == "float32" else ()
    decoder = Decoder(ort, _float_logits_model(folder), provider, allowed)
    tokens = reference["drift_tokens"].tolist()
    ref = reference["parity_logits"]
    start = time.perf_counter()
    ours = _short_run(decoder, tokens, len(ref))
    err = np.abs(ours - ref)
    n = len(PROMPT)
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    row = {"provider": decoder.provider, "prompt_max_abs": float(err[:n].max()),
           "decode_max_abs": float(err[n:].max()),
           "top1": f"{int((ours.argmax(-1) == ref.argmax(-1)).sum())}/{len(ref)}",
           "reference_logit_std": float(ref.std()), "seconds": round(time.perf_counter() - start, 3),
           **decoder.placement}
    problems = list(decoder.placement["placement_problems"])
    if not np.isfinite(ours).all():
        problems.append("non-finite logits")
    if (folder / "cpuref").is_dir():
        cpu = _short_run(Decoder(ort, folder / "cpuref" / "model.onnx", "CPUExecutionProvider"), tokens, len(ref))
        relative = np.linalg.norm(ours - cpu, axis=-1) / np.linalg.norm(cpu, axis=-1)
        row.update(cpuref_max_abs=float(np.abs(ours - cpu).max()),
                   cpuref_top1=round(float((ours.argmax(-1) == cpu.argmax(-1)).mean()), 3),
                   cpuref_median_rel=float(np.median(relative)),
                   cpuref_vs_transformers_top1=f"{int((cpu.argmax(-1) == ref.argmax(-1)).sum())}/{len(ref)}")
        if row["cpuref_top1"] < CPUREF_TOP1_MIN or row["cpuref_median_rel"] > CPUREF_MEDIAN_REL:
            problems.append(f"vs cpuref: top-1 {row['cpuref_top1']:.2f}, median relative error "
                            f"{row['cpuref_median_rel']:.3f}")
    elif top1 < FLOAT_TOP1_MIN:
        problems.append(f"top-1 vs transformers {top1:.2f} < {FLOAT_TOP1_MIN}")
    row.update(verdict="FAIL" if problems else "ok", problems=problems)
    if not entry["drift"]:
        return row
    decoder.prompt(PROMPT)
    drift_ref = reference["drift_logits"]
    errors, agree, states = [], 0, {}
    for k, token in enumerate(tokens, 1):
        logits = decoder.step(token)
        errors.append(float(np.abs(logits - drift_ref[k - 1]).max()))
        agree += int(logits.argmax() == drift_ref[k - 1].argmax())
        if k in STATE_CHECKPOINTS:
            for layer, state in decoder.recurrent_states().items():
                want = reference[f"recurrent.{layer}.step{k}"]
                states.setdefault(f"step {k}", []).append(float(np.linalg.norm(state - want) / np.linalg.norm(want)))
    row["drift_logit_max_abs"] = {f"steps {a}-{b}": max(errors[a - 1:b]) for a, b in WINDOWS}
    row["drift_top1"] = f"{agree}/{len(tokens)}"
    row["recurrent_state_rel_error"] = {step: max(values) for step, values in states.items()}
    return row


def run(bundle: Path, out: Path, provider: str) -> int:
    try:  # torch (when present) loads the CUDA runtime libraries that ORT's CUDA provider links against
        import torch  # noqa: F401
    except ImportError:
        pass
    import onnxruntime as ort

    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    references: dict[str, dict] = {}
    results = []
    for entry in manifest:
        if (provider == "CPUExecutionProvider") != (entry["ep"] == "cpu"):
            continue  # cuda exports need the CUDA provider (fused q/k norms); cpu copies are the smoke test
        row = {k: entry[k] for k in ("name", "precision", "extra")}
        if entry["status"] != "exported":
            row.update(status=entry["status"], error=entry.get("error"))
        else:
            try:
                if entry["model"] not in references:
                    references[entry["model"]] = dict(np.load(bundle / f"{entry['model']}-reference.npz"))
                row.update(status="ok", **run_one(ort, bundle / entry["name"], entry, references[entry["model"]],
                                                  provider))
            except Exception as exc:
                row.update(status="run failed", error=f"{type(exc).__name__}: {exc}"[:600])
                traceback.print_exc()
        row.setdefault("verdict", "FAIL")
        results.append(row)
        if row["status"] != "ok":
            print(f"{row['name']:28s} {row['status']}: {row.get('error')}", flush=True)
            continue
        line = (f"{row['name']:28s} {row['provider'][:4]} prompt {row['prompt_max_abs']:.2e} decode "
                f"{row['decode_max_abs']:.2e} top1 {row['top1']}")
        if "drift_top1" in row:
            windows = " ".join(f"{v:.2e}" for v in row["drift_logit_max_abs"].values())
            state = " ".join(f"{v:.1e}" for v in row["recurrent_state_rel_error"].values())
            line += f" | 256 steps: logits {windows} top1 {row['drift_top1']} | state rel {state}"
        if "cpuref_top1" in row:
            line += (f" | cpuref top1 {row['cpuref_top1']:.2f} median rel {row['cpuref_median_rel']:.3f} (cpuref vs "
                     f"transformers {row['cpuref_vs_transformers_top1']})")
        print(f"{line} -> {row['verdict']}", flush=True)
        for problem in row["problems"]:
            print(f"{'':28s} problem: {problem}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    failed = [r["name"] for r in results if r["verdict"] != "ok"]
    print(f"{len(results)} exports, {len(results) - len(failed)} ok, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed or not results else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="CPU machine: checkpoints, exports, references")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu_hybrid")
    p.add_argument("--smoke", action="store_true", help="also export -e cpu fp32 copies (run them with --provider "
                                                        "CPUExecutionProvider to test the harness without a GPU)")
    p.add_argument("--only", nargs="*", help=f"models to include ({', '.join(MODELS)})")
    p.add_argument("--exports", nargs="*", help="exports to include: suffixes (all models) or MODEL-SUFFIX names "
                                                f"(suffixes: {', '.join(e[0] for e in EXPORTS)})")
    r = sub.add_parser("run", help="GPU machine: run the bundle")
    r.add_argument("bundle", type=Path)
    r.add_argument("--out", type=Path, default=Path("."))
    r.add_argument("--provider", default="CUDAExecutionProvider")
    args = parser.parse_args()
    if args.command == "prepare":
        return 1 if prepare(args.out, args.smoke, args.only, args.exports) else 0
    return run(args.bundle, args.out, args.provider)


if __name__ == "__main__":
    sys.exit(main())

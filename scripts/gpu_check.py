#!/usr/bin/env python3
"""Run a bundle made by scripts/gpu_bundle.py through ONNX Runtime's CUDA EP and compare with the references.

Needs only numpy, onnx and onnxruntime-gpu (torch, when present, just loads the CUDA libraries first). Each entry runs
in its own Python process (`--entry NAME`), so a CUDA error that poisons a process (an illegal memory access leaves
the context unusable, and every later session silently falls back to the CPU EP) costs that entry only; a crash or a
time-out is recorded as the entry's failure.

For each exported model: a prompt pass (empty KV cache) and the decode steps (present -> past, OrtValues kept on the
ORT side), max-abs logit error against transformers fp32 and top-1 agreement at every position. bf16 models get a
Cast on their logits in a side copy of model.onnx (numpy has no bf16). Also, per entry:
- placement (scripts/ort_placement.py): the prompt pass is profiled; a session on the CPU EP alone, or compute nodes
  that fell back to the CPU EP, fail the entry (float32 activations may put GroupQueryAttention there: its CUDA
  kernel is float16/bfloat16 only);
- capture as the export decided it (genai_config.json's enable_cuda_graph): where on, the decode steps run again in
  an enable_cuda_graph=1 session (static [1, max_length] mask, one shared KV buffer per cache, inputs updated in
  place) and must give the uncaptured logits; where off, nothing is captured;
- a `cpuref` folder (gpu_bundle.py writes one for int4/int8 entries: the same checkpoint exported -e cpu with
  int4_accuracy_level=0, so the same quantized weights with float activations) runs on the CPU EP with the same tokens:
  quantization noise is common to both, so a routing or layout error of the CUDA export shows against it.
Verdict PASS when it ran on the CUDA EP without unexpected fallback, the logits are finite, the captured decode
matches (--capture-tol, bf16 x5), float exports pick transformers' top-1 at >= 75% of the positions and quantized
exports agree with their cpuref (top-1 at >= 85%, median relative logit error <= 5%).

Batch entries (`batch-*`, fp16): the prompts of tests/batching.py (17, 11, 5 tokens) run as one batch padded on the
left and on the right, with a growing cache and with one shared buffer (and left with the static decode mask of
CUDA-graph decoding), then 6 decode steps fed each prompt's own greedy tokens; each row's logits are compared with
the same prompt run alone on the GPU (max-abs, and greedy agreement at every real position). Also: the Memcpy nodes
ORT inserts for the provider (CUDA-graph capture refuses any) and, where the export turns capture on, a left-padded
prefill followed by decode steps in an enable_cuda_graph=1 session (static mask, shared KV buffers bound once, inputs
updated in place). A control run of the same model with the padding reorder bypassed shows the left-padding error
the check would catch. Verdict FAIL when a max-abs exceeds --batch-tol, the captured run fails, or placement fails.

    python scripts/gpu_check.py BUNDLE --out DIR      # every entry, one process each; DIR/results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from ort_placement import placement, profiled_options  # noqa: E402

FLOAT_TOP1_MIN = 0.75  # float exports: transformers' top-1 at >= 75% of the positions (routing near-ties flip a few)
CPUREF_TOP1_MIN, CPUREF_MEDIAN_REL = 0.85, 0.05  # quantized exports vs the same weights on the CPU EP


def _float_logits_model(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    if logits.type.tensor_type.elem_type == TensorProto.FLOAT:
        return folder / "model.onnx"
    for node in model.graph.node:
        node.output[:] = ["logits_native" if o == "logits" else o for o in node.output]
    model.graph.node.append(helper.make_node("Cast", ["logits_native"], ["logits"], to=TensorProto.FLOAT))
    logits.type.tensor_type.elem_type = TensorProto.FLOAT
    path = folder / "model_fp32_logits.onnx"
    onnx.save(model, str(path))
    return path


def capture_on(folder: Path) -> bool:
    """The export's own capture decision (genai_config.json's CUDA provider option, builder/capture.py)."""
    config = json.loads((folder / "genai_config.json").read_text())
    options = config["model"]["decoder"]["session_options"].get("provider_options", [])
    return any(o.get("cuda", {}).get("enable_cuda_graph") == "1" for o in options)


def allowed_cpu_ops(folder: Path) -> tuple[str, ...]:
    """Compute the export itself puts on the CPU EP: attention of float32 activations (GroupQueryAttention's CUDA
    kernel is float16/bfloat16 only)."""
    made = json.loads((folder / "ortbuild.json").read_text())
    return ("GroupQueryAttention",) if made.get("io_dtype") == "float32" else ()


def _empty(ort, p, device: str = "cpu"):
    """A KV cache input of length 0."""
    shape = [1, p.shape[1], 0, p.shape[3]]
    if p.type == "tensor(bfloat16)":
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, 16)  # TensorProto.BFLOAT16
    return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, ELEM[p.type]))


ELEM = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def decode_run(session, ids: list[int], tokens: list[int], on_prompt=None) -> np.ndarray:
    """[prompt + steps, V] float32 logits: a prompt pass with empty caches, then one step per token (present ->
    past). `on_prompt()` is called after the prompt pass (profiling ends there)."""
    import onnxruntime as ort

    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    out_names = [o.name for o in session.get_outputs()]
    feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.array([ids], np.int64)),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, len(ids)), np.int64))}
    feed.update({p.name: _empty(ort, p) for p in pasts})
    outputs = dict(zip(out_names, session.run_with_ort_values(out_names, feed)))
    if on_prompt:
        on_prompt()
    logits = [outputs["logits"].numpy()[0]]
    total = len(ids)
    for token in tokens:
        total += 1
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.array([[token]], np.int64)),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, total), np.int64))}
        feed.update({p.name: outputs[p.name.replace("past_key_values.", "present.")] for p in pasts})
        outputs = dict(zip(out_names, session.run_with_ort_values(out_names, feed)))
        logits.append(outputs["logits"].numpy()[0])
    return np.concatenate(logits, axis=0).astype(np.float32)


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float, float]:
    """(max-abs, fraction of positions with the same top-1, median relative L2 error per position)."""
    relative = np.linalg.norm(ours - theirs, axis=-1) / np.maximum(np.linalg.norm(theirs, axis=-1), 1e-6)
    return (float(np.abs(ours - theirs).max()), float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            float(np.median(relative)))


def run_one(folder: Path, entry: dict, provider: str, capture_tol: float) -> dict:
    import onnxruntime as ort

    path = _float_logits_model(folder)
    session = ort.InferenceSession(str(path), profiled_options(ort), providers=[provider])
    reference = np.load(folder / "reference_logits.npy")
    ids, tokens = entry["prompt"], entry["decode_tokens"]
    profile: list[str] = []
    start = time.perf_counter()
    ours = decode_run(session, ids, tokens, on_prompt=lambda: profile.append(session.end_profiling()))
    seconds = time.perf_counter() - start
    err = np.abs(ours - reference)
    n_prompt = len(ids)
    row = {"provider": session.get_providers()[0], "prompt_max_abs": float(err[:n_prompt].max()),
           "decode_max_abs": float(err[n_prompt:].max()) if len(tokens) else 0.0,
           "top1_agree": f"{int((ours.argmax(-1) == reference.argmax(-1)).sum())}/{len(reference)}",
           "reference_logit_std": float(reference.std()), "seconds": round(seconds, 3),
           **placement(session, profile[0], provider, allowed_cpu_ops(folder))}
    problems = list(row["placement_problems"])
    if not np.isfinite(ours).all():
        problems.append("non-finite logits")
    if capture_on(folder):
        tol = capture_tol * (5 if entry["precision"] == "bf16" else 1)
        try:
            captured = captured_static_decode(path, provider, [ids], [tokens])[0]
            row["captured_decode_max_abs"] = float(np.max(np.abs(np.stack(captured) - ours[n_prompt:])))
            if row["captured_decode_max_abs"] > tol:
                problems.append(f"captured decode differs by {row['captured_decode_max_abs']:.3g} > {tol:g}")
        except Exception as exc:  # noqa: BLE001 - the verdict says why
            row["captured_decode_error"] = f"{type(exc).__name__}: {exc}"[:300]
            problems.append("captured decode failed: " + row["captured_decode_error"])
    else:
        row["capture"] = "off in genai_config.json"
    if (folder / "cpuref").is_dir():
        cpu = ort.InferenceSession(str(folder / "cpuref" / "model.onnx"), providers=["CPUExecutionProvider"])
        diff, top1, median = _agreement(ours, decode_run(cpu, ids, tokens))
        row.update(cpuref_max_abs=diff, cpuref_top1=round(top1, 3), cpuref_median_rel=median)
        if top1 < CPUREF_TOP1_MIN or median > CPUREF_MEDIAN_REL:
            problems.append(f"vs cpuref: top-1 {top1:.2f}, median relative error {median:.3f}")
    elif entry["precision"] in ("fp16", "bf16", "fp32"):
        top1 = float((ours.argmax(-1) == reference.argmax(-1)).mean())
        if top1 < FLOAT_TOP1_MIN:
            problems.append(f"top-1 vs transformers {top1:.2f} < {FLOAT_TOP1_MIN}")
    row.update(verdict="FAIL" if problems else "ok", problems=problems)
    return row


def memcpy_nodes(folder: Path, provider: str) -> int:
    """Memcpy nodes ORT inserts for this provider (CUDA-graph capture refuses a session that has any)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(Path(tempfile.mkdtemp()) / "optimized.onnx")
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=[provider])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return sum(n.op_type.startswith("Memcpy") for n in graph.node)


def captured_static_decode(path: Path, provider: str, prompts: list[list[int]], feeds: list[list[int]],
                           max_length: int = 64) -> list[list[np.ndarray]]:
    """Left-padded prefill (plain session), then decode steps in a CUDA-graph session (enable_cuda_graph=1) with the
    static [B, max_length] mask and one shared KV buffer per cache, inputs updated in place (the captured layout of
    ort-ops.md). Returns per row the logits of each decode step. On CPU: the same I/O binding, no capture. `path`: a
    model whose logits are float32 or float16 (bf16 exports: the side copy of _float_logits_model)."""
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tests"))
    import batching

    cuda = provider == "CUDAExecutionProvider"
    device = "cuda" if cuda else "cpu"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    path = str(path)
    plain = ort.InferenceSession(path, options, providers=[provider])
    captured = ort.InferenceSession(path, options, providers=[(provider, {"enable_cuda_graph": "1"})] if cuda
                                    else [provider])
    elem = ELEM
    pasts = batching.state_inputs(plain)
    batch = len(prompts)

    def shared(p):  # KV caches: one [B, kv, max_length, head] buffer; conv / recurrent state: updated in place
        shape = [batch, p.shape[1], max_length, p.shape[3]] if p.name.startswith("past_key_values.") else \
            [batch, *p.shape[1:]]
        if p.type == "tensor(bfloat16)":  # never read past the written slots (GroupQueryAttention's lengths)
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, 16, device, 0)
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, elem[p.type]), device, 0)

    kv = {p.name: shared(p) for p in pasts}
    ids, mask = batching.pad(prompts, "left", 3)
    io = plain.io_binding()
    io.bind_cpu_input("input_ids", ids)
    io.bind_cpu_input("attention_mask", mask)
    for name, value in kv.items():
        io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(batching.present_name(name), value)
    io.bind_output("logits", device)
    plain.run_with_iobinding(io)
    counts = mask.sum(1)
    logits_type = next(o.type for o in plain.get_outputs() if o.name == "logits")
    vocab = next(o.shape[2] for o in plain.get_outputs() if o.name == "logits")
    step_ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), device, 0)
    step_mask = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, max_length), np.int64), device, 0)
    step_logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1, vocab), elem[logits_type]), device, 0)
    io = captured.io_binding()
    io.bind_ortvalue_input("input_ids", step_ids)
    io.bind_ortvalue_input("attention_mask", step_mask)
    for name, value in kv.items():
        io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(batching.present_name(name), value)
    io.bind_ortvalue_output("logits", step_logits)
    steps: list[list[np.ndarray]] = [[] for _ in prompts]
    for k in range(len(feeds[0])):
        step_ids.update_inplace(np.array([[f[k]] for f in feeds], np.int64))
        step_mask.update_inplace((np.arange(max_length)[None, :] < (counts + k + 1)[:, None]).astype(np.int64))
        captured.run_with_iobinding(io)
        out = step_logits.numpy().astype(np.float32)
        for b, row in enumerate(steps):
            row.append(out[b, -1])
    return steps


def run_batch(folder: Path, entry: dict, provider: str, tol: float) -> dict:
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tests"))
    import batching  # numpy + onnxruntime only

    session = ort.InferenceSession(str(folder / "model.onnx"), profiled_options(ort), providers=[provider])
    first = np.array([entry["prompts"][0]], np.int64)
    session.run(None, batching._first_feed(session, first, np.ones_like(first), None))  # one profiled prompt pass
    placed = placement(session, session.end_profiling(), provider, allowed_cpu_ops(folder))
    used = placed["session_provider"]
    providers = [provider]
    prompts, steps = entry["prompts"], entry["decode_steps"]
    feeds = [batching.greedy_tokens(folder, p, steps, providers) for p in prompts]
    solos = [batching.run_onnx_solo(folder, p, f, providers) for p, f in zip(prompts, feeds)]

    def compare(model: Path, side: str, max_length: int | None, static: bool = False) -> dict:
        run = batching.run_onnx_batch(model, prompts, side, feeds, max_length=max_length, providers=providers,
                                      static_mask=static)
        prompt_err, decode_err = batching.batch_vs_solo(run, solos)
        agree = total = 0
        for b, solo in enumerate(solos):
            ours = np.concatenate([run.prompt_logits[b], np.stack(run.step_logits[b])]).argmax(-1)
            theirs = np.concatenate([solo.prompt_logits[0], np.stack(solo.step_logits[0])]).argmax(-1)
            agree, total = agree + int((ours == theirs).sum()), total + len(ours)
        return {"prompt_max_abs": prompt_err, "decode_max_abs": decode_err, "top1_agree": f"{agree}/{total}"}

    layouts = {f"{side}-{'shared' if ml else 'growing'}": compare(folder, side, ml)
               for side in ("left", "right") for ml in (None, 64)}
    layouts["left-static"] = compare(folder, "left", 64, static=True)  # decode with a CUDA-graph static mask
    extra = {"memcpy_nodes": memcpy_nodes(folder, provider), **placed}
    if not capture_on(folder):
        extra["capture"] = "off in genai_config.json"
    else:
        try:
            steps_captured = captured_static_decode(folder / "model.onnx", provider, prompts, feeds)
            extra["captured_static_decode_max_abs"] = max(float(np.max(np.abs(x - y))) for rows, solo in
                                                          zip(steps_captured, solos)
                                                          for x, y in zip(rows, solo.step_logits[0]))
        except Exception as exc:  # e.g. capture refused because of Memcpy nodes
            extra["captured_static_decode_error"] = f"{type(exc).__name__}: {exc}"[:300]
    control = compare(batching.without_reorder(folder, Path(tempfile.mkdtemp()) / folder.name), "left", None)
    worst = max(max(r["prompt_max_abs"], r["decode_max_abs"]) for r in layouts.values())
    worst = max(worst, extra.get("captured_static_decode_max_abs", 0.0))
    problems = list(placed["placement_problems"])
    if worst > tol:
        problems.append(f"batch rows differ from alone by {worst:.3g} > {tol:g}")
    if "captured_static_decode_error" in extra:
        problems.append("captured decode failed: " + extra["captured_static_decode_error"])
    return {"provider": used, "layouts": layouts, **extra, "control_left_without_reorder": control,
            "batch_max_abs": worst, "verdict": "FAIL" if problems else "ok", "problems": problems}


def check_entry(bundle: Path, entry: dict, args) -> dict:
    """One manifest entry, in this process."""
    row = {k: entry[k] for k in ("name", "precision", "extra")}
    if entry["status"] != "exported":
        return {**row, "status": entry["status"], "error": entry.get("error"), "verdict": "FAIL"}
    try:
        if entry.get("kind") == "batch":
            row.update(status="ok", **run_batch(bundle / entry["name"], entry, args.provider, args.batch_tol))
        else:
            row.update(status="ok", **run_one(bundle / entry["name"], entry, args.provider, args.capture_tol))
    except Exception as exc:
        row.update(status="run failed", error=f"{type(exc).__name__}: {exc}"[:500], verdict="FAIL")
        traceback.print_exc()
    return row


def isolated(bundle: Path, entry: dict, args) -> dict:
    """check_entry in a child process: a crash or time-out fails this entry only."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, str(bundle), "--entry", entry["name"], "--row-out", str(out),
               "--provider", args.provider, "--batch-tol", str(args.batch_tol), "--capture-tol", str(args.capture_tol)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.entry_timeout)
        except subprocess.TimeoutExpired:
            return {"name": entry["name"], "precision": entry["precision"], "extra": entry["extra"],
                    "status": "timed out", "error": f"no result in {args.entry_timeout} s", "verdict": "FAIL"}
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"name": entry["name"], "precision": entry["precision"], "extra": entry["extra"],
                "status": "crashed", "error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:], "verdict": "FAIL"}


def print_row(row: dict) -> None:
    if row["status"] == "ok" and "layouts" in row:
        for layout, r in row["layouts"].items():
            print(f"{row['name']:28s} {row['provider'][:4]} {layout:14s} prompt {r['prompt_max_abs']:.3e} decode "
                  f"{r['decode_max_abs']:.3e} top1 {r['top1_agree']} vs alone", flush=True)
        c = row["control_left_without_reorder"]
        captured = row.get("captured_static_decode_max_abs", row.get("captured_static_decode_error",
                                                                     row.get("capture")))
        print(f"{row['name']:28s} {row['verdict']}: memcpy nodes {row['memcpy_nodes']}, captured static-mask "
              f"decode {captured} (control, reorder bypassed, left: prompt {c['prompt_max_abs']:.3e} decode "
              f"{c['decode_max_abs']:.3e})", flush=True)
    elif row["status"] == "ok":
        captured = row.get("captured_decode_max_abs", row.get("captured_decode_error", row.get("capture")))
        line = (f"{row['name']:28s} {row['provider'][:4]} prompt {row['prompt_max_abs']:.3e} decode "
                f"{row['decode_max_abs']:.3e} top1 {row['top1_agree']} (ref std {row['reference_logit_std']:.2f}) "
                f"captured {captured}")
        if "cpuref_top1" in row:
            line += f" | cpuref top1 {row['cpuref_top1']:.2f} median rel {row['cpuref_median_rel']:.3f}"
        print(f"{line} -> {row['verdict']}", flush=True)
    else:
        print(f"{row['name']:28s} {row['status']}: {row.get('error')}", flush=True)
    for problem in row.get("problems", []):
        print(f"{'':28s} problem: {problem}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--provider", default="CUDAExecutionProvider")
    parser.add_argument("--batch-tol", type=float, default=0.05,
                        help="max-abs fp16 logit difference allowed between a batch row and its prompt alone")
    parser.add_argument("--capture-tol", type=float, default=0.05,
                        help="max-abs logit difference allowed between captured and uncaptured decode steps (fp16; "
                             "bf16 five times that)")
    parser.add_argument("--entry-timeout", type=float, default=240, help="seconds per entry")
    parser.add_argument("--entry", help="check this one entry in this process (what each child runs)")
    parser.add_argument("--row-out", type=Path, help="with --entry: write its result row here")
    args = parser.parse_args()
    try:  # torch (when present) loads the CUDA runtime libraries that ORT's CUDA provider links against: first
        import torch  # noqa: F401
    except ImportError:
        pass
    import onnxruntime as ort

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    if args.entry:
        row = check_entry(args.bundle, next(e for e in manifest if e["name"] == args.entry), args)
        if args.row_out:
            args.row_out.write_text(json.dumps(row, indent=2))
        return 0
    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for entry in manifest:
        row = isolated(args.bundle, entry, args)
        results.append(row)
        print_row(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))  # after each: a time-out keeps these
    failed = [r["name"] for r in results if r.get("verdict") != "ok"]
    print(f"{len(results)} entries, {len(results) - len(failed)} ok, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

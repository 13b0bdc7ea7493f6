#!/usr/bin/env python3
"""Run a bundle made by scripts/gpu_bundle.py through ONNX Runtime's CUDA EP and compare with the references.

Needs only numpy, onnx and onnxruntime-gpu. For each exported model: a prompt pass (empty KV cache) and the decode
steps (present -> past, OrtValues kept on the ORT side), max-abs logit error against transformers fp32 and top-1
agreement at every position. bf16 models get a Cast on their logits in a side copy of model.onnx (numpy has no
bf16). Prints a table and writes results.json to --out.

Batch entries (`batch-*`, fp16): the prompts of tests/batching.py (17, 11, 5 tokens) run as one batch padded on the
left and on the right, with a growing cache and with one shared buffer (and left with the static decode mask of
CUDA-graph decoding), then 6 decode steps fed each prompt's own
greedy tokens; each row's logits are compared with the same prompt run alone on the GPU (max-abs, and greedy
agreement at every real position). Also: the Memcpy nodes ORT inserts for the provider (CUDA-graph capture refuses
any), and a left-padded prefill followed by decode steps in an enable_cuda_graph=1 session (static mask, shared KV
buffers bound once, inputs updated in place). A control run of the same model with the padding reorder bypassed
shows the left-padding error the check would catch. Verdict FAIL when a max-abs exceeds --batch-tol or the captured
run fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


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


def run_one(folder: Path, entry: dict, provider: str) -> dict:
    import onnxruntime as ort

    path = _float_logits_model(folder)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[provider])
    used = session.get_providers()[0]
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    elem = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    out_names = [o.name for o in session.get_outputs()]
    reference = np.load(folder / "reference_logits.npy")
    ids, tokens = entry["prompt"], entry["decode_tokens"]

    def empty(p):
        shape = [1, p.shape[1], 0, p.shape[3]]
        if p.type == "tensor(bfloat16)":
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, 16)  # TensorProto.BFLOAT16
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, elem[p.type]))

    feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.array([ids], np.int64)),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, len(ids)), np.int64))}
    feed.update({p.name: empty(p) for p in pasts})
    start = time.perf_counter()
    outputs = dict(zip(out_names, session.run_with_ort_values(out_names, feed)))
    logits = [outputs["logits"].numpy()[0]]
    total = len(ids)
    for token in tokens:
        total += 1
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.array([[token]], np.int64)),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, total), np.int64))}
        feed.update({p.name: outputs[p.name.replace("past_key_values.", "present.")] for p in pasts})
        outputs = dict(zip(out_names, session.run_with_ort_values(out_names, feed)))
        logits.append(outputs["logits"].numpy()[0])
    seconds = time.perf_counter() - start
    ours = np.concatenate(logits, axis=0).astype(np.float32)
    err = np.abs(ours - reference)
    agree = int((ours.argmax(-1) == reference.argmax(-1)).sum())
    n_prompt = len(ids)
    return {"provider": used, "prompt_max_abs": float(err[:n_prompt].max()),
            "decode_max_abs": float(err[n_prompt:].max()) if len(tokens) else 0.0,
            "top1_agree": f"{agree}/{len(reference)}", "reference_logit_std": float(reference.std()),
            "seconds": round(seconds, 3)}


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


def captured_static_decode(folder: Path, provider: str, prompts: list[list[int]], feeds: list[list[int]],
                           max_length: int = 64) -> list[list[np.ndarray]]:
    """Left-padded prefill (plain session), then decode steps in a CUDA-graph session (enable_cuda_graph=1) with the
    static [B, max_length] mask and one shared KV buffer per cache, inputs updated in place (the captured layout of
    ort-ops.md). Returns per row the logits of each decode step. On CPU: the same I/O binding, no capture."""
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tests"))
    import batching

    cuda = provider == "CUDAExecutionProvider"
    device = "cuda" if cuda else "cpu"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    path = str(folder / "model.onnx")
    plain = ort.InferenceSession(path, options, providers=[provider])
    captured = ort.InferenceSession(path, options, providers=[(provider, {"enable_cuda_graph": "1"})] if cuda
                                    else [provider])
    elem = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    pasts = batching.state_inputs(plain)
    batch = len(prompts)

    def shared(p):  # KV caches: one [B, kv, max_length, head] buffer; conv / recurrent state: updated in place
        shape = [batch, p.shape[1], max_length, p.shape[3]] if p.name.startswith("past_key_values.") else \
            [batch, *p.shape[1:]]
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

    options = ort.SessionOptions()
    options.log_severity_level = 3
    used = ort.InferenceSession(str(folder / "model.onnx"), options, providers=[provider]).get_providers()[0]
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
    extra = {"memcpy_nodes": memcpy_nodes(folder, provider)}
    try:
        steps_captured = captured_static_decode(folder, provider, prompts, feeds)
        extra["captured_static_decode_max_abs"] = max(float(np.max(np.abs(x - y))) for rows, solo in
                                                      zip(steps_captured, solos)
                                                      for x, y in zip(rows, solo.step_logits[0]))
    except Exception as exc:  # e.g. capture refused because of Memcpy nodes
        extra["captured_static_decode_error"] = f"{type(exc).__name__}: {exc}"[:300]
    control = compare(batching.without_reorder(folder, Path(tempfile.mkdtemp()) / folder.name), "left", None)
    worst = max(max(r["prompt_max_abs"], r["decode_max_abs"]) for r in layouts.values())
    worst = max(worst, extra.get("captured_static_decode_max_abs", 0.0))
    ok = worst <= tol and "captured_static_decode_error" not in extra
    return {"provider": used, "layouts": layouts, **extra, "control_left_without_reorder": control,
            "batch_max_abs": worst, "verdict": "ok" if ok else "FAIL"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--provider", default="CUDAExecutionProvider")
    parser.add_argument("--batch-tol", type=float, default=0.05,
                        help="max-abs fp16 logit difference allowed between a batch row and its prompt alone")
    args = parser.parse_args()
    try:  # torch (when present) loads the CUDA runtime libraries that ORT's CUDA provider links against
        import torch  # noqa: F401
    except ImportError:
        pass
    import onnxruntime as ort

    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    results = []
    for entry in manifest:
        row = {k: entry[k] for k in ("name", "precision", "extra")}
        if entry["status"] != "exported":
            row.update(status=entry["status"], error=entry.get("error"))
        else:
            try:
                if entry.get("kind") == "batch":
                    row.update(status="ok", **run_batch(args.bundle / entry["name"], entry, args.provider,
                                                        args.batch_tol))
                else:
                    row.update(status="ok", **run_one(args.bundle / entry["name"], entry, args.provider))
            except Exception as exc:
                row.update(status="run failed", error=f"{type(exc).__name__}: {exc}"[:500])
                traceback.print_exc()
        results.append(row)
        if row["status"] == "ok" and "layouts" in row:
            for layout, r in row["layouts"].items():
                print(f"{row['name']:28s} {row['provider'][:4]} {layout:14s} prompt {r['prompt_max_abs']:.3e} decode "
                      f"{r['decode_max_abs']:.3e} top1 {r['top1_agree']} vs alone", flush=True)
            c = row["control_left_without_reorder"]
            captured = row.get("captured_static_decode_max_abs", row.get("captured_static_decode_error"))
            print(f"{row['name']:28s} {row['verdict']}: memcpy nodes {row['memcpy_nodes']}, captured static-mask "
                  f"decode {captured} (control, reorder bypassed, left: prompt {c['prompt_max_abs']:.3e} decode "
                  f"{c['decode_max_abs']:.3e})", flush=True)
        elif row["status"] == "ok":
            print(f"{row['name']:28s} {row['provider'][:4]} prompt {row['prompt_max_abs']:.3e} decode "
                  f"{row['decode_max_abs']:.3e} top1 {row['top1_agree']} (ref std {row['reference_logit_std']:.2f})",
                  flush=True)
        else:
            print(f"{row['name']:28s} {row['status']}: {row.get('error')}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

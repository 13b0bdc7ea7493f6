#!/usr/bin/env python3
"""Decode speed of exported decoders on one GPU: prefill ms, decode tokens/s, kernels per token, ORT vs genai.

Needs numpy, onnx, onnxruntime-gpu and torch (torch holds the device buffers, picks greedy tokens on the device and
profiles kernels); onnxruntime-genai-cuda is used when importable. Each folder (an export: model.onnx +
genai_config.json, from ortbuild or the reference builder) is measured in these modes, all with IO binding and the
KV cache on the device in one shared past/present buffer [1, kv_heads, max_length, head] per cache (window-sized for
the caches of GroupQueryAttention nodes with sliding_window_cache=1, as the reference builder writes GPT-OSS's sliding
layers, since ONNX Runtime requires that capacity there):

- `growing`:  the attention mask grows by one column per step ([1, t]), as onnxruntime-genai runs without capture;
- `static`:   the static [1, max_length] mask (ones up to the current length, zeros after), same session;
- `captured`: static mask in a second session with the CUDA EP option enable_cuda_graph=1: decode steps are captured
              once and replayed (ORT CUDA graph); the prompt runs in the plain session bound to the same KV buffers;
- `captured_fpa` (exports with MatMulNBits only): `captured` with the session config entry ep.cuda.fpa_intb_gemm=1,
              ONNX Runtime's fpA_intB (TensorRT-LLM weight-only) GEMM/GEMV path for MatMulNBits (weights repacked at
              load); a runtime setting genai_config could carry ("session_options": {"ep.cuda.fpa_intb_gemm": "1"});
- `genai`:    onnxruntime-genai with the folder's own genai_config.json, as a user runs the folder (our config turns
              capture on where builder/capture.py allows it; the reference's leaves it off).

Per mode: a warm-up pass, then `--repeat` passes of a `--prompt`-token random prompt (prefill, timed) and `--steps`
greedy decode steps (timed together); figures are medians over the passes. Greedy tokens of every mode are compared
with the `growing` mode's. Kernels per decode step come from torch.profiler (CUPTI sees every kernel of the process,
ORT's included) around `--profile-steps` uncaptured steps, minus a control loop of the harness' own torch ops; the
session's node placement (nodes per execution provider, Memcpy nodes) is parsed from ORT's verbose log of the session
load. ORT's own profiler (enable_profiling) is not used: it needs another session load and records no kernels in the
release build.

    python scripts/gpu_decode_bench.py /tmp/exports/ours-int4 /tmp/exports/ref-int4 --json bench.json
    python scripts/gpu_decode_bench.py out/tiny --provider cpu --prompt 32 --steps 8 --repeat 1   # CPU dry run
    # two exports that differ by a few nodes: both open at once, passes alternating A B B A ... in every mode
    python scripts/gpu_decode_bench.py out/int4 out/int4-nopad --interleave --repeat 10 --json pad.json

On CPU (`--provider cpu`) the same code runs with torch CPU tensors and no `captured` mode: a dry run of the harness.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_kernel_profile import kernels_per_step  # noqa: E402

KV_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
ORT_TO_TORCH = {"tensor(float16)": "float16", "tensor(float)": "float32", "tensor(bfloat16)": "bfloat16",
                "tensor(int64)": "int64", "tensor(int32)": "int32"}
# KV buffer floor: a sliding-window cache (the reference builder's GPT-OSS export) must hold a whole window (128)
MIN_MAX_LENGTH = 256
ELEMENT = {"float16": np.float16, "float32": np.float32, "int64": np.int64, "int32": np.int32}


def _present(name: str) -> str:
    layer, kind = KV_PAST.match(name).groups()
    return f"present.{layer}.{kind}"


def window_caches(model_path: Path) -> dict[str, int]:
    """{past input: local_window_size} for the caches of GroupQueryAttention nodes with sliding_window_cache=1 (their
    buffer must hold exactly the window)."""
    import onnx
    from onnx import helper

    out = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("sliding_window_cache") == 1:
            out.update({name: int(attrs["local_window_size"]) for name in node.input[3:5] if name})
    return out


class Harness:
    """One export on one device: sessions, device buffers, and the greedy decode loop of each mode."""

    def __init__(self, folder: Path, provider: str, max_length: int, verbose_log: Path | None):
        import onnxruntime as ort
        import torch

        self.ort, self.torch = ort, torch
        self.folder, self.cuda = folder, provider == "cuda"
        self.device = torch.device("cuda:0" if self.cuda else "cpu")
        self.ep = "CUDAExecutionProvider" if self.cuda else "CPUExecutionProvider"
        self.max_length = max_length
        start = time.perf_counter()
        self.plain = self._session({}, verbose_log)
        self.load_s = time.perf_counter() - start
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 3
        inputs = {i.name: i for i in self.plain.get_inputs()}
        other = [n for n in inputs if n not in ("input_ids", "attention_mask") and not KV_PAST.match(n)]
        if other:
            raise ValueError(f"{folder}: inputs {other} are not input_ids / attention_mask / KV caches")
        self.pasts = [i for i in self.plain.get_inputs() if KV_PAST.match(i.name)]
        logits = next(o for o in self.plain.get_outputs() if o.name == "logits")
        self.logits_dtype = ORT_TO_TORCH[logits.type]
        self.vocab = int(logits.shape[2]) if isinstance(logits.shape[2], int) else None
        # an export with last_token_logits=true returns one position per row, a prompt pass included
        self.prompt_positions = logits.shape[1] if isinstance(logits.shape[1], int) else None
        self.kv = {}
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        windows = window_caches(folder / "model.onnx")
        for p in self.pasts:  # the reference builder names the head size symbolically: take it from genai_config
            kv_heads = p.shape[1] if isinstance(p.shape[1], int) else decoder["num_key_value_heads"]
            head = p.shape[3] if isinstance(p.shape[3], int) else decoder["head_size"]
            self.kv[p.name] = torch.zeros((1, kv_heads, windows.get(p.name, max_length), head),
                                          dtype=getattr(torch, ORT_TO_TORCH[p.type]), device=self.device)
        self.captured: dict = {}  # mode -> session with enable_cuda_graph=1
        # decode buffers live as long as the harness: a captured graph replays on the addresses it was captured with
        dtype = getattr(torch, self.logits_dtype)
        self.step_ids = torch.zeros((1, 1), dtype=torch.int64, device=self.device)
        self.step_mask = torch.zeros((1, max_length), dtype=torch.int64, device=self.device)
        self.step_logits = torch.empty((1, 1, self.vocab or 1), dtype=dtype, device=self.device)
        self.bindings: dict = {}

    def _session(self, cuda_options: dict, verbose_log: Path | None = None, config: dict | None = None):
        ort = self.ort
        options = ort.SessionOptions()
        options.log_severity_level = 0 if verbose_log else 3
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        providers = [(self.ep, cuda_options)] if self.cuda else [self.ep]
        if verbose_log is None:
            return ort.InferenceSession(str(self.folder / "model.onnx"), options, providers=providers)
        saved, sink = os.dup(2), os.open(verbose_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(sink, 2)  # ORT's default logger writes to stderr; keep the load's node placement
        try:
            return ort.InferenceSession(str(self.folder / "model.onnx"), options, providers=providers)
        finally:
            os.dup2(saved, 2)
            os.close(sink)
            os.close(saved)

    def captured_session(self, mode: str):
        if mode not in self.captured:
            config = {"ep.cuda.fpa_intb_gemm": "1"} if mode == "captured_fpa" else None
            self.captured[mode] = self._session({"enable_cuda_graph": "1"}, config=config)
        return self.captured[mode]

    # -- binding -------------------------------------------------------------------------------------------------
    def _bind(self, io, name: str, tensor, output: bool = False, shape=None) -> None:
        shape = list(tensor.shape if shape is None else shape)
        element = ELEMENT[str(tensor.dtype).removeprefix("torch.")]
        device = "cuda" if self.cuda else "cpu"
        bind = io.bind_output if output else io.bind_input
        bind(name, device, 0, element, shape, tensor.data_ptr())

    def _bind_kv(self, io) -> None:
        for name, buffer in self.kv.items():
            self._bind(io, name, buffer)
            self._bind(io, _present(name), buffer, output=True)

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    # -- one pass --------------------------------------------------------------------------------------------------
    def prefill(self, prompt: np.ndarray):
        """Run the prompt into the KV buffers; returns (seconds, first greedy token as a device tensor)."""
        torch = self.torch
        ids = torch.from_numpy(prompt[None]).to(self.device)
        mask = torch.ones((1, len(prompt)), dtype=torch.int64, device=self.device)
        shape = (1, self.prompt_positions or len(prompt), self.vocab)
        logits = torch.empty(shape, dtype=getattr(torch, self.logits_dtype), device=self.device)
        io = self.plain.io_binding()
        self._bind(io, "input_ids", ids)
        self._bind(io, "attention_mask", mask)
        self._bind_kv(io)
        self._bind(io, "logits", logits, output=True)
        self._sync()
        start = time.perf_counter()
        self.plain.run_with_iobinding(io, self.run_options)
        self._sync()
        seconds = time.perf_counter() - start
        return seconds, logits[0, -1].argmax()

    def decode(self, mode: str, prompt: np.ndarray, steps: int, step_hook=None):
        """(prefill s, decode s, greedy tokens) of one pass in `mode` (growing | static | captured | captured_fpa)."""
        torch = self.torch
        prefill_s, token = self.prefill(prompt)
        n = len(prompt)
        session = self.captured_session(mode) if mode.startswith("captured") else self.plain
        ids, mask, logits = self.step_ids, self.step_mask, self.step_logits
        mask.zero_()
        mask[0, :n] = 1
        tokens = torch.zeros(steps + 1, dtype=torch.int64, device=self.device)
        tokens[0] = token
        if mode not in self.bindings:
            io = self.bindings[mode] = session.io_binding()
            self._bind(io, "input_ids", ids)
            self._bind_kv(io)
            self._bind(io, "logits", logits, output=True)
            self._bind(io, "attention_mask", mask)
        io = self.bindings[mode]
        self._sync()
        start = time.perf_counter()
        for k in range(steps):
            ids[0, 0] = tokens[k]
            mask[0, n + k] = 1
            if mode == "growing":
                self._bind(io, "attention_mask", mask, shape=(1, n + k + 1))
            self._sync()
            if step_hook is None:
                session.run_with_iobinding(io, self.run_options)
            else:
                step_hook(session, io)
            self._sync()
            tokens[k + 1] = logits[0, 0].argmax()
        self._sync()
        seconds = time.perf_counter() - start
        return prefill_s, seconds, tokens.tolist()  # t0 (from the prompt) .. t_steps


def node_placement(log: Path) -> dict:
    """Nodes per execution provider, the ops ORT put on the CPU, and Memcpy nodes, from ORT's verbose session-load
    log ("Node placements", then per provider "Node(s) placed on [EP]. Number of nodes: N" and one line per node)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    counts, ops, current = {}, {}, None
    for line in text.splitlines():
        if "VerifyEachNodeIsAssignedToAnEp]" not in line:
            current = None
            continue
        head = re.search(r"placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if head:
            current = head.group(1)
            counts[current] = int(head.group(2))
            continue
        node = re.search(r"VerifyEachNodeIsAssignedToAnEp\]\s+(\w+) \(", line)
        if node and current:
            ops.setdefault(current, []).append(node.group(1))
    cpu = ops.get("CPUExecutionProvider", [])
    memcpy = sum(op.startswith("Memcpy") for listed in ops.values() for op in listed)
    return {"nodes_per_ep": counts, "memcpy_nodes": memcpy,
            "cpu_ops": {op: cpu.count(op) for op in sorted(set(cpu))}}


def _has_matmul_nbits(folder: Path) -> bool:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return any(n.op_type == "MatMulNBits" for n in graph.node)


def _open(folder: Path, provider: str, prompt_len: int, steps: int, log_dir: Path):
    """(harness, random prompt, result skeleton) of one export."""
    max_length = max(prompt_len + steps + 8, MIN_MAX_LENGTH)
    log = log_dir / f"{folder.name}.ort-load.log"
    h = Harness(folder, provider, max_length, log if provider == "cuda" else None)
    if h.vocab is None:
        raise ValueError(f"{folder}: logits have a symbolic vocabulary size")
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, min(h.vocab, 30000), size=prompt_len).astype(np.int64)
    result = {"session_load_s": round(h.load_s, 2), "max_length": max_length, "modes": {}}
    if provider == "cuda":
        result["placement"] = node_placement(log)
    return h, prompt, result


def _pass_order(names: list, r: int) -> list:
    """Pass r's order of the folders: A B, then B A, ... (a fixed A B order measured the second folder 2-5% faster
    on the CPU machine whichever it was: the order alone would swamp a difference of a few nodes)."""
    return names if r % 2 == 0 else names[::-1]


def bench_ort(folders: list[Path], provider: str, prompt_len: int, steps: int, repeat: int, modes: list[str],
              profile_steps: int, log_dir: Path) -> dict[str, dict]:
    """{folder name: ORT result}. With several folders every harness is open at once and the passes of a mode
    alternate between them (A B B A A B ...), so a drift of the machine (clocks, other load) hits each alike: the way
    to compare two exports that differ by a few nodes."""
    results, open_ = {}, {}
    for folder in folders:
        try:
            open_[folder.name] = _open(folder, provider, prompt_len, steps, log_dir)
            results[folder.name] = open_[folder.name][2]
        except Exception as exc:
            results[folder.name] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            traceback.print_exc()
    reference_tokens: dict = {}
    nbits = {name: _has_matmul_nbits(h.folder) for name, (h, _, _) in open_.items()}
    for mode in modes:
        if mode.startswith("captured") and provider != "cuda":
            continue
        runs = {}
        for name, (h, prompt, result) in open_.items():
            if mode == "captured_fpa" and not nbits[name]:
                continue
            try:
                h.decode(mode, prompt, min(steps, 16))  # warm-up (and, captured: the capture itself)
                runs[name] = []
            except Exception as exc:  # e.g. a session that cannot be captured: report and go on
                result["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
                traceback.print_exc()
        for r in range(repeat):
            for name in _pass_order(list(runs), r):
                if name not in runs:
                    continue
                h, prompt, result = open_[name]
                try:
                    runs[name].append(h.decode(mode, prompt, steps))
                except Exception as exc:
                    result["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
                    traceback.print_exc()
                    del runs[name]
        for name, passes in runs.items():
            h, _, result = open_[name]
            tokens = passes[-1][2]
            reference_tokens.setdefault(name, tokens)
            result["modes"][mode] = done = {
                "prefill_ms": round(statistics.median(p[0] for p in passes) * 1e3, 3),
                "decode_tok_s": round(statistics.median(steps / p[1] for p in passes), 1),
                "decode_tok_s_passes": [round(steps / p[1], 1) for p in passes],
                "tokens_agree_with_growing":
                    f"{sum(a == b for a, b in zip(tokens, reference_tokens[name]))}/{len(tokens)}",
                "passes_identical": all(p[2] == tokens for p in passes)}
            print(f"  {name} {mode}: prefill {done['prefill_ms']:.2f} ms, decode {done['decode_tok_s']:.1f} tok/s, "
                  f"tokens {done['tokens_agree_with_growing']}", flush=True)
    for name, (h, prompt, result) in open_.items():
        result["tokens"] = reference_tokens.get(name)
        if provider == "cuda" and profile_steps:
            try:
                result["per_step"] = kernels_per_step(h, prompt, profile_steps)
            except Exception as exc:
                result["per_step"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    open_.clear()
    return results


def bench_genai(folders: list[Path], prompt_len: int, steps: int, repeat: int) -> dict[str, dict]:
    """{folder name: genai result}; several folders: loaded together, passes alternating (as bench_ort; the warm-up
    pass runs B A, so the first timed pass is A B)."""
    import onnxruntime_genai as og
    import torch

    # genai runs its CUDA work asynchronously: a prompt pass is timed up to a device-wide synchronize
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    results, loaded = {}, {}
    for folder in folders:
        try:
            config = json.loads((folder / "genai_config.json").read_text())
            options = config["model"]["decoder"]["session_options"].get("provider_options", [])
            start = time.perf_counter()
            model = og.Model(str(folder))
            load_s = time.perf_counter() - start
            vocab = config["model"]["vocab_size"]
            prompt = np.random.default_rng(0).integers(10, min(vocab, 30000), size=prompt_len).astype(np.int32)
            loaded[folder.name] = (model, prompt, [])
            results[folder.name] = {"provider_options": options, "load_s": round(load_s, 2)}
        except Exception as exc:
            results[folder.name] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            traceback.print_exc()
    for i in range(repeat + 1):  # the first pass warms up
        for name in _pass_order(list(loaded), i - 1):
            model, prompt, passes = loaded[name]
            try:
                timed = _genai_pass(og, model, prompt, steps, sync)
            except Exception as exc:
                results[name] = {**results[name], "error": f"{type(exc).__name__}: {exc}"[:600]}
                traceback.print_exc()
                del loaded[name]
                continue
            if i:
                passes.append(timed)
    for name, (_, _, passes) in loaded.items():
        results[name].update({
            "prefill_ms": round(statistics.median(p[0] for p in passes) * 1e3, 3),
            "decode_tok_s": round(statistics.median(p[1] for p in passes), 1),
            "decode_tok_s_passes": [round(p[1], 1) for p in passes], "tokens": passes[-1][2],
            "timing": "decode: generate_next_token calls 2..N; prefill: append_tokens up to a device synchronize"})
    loaded.clear()
    return results


def _genai_pass(og, model, prompt: np.ndarray, steps: int, sync) -> tuple[float, float, list[int]]:
    """(prefill s, decode tok/s, tokens) of one greedy pass. (The prefill was once append_tokens + the first
    generate_next_token - one median step, unsynchronized: it read 0.3-1.6 ms for a 1024-token prompt that ORT runs
    in 5.4 ms.)"""
    params = og.GeneratorParams(model)
    length = max(len(prompt) + steps + 1, MIN_MAX_LENGTH)
    params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=1)
    generator = og.Generator(model, params)
    sync()
    start = time.perf_counter()
    generator.append_tokens(prompt[None])
    sync()
    append_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - t)
    sequence = [int(t) for t in generator.get_sequence(0)][len(prompt):]
    del generator
    return append_s, (steps - 1) / sum(times[1:]), sequence


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, required=True, help="results, one entry per folder (merged if present)")
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="growing,static,captured,captured_fpa")
    parser.add_argument("--profile-steps", type=int, default=8, help="0: no kernel count")
    parser.add_argument("--no-genai", action="store_true")
    parser.add_argument("--interleave", action="store_true",
                        help="open every folder at once and alternate their passes (A B B A ...) in each mode: for "
                             "comparing exports that differ by a few nodes (e.g. scripts/strip_padding.py's twin)")
    args = parser.parse_args(argv)
    try:  # torch first: it loads the CUDA 13 libraries that onnxruntime-gpu's CUDA provider links against
        import torch  # noqa: F401
    except ImportError:
        sys.exit("torch is needed (device buffers, greedy tokens on the device, kernel profile)")
    import onnxruntime as ort

    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    log_dir = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    groups = [args.folders] if args.interleave else [[folder] for folder in args.folders]
    for group in groups:
        entries = {}
        for folder in group:
            entries[folder.name] = {
                "folder": str(folder), "provider": args.provider, "prompt": args.prompt, "steps": args.steps,
                "repeat": args.repeat, "interleaved_with": [f.name for f in group if f != folder],
                "size_mb": round(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20, 1)}
        try:
            ort_results = bench_ort(group, args.provider, args.prompt, args.steps, args.repeat,
                                    args.modes.split(","), args.profile_steps, log_dir)
        except Exception as exc:
            ort_results = {f.name: {"error": f"{type(exc).__name__}: {exc}"[:600]} for f in group}
            traceback.print_exc()
        for name, result in ort_results.items():
            entries[name]["ort"] = result
        if not args.no_genai:
            try:
                genai_results = bench_genai(group, args.prompt, args.steps, args.repeat)
            except Exception as exc:
                genai_results = {f.name: {"error": f"{type(exc).__name__}: {exc}"[:600]} for f in group}
                traceback.print_exc()
            for name, genai in genai_results.items():
                entries[name]["genai"] = genai
                ref = entries[name].get("ort", {}).get("tokens")
                if ref and "tokens" in genai:
                    genai["tokens_agree_with_growing"] = (
                        f"{sum(a == b for a, b in zip(genai['tokens'], ref))}/{min(len(genai['tokens']), len(ref))}")
                if "decode_tok_s" in genai:
                    print(f"  {name} genai: prefill {genai['prefill_ms']:.2f} ms, decode {genai['decode_tok_s']:.1f} "
                          f"tok/s ({genai['provider_options']})", flush=True)
        results.update(entries)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parity harness shared by the end-to-end tests: run an exported model with onnxruntime (prompt + KV-cache decode
steps) and onnxruntime-genai (greedy generation), and the same through transformers.

Kept free of assertions: tests decide tolerances. Nothing here depends on the code under test except `export` and
builder/state.py's naming of state inputs (past -> present), which every state kind shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT_IDS = [5, 17, 99, 3, 250, 7, 8, 300, 11, 12, 13, 14]  # 12 tokens, longer than the tiny sliding windows (8)


def export(checkpoint: Path, out: Path, precision: str = "fp32", ep: str = "cpu", extra: list[str] | None = None,
           **kwargs) -> Path:
    from builder.export import export as run_export

    return run_export(str(checkpoint), out, precision, ep, extra or [], **kwargs)


@dataclass
class OnnxRun:
    prompt_logits: np.ndarray  # [S, V] logits for the prompt
    step_logits: list[np.ndarray]  # [V] logits for each decode step
    step_tokens: list[int]  # tokens fed at each decode step


def state_inputs(session):
    """The session's state inputs (KV caches, conv/recurrent state), as builder/state.py declares them."""
    from builder.state import parse_past

    return [i for i in session.get_inputs() if parse_past(i.name)]


def empty_state(inputs, batch: int = 1) -> dict[str, np.ndarray]:
    """Before the first token: KV caches of length 0, conv/recurrent state zeros."""
    from builder.state import empty_past_shape

    return {i.name: np.zeros(empty_past_shape(i.name, i.shape, batch), _np_dtype(i.type)) for i in inputs}


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[ort_type]


def run_onnx(model_dir: Path, ids: list[int] | None = None, decode_steps: int = 4, providers=None,
             feed_tokens: list[int] | None = None) -> OnnxRun:
    """Prompt pass with an empty cache, then `decode_steps` single-token passes feeding present -> past.

    Decode steps feed `feed_tokens` when given (so ONNX and transformers see the same tokens), else greedy tokens.
    """
    import onnxruntime as ort

    ids = list(PROMPT_IDS if ids is None else ids)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), options,
                                   providers=providers or ["CPUExecutionProvider"])
    from builder.state import present_for

    pasts = state_inputs(session)
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
            **empty_state(pasts)}
    out_names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(out_names, session.run(None, feed)))
    prompt = outputs["logits"][0].astype(np.float32)
    steps, tokens = [], []
    total = len(ids)
    last = prompt[-1]
    for step in range(decode_steps):
        token = int(feed_tokens[step]) if feed_tokens is not None else int(np.argmax(last))
        tokens.append(token)
        total += 1
        feed = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        for p in pasts:
            feed[p.name] = outputs[present_for(p.name)]
        outputs = dict(zip(out_names, session.run(None, feed)))
        last = outputs["logits"][0, -1].astype(np.float32)
        steps.append(last)
    return OnnxRun(prompt, steps, tokens)


def load_hf(checkpoint: Path, dtype: str = "float32"):
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype))
    except ValueError:  # multimodal wrappers (Mistral 3, Qwen-VL): the class the config names
        architecture = json.loads((Path(checkpoint) / "config.json").read_text())["architectures"][0]
        model = getattr(transformers, architecture).from_pretrained(str(checkpoint), dtype=getattr(torch, dtype))
    return model.eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """[S, V] float32 logits for a full sequence (no cache: the reference for prompt and decode positions)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], new_tokens: int = 16) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), top_k=None, top_p=None,
                             temperature=None)
    return out[0, len(ids):].tolist()


def genai_greedy(model_dir: Path, ids: list[int], new_tokens: int = 16) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens, num_beams=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    produced = []
    while not generator.is_done() and len(produced) < new_tokens:
        generator.generate_next_token()
        produced.append(int(generator.get_next_tokens()[0]))
    return produced


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def compare_with_hf(model_dir: Path, checkpoint: Path, decode_steps: int = 4, ids: list[int] | None = None):
    """(prompt max-abs error, decode-step max-abs error, onnx run, hf full logits) against transformers fp32."""
    ids = list(PROMPT_IDS if ids is None else ids)
    model = load_hf(checkpoint)
    # decode the greedy continuation of transformers so both sides see the same tokens
    continuation = hf_greedy(model, ids, decode_steps) if decode_steps else []
    run = run_onnx(model_dir, ids, decode_steps, feed_tokens=continuation)
    full = hf_logits(model, ids + continuation)
    prompt_err = max_abs(run.prompt_logits, full[: len(ids)])
    step_err = max((max_abs(s, full[len(ids) + k]) for k, s in enumerate(run.step_logits)), default=0.0)
    return prompt_err, step_err, run, full


def ops_in(model_dir: Path) -> dict[str, int]:
    """op_type -> count in the exported graph (reads the graph only, not the weights)."""
    import onnx

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def genai_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "genai_config.json").read_text())


def load_graph(model_dir: Path, weights: bool = False):
    """The exported onnx.ModelProto (graph only unless `weights`)."""
    import onnx

    return onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=weights)


def nodes_of(model, op_type: str) -> list:
    return [n for n in model.graph.node if n.op_type == op_type]


def attrs(node) -> dict:
    """A node's attributes as Python values (strings decoded)."""
    import onnx

    out = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}


def case_checkpoints(tiny_checkpoint, cases: dict):
    """case -> checkpoint folder, for a module's CASES table {case: (recipe, config overrides)} (session-cached)."""

    def get(case: str) -> Path:
        arch, overrides = cases[case]
        return tiny_checkpoint(arch, **overrides)

    return get


def hf_prompt_cache(checkpoint):
    """case -> transformers fp32 logits of PROMPT_IDS for checkpoint(case), each computed once."""
    done: dict = {}

    def get(case):
        if case not in done:
            done[case] = hf_logits(load_hf(checkpoint(case)), PROMPT_IDS)
        return done[case]

    return get


def export_cache(checkpoint, tmp_path_factory, prefix: str):
    """(case, precision="fp32", ep="cpu", *extra) -> exported folder, each exported once (for module fixtures)."""
    built: dict[tuple, Path] = {}

    def get(case: str, precision: str = "fp32", ep: str = "cpu", *extra: str) -> Path:
        key = (case, precision, ep, extra)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{prefix}-{case}-{precision}-{ep}") / "model"
            built[key] = export(checkpoint(case), out, precision, ep, list(extra))
        return built[key]

    return get

"""Batched-generation harness: several prompts of different lengths in one batch vs each prompt run alone.

Shared by the batching tests of every family (and by any family added later, e.g. hybrids with recurrent state:
`run_onnx_batch` feeds every past_* input from its present_* output whatever the state kind).

- `run_onnx_batch`: plain onnxruntime, prompts padded on the left or right with an attention mask, prefill then
  decode steps that append a 1 to the mask (what onnxruntime-genai and HF-style serving loops do); the cache either
  grows (present -> past) or is one preallocated buffer of `max_length` (what onnxruntime-genai does).
- `genai_batch_greedy`: onnxruntime-genai, a batch of uneven prompts padded the way its own `Tokenizer.encode_batch`
  pads them (on the right, with the pad token), greedy.
Kept free of assertions: tests decide tolerances. Nothing here depends on the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Three prompts of different lengths; the middle one (11 tokens) is longer than the tiny sliding windows (8) and is
# padded in a batch with the first. No id is the factory pad (3), bos (1) or eos (2) token.
PROMPTS = [
    [5, 17, 99, 30, 250, 7, 8, 300, 11, 12, 13, 14, 40, 41, 42, 43, 44],
    [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70],
    [100, 101, 102, 103, 104],
]


def pad(prompts: list[list[int]], side: str, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [B, max_len], padded on `side` ("left" or "right")."""
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for b, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, cols], mask[b, cols] = p, 1
    return ids, mask


def real_columns(prompts: list[list[int]], side: str) -> list[np.ndarray]:
    """Per row, the prompt columns holding real tokens (in order) for that padding side."""
    width = max(map(len, prompts))
    return [np.arange(width - len(p), width) if side == "left" else np.arange(len(p)) for p in prompts]


@dataclass
class BatchRun:
    prompt_logits: list[np.ndarray]  # per row: [len(prompt), V] logits at that row's real prompt positions
    step_logits: list[list[np.ndarray]]  # per row: [V] logits of each decode step


def _session(model_dir: Path, providers=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(Path(model_dir) / "model.onnx"), options,
                                providers=providers or ["CPUExecutionProvider"])


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[ort_type]


def _state_inputs(session) -> list:
    return [i for i in session.get_inputs() if i.name.startswith("past_")]


def _present_name(past_name: str) -> str:
    return past_name.replace("past_key_values.", "present.").replace("past_", "present_", 1)


def _first_feed(session, ids: np.ndarray, mask: np.ndarray, max_length: int | None) -> dict:
    feed = {"input_ids": ids, "attention_mask": mask}
    for s in _state_inputs(session):
        shape = [ids.shape[0] if d == "batch_size" else d for d in s.shape]
        if s.name.startswith("past_key_values."):
            shape[2] = max_length or 0
        feed[s.name] = np.zeros(shape, _np_dtype(s.type))
    return feed


def _decode(session, out: dict, mask: np.ndarray, tokens: list[int]) -> tuple[dict, np.ndarray]:
    """One decode step: mask grows by a 1 per row, every state input is fed from its present output."""
    mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    feed = {"input_ids": np.array(tokens, np.int64)[:, None], "attention_mask": mask}
    for s in _state_inputs(session):
        feed[s.name] = out[_present_name(s.name)]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed))), mask


def run_onnx_batch(model_dir: Path, prompts: list[list[int]], side: str, feed_tokens: list[list[int]],
                   pad_id: int = 3, max_length: int | None = None, providers=None) -> BatchRun:
    """Prefill the padded batch, then len(feed_tokens[0]) decode steps feeding row b the tokens feed_tokens[b].

    max_length=None grows the cache (present -> past, past starts empty); an int preallocates one zeroed buffer of
    that length per cache and feeds each present back as the next past (onnxruntime-genai's shared buffer).
    """
    session = _session(model_dir, providers)
    ids, mask = pad(prompts, side, pad_id)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, _first_feed(session, ids, mask, max_length))))
    columns = real_columns(prompts, side)
    prompt_logits = [out["logits"][b, columns[b]].astype(np.float32) for b in range(len(prompts))]
    steps: list[list[np.ndarray]] = [[] for _ in prompts]
    for k in range(len(feed_tokens[0])):
        out, mask = _decode(session, out, mask, [row[k] for row in feed_tokens])
        for b, row in enumerate(steps):
            row.append(out["logits"][b, -1].astype(np.float32))
    return BatchRun(prompt_logits, steps)


def run_onnx_solo(model_dir: Path, prompt: list[int], feed_tokens: list[int], providers=None) -> BatchRun:
    """The same prompt and decode tokens as a batch of one (no padding, growing cache)."""
    return run_onnx_batch(model_dir, [prompt], "right", [feed_tokens], providers=providers)


def greedy_tokens(model_dir: Path, prompt: list[int], steps: int, providers=None) -> list[int]:
    """Greedy continuation of one prompt run alone through onnxruntime (the tokens the batch runs are fed)."""
    session = _session(model_dir, providers)
    ids, mask = pad([prompt], "right", 0)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, _first_feed(session, ids, mask, None))))
    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(np.argmax(out["logits"][0, -1])))
        out, mask = _decode(session, out, mask, tokens[-1:])
    return tokens


def batch_vs_solo(batch: BatchRun, solos: list[BatchRun]) -> tuple[float, float]:
    """(prompt max-abs, decode max-abs) between each batch row and the same prompt run alone."""
    prompt = max(float(np.max(np.abs(b - s.prompt_logits[0]))) for b, s in zip(batch.prompt_logits, solos))
    decode = max((float(np.max(np.abs(x - y))) for rows, s in zip(batch.step_logits, solos)
                  for x, y in zip(rows, s.step_logits[0])), default=0.0)
    return prompt, decode


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def genai_batch_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int = 16) -> list[list[int]]:
    """Greedy generation of a batch of uneven prompts through onnxruntime-genai, one token list per prompt.

    The batch is padded exactly as `og.Tokenizer.encode_batch` pads (right, with the model's pad token; genai
    masks the trailing pad tokens). A row that produced eos is cut after it (genai pads finished rows).
    """
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    pad_id = og.Tokenizer(model).pad_token_id
    ids, _ = pad(prompts, "right", pad_id)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, num_beams=1, batch_size=len(prompts),
                              max_length=ids.shape[1] + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids.astype(np.int32))
    produced: list[list[int]] = [[] for _ in prompts]
    while not generator.is_done() and len(produced[0]) < new_tokens:
        generator.generate_next_token()
        for b, t in enumerate(generator.get_next_tokens()):
            produced[b].append(int(t))
    eos = set(np.atleast_1d(og.Tokenizer(model).eos_token_ids).tolist())
    return [_until_eos(p, eos) for p in produced]


def genai_solo_greedy(model_dir: Path, prompt: list[int], new_tokens: int = 16) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, num_beams=1, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], np.int32))
    produced: list[int] = []
    while not generator.is_done() and len(produced) < new_tokens:
        generator.generate_next_token()
        produced.append(int(generator.get_next_tokens()[0]))
    eos = set(np.atleast_1d(og.Tokenizer(model).eos_token_ids).tolist())
    return _until_eos(produced, eos)

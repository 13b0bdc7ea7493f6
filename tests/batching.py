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
# padded in a batch with the first. No id is the factory pad (3), bos (1) or eos (2) token, and no factory family
# greedily produces eos within 16 tokens of any of them (so every row generates 16 tokens).
PROMPTS = [
    [5, 17, 99, 30, 250, 7, 8, 300, 11, 12, 13, 14, 40, 41, 42, 43, 44],
    [120, 33, 250, 71, 9, 88, 145, 200, 6, 77, 301],
    [100, 101, 102, 103, 104],
]


FULL, SLIDING = "full_attention", "sliding_attention"
# Gemma 4 with per-layer inputs and KV sharing (layers 3 and 4 reuse layers 2 and 1), as in test_gemma.py
GEMMA4_ALL = dict(num_hidden_layers=5, layer_types=[SLIDING, FULL, SLIDING, SLIDING, FULL], num_kv_shared_layers=2,
                  hidden_size_per_layer_input=8, use_double_wide_mlp=True, attention_k_eq_v=True,
                  num_global_key_value_heads=1, final_logit_softcapping=30.0)
# One tiny model per family and feature that touches the layout (tests/factory.py recipes + overrides).
FAMILIES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),  # sliding window
    "qwen3": ("qwen3", {}),  # q/k norm
    "qwen2_moe": ("qwen2_moe", {}),  # shared expert, dense layer 0
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", {}),
    "gpt_oss": ("gpt_oss", {}),  # attention sinks, alternating sliding window, clamped experts
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),  # softcaps, alternating sliding window
    "gemma3": ("gemma3", {}),  # local/global rope
    "gemma4_all": ("gemma4", GEMMA4_ALL),  # per-layer inputs, KV sharing
    "gemma4_moe": ("gemma4_moe", {}),
    "granite": ("granite", {}),  # multipliers
    "olmo2": ("olmo2", {}),  # post-norm placement, whole-projection q/k norm
    "olmo3": ("olmo3", {}),  # sliding window
    "nemotron": ("nemotron", {}),  # LayerNorm with bias, relu2 MLP, partial rotary
    "ernie4_5": ("ernie4_5", {}),
    "phi3": ("phi3", {"seed": 1}),  # fused qkv/gate_up, longrope (If on the run length); seed 0 hits eos early
    "phi4_mini": ("phi4_mini", {}),  # partial rotary, tied
    "smollm3": ("smollm3", {}),  # NoPE layers
    "hunyuan": ("hunyuan", {}),  # q/k norm after rotary: rotary outside the attention op
    "mistral3": ("mistral3", {}),  # multimodal wrapper, sliding window
    "qwen3_vl": ("qwen3_vl", {}),  # mRoPE text positions
    # hybrids: linear-attention layers with conv + recurrent state next to gated full attention
    "qwen3_5": ("qwen3_5", {}),
    "qwen3_5_moe": ("qwen3_5_moe_vlm", {}),  # fused experts, shared expert
    "qwen3_next": ("qwen3_next", {}),
    # routed MoE (builder/layers/routing.py): groups + correction bias, softmax + selection bias, sparsemixer, and
    # Llama 4's chunked attention (attention_bias), NoPE temperature tuning and top-1 weight on the expert input
    "glm4_moe": ("glm4_moe", {}),
    "ernie4_5_moe": ("ernie4_5_moe", {}),
    "phimoe": ("phimoe", {}),
    "llama4_text": ("llama4_text", {}),
    # latent attention (one kv head of [rope key | latent] rows)
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v3_moe": ("deepseek_v3_moe", {"seed": 1}),  # sigmoid + correction bias + groups; seed 0 hits eos early
    "deepseek_v2": ("deepseek_v2", {}),  # plain q projection, greedy softmax experts
    # latent attention cached decompressed (num_heads kv heads of [rope | nope] keys, padded values): EXPORT_OPTIONS
    "deepseek_v3_decompressed": ("deepseek_v3", {}),
    "deepseek_v2_decompressed": ("deepseek_v2", {}),
}
# Extra options a FAMILIES case is exported with (the others: none).
EXPORT_OPTIONS = {
    "deepseek_v3_decompressed": ["latent_attention_form=decompressed"],
    "deepseek_v2_decompressed": ["latent_attention_form=decompressed"],
}


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


def state_inputs(session) -> list:
    return [i for i in session.get_inputs() if i.name.startswith(("past_", "past."))]


def present_name(past_name: str) -> str:
    """past_key_values.{i}.key -> present.{i}.key, past.{i}.conv -> present.{i}.conv, past_X -> present_X."""
    if past_name.startswith("past_key_values."):
        return "present." + past_name.removeprefix("past_key_values.")
    if past_name.startswith("past."):
        return "present." + past_name.removeprefix("past.")
    return past_name.replace("past_", "present_", 1)


def _first_feed(session, ids: np.ndarray, mask: np.ndarray, max_length: int | None) -> dict:
    feed = {"input_ids": ids, "attention_mask": mask}
    for s in state_inputs(session):
        shape = [ids.shape[0] if d == "batch_size" else d for d in s.shape]
        if s.name.startswith("past_key_values."):
            shape[2] = max_length or 0
        feed[s.name] = np.zeros(shape, _np_dtype(s.type))
    return feed


def _decode(session, out: dict, mask: np.ndarray, tokens: list[int], static_width: int | None = None
            ) -> tuple[dict, np.ndarray]:
    """One decode step: mask grows by a 1 per row, every state input is fed from its present output.

    static_width: feed instead the static mask of CUDA-graph decoding, [B, static_width] with as many leading ones
    as the row has tokens so far (the returned mask stays the growing one).
    """
    mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    fed = mask
    if static_width is not None:
        fed = (np.arange(static_width)[None, :] < mask.sum(1, keepdims=True)).astype(np.int64)
    feed = {"input_ids": np.array(tokens, np.int64)[:, None], "attention_mask": fed}
    for s in state_inputs(session):
        feed[s.name] = out[present_name(s.name)]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed))), mask


def run_onnx_masked(model_dir: Path, ids: np.ndarray, mask: np.ndarray, feed_tokens: list[list[int]],
                    max_length: int | None = None, providers=None, static_mask: bool = False,
                    static_prompt: bool = False) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """(prefill logits [B, S, V], per row the logits of each decode step) for any ids/mask layout.

    Decode step k feeds row b the token feed_tokens[b][k]. max_length=None grows the cache (present -> past, past
    starts empty); an int preallocates one zeroed buffer of that length per cache and feeds each present back as the
    next past (onnxruntime-genai's shared buffer). static_mask (needs max_length): decode steps get the static
    [B, max_length] mask of CUDA-graph decoding (ones for the row's tokens so far, then zeros). static_prompt (needs
    max_length): the prompt gets it too, as onnxruntime-genai feeds it under capture (the prompt's mask in the first
    columns of a zeroed [B, max_length] buffer: DefaultPositionInputs::InitializeStaticMask).
    """
    session = _session(model_dir, providers)
    names = [o.name for o in session.get_outputs()]
    first = _first_feed(session, ids, mask, max_length)
    if static_prompt:
        first["attention_mask"] = np.pad(mask, ((0, 0), (0, max_length - mask.shape[1])))
    out = dict(zip(names, session.run(None, first)))
    prompt = out["logits"].astype(np.float32)
    steps: list[list[np.ndarray]] = [[] for _ in range(ids.shape[0])]
    for k in range(len(feed_tokens[0])):
        out, mask = _decode(session, out, mask, [row[k] for row in feed_tokens],
                            max_length if static_mask else None)
        for b, row in enumerate(steps):
            row.append(out["logits"][b, -1].astype(np.float32))
    return prompt, steps


def run_onnx_batch(model_dir: Path, prompts: list[list[int]], side: str, feed_tokens: list[list[int]],
                   pad_id: int = 3, max_length: int | None = None, providers=None, static_mask: bool = False,
                   static_prompt: bool = False) -> BatchRun:
    """The prompts padded on `side`, prefilled as one batch, then decode steps (see run_onnx_masked)."""
    ids, mask = pad(prompts, side, pad_id)
    prompt, steps = run_onnx_masked(model_dir, ids, mask, feed_tokens, max_length, providers, static_mask,
                                    static_prompt)
    columns = real_columns(prompts, side)
    return BatchRun([prompt[b, columns[b]] for b in range(len(prompts))], steps)


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


def without_reorder(model_dir: Path, dst: Path) -> Path:
    """A copy of an export whose "real tokens first" reorder is bypassed (control: GroupQueryAttention alone)."""
    import shutil

    import onnx

    shutil.copytree(model_dir, dst)
    proto = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    (scatter,) = [n for n in proto.graph.node if n.op_type == "ScatterElements"]
    (gather,) = [n for n in proto.graph.node if n.op_type == "GatherND"]
    assert scatter.input[0] == "input_ids", scatter.input
    bypass = {scatter.output[0]: "input_ids", gather.output[0]: gather.input[0]}
    for node in proto.graph.node:
        node.input[:] = [bypass.get(i, i) for i in node.input]
    onnx.save(proto, str(dst / "model.onnx"))
    return dst


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

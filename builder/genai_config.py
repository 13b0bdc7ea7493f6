"""genai_config.json: what onnxruntime-genai needs to run the exported decoder (I/O names, sizes, search defaults)."""

from __future__ import annotations

from builder.settings import ExportSettings
from builder.spec import ModelSpec
from builder.state import genai_names

# HF model_type -> the type onnxruntime-genai 0.18 knows; anything else runs as its generic "decoder".
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt_oss": "gptoss",
               "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3_text", "gemma3": "gemma3_text",
               "gemma4_text": "gemma4_text", "gemma4": "gemma4_text", "granite": "granite", "nemotron": "nemotron",
               "ernie4_5": "ernie4_5", "phi3": "phi3", "smollm3": "smollm3", "hunyuan_v1_dense": "hunyuandensev1",
               "qwen2_5_vl_text": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl_text": "qwen3", "qwen3_vl": "qwen3",
               "qwen3_5_text": "qwen3_5_text", "qwen3_5": "qwen3_5_text", "qwen3_5_moe_text": "qwen3_5_moe_text",
               "qwen3_5_moe": "qwen3_5_moe_text"}

SEARCH_KEYS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
               "num_beams": 1, "num_return_sequences": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
               "diversity_penalty": 0.0}


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def token_ids(config: dict, generation: dict | None) -> tuple[int | None, int | list | None, int | None]:
    generation = generation or {}
    bos = generation.get("bos_token_id", config.get("bos_token_id"))
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    if pad is None:
        pad = _first(eos)
    return bos, eos, pad


def genai_config(spec: ModelSpec, settings: ExportSettings, config: dict, generation: dict | None,
                 filename: str) -> dict:
    bos, eos, pad = token_ids(config, generation)
    # head/heads describe the first full-attention layer; a model with none describes its first token mixer
    attn = spec.attention or spec.layers[0].attention
    head_size, heads, kv_heads = ((attn.head_dim, attn.num_heads, attn.num_kv_heads) if spec.attention else
                                  (attn.value_head_dim, attn.num_value_heads, attn.num_key_heads))
    states = spec.state
    past_names, present_names = genai_names(states)
    provider_options = []
    if settings.ep == "cuda":  # onnxruntime-genai 0.18 reads enable_cuda_graph here (builder/capture.py)
        capture = settings.graph_capture is not None and settings.graph_capture.enabled
        provider_options = [{"cuda": {"enable_cuda_graph": "1" if capture else "0"}}]
    search = {key: (generation or {}).get(key, default) for key, default in SEARCH_KEYS.items()}
    search.update({"max_length": spec.context_length, "min_length": 0, "early_stopping": True,
                   "past_present_share_buffer": True})
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
        "filename": filename,
        "head_size": head_size,
        "hidden_size": spec.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", **past_names},
        "outputs": {"logits": "logits", **present_names},
        "num_attention_heads": heads,
        # layers that own state: KV-sharing layers (Gemma 4) have none, hybrid layers hold KV or conv/recurrent
        "num_hidden_layers": len({t.layer for t in states}),
        "num_key_value_heads": kv_heads,
    }
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": spec.context_length,
            "decoder": decoder,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPES.get(spec.model_type, "decoder"),
            "vocab_size": spec.vocab_size,
        },
        "search": search,
    }

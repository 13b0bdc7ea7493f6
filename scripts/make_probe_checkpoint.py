"""Write big random bf16 checkpoints in the Hugging Face layout, fast and without torch, for export benchmarks.

Why not tests/factory.py: it instantiates the transformers model, which for a 1.5 GB probe costs several GB of
memory and minutes. Here every tensor is produced in chunks of random bf16 bit patterns and written straight
into safetensors files (header written by hand), so generating a 2 GB checkpoint takes seconds and little memory.
The values are random but finite and of realistic magnitude (|w| in [2^-9, 2^-5), norms in [0.5, 2)); nobody
checks the probe's logits, only how fast and in how much memory it exports.

Shapes come from named presets (PRESETS) or `ProbeShape(...)`; `tensor_specs(shape)` lists the on-disk tensors
(the names `save_pretrained` writes), `param_count(shape)` counts them, `write_checkpoint(shape, folder)` writes
config.json, generation_config.json, a small tokenizer and `shards` safetensors files with an index json.

    python scripts/make_probe_checkpoint.py qwen3-0.6b /tmp/probe-dense
    python scripts/make_probe_checkpoint.py gpt-oss-2g /tmp/probe-moe          # bf16 experts
    python scripts/make_probe_checkpoint.py gpt-oss-2g-mxfp4 /tmp/probe-mxfp4  # MXFP4 experts (original format)
    python scripts/make_probe_checkpoint.py gpt-oss-20b-mxfp4 /tmp/probe-20b   # GPT-OSS-20B's shape, MXFP4, 24 layers
    python scripts/make_probe_checkpoint.py qwen3.5-35b-a3b /tmp/probe-hybrid --layers 2  # hybrid, real layer shapes
    python scripts/make_probe_checkpoint.py deepseek-v3-probe /tmp/probe-ds3  # FP8, real layer shapes, 3 layers
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from probe_deepseek import DEEPSEEK_V3_LATENT, LatentShape, deepseek_config, deepseek_dtype, deepseek_specs, \
    fp8_chunk, scale_chunk

CHUNK_ITEMS = 8 * 1024 * 1024  # bf16 items generated per chunk (16 MB): memory stays small


@dataclass(frozen=True)
class ProbeShape:
    arch: str  # "qwen3" (dense, Qwen3ForCausalLM) or "gpt_oss" (MoE with bf16 experts, GptOssForCausalLM)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width, or each expert's width for gpt_oss
    vocab: int
    tie: bool = False  # tie_word_embeddings in config.json
    lm_head_copy: bool = False  # store lm_head.weight, a copy of the embedding, although tied (as Qwen3-0.6B does)
    experts: int = 0
    top_k: int = 0
    shards: int = 1
    max_positions: int | None = None  # None: the family's real context length (the rotary cache scales with it)
    mxfp4: bool = False  # gpt_oss experts as MXFP4 *_blocks/*_scales (the original release; the reference builder's
    #                      only GPT-OSS input) instead of bf16 gate_up_proj/down_proj
    # qwen3_5_moe (Qwen3_5MoeForConditionalGeneration text decoder, experts fused 3-D): Gated DeltaNet layers
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_head_dim: int = 0  # key and value head size
    shared_intermediate: int = 0
    full_attention_interval: int = 4  # every n-th layer is full attention; the last one always is in a probe
    # deepseek_v3 (scripts/probe_deepseek.py): latent attention, dense MLPs of dense_intermediate in the first
    # dense_layers layers, FP8 block-scaled linear weights
    latent: LatentShape | None = None
    dense_layers: int = 0
    dense_intermediate: int = 0
    fp8: bool = False


PRESETS = {
    # Qwen/Qwen3-0.6B's shape. Its files hold 751.6M parameters (1.40 GiB bf16) because lm_head.weight is
    # stored although the config ties it to the embedding; the graph has 596M distinct ones.
    "qwen3-0.6b": ProbeShape("qwen3", hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
                             intermediate=3072, vocab=151936, tie=True, lm_head_copy=True, shards=3),
    # GPT-OSS-shaped MoE with bf16 experts, ~2 GB: the real vocabulary and head layout, narrower and shallower.
    "gpt-oss-2g": ProbeShape("gpt_oss", hidden=1024, layers=6, heads=16, kv_heads=8, head_dim=64,
                             intermediate=1024, vocab=201088, experts=32, top_k=4, shards=3),
    # The same in MXFP4 (experts ~4.25 bits/parameter): the format the reference builder reads for GPT-OSS.
    "gpt-oss-2g-mxfp4": ProbeShape("gpt_oss", hidden=1024, layers=6, heads=16, kv_heads=8, head_dim=64,
                                   intermediate=1024, vocab=201088, experts=32, top_k=4, shards=3, mxfp4=True),
    # Qwen/Qwen3.5-35B-A3B's layer shapes (transformers' Qwen3_5MoeTextConfig defaults: 2048 hidden, 256 experts of
    # 512, shared expert 512, 16 key / 32 value linear-attention heads of 128, 16 / 2 heads of 256): ~1.6 GB of bf16
    # experts per layer, so generate it with --layers 2 (one linear-attention and one full-attention layer).
    "qwen3.5-35b-a3b": ProbeShape("qwen3_5_moe", hidden=2048, layers=40, heads=16, kv_heads=2, head_dim=256,
                                  intermediate=512, vocab=248320, experts=256, top_k=8, shards=4, max_positions=4096,
                                  linear_key_heads=16, linear_value_heads=32, linear_head_dim=128,
                                  shared_intermediate=512),
    # deepseek-ai/DeepSeek-V3's real layer shapes and FP8 layout with 3 layers: one dense (18432 wide) and two MoE
    # layers (256 experts of 2048 and a 2048 shared expert, ~11.3 GB of FP8 experts each), latent attention with
    # q_lora 1536, kv_lora 512, 128 heads of 128 + 64 (v 128); the real 129280 vocabulary. ~26 GB on disk.
    "deepseek-v3-probe": ProbeShape("deepseek_v3", hidden=7168, layers=3, heads=128, kv_heads=128, head_dim=192,
                                    intermediate=2048, vocab=129280, experts=256, top_k=8, shards=6,
                                    max_positions=163840, shared_intermediate=2048, latent=DEEPSEEK_V3_LATENT,
                                    dense_layers=1, dense_intermediate=18432, fp8=True),
    # The real models, for extrapolation (param_count / largest tensors only; far too big to generate here).
    "gpt-oss-20b": ProbeShape("gpt_oss", hidden=2880, layers=24, heads=64, kv_heads=8, head_dim=64,
                              intermediate=2880, vocab=201088, experts=32, top_k=4, shards=3),
    # GPT-OSS-20B's real shape with its experts in MXFP4 as openai/gpt-oss-20b ships them (~12.8 GiB at 24 layers):
    # the full-depth probe of scripts/gpu_speed_driver.py (both exporters read it).
    "gpt-oss-20b-mxfp4": ProbeShape("gpt_oss", hidden=2880, layers=24, heads=64, kv_heads=8, head_dim=64,
                                    intermediate=2880, vocab=201088, experts=32, top_k=4, shards=3, mxfp4=True),
    "gpt-oss-120b": ProbeShape("gpt_oss", hidden=2880, layers=36, heads=64, kv_heads=8, head_dim=64,
                               intermediate=2880, vocab=201088, experts=128, top_k=4, shards=15),
    "deepseek-v3": ProbeShape("deepseek_v3", hidden=7168, layers=61, heads=128, kv_heads=128, head_dim=192,
                              intermediate=2048, vocab=129280, experts=256, top_k=8, shards=163, max_positions=163840,
                              shared_intermediate=2048, latent=DEEPSEEK_V3_LATENT, dense_layers=3,
                              dense_intermediate=18432, fp8=True),
}


def layer_types(s: ProbeShape) -> list[str]:
    """qwen3_5_moe: every full_attention_interval-th layer full attention, and the last one always."""
    return ["full_attention" if (i + 1) % s.full_attention_interval == 0 or i == s.layers - 1 else "linear_attention"
            for i in range(s.layers)]


def _hybrid_specs(s: ProbeShape) -> list[tuple[str, tuple[int, ...]]]:
    h, q, kv, e = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.experts
    key, value = s.linear_key_heads * s.linear_head_dim, s.linear_value_heads * s.linear_head_dim
    specs = [("model.language_model.embed_tokens.weight", (s.vocab, h)), ("model.language_model.norm.weight", (h,)),
             ("lm_head.weight", (s.vocab, h))]
    for i, kind in enumerate(layer_types(s)):
        p = f"model.language_model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate.weight", (e, h)), (p + "mlp.experts.gate_up_proj", (e, 2 * s.intermediate, h)),
                  (p + "mlp.experts.down_proj", (e, h, s.intermediate)),
                  (p + "mlp.shared_expert.gate_proj.weight", (s.shared_intermediate, h)),
                  (p + "mlp.shared_expert.up_proj.weight", (s.shared_intermediate, h)),
                  (p + "mlp.shared_expert.down_proj.weight", (h, s.shared_intermediate)),
                  (p + "mlp.shared_expert_gate.weight", (1, h))]
        if kind == "full_attention":
            specs += [(p + "self_attn.q_proj.weight", (2 * q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                      (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                      (p + "self_attn.q_norm.weight", (s.head_dim,)), (p + "self_attn.k_norm.weight", (s.head_dim,))]
        else:
            a = p + "linear_attn."
            specs += [(a + "in_proj_qkv.weight", (2 * key + value, h)), (a + "in_proj_z.weight", (value, h)),
                      (a + "in_proj_a.weight", (s.linear_value_heads, h)),
                      (a + "in_proj_b.weight", (s.linear_value_heads, h)),
                      (a + "conv1d.weight", (2 * key + value, 1, 4)), (a + "A_log", (s.linear_value_heads,)),
                      (a + "dt_bias", (s.linear_value_heads,)), (a + "norm.weight", (s.linear_head_dim,)),
                      (a + "out_proj.weight", (h, value))]
    return sorted(specs)


def tensor_specs(s: ProbeShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, sorted by name as save_pretrained writes them (dtype: see _dtype)."""
    if s.arch == "qwen3_5_moe":
        return _hybrid_specs(s)
    if s.arch == "deepseek_v3":
        return deepseek_specs(s)
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    specs = [("model.embed_tokens.weight", (s.vocab, h)), ("model.norm.weight", (h,))]
    if not s.tie or s.lm_head_copy:
        specs.append(("lm_head.weight", (s.vocab, h)))
    bias = s.arch == "gpt_oss"
    for i in range(s.layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q))]
        if bias:
            specs += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                      (p + "self_attn.v_proj.bias", (kv,)), (p + "self_attn.o_proj.bias", (h,)),
                      (p + "self_attn.sinks", (s.heads,))]
        if s.arch == "qwen3":
            specs += [(p + "self_attn.q_norm.weight", (s.head_dim,)), (p + "self_attn.k_norm.weight", (s.head_dim,)),
                      (p + "mlp.gate_proj.weight", (s.intermediate, h)),
                      (p + "mlp.up_proj.weight", (s.intermediate, h)),
                      (p + "mlp.down_proj.weight", (h, s.intermediate))]
        else:
            e, i2 = s.experts, s.intermediate
            specs += [(p + "mlp.router.weight", (e, h)), (p + "mlp.router.bias", (e,)),
                      (p + "mlp.experts.gate_up_proj_bias", (e, 2 * i2)), (p + "mlp.experts.down_proj_bias", (e, h))]
            if s.mxfp4:  # [E, out, in/32, 16] codes + [E, out, in/32] exponents, as openai/gpt-oss-* ship them
                specs += [(p + "mlp.experts.gate_up_proj_blocks", (e, 2 * i2, h // 32, 16)),
                          (p + "mlp.experts.gate_up_proj_scales", (e, 2 * i2, h // 32)),
                          (p + "mlp.experts.down_proj_blocks", (e, h, i2 // 32, 16)),
                          (p + "mlp.experts.down_proj_scales", (e, h, i2 // 32))]
            else:  # the `x @ W[e]` orientation transformers saves bf16 experts in
                specs += [(p + "mlp.experts.gate_up_proj", (e, h, 2 * i2)), (p + "mlp.experts.down_proj", (e, i2, h))]
    return sorted(specs)


ITEM_BYTES = {"BF16": 2, "U8": 1, "F8_E4M3": 1, "F32": 4}


def _dtype(name: str, s: ProbeShape | None = None) -> str:
    if s is not None and s.arch == "deepseek_v3":
        return deepseek_dtype(name, s.fp8)
    return "U8" if name.endswith(("_blocks", "_scales")) else "BF16"


def _nbytes(name: str, shape: tuple[int, ...], s: ProbeShape) -> int:
    return ITEM_BYTES[_dtype(name, s)] * int(np.prod(shape))


def param_count(s: ProbeShape) -> int:
    """Parameters the checkpoint describes (an MXFP4 byte holds two; scales are not parameters)."""
    def count(name: str, shape: tuple[int, ...]) -> int:
        if name.endswith("_blocks"):
            return int(np.prod(shape)) * 2
        return 0 if name.endswith(("_scales", "_scale_inv")) else int(np.prod(shape))

    return sum(count(name, shape) for name, shape in tensor_specs(s))


def checkpoint_bytes(s: ProbeShape) -> int:
    return sum(_nbytes(name, shape, s) for name, shape in tensor_specs(s))


def _hybrid_config(s: ProbeShape) -> dict:
    """Qwen3_5MoeForConditionalGeneration (the only Qwen3.5 layout the reference builder reads) with a tiny vision
    tower that the probe does not store (transformers initialises it; neither exporter uses it)."""
    text = dict(model_type="qwen3_5_moe_text", hidden_size=s.hidden, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim, vocab_size=s.vocab,
                layer_types=layer_types(s), linear_num_key_heads=s.linear_key_heads,
                linear_num_value_heads=s.linear_value_heads, linear_key_head_dim=s.linear_head_dim,
                linear_value_head_dim=s.linear_head_dim, linear_conv_kernel_dim=4, num_experts=s.experts,
                num_experts_per_tok=s.top_k, moe_intermediate_size=s.intermediate,
                shared_expert_intermediate_size=s.shared_intermediate, rms_norm_eps=1e-6, hidden_act="silu",
                max_position_embeddings=s.max_positions or 262144, tie_word_embeddings=False, attention_bias=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=3, dtype="bfloat16", initializer_range=0.02,
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    vision = dict(model_type="qwen3_5_moe_vision", depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
                  out_hidden_size=s.hidden, num_position_embeddings=16)
    return dict(architectures=["Qwen3_5MoeForConditionalGeneration"], model_type="qwen3_5_moe", text_config=text,
                vision_config=vision, tie_word_embeddings=False, image_token_id=248056, video_token_id=248057,
                vision_start_token_id=248053, vision_end_token_id=248054)


def config_json(s: ProbeShape) -> dict:
    """A config.json transformers (and so the reference builder) loads for this shape."""
    if s.arch == "qwen3_5_moe":
        return _hybrid_config(s)
    if s.arch == "deepseek_v3":
        return deepseek_config(s)
    common = dict(architectures=["Qwen3ForCausalLM" if s.arch == "qwen3" else "GptOssForCausalLM"],
                  hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                  num_key_value_heads=s.kv_heads, head_dim=s.head_dim, intermediate_size=s.intermediate,
                  vocab_size=s.vocab, tie_word_embeddings=s.tie, rms_norm_eps=1e-6, hidden_act="silu",
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, dtype="bfloat16", initializer_range=0.02,
                  attention_dropout=0.0, use_cache=True)
    if s.arch == "qwen3":
        return {**common, "model_type": "qwen3", "attention_bias": False,
                "max_position_embeddings": s.max_positions or 40960,
                "max_window_layers": s.layers, "use_sliding_window": False, "sliding_window": None,
                "layer_types": ["full_attention"] * s.layers,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    quant = {"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}} if s.mxfp4 else {}
    return {**common, **quant, "model_type": "gpt_oss", "attention_bias": True,
            "max_position_embeddings": s.max_positions or 131072,
            "num_local_experts": s.experts, "num_experts_per_tok": s.top_k, "experts_per_token": s.top_k,
            "router_aux_loss_coef": 0.9, "output_router_logits": False, "swiglu_limit": 7.0, "sliding_window": 128,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.layers)],
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False}}


def _random_chunks(name: str, shape: tuple[int, ...], seed: int, dtype: str = "BF16", seed_name: str | None = None):
    """Chunks of bf16 bit patterns (uint16), MXFP4 bytes, e4m3 bytes or float32 scales: seeded per name (or
    `seed_name`), so files are byte-identical run to run."""
    rng = np.random.default_rng([seed, zlib.crc32((seed_name or name).encode())])
    is_norm = name.endswith(("layernorm.weight", "norm.weight", "A_log", "dt_bias"))
    total = int(np.prod(shape))
    for start in range(0, total, CHUNK_ITEMS):
        size = min(CHUNK_ITEMS, total - start)
        if dtype == "F8_E4M3":
            yield fp8_chunk(rng, size)
            continue
        if dtype == "F32":  # block scales, or a router's correction bias (small, either sign)
            yield (scale_chunk(rng, size) if name.endswith("_scale_inv") else
                   rng.uniform(-0.05, 0.05, size).astype(np.float32).view(np.uint8))
            continue
        if name.endswith("_blocks"):  # any fp4 code pair is valid
            yield rng.integers(0, 256, size=size, dtype=np.uint8)
            continue
        if name.endswith("_scales"):  # 2^-11 .. 2^-8 per block: |w| up to 6 * 2^-8 ~ 0.02, like the bf16 weights
            yield (np.uint8(116) + (rng.integers(0, 256, size=size, dtype=np.uint8) & np.uint8(3))).astype(np.uint8)
            continue
        bits = rng.integers(0, 1 << 16, size=size, dtype=np.uint16)
        if is_norm:  # positive, [0.5, 2): exponent 126 or 127
            bits = (bits & np.uint16(0x007F)) | ((np.uint16(126) + ((bits >> 7) & np.uint16(1))) << 7)
        else:  # random sign, |w| in [2^-9, 2^-5): exponents 118..121
            bits = (bits & np.uint16(0x807F)) | ((np.uint16(118) + ((bits >> 7) & np.uint16(3))) << 7)
        yield bits


def _split_shards(specs, shards: int, s: ProbeShape) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Contiguous runs of the sorted names with roughly equal bytes; none empty."""
    sizes = [_nbytes(name, shape, s) for name, shape in specs]
    total, groups, current, acc = sum(sizes), [], [], 0
    for spec, size in zip(specs, sizes):
        current.append(spec)
        acc += size
        if len(groups) < shards - 1 and acc >= total * (len(groups) + 1) / shards:
            groups.append(current)
            current = []
    groups.append(current)
    return [g for g in groups if g]


def _write_safetensors(path: Path, specs, seed: int, s: ProbeShape, seed_names: dict[str, str]) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        dtype = _dtype(name, s)
        size = _nbytes(name, shape, s)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in specs:
            for chunk in _random_chunks(name, shape, seed, _dtype(name, s), seed_names.get(name)):
                f.write(chunk.tobytes())
    return offset


def write_checkpoint(s: ProbeShape, folder: Path, seed: int = 0, tokenizer: bool = True) -> Path:
    """Write the checkpoint folder (overwriting model files there); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
        stale.unlink()
    specs = tensor_specs(s)
    # a tied checkpoint that stores lm_head.weight stores a copy of the embedding (as Qwen/Qwen3-0.6B's files do)
    seed_names = {"lm_head.weight": "model.embed_tokens.weight"} if s.tie and s.lm_head_copy else {}
    groups = _split_shards(specs, max(1, s.shards), s)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += _write_safetensors(folder / fname, group, seed, s, seed_names)
        weight_map.update({name: fname for name, _ in group})
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config_json(s), indent=2, sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "do_sample": False}, indent=2) + "\n")
    (folder / "probe_shape.json").write_text(json.dumps(asdict(s), indent=2) + "\n")
    if tokenizer:
        _write_tokenizer(folder)
    return folder


def _write_tokenizer(folder: Path) -> None:
    """The test factory's small BPE tokenizer (the reference builder loads one; the vocab size need not match)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import factory  # noqa: PLC0415 - tests/factory.py, imported only when a tokenizer is wanted

    factory.make_tokenizer(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--shards", type=int, help="override the preset's shard count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    shape = replace(shape, **{k: v for k, v in (("layers", args.layers), ("shards", args.shards)) if v})
    write_checkpoint(shape, args.folder, args.seed)
    print(f"{args.folder}: {shape.arch}, {param_count(shape) / 1e6:.1f}M parameters, "
          f"{checkpoint_bytes(shape) / 2**30:.2f} GiB, {shape.layers} layers, {shape.shards} shard(s)")


if __name__ == "__main__":
    main()

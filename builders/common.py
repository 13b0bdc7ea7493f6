"""Helpers shared by family modules: typed geometry and rope reads (mRoPE included), name-table weight mapping
(FP8 block-scaled tensors dequantized on the way), multimodal text prefixes, tied heads, consumption checks."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import numpy as np

from builder.checkpoint import Checkpoint
from builder.errors import CheckpointError
from builder.fp8 import FP8_DTYPES, SCALE_SUFFIX, Fp8BlockWeight
from builder.spec import ModelSpec, RopeSpec
from builder.weights import Stored, Weight, WeightMap, block_spans
from builders.config import Config

# Rope types the rotary layer computes, and the parameters each reads: name -> (kind, required)
ROPE_PARAMETERS: dict[str, dict[str, tuple[str, bool]]] = {
    "default": {},
    "dynamic": {},  # dynamic NTK changes frequencies only past the trained length, which the cache does not cover
    "linear": {"factor": ("float", True)},
    "llama3": {"factor": ("float", True), "low_freq_factor": ("float", True), "high_freq_factor": ("float", True),
               "original_max_position_embeddings": ("int", True)},
    "yarn": {"factor": ("float", True), "original_max_position_embeddings": ("int", False),
             "attention_factor": ("float", False), "mscale": ("float", False), "mscale_all_dim": ("float", False),
             "beta_fast": ("float", False), "beta_slow": ("float", False), "truncate": ("bool", False)},
}


def head_dim(cfg: Config) -> int:
    heads = cfg.int("num_attention_heads", minimum=1)
    return cfg.int("head_dim", None, minimum=1) or cfg.int("hidden_size", minimum=1) // heads


def kv_heads(cfg: Config) -> int:
    heads = cfg.int("num_attention_heads", minimum=1)
    kv = cfg.int("num_key_value_heads", None, minimum=1) or heads
    if heads % kv:
        raise cfg.bad("num_key_value_heads", kv, f"a divisor of num_attention_heads={heads}")
    return kv


def typed_params(params: Config, table: dict[str, tuple[str, bool]]) -> tuple[tuple[str, object], ...]:
    """The (name, value) pairs of `table` read from `params` with their types, sorted (hashable RopeSpec params)."""
    read = {"float": params.float, "int": params.int, "bool": params.bool}
    values = {name: read[kind](name, None if not required else Config.REQUIRED) for name, (kind, required)
              in table.items()}
    return tuple(sorted((k, v) for k, v in values.items() if v is not None))


def rope_spec(cfg: Config, rotary_dim: int, *, layer_type: str | None = None, default_theta: float = 10000.0,
              partial: bool = False) -> RopeSpec:
    """RopeSpec from transformers-5 `rope_parameters` (optionally per layer type) or the older rope_theta/scaling.

    A rope type not computed here is refused (exit 3, naming the field). partial_rotary_factor is refused too unless
    `partial` says the caller has turned it into `rotary_dim` (Nemotron)."""
    params = cfg.sub("rope_parameters", None)
    if params is not None and layer_type is not None and layer_type in params:
        params = params.sub(layer_type)
    theta = cfg.float("rope_theta", default_theta)
    if params is None or ("rope_type" not in params and "rope_theta" not in params):
        params = cfg.sub("rope_scaling", None) or Config({}, cfg.architecture, cfg.where, f"{cfg.path}rope_scaling.")
    rope_type = params.str("rope_type", None, choices=tuple(ROPE_PARAMETERS))
    if rope_type is None:  # the legacy spelling of rope_scaling
        rope_type = params.str("type", "default", choices=tuple(ROPE_PARAMETERS))
    for where in (params, cfg):
        factor = where.float("partial_rotary_factor", 1.0)
        if factor != 1.0 and not partial:
            raise where.unsupported("partial_rotary_factor", factor, why="this architecture rotates whole heads")
    return RopeSpec(theta=params.float("rope_theta", theta), rotary_dim=rotary_dim, rope_type=rope_type,
                    params=typed_params(params, ROPE_PARAMETERS[rope_type]),
                    max_positions=cfg.int("max_position_embeddings", 4096, minimum=1))


def projection_table(dst: str, src: str, projections: Iterable[str], *, bias: bool) -> dict[str, str]:
    """{dst.p.weight: src.p_proj.weight} for each projection p, and the .bias pairs when `bias`.

    projection_table("layers.{i}.attn", "model.layers.{i}.self_attn", "qkvo", bias=True). Biases are mapped only
    when the spec reads them, so a bias tensor the config does not announce is left unconsumed and refused.
    """
    kinds = ("weight", "bias") if bias else ("weight",)
    return {f"{dst}.{p}.{kind}": f"{src}.{p}_proj.{kind}" for p in projections for kind in kinds}


def fp8_block(ckpt: Checkpoint) -> tuple[int, int] | None:
    """(rows, columns) per scale of an FP8 block-scaled checkpoint (quantization_config quant_method "fp8"), else
    None. Only what DeepSeek-V3 / Kimi-K2 ship is read: e4m3 weights, dynamic activations, block scales."""
    quant = Config(ckpt.config, ckpt.architecture).sub("quantization_config", None)
    if quant is None or quant.str("quant_method", None) != "fp8":
        return None
    quant.str("fmt", "e4m3", choices=("e4m3",))
    quant.str("activation_scheme", "dynamic", choices=("dynamic",))
    block = quant.list("weight_block_size", None, of=int, length=2)
    if block is None:
        raise quant.unsupported("weight_block_size", None, why="only block-scaled FP8 is read, e.g. [128, 128]")
    if min(block) < 1:
        raise quant.bad("weight_block_size", block, "two positive block sizes (rows, columns)")
    return block[0], block[1]


def checkpoint_weight(ckpt: Checkpoint, name: str) -> Weight:
    """The float weight a checkpoint tensor holds: the tensor as stored, or an FP8 tensor dequantized with its block
    scales `<name>_scale_inv` (builder/fp8.py), row block by row block."""
    ref = ckpt.tensor(name)
    if ref.dtype not in FP8_DTYPES:
        return Stored(ref)
    what = f"{ckpt.architecture}: FP8 tensor {name} ({ref.dtype} {list(ref.shape)})"
    block = fp8_block(ckpt)
    if block is None:
        raise CheckpointError(f"{what}: config.json has no quantization_config with quant_method 'fp8' and a "
                              "weight_block_size, so its scales are unknown. Restore the checkpoint's config.json.")
    scale = name + SCALE_SUFFIX
    if not ckpt.has(scale):
        raise CheckpointError(f"{what} has no scale tensor {scale} in {ckpt.folder} (blocks of {block[0]} x "
                              f"{block[1]}). The checkpoint is incomplete; re-download it.")
    return Fp8BlockWeight(ref, ckpt.tensor(scale), block)


def map_table(ckpt: Checkpoint, weights: WeightMap, table: dict[str, str], num_layers: int) -> None:
    """Map canonical names to checkpoint tensors through a name table; `{i}` expands over layers.

    Tensors absent from the checkpoint are recorded as expected, so a layer that needs one names it in its error.
    """
    for canonical, source in table.items():
        indices: Iterable[int | None] = range(num_layers) if "{i}" in canonical else (None,)
        for i in indices:
            name, hf = (canonical.format(i=i), source.format(i=i)) if i is not None else (canonical, source)
            if ckpt.has(hf):
                weights.add(name, checkpoint_weight(ckpt, hf), hf)
            else:
                weights.expect(name, hf)


# -- typed helpers (builders.config.Config) shared by the Phi-3, SmolLM3, HunYuan and multimodal-text families -------

def rope_settings(cfg: Config) -> Config:
    """The rope settings as one Config: transformers-5 `rope_parameters`, else the older `rope_scaling` with the
    top-level rope_theta (errors name whichever field the value came from)."""
    params = cfg.dict("rope_parameters", None)
    if params is not None and ("rope_type" in params or "rope_theta" in params or "type" in params):
        return cfg.sub("rope_parameters")
    merged = {**cfg.dict("rope_scaling", {})}
    if "rope_theta" in cfg:
        merged.setdefault("rope_theta", cfg.float("rope_theta"))
    return Config(merged, cfg.architecture, cfg.where, "rope_scaling.")


def rope_type(rope: Config, supported: tuple[str, ...], aliases: dict[str, str] | None = None) -> str:
    """rope_type (or the legacy `type`) through `aliases`, refused with exit 3 unless in `supported`."""
    key = "rope_type" if "rope_type" in rope else "type"
    kind = rope.str(key, "default")
    kind = (aliases or {}).get(kind, kind)
    if kind not in supported:
        raise rope.unsupported(key, kind, ", ".join(map(repr, supported)))
    return kind


# mRoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): each frequency pair j of the rotary half is driven by one of three
# position streams (temporal, height, width): pairs are grouped in `mrope_section` sizes, in order (t, h, w, t, ...
# per section) or interleaved (mrope_interleaved: Qwen3-VL). For text tokens the three streams are equal (the
# processor gives text position p as (p, p, p)), so every pair reads the same angle p * inv_freq[j] whatever its
# stream: mRoPE is plain rope with the same inverse frequencies. A text-only export therefore uses a default rope;
# the section fields are only checked (they must cover the rotary half, as transformers' split requires).
MROPE_FIELDS = ("mrope_section", "mrope_interleaved")


def text_positions_mrope(rope: Config, rotary_dim: int) -> bool:
    """Check the mRoPE fields of a rope (if any); returns whether the rope is an mRoPE. See MROPE_FIELDS."""
    section = rope.list("mrope_section", None, of=int)
    rope.bool("mrope_interleaved", False)
    if section is None:
        return False
    if len(section) != 3 or sum(section) != rotary_dim // 2 or min(section) < 0:
        raise rope.bad("mrope_section", section, f"3 non-negative sizes summing to rotary_dim / 2 = {rotary_dim // 2}")
    return True


def rope_from(rope: Config, kind: str, rotary_dim: int, max_positions: int, *, default_theta: float = 10000.0,
              drop: tuple[str, ...] = (), overrides: dict | None = None) -> RopeSpec:
    """RopeSpec of type `kind` from rope settings; `drop` names fields read elsewhere (e.g. MROPE_FIELDS),
    `overrides` sets parameters the family resolved itself."""
    theta = rope.float("rope_theta", default_theta)
    skip = {"rope_type", "type", "rope_theta", "partial_rotary_factor", *drop}
    params = {k: v for k, v in rope.data.items() if k not in skip and v is not None}
    params.update(overrides or {})
    hashable = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return RopeSpec(theta=theta, rotary_dim=rotary_dim, rope_type=kind, params=hashable, max_positions=max_positions)


def layer_windows(cfg: Config, default_types: list[str], window: int | None) -> list[int | None]:
    """Per-layer sliding window from config.layer_types (else `default_types`, transformers' derivation)."""
    types = cfg.list("layer_types", None, of=str, length=len(default_types)) or default_types
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise cfg.unsupported("layer_types", unknown, "'full_attention', 'sliding_attention'")
    if "sliding_attention" in types and window is None:
        raise cfg.bad("sliding_window", None, "a window size (with use_sliding_window), since layer_types has "
                      "sliding_attention layers")
    return [window if t == "sliding_attention" else None for t in types]


def text_decoder_prefix(ckpt: Checkpoint, arch: str, prefixes: tuple[str, ...], skipped: tuple[str, ...]) -> str:
    """The prefix of a multimodal checkpoint's text decoder (the first of `prefixes` holding embed_tokens); tensors
    under `skipped` (vision towers, projectors) are left out on purpose, and said so."""
    for prefix in prefixes:
        if ckpt.has(f"{prefix}embed_tokens.weight"):
            ckpt.ignore(*(n for n in ckpt.names() if n.startswith(skipped)),
                        reason="the vision tower and its projector (only the text decoder is exported)")
            return prefix
    raise CheckpointError(f"{arch}: no token embedding found (looked for "
                          f"{', '.join(p + 'embed_tokens.weight' for p in prefixes)}). The checkpoint does not hold "
                          "the text decoder this architecture names.")


def _same_values(a, b) -> bool:
    """Whether two weights hold the same values (torch.equal after loading), reading row blocks until one differs."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    return all(np.array_equal(a.rows(start, stop), b.rows(start, stop)) for start, stop in block_spans(a))


def resolve_tied_head(spec: ModelSpec, ckpt: Checkpoint, weights: WeightMap) -> tuple[ModelSpec, list[str]]:
    """Tie the lm_head to the embedding the way transformers 5 loads a checkpoint whose config ties them.

    A stored lm_head.weight equal to the embedding is a redundant copy (left out, noted); one that differs wins:
    transformers then keeps both tensors untied (warning that the config is wrong), so the export unties too. A
    checkpoint that stores only the head has it serve as the embedding as well. Returns (spec, notes).
    """
    if not spec.tie_embeddings or "lm_head.weight" not in weights:
        return spec, []
    head_source = weights.source("lm_head.weight")
    if "embed.weight" not in weights:
        weights.add("embed.weight", weights.pop("lm_head.weight"), head_source)
        return spec, [f"the config ties the embedding to the lm_head and the checkpoint stores only {head_source}; "
                      "it serves as both, as transformers loads it."]
    if _same_values(weights.peek("embed.weight"), weights.peek("lm_head.weight")):
        weights.pop("lm_head.weight")
        ckpt.ignore(head_source, reason="a copy of the tied embedding (identical values)")
        return spec, []
    return replace(spec, tie_embeddings=False), [
        f"the config ties the lm_head to the embedding, but {head_source} differs from "
        f"{weights.source('embed.weight')}; exported untied with the stored lm_head, as transformers loads it "
        "(set tie_word_embeddings=false in config.json to say so)."]


def ignore_declared(ckpt: Checkpoint, ignored: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """Leave out the tensors a family declares it does not export (e.g. a vision tower), with the reason."""
    for reason, prefixes in ignored:
        ckpt.ignore(*(n for n in ckpt.names() if n.startswith(prefixes)), reason=reason)


def _listed(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def reject_unconsumed(ckpt: Checkpoint, architecture: str) -> None:
    """Fail on checkpoint tensors nobody used: silent leftovers hide wrong mappings."""
    left = ckpt.unconsumed()
    if left:
        raise CheckpointError(f"{architecture}: {len(left)} checkpoint tensor(s) were not used by the export: "
                              f"{_listed(left)}. The checkpoint has parts this exporter does not understand (or a "
                              "mapping is wrong); refusing to write a model that silently drops weights.")


def reject_unread(weights: WeightMap) -> None:
    """Fail on mapped tensors the graph never read (a spec flag that leaves them out, or a wrong mapping)."""
    unread = weights.unread()
    if unread:
        shown = [f"{weights.source(name) or name}" + (f" (as {name})" if weights.source(name) else "")
                 for name in unread]
        raise CheckpointError(f"{weights.architecture}: {len(unread)} checkpoint tensor(s) were mapped but not read "
                              f"by the graph: {_listed(shown)}. The config switches off what would read them (e.g. "
                              "attention_bias, a per-head norm) or a mapping is wrong; refusing to write a model that "
                              "silently drops weights.")


def skip_notes(ckpt: Checkpoint) -> list[str]:
    """One progress note per reason for the tensors left out on purpose."""
    return [f"not exported: {reason} ({len(names)} tensor{'s' if len(names) != 1 else ''}: {_listed(names, 3)})."
            for reason, names in ckpt.skipped().items()]

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

# Rope types the rotary layer computes (builder/layers/rotary.py), and the parameters each reads:
# name -> (kind, required). Kinds: "float", "int", "bool", and "factors" (one number per rotated frequency pair,
# rotary_dim / 2 of them). A required parameter that is missing exits 4 naming the field.
ROPE_PARAMETERS: dict[str, dict[str, tuple[str, bool]]] = {
    "default": {},
    "dynamic": {},  # dynamic NTK changes frequencies only past the trained length, which the cache does not cover
    "linear": {"factor": ("float", True)},
    "llama3": {"factor": ("float", True), "low_freq_factor": ("float", True), "high_freq_factor": ("float", True),
               "original_max_position_embeddings": ("int", True)},
    "yarn": {"factor": ("float", True), "original_max_position_embeddings": ("int", False),
             "attention_factor": ("float", False), "mscale": ("float", False), "mscale_all_dim": ("float", False),
             "beta_fast": ("float", False), "beta_slow": ("float", False), "truncate": ("bool", False)},
    # Phi-3: short / long factor sets switching at original_max_position_embeddings
    "longrope": {"short_factor": ("factors", True), "long_factor": ("factors", True),
                 "original_max_position_embeddings": ("int", True), "factor": ("float", False),
                 "attention_factor": ("float", False)},
    # Gemma 4 global layers: a partial_rotary_factor share of the pairs rotates, with exponents over the whole head
    "proportional": {"partial_rotary_factor": ("float", False), "factor": ("float", False)},
    # HunYuan: its "dynamic" rope with a fixed alpha is a static NTK stretch of the base (builders/hunyuan.py)
    "ntk_alpha": {"alpha": ("float", True)},
}
# The rope types a family accepts unless it names its own: those transformers computes for any decoder
GENERIC_ROPE_TYPES = ("default", "dynamic", "linear", "llama3", "yarn")

# mRoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): each frequency pair j of the rotary half is driven by one of three
# position streams (temporal, height, width): pairs are grouped in `mrope_section` sizes, in order (t, h, w, t, ...
# per section) or interleaved (mrope_interleaved: Qwen3-VL). For text tokens the three streams are equal (the
# processor gives text position p as (p, p, p)), so every pair reads the same angle p * inv_freq[j] whatever its
# stream: mRoPE is plain rope with the same inverse frequencies. A text-only export therefore uses a default rope
# (the legacy type "mrope" reads as "default"); the section fields are only checked (they must cover the rotary
# half, as transformers' split requires).
MROPE_ALIASES = {"mrope": "default"}


def head_dim(cfg: Config) -> int:
    heads = cfg.int("num_attention_heads", minimum=1)
    return cfg.int("head_dim", None, minimum=1) or cfg.int("hidden_size", minimum=1) // heads


def kv_heads(cfg: Config) -> int:
    heads = cfg.int("num_attention_heads", minimum=1)
    kv = cfg.int("num_key_value_heads", None, minimum=1) or heads
    if heads % kv:
        raise cfg.bad("num_key_value_heads", kv, f"a divisor of num_attention_heads={heads}")
    return kv


def typed_params(params: Config, table: dict[str, tuple[str, bool]], rotary_dim: int = 0
                 ) -> tuple[tuple[str, object], ...]:
    """The (name, value) pairs of `table` read from `params` with their types, sorted (hashable RopeSpec params)."""
    def factors(name, default):
        return params.list(name, default, of=float, length=rotary_dim // 2)

    read = {"float": params.float, "int": params.int, "bool": params.bool, "factors": factors}
    values = {name: read[kind](name, None if not required else Config.REQUIRED) for name, (kind, required)
              in table.items()}
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items() if v is not None))


def rope_settings(cfg: Config, layer_type: str | None = None) -> Config:
    """Where a config keeps its rope, as one Config (errors name the field the value came from): transformers-5
    `rope_parameters` (its `layer_type` entry when keyed per layer type), else the older `rope_scaling`. Fields
    absent there (rope_theta, partial_rotary_factor) fall back to the top level, as transformers reads them."""
    params = cfg.sub("rope_parameters", None)
    if params is not None and layer_type is not None and layer_type in params:
        return params.sub(layer_type)
    if params is not None and any(key in params for key in ("rope_type", "type", "rope_theta")):
        return params
    return cfg.sub("rope_scaling", None) or Config({}, cfg.architecture, cfg.where, f"{cfg.path}rope_scaling.")


def rotary_width(cfg: Config, head_dim: int, *, layer_type: str | None = None, default: float = 1.0) -> int:
    """int(head_dim * partial_rotary_factor), the factor read from the rope settings, else the top level, else
    `default` (the config class's); pass the result to rope_spec(..., partial=True)."""
    settings = rope_settings(cfg, layer_type)
    where = settings if "partial_rotary_factor" in settings else cfg
    factor = where.float("partial_rotary_factor", default)
    if not 0 < factor <= 1:
        raise where.bad("partial_rotary_factor", factor, "a number in (0, 1]")
    width = int(head_dim * factor)
    if width % 2 or not width:
        raise where.unsupported("partial_rotary_factor", factor, f"a factor whose rotated width (head_dim * factor, "
                                f"head_dim {head_dim}) is even" + ("" if width else " and not 0"))
    return width


def _check_mrope(settings: Config, rotary_dim: int) -> None:
    """The mRoPE section fields, if any (MROPE_ALIASES says why they are only checked)."""
    section = settings.list("mrope_section", None, of=int)
    settings.bool("mrope_interleaved", False)
    if section is not None and (len(section) != 3 or sum(section) != rotary_dim // 2 or min(section) < 0):
        raise settings.bad("mrope_section", section, "3 non-negative sizes summing to rotary_dim / 2 = "
                           f"{rotary_dim // 2}")


def _check_whole_heads(cfg: Config, settings: Config, kind: str, partial: bool | tuple[str, ...],
                       types: tuple[str, ...]) -> None:
    if partial is True or kind in (partial or ()) or "partial_rotary_factor" in ROPE_PARAMETERS[kind]:
        return
    for where in (settings, cfg):
        factor = where.float("partial_rotary_factor", 1.0)
        if factor != 1.0:
            readers = [t for t in types if "partial_rotary_factor" in ROPE_PARAMETERS.get(t, {})]
            why = (f"only a {' or '.join(map(repr, readers))} rope rotates part of each head here" if readers
                   else "this architecture rotates whole heads")
            raise where.unsupported("partial_rotary_factor", factor, why=why)


def rope_spec(cfg: Config, rotary_dim: int, *, layer_type: str | None = None, default_theta: float = 10000.0,
              partial: bool | tuple[str, ...] = False, types: tuple[str, ...] = GENERIC_ROPE_TYPES,
              aliases: dict[str, str] | None = None, mrope: bool = False, overrides: dict | None = None,
              max_positions: int | None = None) -> RopeSpec:
    """The one rope parser: RopeSpec from a config's rope settings (rope_settings: per layer type, or the older
    rope_theta / rope_scaling spelling), typed per rope type by ROPE_PARAMETERS.

    types: the rope types the family accepts as spelled (anything else exits 3 naming the field);
    aliases: spellings that mean another computed type (Phi-3's legacy "su" / "yarn" -> "longrope", HunYuan's
      "dynamic" with alpha -> "ntk_alpha");
    mrope: the model's rope is mRoPE, which text-only positions make a plain rope (MROPE_ALIASES; sections checked);
    partial: partial_rotary_factor is refused (exit 3) unless the rope type reads it as a parameter, or `partial` says
      the caller turned it into `rotary_dim` (rotary_width) -- True, or the rope types for which it did;
    overrides: parameters the family resolved itself (Phi-3's top-level original_max_position_embeddings);
    max_positions: the cache length when the family defaults max_position_embeddings itself (else the field, or 4096).
    """
    settings = rope_settings(cfg, layer_type)
    key = "rope_type" if "rope_type" in settings else "type"  # "type": the legacy spelling of rope_scaling
    spelled = settings.str(key, "default")
    aliases = {**(MROPE_ALIASES if mrope else {}), **(aliases or {})}
    if spelled not in types and spelled not in aliases:
        raise settings.unsupported(key, spelled, ", ".join(map(repr, types)))
    kind = aliases.get(spelled, spelled)
    if mrope:
        _check_mrope(settings, rotary_dim)
    _check_whole_heads(cfg, settings, kind, partial, types)
    theta = settings.float("rope_theta", None)
    if theta is None:
        theta = cfg.float("rope_theta", default_theta)
    values = settings.updated(**overrides) if overrides else settings
    return RopeSpec(theta=theta, rotary_dim=rotary_dim, rope_type=kind,
                    params=typed_params(values, ROPE_PARAMETERS[kind], rotary_dim),
                    max_positions=max_positions or cfg.int("max_position_embeddings", 4096, minimum=1))


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


def text_decoder_table(prefix: str) -> dict[str, str]:
    """Canonical -> checkpoint names every Llama-style text decoder under `prefix` shares: embedding, the two
    per-layer norms, q/k/v/o projections (weights and biases; absent biases are simply not mapped), final norm and
    lm_head (beside the decoder: `language_model.lm_head` for a `language_model.model.` decoder)."""
    src = f"{prefix}layers.{{i}}"
    return {
        "embed.weight": f"{prefix}embed_tokens.weight",
        "layers.{i}.attn_norm.weight": f"{src}.input_layernorm.weight",
        "layers.{i}.ffn_norm.weight": f"{src}.post_attention_layernorm.weight",
        **{f"layers.{{i}}.attn.{p}.{kind}": f"{src}.self_attn.{p}_proj.{kind}" for p in "qkvo"
           for kind in ("weight", "bias")},
        "final_norm.weight": f"{prefix}norm.weight",
        "lm_head.weight": "language_model.lm_head.weight" if prefix == "language_model.model." else "lm_head.weight",
    }


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


def partial_rotary_dim(cfg: Config, head_dim: int, *, default: float = 1.0) -> int:
    """int(head_dim * partial_rotary_factor), the factor read from rope_parameters or the top level (`default` when
    neither sets it: the config class's own default). An odd width cannot be rotated in pairs: refused (exit 3)."""
    params = cfg.sub("rope_parameters", None)
    where = params if params is not None and "partial_rotary_factor" in params else cfg
    factor = where.float("partial_rotary_factor", default)
    if not 0 < factor <= 1:
        raise where.bad("partial_rotary_factor", factor, "a number in (0, 1]")
    rotary = int(head_dim * factor)
    if rotary % 2:
        raise where.unsupported("partial_rotary_factor", factor, why=f"the rotated width head_dim * factor "
                                f"({head_dim} * {factor}) must be even")
    return rotary

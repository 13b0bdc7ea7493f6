"""Tiny, deterministic Hugging Face checkpoints for tests (no Hub access needed).

Every test that exports a model needs a checkpoint that looks like a real one on disk: bf16 safetensors
with the tensor names real checkpoints use (transformers' ``save_pretrained`` naming, which reverses its
in-memory weight conversions), a config.json, generation_config.json and tokenizer files.  The weights are
random but seeded, and every 1-D weight (norms, biases, sinks, router biases) is perturbed away from its
initial ones/zeros so that a wrong formula (``w`` vs ``1 + w``, a dropped bias) changes the logits.

The recipes (which tiny config each test architecture gets) live in tests/factory_recipes.py and in any
tests/factory_<topic>_recipes.py module beside it; ``ARCHS`` merges them all.

Public API: ``ARCHS``, ``make_checkpoint``, ``make_tokenizer`` (tests/tiny_tokenizer.py), ``make_hub_cache``, ``load_reference``,
``encode_mxfp4``, ``decode_mxfp4``, ``build_config``, ``special_token_ids``, ``LLAMA3_ROPE``, ``PHI3_LONGROPE``,
``CHAT_TEMPLATE``.
Tests normally use the session-cached ``tiny_checkpoint`` fixture from conftest.py instead of calling
``make_checkpoint`` directly.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tiny_tokenizer
from checkpoint_layouts import apply_layout
from factory_recipes import BASE, LLAMA3_ROPE, PHI3_LONGROPE, ArchRecipe  # noqa: F401
from tiny_tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, TOKENIZER_VOCAB, UNK, special_token_ids  # noqa: F401


# --------------------------------------------------------------------------------------------- recipes


def _recipe_modules() -> list[str]:
    """tests/factory_recipes.py, then every tests/factory_<topic>_recipes.py present, sorted."""
    here = Path(__file__).resolve().parent
    return ["factory_recipes", *sorted(p.stem for p in here.glob("factory_*_recipes.py"))]


def _merged_recipes() -> dict[str, ArchRecipe]:
    merged: dict[str, ArchRecipe] = {}
    owner: dict[str, str] = {}
    for module_name in _recipe_modules():
        module = importlib.import_module(module_name)
        for name, recipe in module.ARCHS.items():
            if name in merged:
                raise ValueError(f"test architecture {name!r} is defined twice: tests/{owner[name]}.py and "
                                 f"tests/{module_name}.py")
            merged[name], owner[name] = recipe, module_name
    return merged


ARCHS: dict[str, ArchRecipe] = _merged_recipes()

__all__ = [
    "ARCHS",
    "LLAMA3_ROPE",
    "PHI3_LONGROPE",
    "ArchRecipe",
    "make_checkpoint",
    "make_tokenizer",
    "make_hub_cache",
    "load_reference",
    "encode_mxfp4",
    "decode_mxfp4",
    "build_config",
    "special_token_ids",
    "CHAT_TEMPLATE",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NOISE_STD = 0.25  # perturbation of 1-D/0-D weights: big enough that w vs 1+w or a dropped bias shows up
MIN_NOISE = 0.03


# --------------------------------------------------------------------------------------------- tokenizer

def make_tokenizer(out_dir: Path) -> None:
    """The factory tokenizer (tests/tiny_tokenizer.py), sized to the tiny configs' context."""
    tiny_tokenizer.make_tokenizer(out_dir, model_max_length=BASE["max_position_embeddings"])


# --------------------------------------------------------------------------------------------- config


def build_config(arch: str, **config_overrides: Any):
    """The transformers config object for ``arch`` with the tiny recipe plus ``config_overrides``.

    For multimodal recipes an override whose key is not a top-level recipe key goes into ``text_config``
    (that is where hidden_size, num_hidden_layers ... live), so the same override works for every arch.
    """
    from transformers import AutoConfig

    recipe = _recipe(arch)
    config = AutoConfig.for_model(recipe.model_type, **_config_kwargs(recipe, config_overrides))
    config.architectures = [recipe.architecture]
    return config


def _config_kwargs(recipe: ArchRecipe, overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(recipe.config)
    tok = special_token_ids()
    ids = {"bos_token_id": tok[BOS], "eos_token_id": tok[EOS], "pad_token_id": tok[PAD]}
    text = cfg.setdefault(recipe.text_config_key, {}) if recipe.text_config_key else cfg
    for key, value in ids.items():
        text.setdefault(key, value)
    for key, value in overrides.items():
        if recipe.text_config_key and key not in cfg:
            text[key] = value
        else:
            cfg[key] = value
    return cfg


def _config_json(arch: str, config, overrides: dict[str, Any]) -> dict[str, Any]:
    """config.json content: transformers' ``to_dict`` plus any key it consumed without storing.

    Some configs turn legacy keys into new structures in ``__post_init__`` (Gemma 4 turns
    ``global_head_dim`` into ``per_layer_config``); released checkpoints carry the legacy key, so keep both.
    """
    recipe = _recipe(arch)
    given = _config_kwargs(recipe, overrides)
    out = config.to_dict()
    out.pop("transformers_version", None)  # keep files independent of the installed version
    pairs = [(given, out)]
    if recipe.text_config_key:
        pairs.append((given[recipe.text_config_key], out[recipe.text_config_key]))
    for src, dst in pairs:
        for key, value in src.items():
            dst.setdefault(key, value)
    return out


def _recipe(arch: str) -> ArchRecipe:
    if arch not in ARCHS:
        raise KeyError(f"unknown test architecture {arch!r}; tests/factory_recipes.py and "
                       f"tests/factory_*_recipes.py define: {sorted(ARCHS)}")
    return ARCHS[arch]


# --------------------------------------------------------------------------------------------- weights


def _build_model(config, seed: int):
    """Instantiate the model with seeded init, then perturb every 1-D/0-D parameter with seeded noise."""
    import transformers

    cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = cls(config)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # state_dict(keep_vars) covers parameters and persistent buffers (e.g. Gemma 4's layer_scalar)
        for _, param in sorted(model.state_dict(keep_vars=True).items()):
            if param.ndim <= 1 and param.is_floating_point():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * NOISE_STD
                # at least a few bf16 ulps away from the init value, so every element survives the cast moved
                noise = torch.where(noise.abs() < MIN_NOISE, MIN_NOISE * torch.sign(noise + 1e-12), noise)
                param.add_(noise.to(param.dtype))
    return model


def _on_disk_tensors(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors exactly as ``save_pretrained`` names them (tied weights dropped, conversions reversed)."""
    from safetensors.torch import load_file

    model = model.to(dtype)
    with tempfile.TemporaryDirectory(prefix="factory-save-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(f))
    return {k: v.contiguous() for k, v in sorted(tensors.items())}


def _write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int) -> None:
    """One file, or ``shards`` files of whole tensors plus the index json real sharded checkpoints carry."""
    from safetensors.torch import save_file

    names = sorted(tensors)
    if shards < 1 or shards > len(names):
        raise ValueError(f"shards={shards} must be between 1 and the tensor count ({len(names)})")
    meta = {"format": "pt"}
    if shards == 1:
        save_file({n: tensors[n] for n in names}, str(out_dir / "model.safetensors"), metadata=meta)
        return
    # Contiguous runs of the sorted names so each shard holds whole tensors and none is empty.
    groups = [list(g) for g in np.array_split(np.array(names, dtype=object), shards)]
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out_dir / fname), metadata=meta)
        for n in group:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- MXFP4

# e2m1 magnitudes indexed by the low three bits of a nibble; bit 3 is the sign (OCP MX spec, and the
# lookup table transformers' integrations/mxfp4.py dequantizes with).
_FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
_FP4_VALUES = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES])
MXFP4_BLOCK = 32


def encode_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w`` (..., K) to MXFP4 blocked along the last axis, the layout of openai/gpt-oss files.

    Returns ``blocks`` uint8 (..., K/32, 16) — element 2j in the low nibble, 2j+1 in the high nibble —
    and ``scales`` uint8 (..., K/32), an e8m0 exponent with bias 127 (value = 2**(scale - 127)).
    The exponent is the smallest one for which the block's max magnitude fits fp4's max of 6.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"encode_mxfp4: last axis {w.shape[-1]} is not a multiple of {MXFP4_BLOCK}")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.ceil(np.log2(amax / 6.0)), -127.0)
    exp = np.clip(exp, -127, 127).astype(np.int32)
    q = blocks / np.exp2(exp)[..., None].astype(np.float32)
    mag_idx = np.abs(np.abs(q)[..., None] - _FP4_MAGNITUDES).argmin(axis=-1).astype(np.uint8)
    codes = mag_idx | np.where((q < 0) & (mag_idx > 0), 8, 0).astype(np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.astype(np.uint8), (exp + 127).astype(np.uint8)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_mxfp4`: (..., G, 16) uint8 + (..., G) uint8 -> float32 (..., G*32)."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"decode_mxfp4: blocks {blocks.shape} and scales {scales.shape} do not match "
                         f"(expected blocks = scales.shape + ({MXFP4_BLOCK // 2},))")
    vals = np.empty(blocks.shape[:-1] + (MXFP4_BLOCK,), dtype=np.float32)
    vals[..., 0::2] = _FP4_VALUES[blocks & 0x0F]
    vals[..., 1::2] = _FP4_VALUES[blocks >> 4]
    vals *= np.exp2(scales.astype(np.float32) - 127.0)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)


_MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def _to_mxfp4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace gpt-oss expert weights by ``*_blocks``/``*_scales`` as in the original openai checkpoints.

    In memory (and in bf16 files) ``gate_up_proj`` is [E, hidden, 2*inter] and ``down_proj`` [E, inter,
    hidden], i.e. (in, out); the MXFP4 files store (out, in) blocked along ``in``: gate_up blocks are
    [E, 2*inter, hidden/32, 16], down blocks [E, hidden, inter/32, 16].  Gate/up stay interleaved.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            w = t.float().numpy().transpose(0, 2, 1)
            blocks, scales = encode_mxfp4(w)
            out[name + "_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
            out[name + "_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
        else:
            out[name] = t
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------- checkpoint


def make_checkpoint(arch: str, out_dir: Path, *, seed: int = 0, shards: int = 1, mxfp4: bool = False,
                    dtype: str = "bfloat16", **config_overrides: Any) -> Path:
    """Write a tiny checkpoint folder for ``arch`` (see ``ARCHS``) and return ``out_dir``.

    Deterministic: the same arguments give byte-identical files.  ``mxfp4=True`` (gpt_oss only) stores the
    experts as MXFP4 blocks/scales with a ``quantization_config`` like openai/gpt-oss-20b.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} not supported; use one of {sorted(_DTYPES)}")
    if mxfp4 and arch != "gpt_oss":
        raise ValueError(f"mxfp4=True is only meaningful for gpt_oss (got arch={arch!r})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("model*.safetensors"), *out_dir.glob("model.safetensors.index.json")]:
        stale.unlink()  # a rebuild with another shard count must not leave a second copy of the weights
    config = build_config(arch, **config_overrides)
    config.dtype = dtype
    model = _build_model(config, seed)
    tensors = _on_disk_tensors(model, _DTYPES[dtype])
    if mxfp4:
        tensors = _to_mxfp4(tensors)
    tensors = apply_layout(tensors, _recipe(arch).layout, seed)
    _write_safetensors(tensors, out_dir, shards)

    cfg_dict = _config_json(arch, config, config_overrides)
    if mxfp4:
        cfg_dict["quantization_config"] = {"quant_method": "mxfp4",
                                           "modules_to_not_convert": list(_MXFP4_NOT_CONVERTED)}
    _write_json(out_dir / "config.json", cfg_dict)
    tok = special_token_ids()
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": tok[BOS], "eos_token_id": tok[EOS], "pad_token_id": tok[PAD], "do_sample": False,
    })
    make_tokenizer(out_dir)
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_reference(checkpoint_dir: Path, dtype: torch.dtype = torch.float32):
    """The transformers model (eval mode) for a factory folder; MXFP4 experts are dequantized on CPU."""
    import transformers

    checkpoint_dir = Path(checkpoint_dir)
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.get("quantization_config", {}).get("quant_method") == "mxfp4":
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = cls.from_pretrained(str(checkpoint_dir), **kwargs)
    return model.eval()


# --------------------------------------------------------------------------------------------- hub cache


def make_hub_cache(checkpoint_dir: Path, cache_dir: Path, repo_id: str) -> Path:
    """Lay ``checkpoint_dir`` out as huggingface_hub's cache does and return the snapshot folder.

    ``models--{org}--{name}/blobs/<sha256>`` holds the bytes, ``snapshots/<commit>/<file>`` are relative
    symlinks into blobs, and ``refs/main`` names the commit — what ``snapshot_download`` resolves offline.
    The commit hash is derived from the file contents so the layout is deterministic.
    """
    checkpoint_dir, cache_dir = Path(checkpoint_dir), Path(cache_dir)
    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id {repo_id!r} must look like 'org/name'")
    repo_root = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file())
    commit_hash = hashlib.sha1()
    digests = {}
    for p in files:
        digest = _sha256(p)
        rel = p.relative_to(checkpoint_dir).as_posix()
        digests[rel] = digest
        commit_hash.update(f"{rel}\0{digest}\n".encode())
    commit = commit_hash.hexdigest()
    blobs = repo_root / "blobs"
    snapshot = repo_root / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for rel, digest in digests.items():
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(checkpoint_dir / rel, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_root / "refs").mkdir(exist_ok=True)
    (repo_root / "refs" / "main").write_text(commit)
    return snapshot


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

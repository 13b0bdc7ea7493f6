"""Tests of the tiny-checkpoint factory: every other test trusts these folders to look like real checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import factory

PROMPT = torch.arange(4, 16)[None]  # 12 tokens: longer than the sliding window (8)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


# ------------------------------------------------------------------------------------------ every arch


# transformers 5.24's Llama4ForConditionalGeneration.forward fails on any input (it reads image_outputs from the text
# model's output); its text decoder loads as Llama4ForCausalLM, as tests/parity.py loads it for parity
TEXT_ONLY_REFERENCE = {"llama4_vlm"}


@pytest.mark.parametrize("arch", sorted(factory.ARCHS))
def test_every_arch_builds_loads_and_gives_informative_logits(tiny_checkpoint, arch):
    folder = tiny_checkpoint(arch)
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"]:
        assert (folder / name).is_file(), f"{arch}: {name} missing"

    if arch in TEXT_ONLY_REFERENCE:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    else:
        model = factory.load_reference(folder)
    logits = _logits(model)
    assert logits.shape == (1, 12, 512)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3, f"{arch}: logits nearly constant (std {logits.std():.3f})"
    # Positions must not collapse onto one distribution, or parity tests could not see position bugs.
    assert (logits[0] - logits[0, :1]).abs().amax(dim=-1)[1:].min() > 0.1

    tensors = _tensors(folder)
    for name, t in tensors.items():
        assert t.dtype == torch.bfloat16, f"{arch}: {name} stored as {t.dtype}, real checkpoints are bf16"
        if t.ndim <= 1:
            # norms init to 1 (or 0 for 1+w norms), biases/sinks to 0: noise must have moved every element
            vals = t.float()
            assert not torch.isin(vals, torch.tensor([0.0, 1.0])).any(), f"{arch}: {name} not perturbed"
            if t.numel() > 1:
                assert vals.std() > 0.1, f"{arch}: {name} nearly constant"


@pytest.mark.parametrize("arch", sorted(factory.ARCHS))
def test_config_files_match_the_recipe(tiny_checkpoint, arch):
    folder = tiny_checkpoint(arch)
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    gen = json.loads((folder / "generation_config.json").read_text())
    ids = factory.special_token_ids()
    assert cfg["architectures"] == [factory.ARCHS[arch].architecture]
    # phi4_mini: 64-wide heads so that its 0.75 partial rotary (48 dims) is one GroupQueryAttention can do itself;
    # Nemotron: half rotary needs a rotated width of 16; hybrids: 0.25 of a 64-wide head rotates 16 dims
    # GLM-4.5: half rotary of a 32-wide head rotates 16 dims, inside GroupQueryAttention as the real 128-wide heads;
    # DeepSeek: latent attention has a key per query head, and head_dim is the rope width (transformers sets it so)
    shape = {"phi4_mini": (128, 2, 1, 64), "nemotron": (64, 4, 2, 32), "glm4_moe": (64, 4, 2, 32),
             **{name: (64, 4, 4, 16) for name in factory.ARCHS if name.startswith("deepseek")}}.get(
        arch, (64, 4, 2, 64 if arch in HYBRID else 16))
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"],
            text["vocab_size"], text["max_position_embeddings"]) == (*shape, 512, 256)
    assert 2 <= text["num_hidden_layers"] <= 4
    assert gen == {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"],
                   "do_sample": False}
    assert text["bos_token_id"] == ids["<s>"] and text["eos_token_id"] == ids["</s>"]

    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    names = set(_tensors(folder))
    assert any(n.endswith("lm_head.weight") for n in names) == (not tied), f"{arch}: lm_head vs tie mismatch"
    assert tied == (arch.startswith("gemma") or arch in ("qwen2", "qwen3", "granite", "ernie4_5", "phi4_mini",
                                                         "smollm3", "qwen3_vl", "ernie4_5_moe"))

    sliding = {"mistral", "gpt_oss", "gemma2", "gemma3", "gemma3_vlm", "gemma4", "gemma4_moe", "gemma4_vlm", "olmo3",
               "mistral3"}
    if arch in sliding:
        assert text["sliding_window"] == 8
    if arch in sliding - {"mistral", "mistral3"}:
        assert {"sliding_attention", "full_attention"} <= set(text["layer_types"])


HYBRID = ("qwen3_5", "qwen3_5_vlm", "qwen3_5_moe", "qwen3_5_moe_vlm", "qwen3_next")


def test_hybrid_recipes_mix_layer_kinds_and_carry_the_released_layouts(tiny_checkpoint):
    for arch in HYBRID:
        cfg = json.loads((tiny_checkpoint(arch) / "config.json").read_text())
        text = cfg.get("text_config", cfg)
        assert {"linear_attention", "full_attention"} == set(text["layer_types"]), arch
        assert text["linear_num_value_heads"] == 2 * text["linear_num_key_heads"]  # value heads grouped per key head
        names = _tensors(tiny_checkpoint(arch))
        a_logs = [t.float() for n, t in names.items() if n.endswith("linear_attn.A_log")]
        # random per head and per layer (transformers draws A from U(0.01, 16)); dt_bias perturbed from ones
        assert len({tuple(t.tolist()) for t in a_logs}) == len(a_logs) and all(t.std() > 0.1 for t in a_logs)
    moe = _tensors(tiny_checkpoint("qwen3_5_moe_vlm"))
    fused = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert moe[fused].shape == (4, 64, 64) and moe[fused.replace("gate_up", "down")].shape == (4, 64, 32)
    assert not any(".experts.0." in n for n in moe)
    assert any(n.startswith("mtp.") for n in moe) and any(n.startswith("model.visual.") for n in moe)
    nxt = _tensors(tiny_checkpoint("qwen3_next"))
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in nxt and "model.layers.2.mlp.gate_proj.weight" in nxt
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in nxt


def test_moe_recipes_mix_dense_and_sparse_layers(tiny_checkpoint):
    for arch in ("qwen3_moe", "qwen2_moe"):
        names = set(_tensors(tiny_checkpoint(arch)))
        assert "model.layers.0.mlp.gate_proj.weight" in names, f"{arch}: layer 0 should be dense"
        assert not any(n.startswith("model.layers.0.mlp.experts") for n in names)
        assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(4)} <= names
    assert "model.layers.1.mlp.shared_expert_gate.weight" in _tensors(tiny_checkpoint("qwen2_moe"))


def test_rope_variants_are_the_ones_real_checkpoints_use(tiny_checkpoint):
    def rope(arch, **kw):
        cfg = json.loads((tiny_checkpoint(arch, **kw) / "config.json").read_text())
        return cfg.get("text_config", cfg)["rope_parameters"]

    assert rope("gpt_oss")["rope_type"] == "yarn"
    assert {"factor", "beta_fast", "beta_slow", "original_max_position_embeddings"} <= set(rope("gpt_oss"))
    assert rope("gemma3")["full_attention"]["rope_type"] == "linear"
    assert rope("gemma3")["sliding_attention"]["rope_type"] == "default"
    assert rope("qwen3")["rope_type"] == "default"
    assert rope("llama", rope_parameters=factory.LLAMA3_ROPE) == factory.LLAMA3_ROPE
    # The override changes the model's numbers, not only the file (positions 0..11 reach scaled bands).
    base = _logits(factory.load_reference(tiny_checkpoint("llama")))
    scaled = _logits(factory.load_reference(tiny_checkpoint("llama", rope_parameters=factory.LLAMA3_ROPE)))
    assert (base - scaled).abs().max() > 1e-3


def test_gemma4_global_layers_use_the_wider_head(tiny_checkpoint):
    names = _tensors(tiny_checkpoint("gemma4"))
    cfg = json.loads((tiny_checkpoint("gemma4") / "config.json").read_text())
    full = cfg["layer_types"].index("full_attention")
    sliding = cfg["layer_types"].index("sliding_attention")
    assert names[f"model.layers.{full}.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert names[f"model.layers.{sliding}.self_attn.q_proj.weight"].shape == (4 * 16, 64)
    # Released Gemma 4 configs name the wide head global_head_dim; transformers turns it into per_layer_config.
    assert cfg["global_head_dim"] == 32 and cfg["per_layer_config"] == {str(full): {"head_dim": 32}}


def test_multimodal_overrides_go_to_the_text_config(tmp_path):
    folder = factory.make_checkpoint("gemma3_vlm", tmp_path, num_hidden_layers=2,
                                     layer_types=["sliding_attention", "full_attention"])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 2 and "num_hidden_layers" not in cfg
    names = set(_tensors(folder))
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in names
    assert not any(n.startswith("language_model.model.layers.2.") for n in names)
    assert any(n.startswith("vision_tower.") for n in names)
    assert not any(".head." in n for n in names), "Gemma 3's SigLIP tower has no pooling head"


# ------------------------------------------------------------------------------------------ files


def test_shards_hold_whole_tensors_and_the_index_lists_each_once(tiny_checkpoint):
    single, sharded = tiny_checkpoint("qwen3"), tiny_checkpoint("qwen3", shards=3)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())

    seen: dict[str, str] = {}
    total = 0
    for fname in files:
        with safe_open(sharded / fname, "pt") as f:
            keys = list(f.keys())
            assert keys, f"{fname} is empty"
            for k in keys:
                assert k not in seen, f"{k} in both {seen[k]} and {fname}"
                seen[k] = fname
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total
    # Same tensors, same values as the single-file build; and it loads to the same logits.
    whole = _tensors(single)
    assert set(whole) == set(seen)
    assert all(torch.equal(whole[k], v) for k, v in _tensors(sharded).items())
    torch.testing.assert_close(_logits(factory.load_reference(sharded)), _logits(factory.load_reference(single)),
                               rtol=0, atol=0)


def test_builds_are_byte_identical_and_seed_matters(tmp_path):
    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    a = factory.make_checkpoint("gemma2", tmp_path / "a", shards=2)
    b = factory.make_checkpoint("gemma2", tmp_path / "b", shards=2)
    assert digests(a) == digests(b)
    c = factory.make_checkpoint("gemma2", tmp_path / "c", shards=2, seed=1)
    assert digests(c)["model-00001-of-00002.safetensors"] != digests(a)["model-00001-of-00002.safetensors"]
    # Rebuilding into a folder with another shard count leaves no stale weights behind.
    factory.make_checkpoint("gemma2", a, shards=1)
    assert sorted(p.name for p in a.glob("model*")) == ["model.safetensors"]


def test_float16_and_float32_checkpoints(tmp_path):
    folder = factory.make_checkpoint("llama", tmp_path, dtype="float16")
    assert {t.dtype for t in _tensors(folder).values()} == {torch.float16}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"


def test_bad_arguments_say_what_to_do(tmp_path):
    with pytest.raises(KeyError, match="unknown test architecture 'lama'.*'llama'"):
        factory.make_checkpoint("lama", tmp_path)
    with pytest.raises(ValueError, match="mxfp4=True is only meaningful for gpt_oss"):
        factory.make_checkpoint("llama", tmp_path, mxfp4=True)
    with pytest.raises(ValueError, match="dtype='int8' not supported"):
        factory.make_checkpoint("llama", tmp_path, dtype="int8")


def test_recipe_modules_beside_the_factory_are_merged_into_archs(tmp_path, monkeypatch):
    """ARCHS = tests/factory_recipes.py + every tests/factory_<topic>_recipes.py present; a name defined twice is an
    error naming both files."""
    import factory_recipes

    assert factory._recipe_modules()[0] == "factory_recipes"
    assert set(factory.ARCHS) >= set(factory_recipes.ARCHS)
    (tmp_path / "factory_extra_recipes.py").write_text(
        "from factory_recipes import ArchRecipe, cfg\n"
        "ARCHS = {'llama_extra': ArchRecipe('llama', 'LlamaForCausalLM', cfg(num_hidden_layers=1))}\n")
    (tmp_path / "factory_clash_recipes.py").write_text(
        "from factory_recipes import ArchRecipe, cfg\nARCHS = {'llama': ArchRecipe('llama', 'LlamaForCausalLM', cfg())}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(factory, "_recipe_modules", lambda: ["factory_recipes", "factory_extra_recipes"])
    merged = factory._merged_recipes()
    assert merged["llama_extra"].config["num_hidden_layers"] == 1 and merged["llama"] == factory_recipes.ARCHS["llama"]
    monkeypatch.setattr(factory, "_recipe_modules", lambda: ["factory_recipes", "factory_clash_recipes"])
    with pytest.raises(ValueError, match=r"test architecture 'llama' is defined twice: tests/factory_recipes.py and "
                                         r"tests/factory_clash_recipes.py"):
        factory._merged_recipes()


def test_hub_cache_resolves_offline(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    src = tiny_checkpoint("qwen3", shards=2)
    snapshot = factory.make_hub_cache(src, tmp_path / "hub", "tiny-org/qwen3-tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolved = Path(huggingface_hub.snapshot_download("tiny-org/qwen3-tiny", cache_dir=tmp_path / "hub"))
    assert resolved == snapshot
    assert resolved.parent.parent == tmp_path / "hub" / "models--tiny-org--qwen3-tiny"
    assert (resolved.parent.parent / "refs" / "main").read_text() == resolved.name
    for p in src.iterdir():
        link = resolved / p.name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        blob = link.resolve()
        assert blob.parent.name == "blobs" and blob.name == hashlib.sha256(p.read_bytes()).hexdigest()
        assert blob.read_bytes() == p.read_bytes()
    cfg = huggingface_hub.hf_hub_download("tiny-org/qwen3-tiny", "config.json", cache_dir=tmp_path / "hub")
    assert Path(cfg) == resolved / "config.json"


# ------------------------------------------------------------------------------------------ MXFP4


def test_decode_mxfp4_follows_the_ocp_e2m1_table():
    # Hand-written from the OCP MX spec: nibble = sign | e2m1 code; element 2j is the low nibble.
    blocks = np.zeros((2, 16), np.uint8)
    blocks[0, 0] = 0x21       # low: code 1 (+0.5), high: code 2 (+1.0)
    blocks[0, 1] = 0xF7       # low: code 7 (+6.0), high: code 15 (-6.0)
    blocks[1, 0] = 0x9C       # low: code 12 (-2.0), high: code 9 (-0.5)
    scales = np.array([127, 129], np.uint8)  # 2**0 and 2**2
    out = factory.decode_mxfp4(blocks, scales)
    assert out.shape == (64,)
    np.testing.assert_array_equal(out[:4], [0.5, 1.0, 6.0, -6.0])
    np.testing.assert_array_equal(out[32:34], [-8.0, -2.0])
    assert not out[4:32].any() and not out[34:].any()


def test_encode_mxfp4_round_trips_representable_values_and_bounds_the_error():
    rng = np.random.default_rng(0)
    # Representable: fp4 values times a power of two, each block holding +-6 so its exponent is forced.
    codes = rng.integers(0, 16, size=(3, 5, 4, 32))
    exps = rng.integers(-10, 4, size=(3, 5, 4, 1))
    vals = factory._FP4_VALUES[codes]
    vals[..., 0] = np.where(rng.random((3, 5, 4)) < 0.5, 6.0, -6.0)
    w = (vals * np.exp2(exps)).reshape(3, 5, 128).astype(np.float32)
    blocks, scales = factory.encode_mxfp4(w)
    assert blocks.shape == (3, 5, 4, 16) and scales.shape == (3, 5, 4) and blocks.dtype == np.uint8
    np.testing.assert_array_equal(scales, exps[..., 0] + 127)
    np.testing.assert_array_equal(factory.decode_mxfp4(blocks, scales), w)

    # Arbitrary values: nearest-value rounding error is at most half of the widest gap (2 -> 1) per unit scale.
    w = rng.standard_normal((8, 96)).astype(np.float32)
    blocks, scales = factory.encode_mxfp4(w)
    err = np.abs(factory.decode_mxfp4(blocks, scales) - w).reshape(8, 3, 32)
    unit = np.exp2(scales.astype(np.float64) - 127)[..., None]
    assert (err <= unit * 1.0 + 1e-12).all()
    assert (np.abs(w).reshape(8, 3, 32).max(-1) <= 6 * unit[..., 0]).all()
    with pytest.raises(ValueError, match="last axis 40 is not a multiple of 32"):
        factory.encode_mxfp4(np.zeros((2, 40)))


def test_mxfp4_checkpoint_layout_matches_transformers(tiny_checkpoint):
    folder = tiny_checkpoint("gpt_oss", mxfp4=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert "lm_head" in cfg["quantization_config"]["modules_to_not_convert"]
    stored = _tensors(folder)
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in stored)
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 64, 2, 16)  # [E, 2I, H/32, 16]
    assert stored["model.layers.0.mlp.experts.down_proj_blocks"].shape == (4, 64, 1, 16)     # [E, H, I/32, 16]

    model = factory.load_reference(folder)  # transformers dequantizes on CPU with its own lookup table
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            prefix = f"model.layers.{i}.mlp.experts.{proj}"
            ours = factory.decode_mxfp4(stored[prefix + "_blocks"].numpy(), stored[prefix + "_scales"].numpy())
            theirs = getattr(layer.mlp.experts, proj).detach().float().numpy()
            np.testing.assert_array_equal(theirs, ours.transpose(0, 2, 1), err_msg=prefix)
    logits = _logits(model)
    assert torch.isfinite(logits).all() and logits.std() > 0.3

    # And the blocks encode the bf16 build's experts (same seed) in the right orientation: gate_up is square
    # here ([E, 64, 64]), so only values, not shapes, can catch a missing transpose.
    dense = factory.load_reference(tiny_checkpoint("gpt_oss"))
    for proj in ("gate_up_proj", "down_proj"):
        want = getattr(dense.model.layers[1].mlp.experts, proj).detach().float().numpy()
        got = getattr(model.model.layers[1].mlp.experts, proj).detach().float().numpy()
        assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.97, proj


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips_through_onnxruntime_genai(tiny_checkpoint, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    src = tiny_checkpoint("llama")
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    # og.Tokenizer(path) reads genai_config.json first; the tokenizer itself comes from the HF files.
    (folder / "genai_config.json").write_text(json.dumps({
        "model": {"type": "llama", "vocab_size": 512, "context_length": 256, "bos_token_id": 1,
                  "eos_token_id": 2, "pad_token_id": 3,
                  "decoder": {"filename": "model.onnx", "hidden_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "num_hidden_layers": 2, "head_size": 16,
                              "inputs": {"input_ids": "input_ids"}, "outputs": {"logits": "logits"}}},
        "search": {"max_length": 256}}))
    text = "Hello world, the quick brown fox said: 42 apples?! Zebras & ünïcode."
    ids = list(og.Tokenizer(str(folder)).encode(text))
    hf = AutoTokenizer.from_pretrained(str(src))
    assert ids == hf(text).input_ids
    assert og.Tokenizer(str(folder)).decode(np.array(ids, dtype=np.int32)) == text
    assert len(ids) < len(text.encode()) * 0.8, "BPE should merge common English"

    vocab = len(hf)
    assert 300 <= vocab <= 400 and vocab <= 512
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 3)
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    assert json.loads((src / "tokenizer_config.json").read_text())["chat_template"] == factory.CHAT_TEMPLATE

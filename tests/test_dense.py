"""End-to-end tests of the dense Llama-layout families (Llama 2/3, Mistral, Qwen2, Qwen3) against transformers.

What is proved here:
- fp32/cpu exports reproduce transformers fp32 logits within 1e-4 max-abs at every prompt position and for four
  KV-cache decode steps, and onnxruntime-genai's greedy search picks the same 16 tokens as transformers `generate`;
- the features these checkpoints rely on (llama3 rope scaling, Mistral's sliding window) really change the logits,
  so the parity above would catch an exporter that ignored them;
- a sharded checkpoint and a Hub id resolved offline from a cache export byte-identical weights;
- Qwen3's per-head q/k RMSNorm is separate SimplifiedLayerNormalization nodes on cpu and is fed to
  GroupQueryAttention (q_norm_weight/k_norm_weight + qk_norm_epsilon) on cuda; asking for the fused form on cpu
  is a usage error that says why;
- genai_config.json and the tokenizer files carry what onnxruntime-genai needs.

Each model is exported once per module (fixture `exported`) and shared by the tests that read it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import factory
import parity

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32 logits, max-abs; measured errors are ~3e-6
NEW_TOKENS = 16

# case -> (factory architecture, config overrides)
CASES = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", {"rope_parameters": factory.LLAMA3_ROPE}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """case -> checkpoint folder (session-cached by conftest)."""

    return parity.case_checkpoints(tiny_checkpoint, CASES)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """(case, precision, ep, extra...) -> exported model folder, built once per module."""
    return parity.export_cache(checkpoint, tmp_path_factory, "dense")


load_graph, nodes_of, attrs = parity.load_graph, parity.nodes_of, parity.attrs


def consumers(model: onnx.ModelProto, value: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if value in n.input]


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of a checkpoint folder whose config.json has `changes` applied (weights identical)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_cpu_logits_match_transformers(case, checkpoint, exported):
    prompt_err, decode_err, run, full = parity.compare_with_hf(exported(case), checkpoint(case), decode_steps=4)
    assert run.prompt_logits.shape == (len(parity.PROMPT_IDS), 512)
    assert len(run.step_logits) == 4
    # the reference is not degenerate: positions differ from each other by far more than the tolerance
    assert np.ptp(full, axis=0).max() > 100 * TOL
    assert prompt_err <= TOL, f"{case}: prompt logits max-abs {prompt_err:.3g} > {TOL}"
    assert decode_err <= TOL, f"{case}: decode-step logits max-abs {decode_err:.3g} > {TOL}"


@pytest.mark.genai
@pytest.mark.parametrize("case", list(CASES))
def test_genai_greedy_matches_transformers_generate(case, checkpoint, exported):
    expected = parity.hf_greedy(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS, NEW_TOKENS)
    produced = parity.genai_greedy(exported(case), parity.PROMPT_IDS, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert produced == expected


@pytest.mark.parametrize("case, changes", [
    ("llama3_rope", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    ("mistral", {"sliding_window": None}),
])
def test_reference_depends_on_the_feature(case, changes, checkpoint, tmp_path):
    """Control for the parity test: dropping llama3 scaling / the sliding window moves transformers' logits by
    far more than the tolerance, so an export that ignored the feature could not pass."""
    with_feature = parity.hf_logits(parity.load_hf(checkpoint(case)), parity.PROMPT_IDS)
    without = parity.hf_logits(parity.load_hf(with_config(checkpoint(case), tmp_path / "ckpt", **changes)),
                               parity.PROMPT_IDS)
    assert parity.max_abs(with_feature, without) > 1000 * TOL


# --------------------------------------------------------------------------------------------- checkpoints


def test_sharded_checkpoint_exports_identical_bytes(tiny_checkpoint, exported, tmp_path):
    sharded = tiny_checkpoint("llama", shards=3)
    assert len(list(sharded.glob("model-0000?-of-00003.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    single = exported("llama")
    out = parity.export(sharded, tmp_path / "sharded")
    assert (out / "model.onnx.data").read_bytes() == (single / "model.onnx.data").read_bytes()
    assert (out / "model.onnx").read_bytes() == (single / "model.onnx").read_bytes()


def _cli(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_hub_id_exports_offline_from_cache(checkpoint, exported, tmp_path):
    cache = tmp_path / "hf-cache"
    factory.make_hub_cache(checkpoint("qwen3"), cache, "tiny-org/tiny-qwen3")
    out = tmp_path / "from-hub"
    done = _cli(["-m", "tiny-org/tiny-qwen3", "-c", str(cache), "-o", str(out), "-p", "fp32", "-e", "cpu", "-q"],
                HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert (out / "model.onnx.data").read_bytes() == (exported("qwen3") / "model.onnx.data").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (checkpoint("qwen3") / "tokenizer.json").read_bytes()

    missing = _cli(["-m", "tiny-org/not-cached", "-c", str(cache), "-o", str(tmp_path / "nope"), "-q"],
                   HF_HUB_OFFLINE="1")
    assert missing.returncode == 4
    assert missing.stderr.strip() == (
        f"ortbuild: bad checkpoint: tiny-org/not-cached: not in the Hugging Face cache {cache}, and HF_HUB_OFFLINE "
        "is set, so nothing is downloaded. Download it once with HF_HUB_OFFLINE unset, or pass -c with the cache "
        "that holds it. Or pass a local checkpoint folder with -m/-i.")
    assert not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------------------------- q/k norm placement


def test_qwen3_cpu_keeps_separate_per_head_qk_norm(exported):
    model = load_graph(exported("qwen3"))
    gqa = nodes_of(model, "GroupQueryAttention")
    assert len(gqa) == 2
    for i, node in enumerate(gqa):
        assert len(node.input) == 9, list(node.input)  # ends at sin_cache: no q_norm_weight / k_norm_weight
        assert node.input[1] and node.input[2], "cpu feeds separate (normed) q, k and v"
        assert "qk_norm_epsilon" not in attrs(node)
        for which in ("q", "k"):
            users = consumers(model, f"layers.{i}.attn.{which}_norm.weight")
            assert [u.op_type for u in users] == ["SimplifiedLayerNormalization"]
            assert attrs(users[0])["epsilon"] == pytest.approx(1e-6)
            assert attrs(users[0])["axis"] == -1
    # 1 (first layer's input norm) + 2 layers x (q, k)
    assert len(nodes_of(model, "SimplifiedLayerNormalization")) == 5


def _checkpoint_tensor(folder: Path, name: str) -> np.ndarray:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))[name].float().numpy()


def test_qwen3_cuda_fuses_qk_norm_into_gqa(exported, checkpoint):
    fused = exported("qwen3", "fp16", "cuda")
    model = onnx.load(str(fused / "model.onnx"))  # with weights: the norm gammas are checked below
    gqa = nodes_of(model, "GroupQueryAttention")
    assert len(gqa) == 2
    initializers = {t.name: t for t in model.graph.initializer}
    for i, node in enumerate(gqa):
        assert len(node.input) == 16, list(node.input)
        assert node.input[14] == f"layers.{i}.attn.q_norm.weight"
        assert node.input[15] == f"layers.{i}.attn.k_norm.weight"
        assert node.input[1] == node.input[2] == "", "packed QKV goes in unnormed; the op normalises"
        assert attrs(node)["qk_norm_epsilon"] == pytest.approx(1e-6)
        for which in ("q", "k"):
            name = f"layers.{i}.attn.{which}_norm.weight"
            assert [u.op_type for u in consumers(model, name)] == ["GroupQueryAttention"]
            gamma = initializers[name]
            assert gamma.data_type == TensorProto.FLOAT16
            expected = _checkpoint_tensor(checkpoint("qwen3"), f"model.layers.{i}.self_attn.{which}_norm.weight")
            np.testing.assert_array_equal(numpy_helper.to_array(gamma), expected.astype(np.float16))
    assert len(nodes_of(model, "SimplifiedLayerNormalization")) == 1  # only the first layer's input norm
    cpu_ops, cuda_ops = parity.ops_in(exported("qwen3")), parity.ops_in(fused)
    assert cpu_ops["SimplifiedLayerNormalization"] - cuda_ops["SimplifiedLayerNormalization"] == 4
    for op in ("GroupQueryAttention", "MatMul", "SkipSimplifiedLayerNormalization"):
        assert cpu_ops[op] == cuda_ops[op], op


def test_cuda_can_opt_out_of_fused_qk_norm(exported):
    model = load_graph(exported("qwen3", "fp16", "cuda", "fuse_qk_norm_gqa=false"))
    for node in nodes_of(model, "GroupQueryAttention"):
        assert len(node.input) == 9 and "qk_norm_epsilon" not in attrs(node)
    assert len(nodes_of(model, "SimplifiedLayerNormalization")) == 5


def test_fused_qk_norm_on_cpu_is_a_usage_error(checkpoint, tmp_path):
    from builder.errors import UsageError

    message = ("fuse_qk_norm_gqa=true needs -e cuda: ONNX Runtime's CPU GroupQueryAttention rejects the "
               "q_norm_weight/k_norm_weight inputs, so CPU models keep separate norm nodes. Drop the option or export "
               "with -e cuda.")
    with pytest.raises(UsageError) as err:
        parity.export(checkpoint("qwen3"), tmp_path / "out", "fp32", "cpu", ["fuse_qk_norm_gqa=true"])
    assert str(err.value) == message
    assert not (tmp_path / "out").exists()
    done = _cli(["-m", str(checkpoint("qwen3")), "-o", str(tmp_path / "cli"), "-e", "cpu",
                 "--extra_options", "fuse_qk_norm_gqa=true"])
    assert done.returncode == 2
    assert done.stderr.strip() == f"ortbuild: usage error: {message}"


# --------------------------------------------------------------------------------------------- cuda dtypes


@pytest.mark.parametrize("precision, elem", [("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)])
def test_cuda_half_precision_exports_have_half_io(precision, elem, exported):
    model = load_graph(exported("qwen3", precision, "cuda"))
    inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    outputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.output}
    assert inputs.pop("input_ids") == TensorProto.INT64
    assert inputs.pop("attention_mask") == TensorProto.INT64
    assert sorted(inputs) == sorted(f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value"))
    assert set(inputs.values()) == {elem}
    assert sorted(outputs) == sorted(["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")])
    assert set(outputs.values()) == {elem}
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    assert dtypes["layers.0.attn.qkv.weight"] == elem
    assert dtypes["cos_cache"] == elem
    assert len(nodes_of(model, "GroupQueryAttention")) == 2


# --------------------------------------------------------------------------------------------- genai config, tokenizer


def test_genai_config_reads_generation_config(checkpoint, tmp_path):
    src = with_config(checkpoint("qwen3"), tmp_path / "ckpt")
    # generation_config.json wins over config.json for the special tokens (as transformers' generate does)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [2, 7],
                                                             "pad_token_id": 3, "do_sample": False}))
    model = parity.genai_config(parity.export(src, tmp_path / "cpu"))["model"]
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (5, [2, 7], 3)
    assert model["context_length"] == 256
    assert model["vocab_size"] == 512
    assert model["type"] == "qwen3"
    decoder = model["decoder"]
    assert (decoder["head_size"], decoder["hidden_size"]) == (16, 64)
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (4, 2, 2)
    assert decoder["filename"] == "model.onnx"
    assert decoder["session_options"]["provider_options"] == []
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"


def test_genai_config_cuda_provider_options(exported):
    cfg = parity.genai_config(exported("qwen3", "fp16", "cuda"))
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]
    ids = factory.special_token_ids()
    assert (cfg["model"]["bos_token_id"], cfg["model"]["eos_token_id"], cfg["model"]["pad_token_id"]) == \
        (ids["<s>"], ids["</s>"], ids["<pad>"])


@pytest.mark.genai
def test_tokenizer_files_copied_and_usable_by_genai(checkpoint, exported):
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    out, src = exported("qwen2"), checkpoint("qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    text = "Hello! The quick brown fox, 2024."
    # the tokenizers library reading the checkpoint's tokenizer.json is the ground truth (transformers 5 may
    # rebuild a Qwen2 tokenizer from its class instead of the file's pre-tokenizer)
    expected = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    tokenizer = og.Tokenizer(og.Model(str(out)))
    assert tokenizer.encode(text).tolist() == expected
    assert tokenizer.decode(np.array(expected, dtype=np.int32)) == text

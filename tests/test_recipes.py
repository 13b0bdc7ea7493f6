"""Quantization recipes end to end: what each option spelling writes into the graph, and that the result is right.

- bits / block_size / accuracy_level / zero points of every MatMulNBits node, per recipe, read by node name;
- legacy aliases and their decoupled spellings produce byte-identical model.onnx and model.onnx.data;
- int4 parity with fp32 transformers (top-1 agreement), and exactness against transformers running the same
  dequantized weights (accuracy_level 0), which catches any weight stored with the wrong format;
- GatherBlockQuantized embeddings return the dequantized table rows; a tied lm_head reads the same bytes, stored once;
- `ortbuild inspect` / `--dry-run` print the resolved per-weight table and notes without reading a weight.

Tiny models: qwen3 (tied embeddings) and llama (untied), 8 layers, hidden 64, vocab 512.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

import parity
from quant_reference import Fmt, dequantized_model, round_trip

LAYERS = 8
MIXED = {0, LAYERS - 1}  # first/last max(1, 8 // 8) layers
V, H = 512, 64
CKPT = {"num_hidden_layers": LAYERS}


@pytest.fixture(scope="module")
def build(tiny_checkpoint, tmp_path_factory):
    """build(arch, precision, *extra) -> export folder, each recipe exported once per module."""
    cache: dict = {}

    def get(arch: str, precision: str, *extra: str) -> Path:
        key = (arch, precision, extra)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"recipe-{arch}-{precision}") / "model"
            parity.export(tiny_checkpoint(arch, **CKPT), out, precision, "cpu", list(extra))
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """arch -> (continuation tokens, fp32 transformers logits [16, V] for prompt + continuation)."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            model = parity.load_hf(tiny_checkpoint(arch, **CKPT))
            continuation = parity.hf_greedy(model, parity.PROMPT_IDS, 4)
            cache[arch] = continuation, parity.hf_logits(model, parity.PROMPT_IDS + continuation)
        return cache[arch]

    return get


def graph(model_dir: Path) -> onnx.GraphProto:
    return onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph


def nbits_nodes(model_dir: Path) -> dict[str, dict]:
    """MatMulNBits node name -> its attributes, plus 'zero_points': whether the 4th input is wired."""
    nodes = {}
    for node in graph(model_dir).node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            attrs["zero_points"] = len(node.input) > 3 and node.input[3] != ""
            nodes[node.name] = attrs
    return nodes


def layer_of(node_name: str) -> int | None:
    match = re.match(r"/model/layers\.(\d+)/", node_name)
    return int(match.group(1)) if match else None


def onnx_logits(model_dir: Path, continuation: list[int]) -> np.ndarray:
    run = parity.run_onnx(model_dir, parity.PROMPT_IDS, len(continuation), feed_tokens=continuation)
    return np.concatenate([run.prompt_logits, np.stack(run.step_logits)])


# ------------------------------------------------------------------------------------------- bits per node

# (precision, extra, lm_head 8-bit, mixed layers 8-bit, block, accuracy_level, zero points at 4 bits, at 8 bits)
BITS_RECIPES = {
    "int4": ("int4", (), False, False, 32, 4, False, False),
    "int4+last": ("int4", ("last_matmul_weight_int8=true",), True, False, 32, 4, False, False),
    "int4+mixed": ("int4", ("int8_mixed_layers=true",), False, True, 32, 4, False, False),
    "rtn asym b64 acc1 +last+mixed": ("int4", ("int4_algo_config=rtn", "int4_is_symmetric=false", "int4_block_size=64",
                                               "int4_accuracy_level=1", "last_matmul_weight_int8=true",
                                               "int8_mixed_layers=true"), True, True, 64, 1, True, True),
    "k_quant+mixed": ("int4", ("int4_algo_config=k_quant", "int8_mixed_layers=true"), False, True, 32, 4, True, False),
    "int8": ("int8", (), True, True, 32, 4, False, False),
    "int8 b16 asym": ("int8", ("int4_block_size=16", "int4_is_symmetric=false"), True, True, 16, 4, False, True),
}


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("recipe", sorted(BITS_RECIPES))
def test_each_matmul_carries_the_planned_format(build, arch, recipe):
    precision, extra, last, mixed, block, level, zp4, zp8 = BITS_RECIPES[recipe]
    nodes = nbits_nodes(build(arch, precision, *extra))
    assert len(nodes) == 4 * LAYERS + 1, sorted(nodes)  # qkv, o, gate_up, down per layer + lm_head
    assert "/model/lm_head/MatMulNBits" in nodes
    for name, attrs in nodes.items():
        layer = layer_of(name)
        eight = precision == "int8" or (last if layer is None else (mixed and layer in MIXED))
        assert attrs["bits"] == (8 if eight else 4), name
        assert attrs["block_size"] == block, name
        assert attrs["accuracy_level"] == level, name
        assert attrs["zero_points"] == (zp8 if eight else zp4), name


# ------------------------------------------------------------------------------------------------- aliases

ALIAS_SPELLINGS = {
    "rtn_last": [("int4_algo_config=rtn", "last_matmul_weight_int8=true"),
                 ("int4_algo_config=rtn", "matmul_mixed_precision=last_matmul:int8")],
    "k_quant_last": [("int4_algo_config=k_quant", "last_matmul_weight_int8=true"),
                     ("int4_algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8")],
    "k_quant_mixed": [("int4_algo_config=k_quant", "last_matmul_weight_int8=true", "int8_mixed_layers=true"),
                      ("int4_algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8")],
    "k_quant_linear": [("int4_algo_config=k_quant", "int8_linear_attn=true"),
                       ("int4_algo_config=k_quant", "matmul_mixed_precision=linear_attn:int8")],
}


def files(model_dir: Path) -> tuple[bytes, bytes]:
    return (model_dir / "model.onnx").read_bytes(), (model_dir / "model.onnx.data").read_bytes()


@pytest.mark.parametrize("alias", sorted(ALIAS_SPELLINGS))
def test_alias_and_decoupled_spellings_write_identical_bytes(build, alias):
    legacy = files(build("qwen3", "int4", f"int4_algo_config={alias}"))
    for spelling in ALIAS_SPELLINGS[alias]:
        assert files(build("qwen3", "int4", *spelling)) == legacy, spelling
    base = "rtn" if alias.startswith("rtn") else "k_quant"
    base_only = files(build("qwen3", "int4", f"int4_algo_config={base}"))
    if alias == "k_quant_linear":
        assert base_only == legacy  # no family has linear attention: the flag changes nothing (and says so)
    else:
        assert base_only[1] != legacy[1]  # the flags did change the weights


# ------------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_int4_top1_agrees_with_fp32_transformers_at_most_positions(build, reference, arch):
    continuation, full = reference(arch)
    ours = onnx_logits(build(arch, "int4"), continuation)
    agree = int(np.sum(ours.argmax(-1) == full.argmax(-1)))
    print(f"{arch} int4 default: top-1 agreement {agree}/{len(full)}, max abs {np.max(np.abs(ours - full)):.3f}")
    assert agree >= 9, f"{agree}/{len(full)}"  # measured 12/16 on both models (quantization.md)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_int8_is_close_to_fp32_transformers(build, reference, arch):
    continuation, full = reference(arch)
    ours = onnx_logits(build(arch, "int8"), continuation)
    agree = int(np.sum(ours.argmax(-1) == full.argmax(-1)))
    err = float(np.max(np.abs(ours - full)))
    print(f"{arch} int8: top-1 agreement {agree}/{len(full)}, max abs {err:.3f}")
    assert err < 0.3 and agree >= 12  # measured 0.12-0.16 and 14-15/16 (logits reach |3|)


def mixed_k_quant(kind, layer):
    if kind == "embed":
        return Fmt(None)
    if kind == "lm_head" or layer in MIXED:
        return Fmt(8, "rtn", 32, True)
    return Fmt(4, "k_quant", 32, False)


# (arch, precision, extra, formats written from the recipe's documented meaning)
EXACT = {
    "default": ("qwen3", "int4", (), lambda k, l: Fmt(4)),  # tied: embedding and head share one int4 table
    "float tied embed": ("qwen3", "int4", ("quantize_embeddings=false",),
                         lambda k, l: Fmt(None) if k == "embed" else Fmt(4)),
    "k_quant_mixed": ("qwen3", "int4", ("int4_algo_config=k_quant_mixed",), mixed_k_quant),
    "rtn asym b16 untied": ("llama", "int4", ("int4_algo_config=rtn", "int4_is_symmetric=false", "int4_block_size=16"),
                            lambda k, l: Fmt(None) if k == "embed" else Fmt(4, "rtn", 16, False)),
    "tied shared embed int4": ("qwen3", "int4", ("quantize_embeddings=true",), lambda k, l: Fmt(4)),
    "tied shared embed int8 (last)": ("qwen3", "int4", ("quantize_embeddings=true", "last_matmul_weight_int8=true"),
                                      lambda k, l: Fmt(8, "rtn") if k in ("embed", "lm_head") else Fmt(4)),
    "untied embed padded block": ("llama", "int4", ("quantize_embeddings=true", "int4_block_size=128",
                                                    "int4_is_symmetric=false"),
                                  lambda k, l: Fmt(4, "default", 128, False)),
    "int8 asym": ("qwen3", "int8", ("int4_is_symmetric=false",),
                  lambda k, l: Fmt(None) if k == "embed" else Fmt(8, "rtn", 32, False)),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_export_equals_transformers_with_the_same_dequantized_weights(build, tiny_checkpoint, reference, case):
    arch, precision, extra, fmt_of = EXACT[case]
    continuation, _ = reference(arch)
    ours = onnx_logits(build(arch, precision, *extra, "int4_accuracy_level=0"), continuation)
    expected = parity.hf_logits(dequantized_model(tiny_checkpoint(arch, **CKPT), fmt_of),
                                parity.PROMPT_IDS + continuation)
    assert np.max(np.abs(ours - expected)) < 1e-4  # measured ~3e-6; a wrong format gives > 0.05


# ---------------------------------------------------------------------------------------- quantized embedding


def embedding_output(model_dir: Path, ids: list[int]) -> np.ndarray:
    """Run the export with the embedding scope's last output exposed (external data stays next to the model)."""
    import onnxruntime as ort

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    last = [n for n in model.graph.node if n.name.startswith("/model/embed_tokens/")][-1]
    model.graph.output.append(onnx.helper.make_tensor_value_info(last.output[0], onnx.TensorProto.FLOAT, None))
    probe = model_dir / "probe_embedding.onnx"
    onnx.save(model, str(probe))
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)  # empty KV cache
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    feed.update(input_ids=np.array([ids], np.int64), attention_mask=np.ones((1, len(ids)), np.int64))
    return session.run([last.output[0]], feed)[0][0]


@pytest.fixture(scope="module")
def embedding_table(tiny_checkpoint):
    """arch -> the checkpoint's embedding table as float32 [V, H], read straight from the safetensors file."""
    from safetensors import safe_open

    def get(arch: str) -> np.ndarray:
        (path,) = tiny_checkpoint(arch, **CKPT).glob("*.safetensors")
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("model.embed_tokens.weight").float().numpy()

    return get


@pytest.mark.parametrize("arch, extra, fmt, padded", [
    ("qwen3", (), Fmt(4, "default", 32, True), 64),
    ("llama", ("int4_algo_config=rtn", "int4_is_symmetric=false", "int4_block_size=128"),
     Fmt(4, "rtn", 128, False), 128),
    ("llama", ("int4_algo_config=k_quant", "int4_block_size=16"), Fmt(4, "k_quant", 16, False), 64),
])
def test_gather_block_quantized_returns_dequantized_rows(build, embedding_table, arch, extra, fmt, padded):
    model_dir = build(arch, "int4", "quantize_embeddings=true", *extra)
    g = graph(model_dir)
    (node,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"gather_axis": 0, "quantize_axis": 1, "block_size": fmt.block_size, "bits": 4}
    shapes = {t.name: list(t.dims) for t in g.initializer}
    assert shapes[node.input[0]] == [V, padded // 2]  # uint8, two codes per byte, K padded to whole blocks
    assert shapes[node.input[2]] == [V, padded // fmt.block_size]
    assert (len(node.input) == 4) == (not fmt.symmetric)
    floats = [t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [V, H]]
    assert floats == []  # no float copy of the table left behind
    ids = [0, 5, 17, 511, 5, 300]
    got = embedding_output(model_dir, ids)
    assert got.shape == (len(ids), H)
    np.testing.assert_allclose(got, round_trip(embedding_table(arch), fmt)[ids], rtol=0, atol=1e-6)


def total_bytes(model_dir: Path) -> int:
    return sum((model_dir / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))


def test_tied_lm_head_reads_the_embedding_bytes_stored_once(build):
    shared = build("qwen3", "int4")  # the default for a tied 4-bit head (same as quantize_embeddings=true)
    plain = build("qwen3", "int4", "quantize_embeddings=false")
    g = graph(shared)
    producers = {out: n for n in g.node for out in n.output}
    (gather,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in g.node if n.name == "/model/lm_head/MatMulNBits"]
    reshape = producers[head.input[1]]
    assert reshape.op_type == "Reshape" and reshape.input[0] == gather.input[0]
    assert head.input[2] == gather.input[2]  # same scales initializer
    assert not [t.name for t in g.initializer if t.name.startswith("lm_head")]
    # plain stores a float table (V*H*4 bytes) plus the head's own int4 codes and scales; shared stores only the int4
    # codes and scales once. Storing them twice would leave V*H/2 + V*(H/32)*4 = 20 KiB more.
    saved = total_bytes(plain) - total_bytes(shared)
    assert abs(saved - V * H * 4) < 1024, saved


def test_tied_shared_table_takes_the_8_bit_lm_head_format(build):
    g = graph(build("qwen3", "int4", "quantize_embeddings=true", "last_matmul_weight_int8=true"))
    (gather,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    assert {a.name: a.i for a in gather.attribute}["bits"] == 8
    shapes = {t.name: list(t.dims) for t in g.initializer}
    assert shapes[gather.input[0]] == [V, H]  # 8-bit codes: one byte each


# ------------------------------------------------------------------------------------------------------ CLI


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    from builder.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def plan_rows(text: str) -> dict[str, str]:
    rows = text.split("plan:\n", 1)[1].splitlines()
    return dict(re.match(r"^  (\S+(?: \(tied\))?)\s{2,}(.+)$", row).groups() for row in rows)


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Make any read of tensor data fail, so a command that succeeds provably decided everything from headers."""
    from builder.checkpoint import TensorRef

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"tensor {self.name} was read")

    monkeypatch.setattr(TensorRef, "read", refuse)


def test_inspect_prints_the_resolved_table_before_reading_weights(capsys, tiny_checkpoint, no_weight_reads):
    ckpt = tiny_checkpoint("qwen3", **CKPT)
    code, out, err = run_cli(capsys, ["inspect", "-m", str(ckpt), "-p", "int4", "--extra_options",
                                      "int4_algo_config=k_quant_mixed", "quantize_embeddings=true"])
    assert code == 0, err
    assert "note: int4_algo_config=k_quant_mixed is deprecated; it means int4_algo_config=k_quant " \
           "last_matmul_weight_int8=true int8_mixed_layers=true." in out
    rows = plan_rows(out)
    assert rows["embed"] == "int8 rtn block 32 sym (GatherBlockQuantized)"
    assert rows["lm_head (tied)"] == "int8 rtn block 32 sym (reads the embed bytes)"
    for i in range(LAYERS):
        for proj in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"):
            want = "int8 rtn block 32 sym" if i in MIXED else "int4 k_quant block 32 asym"
            assert rows[f"layers.{i}.{proj}"] == want, (i, proj)
    assert len(rows) == 2 + 4 * LAYERS


def test_dry_run_reports_options_with_no_target_and_writes_nothing(capsys, tiny_checkpoint, tmp_path,
                                                                   no_weight_reads):
    ckpt, out_dir = tiny_checkpoint("qwen3", **CKPT), tmp_path / "out"
    code, out, err = run_cli(capsys, ["-m", str(ckpt), "-o", str(out_dir), "-p", "int4", "--dry-run",
                                      "--extra_options", "int8_linear_attn=true"])
    assert code == 0, err
    assert "note: int8_linear_attn has no target: Qwen3ForCausalLM has no linear-attention layers" in out
    assert set(plan_rows(out).values()) == {"int4 default block 32 sym (GatherBlockQuantized)",
                                            "int4 default block 32 sym (reads the embed bytes)",
                                            "int4 default block 32 sym"}
    code, out, err = run_cli(capsys, ["-m", str(ckpt), "-o", str(out_dir), "-p", "fp32", "--dry-run",
                                      "--extra_options", "quantize_embeddings=true"])
    assert code == 0, err
    assert "note: -p fp32 keeps every weight in float; ignoring quantize_embeddings." in out
    assert not out_dir.exists()


def test_export_prints_the_deprecation_note(capsys, tiny_checkpoint, tmp_path):
    code, out, err = run_cli(capsys, ["-m", str(tiny_checkpoint("qwen3", **CKPT)), "-o", str(tmp_path / "m"),
                                      "-p", "int4", "--extra_options", "int4_algo_config=rtn_last"])
    assert code == 0, err
    assert "note: int4_algo_config=rtn_last is deprecated; it means int4_algo_config=rtn " \
           "last_matmul_weight_int8=true." in err


def test_unknown_method_is_a_usage_error_listing_the_methods(capsys, tiny_checkpoint, tmp_path):
    code, out, err = run_cli(capsys, ["-m", str(tiny_checkpoint("qwen3", **CKPT)), "-o", str(tmp_path / "m"),
                                      "-p", "int4", "--extra_options", "int4_algo_config=awq"])
    assert code == 2
    assert "int4_algo_config='awq' is not allowed; choose one of: default, rtn, k_quant" in err
    assert not (tmp_path / "m").exists()

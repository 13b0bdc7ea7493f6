"""lm_head_prepacked: on CUDA a 4-bit lm_head with its own table is stored in ONNX Runtime's fpA_intB (CUTLASS SM80)
layout with weight_prepacked=1 (measured on an H200: the same logits, a faster head GEMV; README "Performance").

The bytes are checked against builder/quant/cuda_layout.py's prepack_for_cuda, which tests/test_quant_moe.py holds to
ONNX Runtime's own packer; the GPU run is scripts/gpu_speed_driver.py's variant steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.errors import UsageError
from builder.export import export
from builder.quant.cuda_layout import prepack_for_cuda, prepack_matmul_nbits_blocks, unprepack_from_cuda
from builder.quant.moe import QuantizedExperts
from builder.runtime import cuda_only_features

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from graph_twin import make_twin, read_initializer  # noqa: E402


def _head(folder):
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    weights = {i.name: read_initializer(folder, i) for i in model.graph.initializer}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return node, attrs, weights


def _prepacked_nodes(folder):
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return [n.name for n in graph.node if any(a.name == "weight_prepacked" and a.i == 1 for a in n.attribute)]


@pytest.fixture(scope="module")
def llama_heads(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    ckpt = tiny_checkpoint("llama")  # untied, vocab 512, hidden 64
    return {name: export(str(ckpt), root / name, "int4", "cuda", extra)
            for name, extra in (("auto", []), ("plain", ["lm_head_prepacked=false"]))}


def test_untied_cuda_int4_head_is_stored_prepacked_with_the_same_codes(llama_heads):
    node, attrs, weights = _head(llama_heads["auto"])
    plain_node, plain_attrs, plain_weights = _head(llama_heads["plain"])
    assert attrs["weight_prepacked"] == 1 and "weight_prepacked" not in plain_attrs
    assert _prepacked_nodes(llama_heads["auto"]) == ["/model/lm_head/MatMulNBits"]  # the head alone
    packed, raw = weights[node.input[1]], plain_weights[plain_node.input[1]]
    n, k = attrs["N"], attrs["K"]
    assert packed.shape == raw.shape == (n, k // 32, 16)  # the schema shape, as ORT's cuda_quantizer keeps it
    expected = prepack_for_cuda(QuantizedExperts(packed=raw.reshape(1, n, -1), scales=np.empty((1, n)), bits=4,
                                                 block_size=32), arch=80)
    assert np.array_equal(packed.reshape(-1), expected.reshape(-1))
    assert np.array_equal(unprepack_from_cuda(packed.reshape(1, k, -1), n=n, k=k, bits=4, arch=80)[0],
                          raw.reshape(n, -1))
    assert np.array_equal(weights[node.input[2]], plain_weights[plain_node.input[2]])  # scales as they are


def test_graph_twin_prepacks_a_plain_head_to_the_exporters_bytes(llama_heads, tmp_path):
    """scripts/graph_twin.py (the GPU experiment that measured the layout) writes what the exporter now writes."""
    figures = make_twin("prepack_lm_head", llama_heads["plain"], tmp_path / "twin")
    assert figures["prepacked"] == ["/model/lm_head/MatMulNBits"] and figures["skipped"] == {}
    twin_node, twin_attrs, twin_weights = _head(tmp_path / "twin")
    node, attrs, weights = _head(llama_heads["auto"])
    assert twin_attrs == attrs
    assert np.array_equal(twin_weights[twin_node.input[1]], weights[node.input[1]])
    # ORT's CPU MatMulNBits reads the prepacked bytes as plain ones: the twin's logits check catches that
    from graph_twin import compare

    wrong = compare(llama_heads["plain"], tmp_path / "twin", tokens=8, providers=("CPUExecutionProvider",))
    assert wrong["max_abs_diff"] > 0.1


def test_inspect_names_the_layout(tiny_checkpoint):
    from builder.export import prepare
    from builder.report import plan_rows

    rows = {name: text for name, text, _ in plan_rows(prepare(str(tiny_checkpoint("llama")), "int4", "cuda"))}
    assert rows["lm_head"] == "int4 default block 32 sym (CUDA fpA_intB layout: lm_head_prepacked)"
    rows = {name: text for name, text, _ in plan_rows(prepare(str(tiny_checkpoint("llama")), "int4", "cpu"))}
    assert rows["lm_head"] == "int4 default block 32 sym"


def test_prepacked_head_needs_cuda_and_onnxruntime_1_31(llama_heads):
    assert cuda_only_features(llama_heads["auto"] / "model.onnx", "cuda") == [
        "MatMulNBits weights in the CUDA prepacked (fpA_intB) layout (the CPU kernel would read them as raw weights)"]
    assert cuda_only_features(llama_heads["plain"] / "model.onnx", "cuda") == []
    made = {name: json.loads((folder / "ortbuild.json").read_text()) for name, folder in llama_heads.items()}
    assert (made["auto"]["lm_head_prepacked"], made["plain"]["lm_head_prepacked"]) == (True, False)
    requires = made["auto"]["requires"]
    assert requires["onnxruntime"] == "1.31"
    assert requires["because"][0] == "MatMulNBits weight in the CUDA prepacked layout (onnxruntime 1.31)"
    assert json.loads((llama_heads["plain"] / "ortbuild.json").read_text())["requires"]["onnxruntime"] != "1.31"


def test_blocks_of_any_row_count_stream_to_the_whole_matrix_bytes():
    rng = np.random.default_rng(3)
    n, k = 192, 192
    raw = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    whole = prepack_for_cuda(QuantizedExperts(packed=raw[None], scales=np.empty((1, n)), bits=4, block_size=32),
                             arch=80).reshape(-1)
    cuts = [0, 3, 8, 9, 40, 77, 192]  # blocks of 3, 5, 1, 31, 37, 115 rows: none a multiple of the 64-row group
    blocks = [raw[a:b].reshape(b - a, k // 32, 16) for a, b in zip(cuts, cuts[1:])]
    streamed = list(prepack_matmul_nbits_blocks(iter(blocks), n, k, 4))
    assert [len(b) for b in streamed] == [64, 128]  # whole 64-row groups, emitted as soon as they are complete
    assert np.array_equal(np.concatenate([b.reshape(-1) for b in streamed]), whole)
    with pytest.raises(ValueError, match="prepack_matmul_nbits_blocks: 6 rows are not a multiple of 64"):
        list(prepack_matmul_nbits_blocks(iter([raw[:6]]), 6, k, 4))


@pytest.mark.parametrize("arch, precision, ep, extra, prepacked", [
    ("llama", "int4", "cpu", [], False),  # a CUDA layout
    ("qwen3", "int4", "cuda", [], False),  # tied: the head reads the embedding's table
    ("qwen3", "int4", "cuda", ["quantize_embeddings=false"], True),  # tied, but the head has its own table
    ("llama", "int4", "cuda", ["int4_block_size=64"], False),
    ("llama", "int4", "cuda", ["int4_is_symmetric=false"], False),
    ("llama", "int4", "cuda", ["last_matmul_weight_int8=true"], False),
    ("llama", "int8", "cuda", [], False),
    ("llama", "fp16", "cuda", [], False),
])
def test_the_head_is_prepacked_where_the_fpa_intb_kernel_takes_it(tiny_checkpoint, tmp_path, arch, precision, ep,
                                                                  extra, prepacked):
    out = export(str(tiny_checkpoint(arch)), tmp_path / "m", precision, ep, extra)
    assert bool(_prepacked_nodes(out)) == prepacked


@pytest.mark.parametrize("extra, why", [
    (["int4_block_size=64"], "block size 64 (onnxruntime-gpu 1.31's prepacked MatMulNBits takes 32)"),
    ([], "it is a CUDA execution provider layout (-e cuda)"),
])
def test_asking_for_a_prepacked_head_where_it_cannot_apply_says_why(tiny_checkpoint, tmp_path, extra, why):
    ep = "cpu" if not extra else "cuda"
    with pytest.raises(UsageError) as exc:
        export(str(tiny_checkpoint("llama")), tmp_path / "m", "int4", ep, ["lm_head_prepacked=true", *extra])
    assert str(exc.value) == (f"lm_head_prepacked=true cannot apply to LlamaForCausalLM -p int4 -e {ep}: {why}. "
                              "Drop the option.")
    assert not (tmp_path / "m").exists()

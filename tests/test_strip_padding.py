"""scripts/strip_padding.py: the twin without the padding reorder gives the export's exact logits for an unpadded
prompt + decode steps, has none of the reorder's ops, and refuses what it cannot strip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import batching
import parity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import strip_padding  # noqa: E402

CASES = {"qwen3": "dense", "qwen3_5": "hybrid"}  # the hybrid keeps token_mask / token_count (its layers read them)


@pytest.fixture(scope="module")
def twins(tiny_checkpoint, tmp_path_factory):
    built = {}

    def get(arch: str):
        if arch not in built:
            folder = parity.export(tiny_checkpoint(arch), tmp_path_factory.mktemp(f"strip-{arch}") / "model")
            twin = folder.parent / "nopad"
            built[arch] = folder, twin, strip_padding.strip_folder(folder, twin)
        return built[arch]

    return get


def _names(folder: Path) -> dict[str, str]:
    return {n.name: n.op_type for n in parity.load_graph(folder).graph.node}


@pytest.mark.parametrize("arch", list(CASES))
def test_twin_gives_the_same_logits_unpadded(twins, arch):
    folder, twin, _ = twins(arch)
    a, b = parity.run_onnx(folder, decode_steps=5), parity.run_onnx(twin, decode_steps=5)
    assert a.step_tokens == b.step_tokens
    assert parity.max_abs(a.prompt_logits, b.prompt_logits) == 0.0
    assert max(parity.max_abs(x, y) for x, y in zip(a.step_logits, b.step_logits)) == 0.0


@pytest.mark.parametrize("arch", list(CASES))
def test_twin_lacks_the_reorder_and_nothing_else(twins, arch):
    folder, twin, figures = twins(arch)
    before, after = _names(folder), _names(twin)
    for op in strip_padding.PERMUTATION_OPS:
        assert op in before.values(), op  # control: the export has them
        assert op not in after.values(), op
    removed = set(before) - set(after)
    assert set(after) <= set(before)
    assert removed and all(name.startswith(("/model/padding/", "/model/padding_restore/")) for name in removed)
    assert figures["nodes_before"] - figures["nodes_after"] == len(removed)
    kept = [name for name in after if name.startswith("/model/padding")]
    if CASES[arch] == "dense":
        assert not kept  # everything of the bundle but seqlens_k / total_sequence_length served the permutation
    else:
        assert kept and figures["kept_padding_nodes"]
    meta = {p.key: p.value for p in parity.load_graph(twin).metadata_props}
    assert "unpadded" in meta[strip_padding.METADATA_KEY]
    data = folder / "model.onnx.data"
    assert (twin / "model.onnx.data").stat().st_ino == data.stat().st_ino  # shared, not copied
    assert (twin / "genai_config.json").is_file() and (twin / "tokenizer.json").is_file()


def test_twin_is_wrong_for_left_padding(twins):
    """Control: the reorder is what makes a left-padded batch exact; the twin, without it, is not."""
    folder, twin, _ = twins("qwen3")
    prompts = batching.PROMPTS[:2]
    feed = [[7, 8], [9, 10]]
    errors = {}
    for name, model in (("export", folder), ("twin", twin)):
        batch = batching.run_onnx_batch(model, prompts, "left", feed)
        solos = [batching.run_onnx_solo(model, p, f) for p, f in zip(prompts, feed)]
        errors[name] = batching.batch_vs_solo(batch, solos)
    assert max(errors["export"]) < 1e-4, errors
    assert max(errors["twin"]) > 1e-2, errors


def test_refuses_a_stripped_model_and_existing_output(twins, capsys, tmp_path):
    _, twin, _ = twins("qwen3")
    assert strip_padding.main([str(twin), str(tmp_path / "again")]) == 2
    assert "already stripped (ortbuild.padding in its metadata)" in capsys.readouterr().err
    assert strip_padding.main([str(twins("qwen3")[0]), str(twin)]) == 2
    assert "exists (pass --overwrite to replace it)" in capsys.readouterr().err


def test_refuses_a_graph_without_the_reorder(twins):
    folder, _, _ = twins("qwen3")
    model = parity.load_graph(folder)
    (scatter,) = parity.nodes_of(model, "ScatterElements")
    scatter.input[0] = scatter.output[0] + "_elsewhere"  # not the reorder of input_ids any more
    with pytest.raises(strip_padding.CannotStrip, match=r"expected one ScatterElements\(input_ids, rank, input_ids\)"):
        strip_padding.strip_graph(model)
    assert len(parity.nodes_of(model, "GatherND")) == 1  # nothing was changed before refusing


def test_graph_twin_lm_head_matmul_gives_the_same_logits(twins):
    """scripts/graph_twin.py's float-head rewrite (FusedMatMul transB=1 -> MatMul over a Transpose that ONNX Runtime
    folds at load) computes the export's logits: the measured GPU difference is layout only."""
    import graph_twin

    folder, _, _ = twins("qwen3")
    twin = folder.parent / "lmmm"
    figures = graph_twin.make_twin("lm_head_matmul", folder, twin)
    assert figures["rewrite"] == "lm_head_matmul" and figures["table"] == "embed.weight"
    ops = _names(twin)
    assert ops["/model/lm_head/FusedMatMul"] == "MatMul" and ops["/model/lm_head/FusedMatMul/Transpose"] == "Transpose"
    a, b = parity.run_onnx(folder, decode_steps=3), parity.run_onnx(twin, decode_steps=3)
    assert a.step_tokens == b.step_tokens
    assert parity.max_abs(a.prompt_logits, b.prompt_logits) == 0.0
    assert max(parity.max_abs(x, y) for x, y in zip(a.step_logits, b.step_logits)) == 0.0
    # the driver's on-device check of a twin says the same (here on the CPU EP, the only one this machine has)
    assert graph_twin.compare(folder, twin, tokens=16, providers=("CPUExecutionProvider",)) == {
        "max_abs_diff": 0.0, "relative": 0.0, "argmax_agree": "16/16"}

"""Every checkpoint tensor is read by the graph, left out on purpose (and said so), or refused; tied heads follow
transformers.

- A tensor a family maps but no layer reads (a bias the config switches off, an o_proj bias on an architecture
  without one) is an error naming the checkpoint tensor, exactly like a tensor no mapping knows: proven where the
  graph reads (WeightMap.get), not where the family maps.
- Tensors a family leaves out by declaration (vision towers, k/v of KV-sharing layers, an identical copy of a tied
  head) are named in the progress output.
- tie_word_embeddings=true with a stored lm_head.weight that differs from the embedding: transformers 5 keeps the two
  untied (and warns); so does the export, and `ortbuild verify` passes in fp32. A head stored alone serves as the
  embedding too, as transformers swaps it in.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import parity
from builder.cli import main

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def copy_with(src: Path, dst: Path, config: dict | None = None, drop: tuple[str, ...] = (), **tensors) -> Path:
    """A copy of a single-file checkpoint with config fields changed, tensors dropped or added/replaced."""
    shutil.copytree(src, dst)
    data = {k: v for k, v in load_file(str(dst / "model.safetensors")).items() if k not in drop}
    data.update(tensors)
    save_file(data, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def export_notes(capsys, ckpt: Path, out: Path, *extra: str) -> list[str]:
    code, _, err = run_cli(capsys, "-m", str(ckpt), "-o", str(out), *extra)
    assert code == 0, err
    return [line.split("note: ", 1)[1] for line in err.splitlines() if "note: " in line]


# ------------------------------------------------------------------------------------- mapped but never read


@pytest.mark.parametrize("arch, config, unread", [
    # Llama maps q/k/v/o biases; attention_bias=false switches the layer's bias reads off
    ("llama_bias", {"attention_bias": False}, "model.layers.0.self_attn.q_proj.bias (as layers.0.attn.q.bias)"),
    # Qwen2 has q/k/v biases by architecture but never an o_proj bias: a stored one would vanish
    ("qwen2_o_bias", {}, "model.layers.0.self_attn.o_proj.bias (as layers.0.attn.o.bias)"),
])
def test_a_mapped_tensor_no_layer_reads_is_refused(arch, config, unread, tiny_checkpoint, tmp_path, capsys):
    if arch == "llama_bias":
        ckpt = copy_with(tiny_checkpoint("llama", attention_bias=True), tmp_path / "ckpt", config)
        count = 8  # q, k, v, o biases of two layers
    else:
        src = tiny_checkpoint("qwen2")
        bias = np.full(64, 0.5, np.float32)
        ckpt = copy_with(src, tmp_path / "ckpt", **{f"model.layers.{i}.self_attn.o_proj.bias": bias for i in (0, 1)})
        count = 2
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-m", str(ckpt), "-o", str(out), "-q")
    assert code == 4, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{count} checkpoint tensor(s) were mapped but not read by the graph: " in err
    assert unread in err and "refusing to write a model that silently drops weights" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------- left out on purpose


def test_vision_tower_is_named_in_the_progress_output(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("gemma3_vlm")
    vision = sorted(n for n in load_file(str(ckpt / "model.safetensors")) if "vision_tower" in n or "projector" in n)
    notes = export_notes(capsys, ckpt, tmp_path / "out")
    said = [n for n in notes if n.startswith("not exported: the vision") and f"({len(vision)} tensors: " in n]
    assert len(said) == 1, notes
    assert vision[0] in said[0] and f"and {len(vision) - 3} more" in said[0]


def test_stored_kv_of_a_kv_sharing_layer_is_left_out_by_name(tiny_checkpoint, tmp_path, capsys):
    """transformers ignores k/v projections stored for layers that reuse another layer's cache; so do we, aloud."""
    from test_gemma import GEMMA4_ALL

    src = tiny_checkpoint("gemma4", **GEMMA4_ALL)
    stray = {"model.layers.4.self_attn.k_proj.weight": np.zeros((32, 64), np.float32)}  # layer 4 reuses layer 1
    notes = export_notes(capsys, copy_with(src, tmp_path / "ckpt", **stray), tmp_path / "out")
    assert ("not exported: k/v projections and norms of KV-sharing layers (they reuse an earlier layer's cache, as "
            "in transformers) (1 tensor: model.layers.4.self_attn.k_proj.weight).") in notes


def test_identical_copy_of_a_tied_head_is_left_out_and_changes_nothing(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("qwen3")  # tied; save_pretrained stores no lm_head
    embed = load_file(str(src / "model.safetensors"))[EMBED]
    notes = export_notes(capsys, copy_with(src, tmp_path / "ckpt", **{HEAD: embed.copy()}), tmp_path / "out")
    assert f"not exported: a copy of the tied embedding (identical values) (1 tensor: {HEAD})." in notes
    plain = parity.export(src, tmp_path / "plain")
    assert (tmp_path / "out/model.onnx.data").read_bytes() == (plain / "model.onnx.data").read_bytes()
    assert (tmp_path / "out/model.onnx").read_bytes() == (plain / "model.onnx").read_bytes()


# ------------------------------------------------------------------------------------- tied config, own head


@pytest.fixture(scope="module")
def distinct_head(tiny_checkpoint, tmp_path_factory) -> Path:
    """Tied config, stored lm_head that differs from the embedding (a fine-tune that trained its head apart)."""
    src = tiny_checkpoint("qwen3")
    head = np.random.default_rng(5).standard_normal((512, 64)).astype(np.float32) * 0.5
    return copy_with(src, tmp_path_factory.mktemp("tied") / "ckpt", **{HEAD: head})


def test_distinct_head_under_a_tied_config_exports_untied_and_verifies(distinct_head, tmp_path, capsys):
    cfg = json.loads((distinct_head / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    out = tmp_path / "out"
    notes = export_notes(capsys, distinct_head, out)
    code, stdout, err = run_cli(capsys, "verify", str(out), "--reference", str(distinct_head), "--steps", "4")
    error = float(re.search(r"^max-abs logit error:\s+(\S+)", stdout, re.M).group(1))
    assert code == 0 and error < 1e-4, stdout + err
    assert any(n.startswith(f"the config ties the lm_head to the embedding, but {HEAD} differs from {EMBED}; "
                            "exported untied with the stored lm_head, as transformers loads it") for n in notes), notes
    model = parity.load_graph(out)
    assert {"embed.weight", "lm_head.weight"} <= {t.name for t in model.graph.initializer}


def test_distinct_head_plan_says_untied(distinct_head, capsys):
    code, out, err = run_cli(capsys, "inspect", "-m", str(distinct_head), "-p", "int4", "--extra_options",
                             "quantize_embeddings=true")
    assert code == 0, err
    rows = dict(re.findall(r"^  (\S+(?: \(tied\))?)\s{2,}(.+)$", out.split("plan:\n", 1)[1], re.M))
    assert rows["lm_head"] == "int4 default block 32 sym" and "lm_head (tied)" not in rows
    assert rows["embed"] == "int4 default block 32 sym (GatherBlockQuantized)"


def test_head_stored_alone_serves_as_the_embedding(tiny_checkpoint, tmp_path, capsys):
    """transformers swaps a tie whose source is missing: the stored lm_head becomes the embedding as well."""
    src = tiny_checkpoint("qwen3")
    embed = load_file(str(src / "model.safetensors"))[EMBED]
    ckpt = copy_with(src, tmp_path / "ckpt", drop=(EMBED,), **{HEAD: embed})
    out = tmp_path / "out"
    notes = export_notes(capsys, ckpt, out)
    assert any(f"stores only {HEAD}; it serves as both" in n for n in notes), notes
    prompt_err, decode_err, _, _ = parity.compare_with_hf(out, ckpt, decode_steps=2)
    assert max(prompt_err, decode_err) < 1e-4

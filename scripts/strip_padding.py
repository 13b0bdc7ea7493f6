#!/usr/bin/env python3
"""A twin of an export without the padding reorder: what the padding bundle costs, measured against its absence.

builder/layers/padding.py permutes each row's new tokens so the real ones come first (a rank from two CumSums of the
attention mask, ScatterElements on input_ids) and puts the final hidden states back in the caller's order (GatherND)
before the lm_head. For an unpadded input (batch 1, or rows of equal length with an all-ones attention mask) that
permutation is the identity, so a graph without it computes the same logits. This script writes such a graph:

- input_ids feed the embedding (and Gemma's per-layer inputs) directly; the final hidden states feed the lm_head
  directly (the ScatterElements and GatherND are bypassed);
- every node that then has no consumer (the rank: Shape/Squeeze/Range/Neg/Slice/CumSum x2/Cast/Add/Where, the
  restore's Unsqueeze) is removed, as are the initializers nothing reads any more;
- what the layers still read from the bundle stays untouched: seqlens_k / total_sequence_length (attn_mask scope),
  and, in hybrids, token_mask / token_count (they still read the Range and Slice of the padding scope, and are exact
  for an unpadded input: all ones / the sequence length).

The twin is only valid for unpadded inputs (a padded batch runs in the caller's layout, which GroupQueryAttention
reads wrongly for left padding); model.onnx says so in its metadata (ortbuild.padding). It is meant for speed
comparisons, never for serving.

The output folder holds the new model.onnx (graph only, a few hundred KB) and every other file of the export as a
hard link (a copy where the two folders are on different file systems: ONNX Runtime refuses external data behind
a symbolic link that leaves the model folder): the external data is shared, not copied, so writing the twin takes
well under a second for any model size (keep the twin on the export's file system). genai_config.json, tokenizer
files and the chat template come along, so onnxruntime-genai runs the twin as it runs the export.

    PYTHONPATH=$PWD python scripts/strip_padding.py out/qwen3-int4 out/qwen3-int4-nopad
    PYTHONPATH=$PWD python scripts/strip_padding.py out/a out/a-nopad --overwrite --json strip.json

Exit codes: 0 written; 2 the graph cannot be stripped safely (no bundle, an unexpected shape of it, or a consumer of
the rank this script does not know), with a one-line message saying what was found.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time
from pathlib import Path

MODEL = "model.onnx"
METADATA_KEY = "ortbuild.padding"
METADATA_VALUE = "stripped by scripts/strip_padding.py: valid only for unpadded inputs (batch 1 or equal lengths)"
# ops that exist in an export only because of the padding permutation (a test checks they are gone)
PERMUTATION_OPS = ("ScatterElements", "GatherND", "CumSum")


class CannotStrip(Exception):
    """The graph does not hold the padding bundle in the form builder/layers/padding.py writes."""


def _subgraph_inputs(node) -> set[str]:
    """Names read inside a node's subgraphs (If/Loop/Scan bodies), recursively: outer-scope values they capture."""
    import onnx

    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(i for i in inner.input if i)
                names |= _subgraph_inputs(inner)
    return names


def _used_names(graph) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        used |= _subgraph_inputs(node)
    return used


def find_bundle(graph) -> tuple:
    """(ScatterElements on input_ids, restoring GatherND, rank name) or CannotStrip saying what was found."""
    scatters = [n for n in graph.node if n.op_type == "ScatterElements"]
    on_ids = [n for n in scatters if n.input[0] == "input_ids" and n.input[2] == "input_ids"]
    if len(on_ids) != 1:
        raise CannotStrip(f"expected one ScatterElements(input_ids, rank, input_ids) (the padding reorder of "
                          f"builder/layers/padding.py), found {len(on_ids)} (ScatterElements nodes: {len(scatters)}); "
                          f"an export from before the reorder, or one already stripped, has nothing to strip")
    scatter = on_ids[0]
    rank = scatter.input[1]
    producers = {o: n for n in graph.node for o in n.output}
    gathers = []
    for node in graph.node:
        if node.op_type != "GatherND" or len(node.input) != 2:
            continue
        index = producers.get(node.input[1])
        if index is not None and index.op_type == "Unsqueeze" and index.input[0] == rank:
            gathers.append(node)
    if len(gathers) != 1:
        raise CannotStrip(f"expected one GatherND(hidden, Unsqueeze(rank)) restoring the caller's order before the "
                          f"lm_head, found {len(gathers)}")
    batch_dims = [a.i for a in gathers[0].attribute if a.name == "batch_dims"]
    if batch_dims != [1]:
        raise CannotStrip(f"the restoring GatherND {gathers[0].name!r} has batch_dims {batch_dims}, expected [1]")
    return scatter, gathers[0], rank


def strip_graph(model) -> dict:
    """Remove the padding permutation from `model` (an onnx.ModelProto, weights not loaded) in place.

    Returns {"nodes_before", "nodes_after", "removed": {op: count}, "initializers_removed", "kept_padding_nodes"}.
    """
    graph = model.graph
    if any(p.key == METADATA_KEY for p in model.metadata_props):
        raise CannotStrip(f"the model is already stripped ({METADATA_KEY} in its metadata)")
    scatter, gather, rank = find_bundle(graph)
    before = collections.Counter(n.op_type for n in graph.node)
    bypass = {scatter.output[0]: "input_ids", gather.output[0]: gather.input[0]}
    if any(o.name in bypass for o in graph.output):
        raise CannotStrip("the reordered input_ids or restored hidden states are a graph output; nothing to bypass to")
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in bypass:
                node.input[k] = bypass[name]
    for node in graph.node:  # a subgraph reading a bypassed value would need the same rewrite: refuse instead
        if _subgraph_inputs(node) & set(bypass):
            raise CannotStrip(f"node {node.name!r} reads the reordered values inside a subgraph")
    removed: collections.Counter = collections.Counter()
    while True:  # dead-node elimination (the bundle is top-level; subgraph captures count as uses)
        used = _used_names(graph)
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        dead_ids = {id(n) for n in dead}
        kept = [n for n in graph.node if id(n) not in dead_ids]
        removed.update(n.op_type for n in dead)
        del graph.node[:]
        graph.node.extend(kept)
    still = [n.name for n in graph.node if rank in n.input or rank in n.output]
    if still:
        raise CannotStrip(f"the rank {rank!r} still has nodes after the bypass ({', '.join(still[:4])}): some layer "
                          f"reads the permutation itself, stripping it would change that layer")
    used = _used_names(graph)
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, METADATA_VALUE
    kept_padding = [n.op_type for n in graph.node if "/padding" in n.name]
    return {"nodes_before": sum(before.values()), "nodes_after": len(graph.node),
            "removed": dict(sorted(removed.items())), "initializers_removed": len(unused),
            "kept_padding_nodes": dict(sorted(collections.Counter(kept_padding).items()))}


def _link(src: Path, dst: Path) -> str:
    """A hard link; a copy across file systems (ONNX Runtime refuses external data through a symbolic link that
    leaves the model's folder: "External data path escapes model directory")."""
    try:
        os.link(src, dst)
        return "hard link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def strip_folder(src: Path, dst: Path, overwrite: bool = False) -> dict:
    """Write the stripped twin of export folder `src` into `dst` (see the module docstring); returns strip_graph's
    figures plus the time taken, the new model.onnx size and how the other files were shared."""
    return write_twin(src, dst, strip_graph, overwrite)


def write_twin(src: Path, dst: Path, rewrite, overwrite: bool = False) -> dict:
    """A twin of export folder `src` in `dst`: model.onnx rewritten in place by `rewrite(model) -> figures`, every
    other file hard-linked (see the module docstring); returns the figures plus the time taken, the new model.onnx
    size and how the other files were shared."""
    import onnx

    src, dst = Path(src), Path(dst)
    if not (src / MODEL).is_file():
        raise CannotStrip(f"no {MODEL} here (pass an export folder)")
    if dst.resolve() == src.resolve():
        raise CannotStrip(f"{dst}: the output folder must differ from the export")
    if dst.exists():
        if not overwrite:
            raise CannotStrip(f"{dst} exists (pass --overwrite to replace it)")
        shutil.rmtree(dst)
    start = time.perf_counter()
    model = onnx.load(str(src / MODEL), load_external_data=False)
    dst.mkdir(parents=True)
    try:
        figures = rewrite(model)
    except BaseException:
        shutil.rmtree(dst)
        raise
    onnx.save(model, str(dst / MODEL))
    shared = collections.Counter()
    for item in sorted(src.iterdir()):
        if item.name == MODEL or (dst / item.name).exists():  # (the rewrite may have written files of its own)
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, copy_function=lambda s, d: _link(Path(s), Path(d)))
            shared["folder"] += 1
        elif item.is_symlink():  # copied through (a hard link would link the link itself)
            shutil.copy2(item, dst / item.name)
            shared["copy"] += 1
        else:
            shared[_link(item, dst / item.name)] += 1
    figures.update(seconds=round(time.perf_counter() - start, 3),
                   model_onnx_kb=round((dst / MODEL).stat().st_size / 1024, 1), shared_files=dict(shared),
                   source=str(src), folder=str(dst))
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an exported model folder (model.onnx + external data)")
    parser.add_argument("output", type=Path, help="the twin's folder")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    try:
        figures = strip_folder(args.export, args.output, args.overwrite)
    except CannotStrip as exc:
        print(f"strip_padding: {args.export}: {exc}", file=sys.stderr)
        return 2
    removed = ", ".join(f"{op} {n}" for op, n in figures["removed"].items())
    print(f"{args.output}: {figures['nodes_before']} -> {figures['nodes_after']} nodes "
          f"(removed {figures['nodes_before'] - figures['nodes_after']}: {removed}); "
          f"{figures['initializers_removed']} initializers dropped; kept padding nodes "
          f"{figures['kept_padding_nodes'] or 'none'}; {figures['seconds']} s, model.onnx "
          f"{figures['model_onnx_kb']} KB, other files {figures['shared_files']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

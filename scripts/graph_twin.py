#!/usr/bin/env python3
"""Twins of an export that differ in one layout choice, for paired GPU speed runs (scripts/gpu_speed_driver.py's
variant steps): model.onnx rewritten, every other file hard-linked (as scripts/strip_padding.py writes its twin).
Each rewrite computes the same logits as the export it starts from.

- `lm_head_matmul`: a float lm_head FusedMatMul(x, W[vocab, hidden], transB=1) becomes MatMul(x, Transpose(W)).
  ONNX Runtime folds the Transpose of the initializer at session load (a second, [hidden, vocab] copy of the table
  in memory, as the reference builder's tied fp16 head has), so the GEMV reads the weight in MatMul's own layout.

- `prepack_lm_head` / `prepack_all`: the lm_head's (or every eligible) MatMulNBits gets its B initializer in the
  CUTLASS fpA_intB SM80 layout (builder/quant/cuda_layout.py's prepack_for_cuda, the QMoE transform on one
  "expert"; ORT's onnxruntime/quantization/cuda_quantizer.py states the same bytes for MatMulNBits, kept in the schema
  shape [N, K/block, block*bits/8]) and the attribute weight_prepacked=1, so ONNX Runtime's CUDA EP runs that node on
  its fpA_intB GEMV/GEMM path whatever the session's ep.cuda.fpa_intb_gemm says. Scales stay as they are. The new
  bytes go to prepacked.data in the twin (a tied head that shared the embedding's table gets its own copy).
  Eligible: 4-bit, no zero points, no bias, block 32/64/128, N % 64 == 0, K % 64 == 0.

- `unfuse_gate_up`: each MLP's fused gate|up projection and the Split of its output become two projections (gate rows,
  then up rows of the same weights, MatMul or MatMulNBits), the Split's consumers reading them directly: one more GEMM
  and no Split per layer (the Split copies the [tokens, 2 x intermediate] product, ~12 MB per layer in a 1024-token
  prompt of Qwen3-0.6B's shape). The halves go to unfused.data.

    PYTHONPATH=$PWD python scripts/graph_twin.py lm_head_matmul out/qwen3-fp16 out/qwen3-fp16-lmmm
    PYTHONPATH=$PWD python scripts/graph_twin.py unfuse_gate_up out/qwen3-int4 out/qwen3-int4-unfused
    PYTHONPATH=$PWD python scripts/graph_twin.py prepack_lm_head out/gpt-oss-int4 out/gpt-oss-int4-pp
    python scripts/graph_twin.py --compare out/gpt-oss-int4 out/gpt-oss-int4-pp   # logits of both on CUDA
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # + ortbuild
from strip_padding import CannotStrip, write_twin  # noqa: E402


def lm_head_matmul(model) -> dict:
    from onnx import helper

    graph = model.graph
    for index, node in enumerate(graph.node):
        if node.op_type == "FusedMatMul" and "lm_head" in node.name:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB") != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                raise CannotStrip(f"{node.name}: attributes {attrs} are not transB=1 alone")
            x, table = node.input[0], node.input[1]
            transposed = f"{table}.transposed"
            graph.node.remove(node)
            graph.node.insert(index, helper.make_node("MatMul", [x, transposed], list(node.output), name=node.name))
            graph.node.insert(index, helper.make_node("Transpose", [table], [transposed], perm=[1, 0],
                                                      name=f"{node.name}/Transpose"))
            return {"rewrite": "lm_head_matmul", "node": node.name, "table": table}
    raise CannotStrip("no float lm_head FusedMatMul (an int4 export's head is MatMulNBits)")


def _initializer_source(graph, name: str):
    """(initializer, reshape node or None) behind a node input: an initializer, or a Reshape of one (the tied head's
    view of the embedding's packed table)."""
    inits = {i.name: i for i in graph.initializer}
    if name in inits:
        return inits[name], None
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "Reshape" and producer.input[0] in inits:
        return inits[producer.input[0]], producer
    raise CannotStrip(f"{name} is neither an initializer nor a Reshape of one")


def read_initializer(folder: Path, tensor):
    """An initializer's array, its external bytes read directly: onnx.load refuses data files with several hard links,
    which is what a twin's are (they are its export's)."""
    import numpy as np
    from onnx import helper, numpy_helper

    if not tensor.external_data:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    with open(folder / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        data = f.read(int(info["length"]))
    return np.frombuffer(data, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims))


def _append_external(graph, sink, data_path: Path, name: str, array) -> None:
    """Write `array` at the end of the open data file `sink` (data_path); add an initializer `name` pointing there."""
    from onnx import helper, TensorProto

    offset = sink.tell()
    sink.write(array.tobytes())  # (C order, whatever the array's own layout)
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph.initializer.append(tensor)


def prepack(model, folder: Path, out: Path, select) -> dict:
    import numpy as np
    from onnx import helper

    from builder.quant.cuda_layout import prepack_for_cuda
    from builder.quant.moe import QuantizedExperts

    graph, done, skipped = model.graph, [], {}
    data_path = out / "prepacked.data"
    with open(data_path, "wb") as sink:
        for node in graph.node:
            if node.op_type != "MatMulNBits" or not select(node):
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            n, k, bits, block = attrs["N"], attrs["K"], attrs.get("bits", 4), attrs["block_size"]
            why = ("bits" if bits != 4 else "zero points" if len(node.input) > 3 and node.input[3] else
                   "bias (onnxruntime-gpu 1.31's prepacked kernel takes none)" if len(node.input) > 5 and node.input[5]
                   else
                   "block" if block not in (32, 64, 128) else "N % 64" if n % 64 else "K % 64" if k % 64 else
                   "already" if attrs.get("weight_prepacked") else None)
            if why:
                skipped[node.name] = why
                continue
            tensor, _ = _initializer_source(graph, node.input[1])
            raw = read_initializer(folder, tensor).reshape(1, n, k * bits // 8)
            q = QuantizedExperts(packed=raw, scales=np.zeros((1, n), np.float32), bits=bits, block_size=block)
            packed = prepack_for_cuda(q, arch=80).reshape(-1)
            name = f"{node.name.strip('/').replace('/', '.')}.prepacked_sm80"
            _append_external(graph, sink, data_path, name, packed.reshape(n, k // block, block * bits // 8))
            node.input[1] = name
            node.attribute.append(helper.make_attribute("weight_prepacked", 1))
            done.append(node.name)
    return {"prepacked": done, "skipped": skipped}


def unfuse_gate_up(model, folder: Path, out: Path) -> dict:
    import numpy as np
    from onnx import helper

    graph, done = model.graph, []
    inits = {i.name: i for i in graph.initializer}
    data_path = out / "unfused.data"

    with open(data_path, "wb") as sink:
        for split in [n for n in graph.node if n.op_type == "Split" and "/mlp/" in n.name]:
            producer = next((n for n in graph.node if split.input[0] in n.output), None)
            if producer is None or "gate_up" not in producer.name or len(split.output) != 2 or len(split.input) > 1:
                continue
            halves = []
            for source in producer.input[1:3] if producer.op_type == "MatMulNBits" else producer.input[1:2]:
                array = read_initializer(folder, inits[source])
                if producer.op_type == "MatMulNBits":  # B [N, K/block, bytes], scales [N * K/block] or [N, K/block]
                    rows = array.reshape(2, -1, *array.shape[1:]) if array.ndim > 1 else array.reshape(2, -1)
                else:  # MatMul: W [K, N]
                    rows = np.stack(np.split(array, 2, axis=-1))
                halves.append(rows)
            for half, output in enumerate(split.output):
                node = helper.make_node(producer.op_type, list(producer.input), [output],
                                        name=producer.name.replace("gate_up", ("gate", "up")[half]),
                                        domain=producer.domain)
                node.attribute.extend(a for a in producer.attribute)
                for slot, rows in enumerate(halves, start=1):
                    name = f"{node.name.strip('/').replace('/', '.')}.input{slot}"
                    _append_external(graph, sink, data_path, name, rows[half])
                    node.input[slot] = name
                if producer.op_type == "MatMulNBits":
                    for attr in node.attribute:
                        if attr.name == "N":
                            attr.i //= 2
                graph.node.insert(list(graph.node).index(split), node)
            graph.node.remove(split)
            graph.node.remove(producer)
            done.append(producer.name)
    if not done:
        raise CannotStrip("no MLP gate_up projection followed by a Split")
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return {"unfused": done}


REWRITES = {"lm_head_matmul": lm_head_matmul,
            "prepack_lm_head": lambda m, src, dst: prepack(m, src, dst, lambda n: "lm_head" in n.name),
            "prepack_all": lambda m, src, dst: prepack(m, src, dst, lambda n: True),
            "unfuse_gate_up": unfuse_gate_up}
# called with (model, source folder, twin folder)
FOLDER_REWRITES = ("prepack_lm_head", "prepack_all", "unfuse_gate_up")


def make_twin(rewrite: str, src: Path, dst: Path, overwrite: bool = False) -> dict:
    src, dst = Path(src), Path(dst)

    def apply(model) -> dict:
        figures = REWRITES[rewrite](model, src, dst) if rewrite in FOLDER_REWRITES else REWRITES[rewrite](model)
        _drop_unused_reshapes(model.graph)
        return figures

    return write_twin(src, dst, apply, overwrite)


def _drop_unused_reshapes(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Reshape" and not used & set(n.output)]:
        graph.node.remove(node)


def compare(a: Path, b: Path, tokens: int = 64, providers=("CUDAExecutionProvider", "CPUExecutionProvider")) -> dict:
    """Prompt logits of two exports (builder/verify.py's OnnxDecoder: empty state, all-ones mask), on the CUDA EP where
    there is one: the largest absolute difference, relative to the largest logit, and whether the argmax agrees at
    every position."""
    import numpy as np

    from builder.verify import OnnxDecoder

    logits = []
    for folder in (a, b):
        config = json.loads((folder / "genai_config.json").read_text())
        vocab = config["model"]["vocab_size"]
        ids = np.random.default_rng(0).integers(10, min(vocab, 3000), size=tokens).tolist()
        logits.append(OnnxDecoder(folder / "model.onnx", list(providers)).run(ids, [], config)[0])
    diff = float(np.abs(logits[0] - logits[1]).max())
    return {"max_abs_diff": diff, "relative": diff / float(np.abs(logits[0]).max()),
            "argmax_agree": f"{int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())}/{tokens}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rewrite", help=f"one of {', '.join(sorted(REWRITES))}, or --compare")
    parser.add_argument("export", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.rewrite == "--compare" or args.rewrite == "compare":
        print(json.dumps(compare(args.export, args.output)))
        return 0
    if args.rewrite not in REWRITES:
        parser.error(f"unknown rewrite {args.rewrite!r}")
    try:
        figures = make_twin(args.rewrite, args.export, args.output, args.overwrite)
    except CannotStrip as exc:
        print(f"graph_twin: {args.export}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which nodes of a graph give an output whose shape depends on the *contents* of the graph inputs (not only on
their shapes).

A CUDA graph replays the kernels of one captured decode step with the buffers and launch sizes of that step; the
step's input shapes are fixed under capture (input_ids [B, 1], the static mask [B, max_length], one KV buffer per
cache), so every shape computed from input shapes and constants is the same at every step. A shape computed from
input *values* (NonZero over the routed tokens, a Range to a summed mask) changes from step to step, and the replay
then reads and writes with stale sizes (what crashed the per-expert Gemma 4 MoE export in cudaGraphLaunch, CUDA
error 700, on an H200 with onnxruntime-gpu 1.31.1).

A forward data-flow over the graph with two flags per value: `value` (its contents depend on input contents) and
`shape` (its shape does). Graph inputs have data-dependent values and fixed shapes; initializers and constants
neither. Shape/Size read only shapes. An op in SHAPE_INPUTS takes its output shape from the *values* of the inputs
listed there, so their `value` flag becomes the output's `shape` flag; an op in SIZED_BY_DATA sizes its output by
the data itself; control flow is data-dependent through and through. Every op in SHAPE_FOLLOWS gives outputs whose
shape is a function of its input shapes and attributes only: of all of them, or of those SHAPE_OF lists (a scatter
keeps its data's shape whatever its updates' count). An op in none of the tables is an error (add it where its schema
says), so a new op cannot slip through unexamined.
"""

from __future__ import annotations

import onnx_ir as ir

# op -> input indices whose values set the output shape (ai.onnx and the com.microsoft ops the exports use)
SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Range": (0, 1, 2), "ConstantOfShape": (0,),
    "TopK": (1,), "Pad": (1, 2, 3), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "OneHot": (1,),
    "Resize": (1, 2, 3), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceMean": (1,),
    "ReduceProd": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,), "ReduceLogSumExp": (1,),
    # present_key / present_value are [B, kv, total_sequence_length, head] with a growing cache (the past's shape with
    # the shared buffer genai uses under capture); every export derives total_sequence_length from the mask's shape
    "GroupQueryAttention": (6,),
}
# op -> the inputs whose shape is the output's (the others only fill it): a scatter is the shape of its data
SHAPE_OF = {"ScatterND": (0,), "ScatterElements": (0,)}
SIZED_BY_DATA = {"NonZero", "Compress", "Unique", "NonMaxSuppression", "StringSplit"}
SHAPE_ONLY = {"Shape", "Size"}
CONTROL_FLOW = {"If", "Loop", "Scan"}
SHAPE_FOLLOWS = {
    # elementwise / broadcasting
    "Abs", "Add", "Sub", "Mul", "Div", "Neg", "Max", "Min", "Pow", "Sqrt", "Exp", "Log", "Tanh", "Sigmoid", "Relu",
    "Gelu", "Erf", "Cos", "Sin", "Cast", "Identity", "Where", "Equal", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "Not", "And", "Or", "Mod", "Floor", "Ceil", "Round", "Clip", "Softmax", "LogSoftmax", "CumSum",
    # layout and indexing (output shapes from input shapes and attributes)
    "Concat", "Transpose", "Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "Flatten",
    "MatMul", "Gemm", "Trilu", "ArgMax", "ArgMin",
    # norms
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
    # com.microsoft ops of the exports: every output shape from input shapes and attributes
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "MatMulNBits", "GatherBlockQuantized",
    "FusedMatMul", "RotaryEmbedding", "MoE", "QMoE", "CausalConvWithState", "LinearAttention", "LinearAttentionGate",
    "GatedRMSNorm",
}


def _graph(model) -> ir.Graph:
    if isinstance(model, ir.Graph):
        return model
    if isinstance(model, ir.Model):
        return model.graph
    return ir.serde.deserialize_model(model).graph  # an onnx ModelProto (weights need not be loaded)


def data_dependent_shapes(model) -> list[str]:
    """"op_type: name" of each node whose output shape depends on input values although its inputs' shapes do not
    (where the dependence starts), in graph order. `model`: an onnx_ir Model or Graph, or an onnx ModelProto."""
    graph = _graph(model)
    value: dict[ir.Value, bool] = {v: True for v in graph.inputs}
    shape: dict[ir.Value, bool] = {v: False for v in graph.inputs}
    found = []
    for node in graph:  # the builder appends nodes in topological order
        op = node.op_type
        v = [value.get(i, False) if i is not None else False for i in node.inputs]
        s = [shape.get(i, False) if i is not None else False for i in node.inputs]
        if op == "Constant":
            out_value = out_shape = False
        elif op in SHAPE_ONLY:
            out_value, out_shape = s[0], False
        elif op in SIZED_BY_DATA or op in CONTROL_FLOW:
            out_value = out_shape = True
        elif op in SHAPE_INPUTS or op in SHAPE_FOLLOWS:
            out_value = any(v) or any(s)
            shaped_by = SHAPE_OF.get(op, range(len(s)))
            out_shape = any(s[i] for i in shaped_by) or any(v[i] for i in SHAPE_INPUTS.get(op, ()) if i < len(v))
        else:
            raise ValueError(f"{op} ({node.name}): not in tests/shape_flow.py's tables; add it to SHAPE_FOLLOWS or "
                             "SHAPE_INPUTS as its schema says")
        if out_shape and not any(s):
            found.append(f"{op}: {node.name}")
        for out in node.outputs:
            value[out], shape[out] = out_value, out_shape
    return found


# op -> inputs a CUDA kernel reads from host memory (ORT kernel defs: InputMemoryType(OrtMemTypeCPUInput, i)); the
# condition of an If is read on the host too
HOST_SLOTS = {**SHAPE_INPUTS, "CumSum": (1,), "If": (0,)}


def host_device_copies(model) -> list[str]:
    """"op_type: name (input i)" of each node input that needs a Memcpy between host and device on the CUDA EP, in
    graph order: ONNX Runtime refuses to capture a graph with any Memcpy node.

    Shape and Size give host tensors, and a node computing only from host tensors (and constants) runs on the CPU EP
    (ORT places shape arithmetic there), unless every host input is one its CUDA kernel reads from host memory
    (HOST_SLOTS: ConstantOfShape, Range), whose output is then on the device. Graph inputs and everything computed
    from them are on the device. A device node reading a host tensor outside HOST_SLOTS needs a MemcpyFromHost; any
    node reading a device tensor in a HOST_SLOTS input needs a MemcpyToHost. (A model of ORT's CPU-preference
    heuristic for the graphs we build, checked against the Memcpy counts measured on an H200.)"""
    graph = _graph(model)
    where: dict[ir.Value, str] = {v: "device" for v in graph.inputs}  # else "const" (initializers, constants)
    found = []
    for node in graph:
        op = node.op_type
        host_slots = HOST_SLOTS.get(op, ())
        kinds = [where.get(i, "const") if i is not None else "const" for i in node.inputs]
        for i, kind in enumerate(kinds):
            if kind == "device" and i in host_slots:
                found.append(f"{op}: {node.name} (input {i}, to host)")
        if op in SHAPE_ONLY:
            out = "host"
        elif "device" in kinds:
            out = "device"
            found += [f"{op}: {node.name} (input {i}, from host)" for i, kind in enumerate(kinds)
                      if kind == "host" and i not in host_slots]
        elif "host" in kinds:
            on_device = all(i in host_slots for i, kind in enumerate(kinds) if kind == "host")
            out = "device" if on_device else "host"
        else:
            out = "const"
        for value in node.outputs:
            where[value] = out
    return found

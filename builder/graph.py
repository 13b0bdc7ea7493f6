"""Small helpers over onnx_ir: emit ops with readable names, bind initializers whose bytes are produced lazily.

Layers pass `ir.Value` objects around; node and value names derive from a hierarchical scope
("/model/layers.3/attn/q_proj/MatMul") so the graph is deterministic and debuggable.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

MS = "com.microsoft"
OPSET = {"": 21, MS: 1}

FLOAT_DTYPES = {
    "float32": (ir.DataType.FLOAT, np.dtype(np.float32)),
    "float16": (ir.DataType.FLOAT16, np.dtype(np.float16)),
    "bfloat16": (ir.DataType.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
}
_NUMPY_TO_IR = {np.dtype(np.uint8): ir.DataType.UINT8, np.dtype(np.int64): ir.DataType.INT64,
                np.dtype(np.int32): ir.DataType.INT32, np.dtype(np.float32): ir.DataType.FLOAT,
                np.dtype(np.float64): ir.DataType.DOUBLE,
                np.dtype(np.float16): ir.DataType.FLOAT16, np.dtype(ml_dtypes.bfloat16): ir.DataType.BFLOAT16}


PREFETCH_MIN_BYTES = 1 << 20  # smaller tensors are produced inline: a thread per norm weight costs more than it saves


def prefetched(produce: Callable[[], Iterator], depth: int = 1) -> Iterator:
    """Items of `produce()`, computed in a background thread up to `depth` items ahead of the consumer.

    Lets the next block be read, converted or quantized while this one is written (numpy and file I/O release the
    GIL). Items come in the same order as without the thread; an exception in the producer is re-raised here, and a
    consumer that stops early stops the producer after the item in hand.
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        items = produce()
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # re-raised in the consumer
            put((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # run the producer's own cleanup (e.g. a worker pool) in its thread

    worker = threading.Thread(target=run, name="ortbuild-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            more, item = handoff.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
            del item
    finally:
        stop.set()
        worker.join()


class StreamedTensor(ir.LazyTensor):
    """An initializer whose bytes are produced block by block when the writer saves the model.

    `blocks()` yields numpy arrays whose concatenation (in C order) is the tensor. The next block is produced in a
    background thread while this one is written (one block ahead), so a few blocks are alive at a time, never the
    whole tensor; calling numpy() instead would build it whole (only small tensors, inlined in model.onnx, are).
    """

    def __init__(self, name: str, dtype: ir.DataType, shape: Sequence[int],
                 blocks: Callable[[], Iterator[np.ndarray]], on_written: Callable[[int], None] | None = None):
        numpy_dtype = dtype.numpy()
        super().__init__(lambda: ir.tensor(np.concatenate([b.reshape(-1) for b in blocks()]).astype(numpy_dtype)
                                           .reshape(tuple(shape)), dtype=dtype),
                         dtype=dtype, shape=ir.Shape(list(shape)), name=name)
        self._blocks = blocks
        self._numpy_dtype = numpy_dtype
        self._on_written = on_written

    def _converted_blocks(self) -> Iterator[np.ndarray]:
        for block in self._blocks():
            yield np.ascontiguousarray(block, dtype=self._numpy_dtype)

    def tofile(self, file) -> None:
        written = 0
        blocks = prefetched(self._converted_blocks) if self.nbytes >= PREFETCH_MIN_BYTES else self._converted_blocks()
        for data in blocks:
            file.write(data.reshape(-1).view(np.uint8))  # the array's own buffer: no tobytes() copy
            written += data.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"initializer {self.name}: produced {written} bytes, expected {self.nbytes}")
        if self._on_written is not None:
            self._on_written(written)


class GraphBuilder:
    """Builds one ir.Graph; tracks a name scope and keeps initializer names unique."""

    def __init__(self, name: str = "main_graph"):
        self.graph = ir.Graph([], [], nodes=[], opset_imports=dict(OPSET), name=name)
        self._scope: list[str] = []
        self._counts: dict[str, int] = {}
        self.on_written: Callable[[int], None] | None = None  # progress hook for streamed initializers

    # -- naming ------------------------------------------------------------------------------------------------
    @contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _node_name(self, op_type: str) -> str:
        base = "/" + "/".join(["model", *self._scope, op_type])
        count = self._counts.get(base, 0)
        self._counts[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    # -- graph I/O ---------------------------------------------------------------------------------------------
    def input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))
        self.graph.inputs.append(value)
        return value

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> None:
        value.name = name
        value.type = ir.TensorType(dtype)
        value.shape = ir.Shape(list(shape))
        self.graph.outputs.append(value)

    # -- ops ---------------------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[ir.Value | None], *, domain: str = "", outputs: int = 1,
           **attributes) -> ir.Value | tuple[ir.Value, ...]:
        attrs = {k: v for k, v in attributes.items() if v is not None}
        name = self._node_name(op_type)
        node = ir.node(op_type, list(inputs), attrs, domain=domain, num_outputs=outputs, name=name)
        for i, value in enumerate(node.outputs):
            value.name = f"{name}/output_{i}"
        self.graph.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def ms(self, op_type: str, inputs: Sequence[ir.Value | None], *, outputs: int = 1, **attributes):
        return self.op(op_type, inputs, domain=MS, outputs=outputs, **attributes)

    # -- initializers ------------------------------------------------------------------------------------------
    def _add_initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        if name in self.graph.initializers:
            raise ValueError(f"initializer {name} defined twice")
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A small initializer from a numpy array (shapes, axes, rotary caches)."""
        array = np.asarray(array)
        return self._add_initializer(name, ir.tensor(array, dtype=_NUMPY_TO_IR[array.dtype], name=name))

    def streamed(self, name: str, dtype: ir.DataType, shape: Sequence[int],
                 blocks: Callable[[], Iterator[np.ndarray]]) -> ir.Value:
        """An initializer whose bytes come from `blocks()` at save time."""
        tensor = StreamedTensor(name, dtype, shape, blocks, on_written=lambda n: self.on_written and self.on_written(n))
        return self._add_initializer(name, tensor)

    def external(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        return self._add_initializer(name, tensor)

    def has_initializer(self, name: str) -> bool:
        return name in self.graph.initializers

    def initializer(self, name: str) -> ir.Value:
        return self.graph.initializers[name]

    # -- common shapes -----------------------------------------------------------------------------------------
    def shared_constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A small constant created on first use and shared by name afterwards."""
        if self.has_initializer(name):
            return self.initializer(name)
        return self.constant(name, array)

    def ints(self, name: str, values: Sequence[int]) -> ir.Value:
        """An int64 1-D constant shared by name (axes, shapes)."""
        return self.shared_constant(name, np.asarray(values, dtype=np.int64))

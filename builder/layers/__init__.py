"""Graph layers. Each takes a LayerContext and ir.Values and returns ir.Values; none reads a HF config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from builder.graph import GraphBuilder
from builder.settings import ExportSettings
from builder.spec import ModelSpec
from builder.weights import Weight, WeightMap, WholeMap, row_blocks


@dataclass
class StepInputs:
    """Per-step values every token mixer shares, computed once by the decoder (builder/decoder.py)."""

    seqlens_k: ir.Value  # int32 [batch]: total length - 1 (GroupQueryAttention)
    total_sequence_length: ir.Value  # int32 scalar
    make_token_mask: Callable[[], ir.Value]  # built on first use, so graphs that never ask have no such node
    derived: dict = field(default_factory=dict)  # values computed once from the above and shared by layers

    @property
    def token_mask(self) -> ir.Value:
        """int64 [batch, sequence]: 1 for the real new tokens, 0 for padding."""
        if "token_mask" not in self.derived:
            self.derived["token_mask"] = self.make_token_mask()
        return self.derived["token_mask"]


@dataclass
class LayerContext:
    g: GraphBuilder
    spec: ModelSpec
    settings: ExportSettings
    weights: WeightMap
    rope_caches: dict = field(default_factory=dict)  # RopeSpec -> (cos, sin) initializers

    def float_initializer(self, name: str, weight: Weight, *, transpose: bool = False,
                          dtype: ir.DataType | None = None) -> ir.Value:
        """A float weight in the model dtype (or `dtype`), streamed in row blocks; `transpose` swaps a 2-D weight."""
        if self.g.has_initializer(name):
            return self.g.initializer(name)
        if transpose:
            weight = WholeMap(weight, lambda a: np.ascontiguousarray(a.T), tuple(reversed(weight.shape)))
        dtype = dtype or self.settings.ir_dtype
        numpy_dtype = dtype.numpy()
        return self.g.streamed(name, dtype, weight.shape,
                               lambda: (rows.astype(numpy_dtype) for _, rows in row_blocks(weight)))

    def scalar(self, name: str, value: float) -> ir.Value:
        """A 0-d constant in the model dtype."""
        return self.g.shared_constant(name, np.array(value, dtype=np.float32).astype(self.settings.numpy_dtype))

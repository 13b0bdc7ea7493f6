"""Graph layers. Each takes a LayerContext and ir.Values and returns ir.Values; none reads a HF config."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from builder.graph import GraphBuilder
from builder.settings import ExportSettings
from builder.spec import ModelSpec
from builder.weights import Weight, WeightMap, WholeMap, row_blocks


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

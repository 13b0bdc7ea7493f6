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
    """Per-step values every token mixer shares, computed once by the decoder (builder/layers/padding.py).

    Layers run in the "real tokens first" layout: a row's n real new tokens are its columns 0..n-1.
    `token_mask` / `token_count` (layers with recurrent state) and `position_ids` (rotary or query scaling outside
    GroupQueryAttention) are built on first use, so a model whose layers never ask pays no node for them in its
    decode step.
    """

    seqlens_k: ir.Value  # int32 [batch]: total length - 1
    total_sequence_length: ir.Value  # int32 scalar
    make: Callable[[str], ir.Value] | None = None  # builds a lazy value (token_mask, token_count, position_ids)
    derived: dict = field(default_factory=dict)  # values a layer computes once from the above and shares

    def _lazy(self, name: str) -> ir.Value:
        if name not in self.derived:
            self.derived[name] = self.make(name)
        return self.derived[name]

    @property
    def token_mask(self) -> ir.Value:
        """bool [batch, sequence_length]: which new tokens are real (column < n)."""
        return self._lazy("token_mask")

    @property
    def token_count(self) -> ir.Value:
        """int64 [batch]: n, the real new tokens per row."""
        return self._lazy("token_count")

    @property
    def position_ids(self) -> ir.Value:
        """int64 [batch, sequence]: each new token's position as GroupQueryAttention numbers it (layers that rotate
        or scale outside the op)."""
        return self._lazy("position_ids")


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

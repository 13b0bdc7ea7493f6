"""Lazy weights: descriptions of how to produce a float32 tensor, read row block by row block on demand.

A family's weight map is a dict of canonical name -> Weight. Nothing is read until the ONNX writer asks for the
bytes of the initializer that consumes it, and then only a block of rows at a time where the layout allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np

from builder.checkpoint import TensorRef

ROW_BLOCK_BYTES = 32 * 1024 * 1024


class Weight(Protocol):
    shape: tuple[int, ...]

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 rows [start:stop) along axis 0."""


def row_blocks(weight: Weight, block_bytes: int = ROW_BLOCK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
    """(start_row, rows) blocks of about block_bytes (as float32) covering the whole weight."""
    n = weight.shape[0] if weight.shape else 1
    row_bytes = 4 * int(np.prod(weight.shape[1:], dtype=np.int64)) if len(weight.shape) > 1 else 4
    step = max(1, block_bytes // max(row_bytes, 1))
    for start in range(0, n, step):
        yield start, weight.rows(start, min(n, start + step))


def materialize(weight: Weight) -> np.ndarray:
    return weight.rows(0, None)


@dataclass(frozen=True)
class Stored:
    """A checkpoint tensor as it is."""

    ref: TensorRef

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.ref.read_float(start, stop)


@dataclass(frozen=True)
class RowMap:
    """A transform applied independently to each block of rows (elementwise ops, per-row reshapes)."""

    source: Weight
    fn: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.fn(self.source.rows(start, stop))


@dataclass(frozen=True)
class WholeMap:
    """A transform that needs the whole source (e.g. a transpose); memory is one tensor at a time."""

    source: Weight
    fn: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.fn(self.source.rows())[start:stop]


@dataclass(frozen=True)
class Stacked:
    """Per-expert tensors stacked along a new axis 0 (read expert by expert)."""

    parts: tuple[Weight, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.stack([p.rows() for p in self.parts[start:stop]])


@dataclass(frozen=True)
class Concatenated:
    """Tensors concatenated along axis 0 (e.g. fused projections)."""

    parts: tuple[Weight, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.shape[0] if stop is None else stop
        out, offset = [], 0
        for part in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
            if lo < hi:
                out.append(part.rows(lo, hi))
            offset += part.shape[0]
        return np.concatenate(out, axis=0)


@dataclass(frozen=True)
class Constant:
    """A small weight computed at export time (e.g. rotary caches)."""

    value: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.value[start:stop], dtype=np.float32)


def offset_weight(weight: Weight, offset: float) -> Weight:
    """w + offset in float32 (Gemma's RMSNorm applies 1 + w)."""
    if offset == 0:
        return weight
    return RowMap(weight, lambda rows: rows + np.float32(offset), weight.shape)


class WeightMap:
    """Canonical name -> Weight, remembering which checkpoint tensor each came from (for error messages)."""

    def __init__(self, architecture: str):
        self.architecture = architecture
        self._weights: dict[str, Weight] = {}
        self._sources: dict[str, str] = {}
        self._expected: dict[str, str] = {}  # canonical -> checkpoint name that would have provided it

    def add(self, name: str, weight: Weight, source: str = "") -> None:
        self._weights[name] = weight
        self._sources[name] = source

    def expect(self, name: str, source: str) -> None:
        """Record which checkpoint tensor should provide `name`, for the message if it is missing."""
        self._expected[name] = source

    def __contains__(self, name: str) -> bool:
        return name in self._weights

    def names(self) -> list[str]:
        return sorted(self._weights)

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> Weight:
        from builder.errors import CheckpointError

        weight = self._weights.get(name)
        if weight is None:
            source = self._expected.get(name)
            where = f"tensor {source}" if source else f"a tensor for {name}"
            raise CheckpointError(f"{self.architecture}: {where} missing from the checkpoint (the config implies it; "
                                  f"needed for {name}). The checkpoint is incomplete or does not match its config.")
        if shape is not None and tuple(weight.shape) != tuple(shape):
            source = self._sources.get(name) or name
            raise CheckpointError(f"{self.architecture}: tensor {source} has shape {list(weight.shape)} but the config "
                                  f"implies {list(shape)}. The checkpoint does not match its config.json.")
        return weight

    def optional(self, name: str) -> Weight | None:
        return self._weights.get(name)


@dataclass(frozen=True)
class InterleavedGateUp:
    """fc1 for fused SwiGLU experts: gate and up [E, I, ...] -> [E, 2I, ...] with rows g0, u0, g1, u1, ...

    ORT's MoE/QMoE with swiglu_fusion=1 (the only layout its CPU kernel accepts) expects this interleave.
    Works for weights [E, I, H] and biases [E, I]; read expert by expert.
    """

    gate: Weight
    up: Weight

    @property
    def shape(self) -> tuple[int, ...]:
        e, i, *rest = self.gate.shape
        return (e, 2 * i, *rest)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        gate, up = self.gate.rows(start, stop), self.up.rows(start, stop)
        out = np.empty((gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]), np.float32)
        out[:, 0::2], out[:, 1::2] = gate, up
        return out

"""Lazy weights: descriptions of how to produce a float32 tensor, read row block by row block on demand.

A family's weight map is a dict of canonical name -> Weight. Nothing is read until the ONNX writer asks for the
bytes of the initializer that consumes it, and then only a block of rows at a time where the layout allows.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import numpy as np

from builder.checkpoint import TensorRef

ROW_BLOCK_BYTES = 8 * 1024 * 1024  # float32 bytes per block: small enough for glibc to reuse (see output.py)
_T = TypeVar("_T")
_R = TypeVar("_R")


class Weight(Protocol):
    shape: tuple[int, ...]

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 rows [start:stop) along axis 0."""


def block_spans(weight: Weight, block_bytes: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about block_bytes (as float32, default ROW_BLOCK_BYTES) covering the weight."""
    block_bytes = block_bytes or ROW_BLOCK_BYTES
    n = weight.shape[0] if weight.shape else 1
    row_bytes = 4 * int(np.prod(weight.shape[1:], dtype=np.int64)) if len(weight.shape) > 1 else 4
    step = max(1, block_bytes // max(row_bytes, 1))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def row_blocks(weight: Weight, block_bytes: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(start_row, rows) blocks of about block_bytes (as float32) covering the whole weight."""
    for start, stop in block_spans(weight, block_bytes):
        yield start, weight.rows(start, stop)


def export_threads() -> int:
    """Threads that compute row blocks side by side: ORTBUILD_THREADS, else the usable cores (at most 4).

    numpy releases the GIL in reads and ufuncs, so quantizing blocks in threads uses every core; each thread holds
    one block's temporaries, hence the cap (memory grows by ~6 blocks' float32 size per thread).
    """
    value = os.environ.get("ORTBUILD_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            from builder.errors import UsageError

            raise UsageError(f"ORTBUILD_THREADS={value!r}: expected a whole number of threads >= 1 (unset it for "
                             "one per core).")
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int | None = None) -> Iterator[_R]:
    """fn(item) for each item, yielded in input order, with up to `workers` calls running at once.

    Results are identical to a plain loop (each call is independent), so exports stay byte-identical; the next call
    starts only when a result is taken, so at most `workers` + 1 results are alive: memory is bounded by the worker
    count, not by the number of items.
    """
    workers = export_threads() if workers is None else workers
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="ortbuild-block")
    pending: deque = deque()
    try:
        upcoming = iter(items)
        for item in upcoming:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(upcoming, pending)  # `pending` doubles as the end marker
            if nxt is not pending:
                pending.append(pool.submit(fn, nxt))
            yield result
            del result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


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
    """A transform that needs the whole source (e.g. a transpose); memory is one tensor at a time.

    A writer reading it in row blocks would otherwise re-read and re-transform the whole source per block
    (blocks x the I/O), so the transformed tensor is kept from the first partial read until every row has been
    handed out once, then dropped.
    """

    source: Weight
    fn: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        n = self.shape[0] if self.shape else 1
        stop = n if stop is None else min(stop, n)
        with self._lock:
            whole = self._cache.get("whole")
            if whole is None:
                if start == 0 and stop == n:
                    return self.fn(self.source.rows())
                whole = self._cache["whole"] = self.fn(self.source.rows())
                self._cache["served"] = 0
            self._cache["served"] += max(0, stop - start)
            if self._cache["served"] >= n:  # every row handed out: the scan is over
                self._cache.clear()
            return whole[start:stop]


@dataclass(frozen=True)
class Stacked:
    """Per-expert tensors stacked along a new axis 0 (read expert by expert)."""

    parts: tuple[Weight, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        parts = self.parts[start:stop]
        out = np.empty((len(parts), *self.parts[0].shape), np.float32)  # filled in place: no list + stack copy
        for i, part in enumerate(parts):
            out[i] = part.rows()
        return out


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
    """Canonical name -> Weight, remembering which checkpoint tensor each came from (for error messages).

    Consumption is proven where the graph reads: `get` records the names layers ask for, and `unread` lists the
    weights a family mapped that no layer asked for (builders.common.reject_unread turns them into an error).
    """

    def __init__(self, architecture: str):
        self.architecture = architecture
        self._weights: dict[str, Weight] = {}
        self._sources: dict[str, str] = {}
        self._expected: dict[str, str] = {}  # canonical -> checkpoint name that would have provided it
        self._read: set[str] = set()

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

    def source(self, name: str) -> str:
        """The checkpoint tensor `name` was mapped from ("" for computed weights)."""
        return self._sources.get(name, "")

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> Weight:
        """The weight a layer reads (recorded as read); a missing or mis-shaped one is a CheckpointError."""
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
        self._read.add(name)
        return weight

    def peek(self, name: str) -> Weight:
        """The weight without counting it as read by the graph (checks made while preparing, e.g. tied heads)."""
        return self._weights[name]

    def pop(self, name: str) -> Weight:
        """Remove a mapped weight (a family or a check decided it is not part of the model) and return it."""
        self._sources.pop(name, None)
        return self._weights.pop(name)

    def unread(self) -> list[str]:
        """Mapped weights that no layer has read (call after the graph is built)."""
        return sorted(set(self._weights) - self._read)


@dataclass(frozen=True)
class InterleavedGateUp:
    """The one gate/up interleave: fc1 of fused SwiGLU experts, [E, 2I, ...] with rows g0, u0, g1, u1, ...

    ORT's MoE/QMoE with swiglu_fusion=1 (the only layout its CPU kernel accepts) expects this interleave. Built from
    what the checkpoint stores, read once per block of experts:
      from_gate_up(gate, up)  separate gate and up stacks [E, I, ...] (per-expert checkpoints: Qwen-MoE, Mixtral)
      from_halves(gate_up)    one fused [E, 2I, ...] stored as [all gate rows; all up rows] (transformers'
                              experts.gate_up_proj in the [E, out, in] orientation)
    Works for weights [E, I, H] and biases [E, I]. Per-expert MatMuls want [gate; up] (the stored halves) instead, so
    nothing interleaves for them.
    """

    parts: tuple[Weight, ...]  # (gate, up) or (halves,)

    @classmethod
    def from_gate_up(cls, gate: Weight, up: Weight) -> "InterleavedGateUp":
        return cls((gate, up))

    @classmethod
    def from_halves(cls, gate_up: Weight) -> "InterleavedGateUp":
        if len(gate_up.shape) < 2 or gate_up.shape[1] % 2:
            raise ValueError(f"InterleavedGateUp.from_halves: axis 1 of shape {list(gate_up.shape)} must hold gate "
                             "and up halves of equal size")
        return cls((gate_up,))

    @property
    def shape(self) -> tuple[int, ...]:
        e, i, *rest = self.parts[0].shape
        return (e, i * len(self.parts), *rest)  # (gate, up): 2I rows; (halves,): already 2I

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        blocks = [part.rows(start, stop) for part in self.parts]
        if len(blocks) == 1:
            half = blocks[0].shape[1] // 2
            blocks = [blocks[0][:, :half], blocks[0][:, half:]]
        gate, up = blocks
        out = np.empty((gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]), np.float32)
        out[:, 0::2], out[:, 1::2] = gate, up
        return out


@dataclass(frozen=True)
class ExpertMajor:
    """Stacked experts stored input-major [E, K, N] (x @ W[e]) viewed as expert-major [E, N, K] (rows = outputs).

    Read expert by expert: a block of experts is transposed in memory, never the whole tensor.
    """

    source: Weight

    @property
    def shape(self) -> tuple[int, ...]:
        e, k, n = self.source.shape
        return (e, n, k)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.ascontiguousarray(np.swapaxes(self.source.rows(start, stop), 1, 2))


def to_expert_major(weight: Weight) -> Weight:
    """[E, K, N] (the `x @ W[e]` orientation of fused-expert checkpoints: GPT-OSS gate_up_proj [E, H, 2I] and
    down_proj [E, I, H]) -> [E, N, K], the layout MoE/QMoE read (fc1 [E, 2I, H], fc2 [E, H, I]).

    Column order along N is kept, so a gate_up_proj whose last axis already alternates gate/up (GPT-OSS:
    gate = [..., ::2], up = [..., 1::2]) becomes fc1 rows g0, u0, g1, u1, ...: the swiglu_fusion=1 interleave.
    A checkpoint with gate and up as two halves needs InterleavedGateUp.from_halves on top instead.
    """
    if len(weight.shape) != 3:
        raise ValueError(f"to_expert_major: expected stacked experts [E, K, N], got shape {list(weight.shape)}")
    return ExpertMajor(weight)

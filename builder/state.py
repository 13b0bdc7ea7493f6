"""Per-layer decoder state: what each token mixer reads and writes between steps, declared by the mixer's spec.

Full attention keeps a KV cache; linear attention (Gated DeltaNet) a conv state (the last kernel-1 conv inputs) and
a recurrent state. The decoder's past/present inputs and outputs, genai_config's name templates, `verify` and the
test harness all derive from these declarations (`model_state(spec)`); nothing else spells a state name.

Names are those onnxruntime-genai 0.18 reads (its runtime discovers the layer indices of each kind by matching the
session's input names against the templates, so `{i}` is the decoder layer index and gaps are fine):
    key / value   past_key_values.{i}.key / .value -> present.{i}.key / .value   [batch, kv_heads, length, head_dim]
    conv          past.{i}.conv -> present.{i}.conv                              [batch, conv_channels, kernel - 1]
    recurrent     past.{i}.recurrent -> present.{i}.recurrent       [batch, value_heads, key_head_dim, value_head_dim]
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class StateKind:
    name: str
    past: str  # name template, {i} = layer index
    present: str
    genai_past: str  # genai_config decoder.inputs key holding the past template (with %d)
    genai_present: str  # genai_config decoder.outputs key
    sequence_axis: int | None  # the axis that grows with the context (KV caches); None for fixed-size state


KINDS: dict[str, StateKind] = {k.name: k for k in (
    StateKind("key", "past_key_values.{i}.key", "present.{i}.key", "past_key_names", "present_key_names", 2),
    StateKind("value", "past_key_values.{i}.value", "present.{i}.value", "past_value_names", "present_value_names", 2),
    StateKind("conv", "past.{i}.conv", "present.{i}.conv", "past_conv_names", "present_conv_names", None),
    StateKind("recurrent", "past.{i}.recurrent", "present.{i}.recurrent", "past_recurrent_names",
              "present_recurrent_names", None),
)}

# The dtype a state tensor is stored in: "io" follows the export's activation dtype; "linear_attn" is the dtype of the
# linear-attention core (ExportSettings.linear_attn_dtype: float32 unless asked otherwise).
STATE_DTYPES = ("io", "linear_attn")


@dataclass(frozen=True)
class StateTensor:
    kind: str  # a KINDS key
    layer: int  # decoder layer index
    past_shape: tuple[int | str, ...]
    present_shape: tuple[int | str, ...]
    dtype: str = "io"  # a STATE_DTYPES value

    @property
    def past_name(self) -> str:
        return KINDS[self.kind].past.format(i=self.layer)

    @property
    def present_name(self) -> str:
        return KINDS[self.kind].present.format(i=self.layer)


def kv_state(layer: int, kv_heads: int, head_dim: int) -> tuple[StateTensor, StateTensor]:
    past = ("batch_size", kv_heads, "past_sequence_length", head_dim)
    present = ("batch_size", kv_heads, "total_sequence_length", head_dim)
    return StateTensor("key", layer, past, present), StateTensor("value", layer, past, present)


def linear_attention_state(layer: int, conv_channels: int, conv_kernel: int, value_heads: int, key_head_dim: int,
                           value_head_dim: int) -> tuple[StateTensor, StateTensor]:
    conv = ("batch_size", conv_channels, conv_kernel - 1)
    recurrent = ("batch_size", value_heads, key_head_dim, value_head_dim)
    return (StateTensor("conv", layer, conv, conv, dtype="linear_attn"),
            StateTensor("recurrent", layer, recurrent, recurrent, dtype="linear_attn"))


def model_state(spec) -> tuple[StateTensor, ...]:
    """Every layer's declared state, in layer order (the order of the graph's inputs and outputs)."""
    return tuple(tensor for i, layer in enumerate(spec.layers) for tensor in layer.attention.state(i))


def genai_names(states) -> tuple[dict[str, str], dict[str, str]]:
    """genai_config decoder.inputs / decoder.outputs entries for the kinds present, in KINDS order."""
    present = {t.kind for t in states}
    inputs = {KINDS[k].genai_past: KINDS[k].past.replace("{i}", "%d") for k in KINDS if k in present}
    outputs = {KINDS[k].genai_present: KINDS[k].present.replace("{i}", "%d") for k in KINDS if k in present}
    return inputs, outputs


def _pattern(template: str) -> re.Pattern:
    head, tail = template.split("{i}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")


_PAST = [(kind, _pattern(kind.past)) for kind in KINDS.values()]


def parse_past(name: str) -> tuple[StateKind, int] | None:
    """(kind, layer) of a state input name, None for any other input."""
    for kind, pattern in _PAST:
        match = pattern.match(name)
        if match:
            return kind, int(match.group(1))
    return None


def present_for(past_name: str) -> str:
    """The output that feeds a state input at the next step."""
    parsed = parse_past(past_name)
    if parsed is None:
        raise ValueError(f"{past_name} is not a state input")
    kind, layer = parsed
    return kind.present.format(i=layer)


def empty_past_shape(name: str, declared: list, batch: int = 1, fallback: dict | None = None) -> list[int]:
    """The shape of an empty state input before the first step: batch for the batch axis, 0 for the growing axis,
    the declared size elsewhere (`fallback[axis]` for a symbolic size, e.g. another tool's symbolic head size)."""
    kind, _ = parse_past(name)
    shape = []
    for axis, dim in enumerate(declared):
        if axis == 0:
            shape.append(batch)
        elif axis == kind.sequence_axis:
            shape.append(0)
        elif isinstance(dim, int):
            shape.append(dim)
        elif fallback and axis in fallback:
            shape.append(int(fallback[axis]))
        else:
            raise ValueError(f"state input {name} has a symbolic size {dim!r} at axis {axis}")
    return shape

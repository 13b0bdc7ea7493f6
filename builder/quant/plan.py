"""QuantPlan: decide once, per weight, how it is stored (float, int4 with a base method, or int8).

Inputs are the precision, the INT4 base method, the orthogonal INT8 placement flags and a few facts about the model
(layer count, tied embeddings, linear-attention layers); the output answers `format_for(role, layer)` for every
weight, which `ortbuild inspect` prints as a table before a single weight is read. Layers ask the plan; nobody
re-checks flags inside graph code.

Roles: attn.{q,k,v,o}, mlp.{gate,up,down}, linear_attn.{qkv,out}, moe.router, moe.experts, moe.shared.*, lm_head, embed
(plus family roles such as per_layer.*, which take the base format).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from builder.errors import UsageError
from builder.options import OPTIONS

BASE_METHODS = ("default", "rtn", "k_quant")

# Legacy compound method names -> (base method, flags they imply). Accepted with a deprecation note.
LEGACY_METHODS = {
    "rtn_last": ("rtn", {"last_matmul"}),
    "k_quant_last": ("k_quant", {"last_matmul"}),
    "k_quant_mixed": ("k_quant", {"last_matmul", "mixed_layers"}),
    "k_quant_linear": ("k_quant", {"linear_attn"}),
}
# Short placement name -> the boolean extra option that switches it on.
PLACEMENT_FLAGS = {"last_matmul": "last_matmul_weight_int8", "mixed_layers": "int8_mixed_layers",
                   "linear_attn": "int8_linear_attn"}

# The projections that `int8_mixed_layers` moves to 8 bits inside a mixed layer.
PROJECTION_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
# What `int8_linear_attn` moves to 8 bits in a linear-attention layer: its projections (qkv, z, out; the tiny a/b
# decay projections are always float) and the same layer's MLP or shared expert.
LINEAR_ATTN_ROLES = ("linear_attn.", "mlp.", "moe.shared.")
# Weights that stay float whatever the precision: tiny, and routing decisions are sensitive to them.
ALWAYS_FLOAT_ROLES = ("moe.router", "moe.shared_gate")
# 8-bit weights are always RTN: at 8 bits the base methods differ by less than the activation rounding of
# accuracy_level 4, and RTN needs no search (k_quant's search buys nothing with 256 levels).
INT8_METHOD = "rtn"


@dataclass(frozen=True)
class WeightFormat:
    bits: int | None  # None: stored in the model's float dtype
    method: str = "float"  # "float" | "default" | "rtn" | "k_quant"
    block_size: int = 0
    symmetric: bool = True
    accuracy_level: int = 0

    @property
    def is_float(self) -> bool:
        return self.bits is None

    def describe(self) -> str:
        if self.bits is None:
            return "float"
        sym = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {self.method} block {self.block_size} {sym}"


FLOAT = WeightFormat(None)


def parse_mixed_precision(text: str) -> set[str]:
    """`last_matmul:int8,mixed_layers:int8,linear_attn:int8` -> {"last_matmul", "mixed_layers", "linear_attn"}."""
    flags: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, _, dtype = item.partition(":")
        if target not in PLACEMENT_FLAGS:
            raise UsageError(f"matmul_mixed_precision: unknown target {target!r}; use "
                             f"{', '.join(t + ':int8' for t in PLACEMENT_FLAGS)}.")
        if dtype != "int8":
            raise UsageError(f"matmul_mixed_precision: {target} must be int8 (got {dtype or 'nothing'!r}).")
        flags.add(target)
    return flags


def mixed_layer_indices(num_layers: int) -> frozenset[int]:
    """The 'mixed layers' set: the first and the last max(1, num_layers // 8) layers."""
    edge = max(1, num_layers // 8)
    return frozenset(i for i in range(num_layers) if i < edge or i >= num_layers - edge)


def _resolve_flags(method: str, extra: dict, notes: list[str]) -> tuple[str, set[str]]:
    """(base method, placement flags) from the method option, the three booleans and matmul_mixed_precision."""
    flags: set[str] = set()
    if method in LEGACY_METHODS:
        base, implied = LEGACY_METHODS[method]
        spelled = " ".join(f"{PLACEMENT_FLAGS[f]}=true" for f in sorted(implied))
        notes.append(f"int4_algo_config={method} is deprecated; it means int4_algo_config={base} {spelled}.")
        method, flags = base, set(implied)
    if method not in BASE_METHODS:
        raise UsageError(f"int4_algo_config={method!r} is not a quantization method; choose one of "
                         f"{', '.join(BASE_METHODS)} (legacy: {', '.join(LEGACY_METHODS)}).")
    for short, option in PLACEMENT_FLAGS.items():
        if extra.get(option):
            flags.add(short)
    flags |= parse_mixed_precision(extra.get("matmul_mixed_precision", ""))
    return method, flags


@dataclass(frozen=True)
class QuantPlan:
    bits: int | None  # base bits for projections: 4 (int4), 8 (int8) or None (float precision)
    method: str = "default"  # int4 base method
    block_size: int = 32
    symmetric: bool = True  # of the int4 base (k_quant forces False)
    int8_symmetric: bool = True  # of every 8-bit weight (int4_is_symmetric; RTN supports both)
    accuracy_level: int = 0
    flags: frozenset[str] = frozenset()
    quantize_embeddings: bool = False
    tied_embeddings: bool = False
    num_layers: int = 0
    linear_attn_layers: frozenset[int] = frozenset()
    notes: tuple[str, ...] = ()  # deprecation / no-op messages to show the user

    @classmethod
    def from_options(cls, precision: str, extra: dict, ep: str, num_layers: int, *, tied_embeddings: bool = False,
                     linear_attn_layers=(), model: str = "this model") -> "QuantPlan":
        """Resolve the options once. `extra` is the full typed option dict (defaults filled in)."""
        notes: list[str] = []
        method, flags = _resolve_flags(extra["int4_algo_config"], extra, notes)
        bits = {"int4": 4, "int8": 8}.get(precision)
        if bits is None:
            ignored = [PLACEMENT_FLAGS[f] for f in sorted(flags)]
            ignored += ["quantize_embeddings"] if extra["quantize_embeddings"] else []
            ignored += [f"{o.name}={extra[o.name]}" for o in OPTIONS if o.quantized_only and extra[o.name] != o.default]
            if ignored:
                notes.append(f"-p {precision} keeps every weight in float; ignoring {', '.join(ignored)}.")
            return cls(bits=None, num_layers=num_layers, tied_embeddings=tied_embeddings, notes=tuple(notes))

        linear_attn_layers = frozenset(linear_attn_layers)
        if "linear_attn" in flags and not linear_attn_layers:
            notes.append(f"int8_linear_attn has no target: {model} has no linear-attention layers (only the "
                         "hybrid families, Qwen3.5 and Qwen3-Next, have them), so the flag changes nothing.")
        if bits == 8:
            moot = [PLACEMENT_FLAGS[f] for f in sorted(flags - {"linear_attn"})]
            moot += [f"int4_algo_config={method}"] if method != "default" else []
            if moot:
                notes.append(f"-p int8 stores every MatMul weight in 8 bits (RTN) already; {', '.join(moot)} "
                             "changes nothing.")
        symmetric = bool(extra["int4_is_symmetric"]) and method != "k_quant"
        level = extra["int4_accuracy_level"]
        if level is None:
            level = 4 if ep == "cpu" else 0
        quantize_embeddings = bool(extra["quantize_embeddings"])
        plan = cls(bits=bits, method=method, block_size=extra["int4_block_size"], symmetric=symmetric,
                   int8_symmetric=bool(extra["int4_is_symmetric"]), accuracy_level=level, flags=frozenset(flags),
                   quantize_embeddings=quantize_embeddings, tied_embeddings=tied_embeddings,
                   num_layers=num_layers, linear_attn_layers=linear_attn_layers)
        if plan.shares_embedding and plan.format_for("lm_head") != plan._base():
            notes.append(f"the embedding is tied to the lm_head and both read one quantized table, so it is stored "
                         f"as the lm_head is ({plan.format_for('lm_head').describe()}).")
        return replace(plan, notes=tuple(notes))

    # -- formats -------------------------------------------------------------------------------------------------
    def _int8(self) -> WeightFormat:
        return WeightFormat(8, INT8_METHOD, self.block_size, self.int8_symmetric, self.accuracy_level)

    def _base(self) -> WeightFormat:
        if self.bits == 8:
            return self._int8()
        return WeightFormat(4, self.method, self.block_size, self.symmetric, self.accuracy_level)

    @property
    def shares_embedding(self) -> bool:
        """A tied lm_head and a quantized embedding read the same packed bytes (stored once)."""
        return self.bits is not None and self.quantize_embeddings and self.tied_embeddings

    @property
    def mixed_layers(self) -> frozenset[int]:
        """The layers whose projections are 8-bit (empty unless int8_mixed_layers is on)."""
        return mixed_layer_indices(self.num_layers) if "mixed_layers" in self.flags else frozenset()

    def format_for(self, role: str, layer: int | None = None) -> WeightFormat:
        """How the weight with this role (in this layer) is stored."""
        if self.bits is None or role in ALWAYS_FLOAT_ROLES:
            return FLOAT
        if role == "embed":
            if not self.quantize_embeddings:
                return FLOAT
            return self.format_for("lm_head") if self.tied_embeddings else self._base()
        if role == "lm_head":
            return self._int8() if "last_matmul" in self.flags else self._base()
        if "linear_attn" in self.flags and layer in self.linear_attn_layers and role.startswith(LINEAR_ATTN_ROLES):
            return self._int8()
        if role in PROJECTION_ROLES and layer is not None and layer in self.mixed_layers:
            return self._int8()
        return self._base()

    def summary(self) -> str:
        """One line for `inspect`: the base format and where 8-bit weights go."""
        if self.bits is None:
            return "float weights"
        if self.bits == 8:
            head = f"int8 {INT8_METHOD} block {self.block_size} {'sym' if self.int8_symmetric else 'asym'}"
        else:
            head = f"int4 base {self._base().describe().removeprefix('int4 ')}"
        placed = []
        if "last_matmul" in self.flags:
            placed.append("lm_head")
        if self.mixed_layers:
            placed.append("layers " + ",".join(map(str, sorted(self.mixed_layers))) + " projections")
        if "linear_attn" in self.flags and self.linear_attn_layers:
            placed.append("linear-attention layers' projections and MLP / shared expert")
        tail = f"; int8 for {' + '.join(placed)}" if placed and self.bits == 4 else ""
        embed = "; embeddings " + ("quantized (GatherBlockQuantized)" if self.quantize_embeddings else "float")
        if self.shares_embedding:
            embed += ", shared with the tied lm_head"
        return f"{head}, accuracy_level {self.accuracy_level}{tail}{embed}"

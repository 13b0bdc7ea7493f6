"""QuantPlan: decide once, per weight, how it is stored (float, int4 with a base method, or int8).

Inputs are the precision, the INT4 base method and the orthogonal INT8 placement flags; the output is a small
table (weight name -> WeightFormat) that `ortbuild inspect` prints before a single weight is read. Layers ask the
plan; nobody re-checks flags inside graph code.

Roles: attn.{q,k,v,o}, mlp.{gate,up,down}, linear_attn.*, moe.router, moe.experts, moe.shared.*, lm_head, embed.
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.errors import UsageError

BASE_METHODS = ("default", "rtn", "k_quant")

# Legacy compound method names -> (base method, flags they imply). Accepted with a deprecation note.
LEGACY_METHODS = {
    "rtn_last": ("rtn", {"last_matmul"}),
    "k_quant_last": ("k_quant", {"last_matmul"}),
    "k_quant_mixed": ("k_quant", {"last_matmul", "mixed_layers"}),
    "k_quant_linear": ("k_quant", {"linear_attn"}),
}
PLACEMENT_FLAGS = {"last_matmul": "last_matmul_weight_int8", "mixed_layers": "int8_mixed_layers",
                   "linear_attn": "int8_linear_attn"}

PROJECTION_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


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


@dataclass(frozen=True)
class QuantPlan:
    bits: int | None  # base bits for projections: 4 (int4), 8 (int8) or None (float precision)
    method: str = "default"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    flags: frozenset[str] = frozenset()
    quantize_embeddings: bool = False
    num_layers: int = 0
    notes: tuple[str, ...] = ()  # deprecation / no-op messages to show the user

    @classmethod
    def from_options(cls, precision: str, extra: dict, ep: str, num_layers: int) -> "QuantPlan":
        notes: list[str] = []
        method = extra["int4_algo_config"]
        flags = set()
        if method in LEGACY_METHODS:
            base, implied = LEGACY_METHODS[method]
            spelled = " ".join(f"{PLACEMENT_FLAGS[f]}=true" for f in sorted(implied))
            notes.append(f"int4_algo_config={method} is deprecated; it means int4_algo_config={base} {spelled}.")
            method, flags = base, set(implied)
        for short, option in PLACEMENT_FLAGS.items():
            if extra[option]:
                flags.add(short)
        flags |= parse_mixed_precision(extra["matmul_mixed_precision"])
        bits = {"int4": 4, "int8": 8}.get(precision)
        if bits is None:
            ignored = [PLACEMENT_FLAGS[f] for f in sorted(flags)]
            if ignored or extra["quantize_embeddings"]:
                notes.append(f"-p {precision} keeps every weight in float; ignoring "
                             f"{', '.join(ignored + (['quantize_embeddings'] if extra['quantize_embeddings'] else []))}.")
            return cls(bits=None, num_layers=num_layers, notes=tuple(notes))
        symmetric = extra["int4_is_symmetric"] and method != "k_quant"
        level = extra["int4_accuracy_level"]
        if level is None:
            level = 4 if ep == "cpu" else 0
        return cls(bits=bits, method=method, block_size=extra["int4_block_size"], symmetric=symmetric,
                   accuracy_level=level, flags=frozenset(flags), quantize_embeddings=extra["quantize_embeddings"],
                   num_layers=num_layers, notes=tuple(notes))

    def _int8(self) -> WeightFormat:
        # 8-bit weights always use RTN-style symmetric block quantization ("default" == MLAS, same maths)
        return WeightFormat(8, "default", self.block_size, True, self.accuracy_level)

    def _base(self) -> WeightFormat:
        if self.bits == 8:
            return self._int8()
        return WeightFormat(4, self.method, self.block_size, self.symmetric, self.accuracy_level)

    def format_for(self, role: str, layer: int | None = None) -> WeightFormat:
        """How the weight with this role (in this layer) is stored."""
        if self.bits is None or role in ("moe.router", "moe.shared_gate"):
            return FLOAT
        if role == "embed":
            return self._base() if self.quantize_embeddings else FLOAT
        if role == "lm_head":
            return self._int8() if "last_matmul" in self.flags else self._base()
        if role.startswith("linear_attn.") and "linear_attn" in self.flags:
            return self._int8()
        if (role in PROJECTION_ROLES and layer is not None and "mixed_layers" in self.flags
                and layer in mixed_layer_indices(self.num_layers)):
            return self._int8()
        return self._base()

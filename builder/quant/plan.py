"""QuantPlan: decide once, per weight, how it is stored (float, int4 with a base method, or int8).

Inputs are the precision, the INT4 base method, the orthogonal INT8 placement flags and a few facts about the model
(layer count, tied embeddings, linear-attention layers); the output answers `format_for(role, layer)` for every
weight, which `ortbuild inspect` prints as a table before a single weight is read. Layers ask the plan; nobody
re-checks flags inside graph code.

Roles: attn.{q,k,v,o}, attn.kv_b (latent attention), mlp.{gate,up,down}, linear_attn.{qkv,out,ab}, moe.router,
moe.experts, moe.shared.*, moe.shared_gate, lm_head, embed (plus family roles such as per_layer.*, which take the
base format).

Routed experts are decided here too, from moe_quant_bits / qmoe_block_size, whichever op computes them: experts of a
fused MoE/QMoE layer get the QMoE grid (symmetric MLAS, block or per-channel scales); per-expert experts (Gemma 4,
one MatMulNBits per expert) get those bits and that block size with the base method (8 bits: RTN, as every 8-bit
weight), and per-channel scales, which MatMulNBits cannot store, are a usage error for them.
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
# Weights that stay float whatever the precision: routers and the shared-expert gate (tiny, and routing decisions
# are sensitive to them), linear attention's a/b decay projections (tiny, they drive the recurrent state's decay)
# the per-layer input table (a Gather, with no quantized lookup wired) and latent attention's absorbed kv_b matrices
# (per-head batched MatMul weights, which MatMulNBits cannot hold; builder/layers/mla.py).
ALWAYS_FLOAT_ROLES = ("moe.router", "moe.shared_gate", "linear_attn.ab", "per_layer.embed", "attn.kv_b")
# Options that only concern MoE experts (the first two their numbers, the last two the CUDA QMoE byte layout).
EXPERT_OPTIONS = ("moe_quant_bits", "qmoe_block_size")
QMOE_LAYOUT_OPTIONS = ("qmoe_weights_prepacked", "qmoe_prepack_arch")
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
        block = f"block {self.block_size}" if self.block_size > 0 else "per-channel"
        return f"int{self.bits} {self.method} {block} {sym}"


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


def _given(extra: dict, given) -> set[str]:
    """The options the user set: `given` when known, else those that differ from their defaults."""
    if given is not None:
        return set(given)
    return {o.name for o in OPTIONS if extra.get(o.name, o.default) != o.default}


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
    expert_bits: int | None = None  # routed experts: moe_quant_bits, else the precision's bits
    expert_block_size: int = 32  # qmoe_block_size; 0: one scale per output row (QMoE only)
    fused_expert_layers: frozenset[int] = frozenset()  # layers whose experts are one MoE/QMoE op
    per_expert_layers: frozenset[int] = frozenset()  # layers whose experts are one MatMulNBits per expert
    notes: tuple[str, ...] = ()  # deprecation / no-op messages to show the user

    @classmethod
    def from_options(cls, precision: str, extra: dict, ep: str, num_layers: int, *, tied_embeddings: bool = False,
                     linear_attn_layers=(), fused_expert_layers=(), per_expert_layers=(), expert_k=(),
                     given=None, model: str = "this model") -> "QuantPlan":
        """Resolve the options once. `extra` is the full typed option dict (defaults filled in); `given` names the
        options the user set (default: those that differ from their defaults); `expert_k` lists the input widths
        of fused experts (fc1: hidden, fc2: intermediate), which a QMoE block size must divide."""
        notes: list[str] = []
        given = _given(extra, given)
        method, flags = _resolve_flags(extra["int4_algo_config"], extra, notes)
        bits = {"int4": 4, "int8": 8}.get(precision)
        experts = dict(fused_expert_layers=frozenset(fused_expert_layers),
                       per_expert_layers=frozenset(per_expert_layers))
        if bits is None:
            ignored = [PLACEMENT_FLAGS[f] for f in sorted(flags)]
            ignored += ["quantize_embeddings"] if extra["quantize_embeddings"] else []
            # every quantization-only option set away from its default (expert options included) changes nothing
            ignored += [f"{o.name}={extra[o.name]}" for o in OPTIONS if o.quantized_only and extra[o.name] != o.default]
            if ignored:
                notes.append(f"-p {precision} keeps every weight in float; ignoring {', '.join(ignored)}.")
            return cls(bits=None, num_layers=num_layers, tied_embeddings=tied_embeddings, notes=tuple(notes),
                       expert_bits=None, **experts)

        expert_notes = _expert_option_notes(given, model, **experts)

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
        quantize_embeddings = extra["quantize_embeddings"]
        if quantize_embeddings is None:  # auto: share a tied 4-bit table (quantization.md, "Embeddings")
            quantize_embeddings = bits == 4 and tied_embeddings and "last_matmul" not in flags
        quantize_embeddings = bool(quantize_embeddings)
        expert_block = max(0, extra["qmoe_block_size"])
        _check_expert_blocks(expert_block, expert_k, model, **experts)
        plan = cls(bits=bits, method=method, block_size=extra["int4_block_size"], symmetric=symmetric,
                   int8_symmetric=bool(extra["int4_is_symmetric"]), accuracy_level=level, flags=frozenset(flags),
                   quantize_embeddings=quantize_embeddings, tied_embeddings=tied_embeddings,
                   num_layers=num_layers, linear_attn_layers=linear_attn_layers,
                   expert_bits=extra["moe_quant_bits"] or bits, expert_block_size=expert_block, **experts)
        if plan.shares_embedding and plan.format_for("lm_head") != plan._base():
            notes.append(f"the embedding is tied to the lm_head and both read one quantized table, so it is stored "
                         f"as the lm_head is ({plan.format_for('lm_head').describe()}).")
        return replace(plan, notes=tuple(notes + expert_notes))

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

    def _experts(self, layer: int | None) -> WeightFormat:
        if layer in self.fused_expert_layers:  # QMoE: the symmetric MLAS grid, no zero points, no accuracy level
            return WeightFormat(self.expert_bits, "default", self.expert_block_size, True, 0)
        if layer in self.per_expert_layers:  # one MatMulNBits per expert: the width's usual format, expert blocks
            if self.expert_bits == 8:
                fmt = self._int8()
            elif self.bits == 4:
                fmt = self._base()
            else:  # moe_quant_bits=4 under -p int8: RTN like the rest of that model
                fmt = replace(self._int8(), bits=4)
            return replace(fmt, block_size=self.expert_block_size)
        raise ValueError(f"layer {layer} has no routed experts (the plan knows layers {sorted(self.expert_layers)})")

    @property
    def expert_layers(self) -> frozenset[int]:
        return self.fused_expert_layers | self.per_expert_layers

    def format_for(self, role: str, layer: int | None = None) -> WeightFormat:
        """How the weight with this role (in this layer) is stored."""
        if self.bits is None or role in ALWAYS_FLOAT_ROLES:
            return FLOAT
        if role == "moe.experts":
            return self._experts(layer)
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
        experts = ""
        if self.expert_layers:
            op = "QMoE" if self.fused_expert_layers else "MatMulNBits per expert"
            experts = f"; experts {self._experts(min(self.expert_layers)).describe()} ({op})"
        return f"{head}, accuracy_level {self.accuracy_level}{tail}{embed}{experts}"


def _expert_option_notes(given: set[str], model: str, *, fused_expert_layers: frozenset[int],
                         per_expert_layers: frozenset[int]) -> list[str]:
    """Notes for expert options that have nothing to act on in this model."""
    asked = [o for o in EXPERT_OPTIONS + QMOE_LAYOUT_OPTIONS if o in given]
    if not fused_expert_layers and not per_expert_layers:
        return [f"{', '.join(asked)}: {model} has no MoE experts, so {'they change' if len(asked) > 1 else 'it changes'}"
                " nothing."] if asked else []
    layout = [o for o in QMOE_LAYOUT_OPTIONS if o in given]
    if not fused_expert_layers and layout:
        return [f"{', '.join(layout)}: {model}'s experts are per-expert MatMulNBits weights, not a QMoE op, so "
                f"{'they change' if len(layout) > 1 else 'it changes'} nothing."]
    return []


def _check_expert_blocks(block: int, expert_k, model: str, *, fused_expert_layers: frozenset[int],
                         per_expert_layers: frozenset[int]) -> None:
    """Refuse expert block sizes the expert ops cannot take."""
    if per_expert_layers and block <= 0:
        raise UsageError(f"qmoe_block_size={block} asks for per-channel expert scales, but {model}'s experts are "
                         "per-expert MatMulNBits weights (no QMoE op), whose scales come in blocks of 16..256 along "
                         "K. Use qmoe_block_size=16, 32, 64, 128 or 256 (default 32).")
    bad = sorted(k for k in set(expert_k) if block > 0 and k % block) if fused_expert_layers else []
    if bad:
        raise UsageError(f"qmoe_block_size={block} does not divide the experts' input width {bad[0]} in {model} "
                         "(QMoE blocks must tile K exactly). Use a block size that divides it, or qmoe_block_size=0 "
                         "for per-channel scales.")

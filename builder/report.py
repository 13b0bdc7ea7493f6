"""Human-readable description of an export: the plan before any weight is read (`ortbuild inspect`, `--dry-run`)
and, after writing, what the graph actually stores (the export's closing line).
"""

from __future__ import annotations

from builder.quant.plan import FLOAT
from builder.spec import LinearAttentionSpec, MlpSpec, MoeSpec

# Quantized contrib ops: (bits attribute, its default, inputs holding the packed weights).
QUANTIZED_OPS = {"MatMulNBits": ("bits", 4, (1,)), "GatherBlockQuantized": ("bits", 4, (0,)),
                 "QMoE": ("expert_weight_bits", 4, (2, 5, 8))}


def plan_rows(prepared) -> list[tuple[str, str, int | None]]:
    """(weight, format, bits or None for float) for every weight the plan decides, in graph order."""
    spec, plan = prepared.spec, prepared.settings.plan
    embed = plan.format_for("embed")
    rows = [("embed", embed.describe() + ("" if embed.is_float else " (GatherBlockQuantized)"), embed.bits)]

    def add(name, fmt, suffix=""):
        rows.append((name, fmt.describe() + suffix, None if fmt.is_float else fmt.bits))

    for i, layer in enumerate(spec.layers):
        if isinstance(layer.attention, LinearAttentionSpec):
            add(f"layers.{i}.linear_attn.qkv_z", plan.format_for("linear_attn.qkv", i))
            add(f"layers.{i}.linear_attn.a_b", FLOAT)
            add(f"layers.{i}.linear_attn.out", plan.format_for("linear_attn.out", i))
        else:
            add(f"layers.{i}.attn.qkv", plan.format_for("attn.q", i))
            add(f"layers.{i}.attn.o", plan.format_for("attn.o", i))
        if isinstance(layer.ffn, MlpSpec):
            if layer.ffn.gated:
                add(f"layers.{i}.mlp.gate_up", plan.format_for("mlp.gate", i))
            else:
                add(f"layers.{i}.mlp.up", plan.format_for("mlp.up", i))
            add(f"layers.{i}.mlp.down", plan.format_for("mlp.down", i))
        elif isinstance(layer.ffn, MoeSpec):
            moe = prepared.settings.moe
            experts = "float (MoE)" if moe.bits is None else (
                f"int{moe.bits} QMoE " + (f"block {moe.block_size}" if moe.block_size > 0 else "per-channel"))
            add(f"layers.{i}.moe.router", plan.format_for("moe.router", i))
            rows.append((f"layers.{i}.moe.experts", experts, moe.bits))
            if layer.ffn.shared_expert_size:
                add(f"layers.{i}.moe.shared.gate_up", plan.format_for("moe.shared.gate", i))
                add(f"layers.{i}.moe.shared.down", plan.format_for("moe.shared.down", i))
    add("lm_head" + (" (tied)" if spec.tie_embeddings else ""), plan.format_for("lm_head"),
        " (reads the embed bytes)" if plan.shares_embedding else "")
    return rows


def _layer_ranges(indices: list[int]) -> str:
    if len(indices) == 1:
        return f"layer {indices[0]}"
    contiguous = indices == list(range(indices[0], indices[-1] + 1))
    return f"layers {indices[0]}-{indices[-1]}" if contiguous else "layers " + ",".join(map(str, indices))


def rope_rows(spec) -> list[str]:
    """How each layer rotates q/k (rope type, rotated dims, longrope switch, where the rotation runs), by layer."""
    from builder.layers.rotary import length_switch
    from builder.layers.rotary_graph import rotary_in_op

    groups: dict[str, list[int]] = {}
    for i, layer in enumerate(spec.layers):
        if isinstance(layer.attention, LinearAttentionSpec):
            continue  # no rotary: linear attention is position-free
        attn, rope = layer.attention, layer.attention.rope
        if rope is None:
            text = "none (NoPE)"
        else:
            switch = length_switch(rope)
            text = (f"{rope.rope_type}, theta {rope.theta:g}, {rope.rotary_dim} of {attn.head_dim} dims"
                    + (f", short factors up to {switch} tokens, long beyond" if switch else "")
                    + (", in GroupQueryAttention" if rotary_in_op(attn) else ", RotaryEmbedding before attention")
                    + (" (q/k norm after rotary)" if attn.qk_norm_after_rope else ""))
        groups.setdefault(text, []).append(i)
    return [f"{_layer_ranges(indices)}: {text}" for text, indices in groups.items()]


def _format_name(bits: int | None) -> str:
    return "float" if bits is None else f"int{bits}"


def _counts_text(counts: dict, nominal: int | None) -> str:
    """"0 int4, 9 int8, 3 float" from {bits or None: text}; the precision's own width is named even when empty."""
    keys = [k for k in (4, 8) if k in counts or k == nominal] + ([None] if None in counts else [])
    return ", ".join(f"{counts.get(k, 0)} {_format_name(k)}" for k in keys)


def describe(prepared, notes: bool = True) -> str:
    spec, settings = prepared.spec, prepared.settings
    attn = spec.attention
    heads = (f"heads {attn.num_heads} (kv {attn.num_kv_heads}, head_dim {attn.head_dim})" if attn
             else "no full attention")
    lines = [
        f"architecture: {spec.architecture} (model_type {spec.model_type})",
        f"layers: {spec.num_layers}, hidden {spec.hidden_size}, vocab {spec.vocab_size}, {heads}, "
        f"context {spec.context_length}",
        f"precision: {settings.precision}, ep: {settings.ep}, io dtype: {settings.io_dtype}, "
        f"fused q/k norm: {settings.fuse_qk_norm}",
    ]
    lines += [f"rope: {row}" for row in rope_rows(spec)]
    linear = spec.linear_attention_layers
    if linear:
        mixer = spec.layers[linear[0]].attention
        lines.append(f"linear attention (Gated DeltaNet): layers {','.join(map(str, linear))}; key heads "
                     f"{mixer.num_key_heads} x {mixer.key_head_dim}, value heads {mixer.num_value_heads} x "
                     f"{mixer.value_head_dim}, conv kernel {mixer.conv_kernel}, core and state in "
                     f"{settings.linear_attn_dtype}")
    rows = plan_rows(prepared)
    counts: dict = {}
    for _, _, bits in rows:
        counts[bits] = counts.get(bits, 0) + 1
    nominal = {"int4": 4, "int8": 8}.get(settings.precision)
    lines.append(f"quantization: {settings.plan.summary()}")
    lines.append(f"weights by format: {_counts_text(counts, nominal)} (of {len(rows)} in the plan below)")
    if notes:
        lines += [f"note: {note}" for note in settings.plan.notes]
    width = max(len(name) for name, _, _ in rows)
    lines.append("plan:")
    lines += [f"  {name.ljust(width)}  {fmt}" for name, fmt, _ in rows]
    return "\n".join(lines)


def written_formats(graph, nominal: int | None) -> str:
    """What the graph stores, by format: count of weights and bytes (scales and zero points included) per bit width,
    and the float tensors. Shapes and dtypes only: no weight is read."""
    owner: dict[str, int] = {}  # initializer name -> bits of the quantized op that reads it
    weights: dict = {}
    for node in graph:
        op = QUANTIZED_OPS.get(node.op_type) if node.domain == "com.microsoft" else None
        if op is None:
            continue
        attr = node.attributes.get(op[0])
        bits = int(attr.value) if attr is not None else op[1]
        for index, value in enumerate(node.inputs):
            if value is None or not value.is_initializer() or value.name in owner:
                continue
            owner[value.name] = bits
            if index in op[2]:
                weights[bits] = weights.get(bits, 0) + 1
    sizes: dict = {}
    for name, value in graph.initializers.items():
        bits = owner.get(name)
        if bits is None and not value.dtype.is_floating_point():
            continue  # shapes, axes, token ids
        sizes[bits] = sizes.get(bits, 0) + value.const_value.nbytes
        if bits is None:
            weights[None] = weights.get(None, 0) + 1
    keys = [k for k in (4, 8) if k in sizes or k == nominal] + ([None] if None in sizes else [])
    return "weights written: " + ", ".join(
        f"{weights.get(k, 0)} {_format_name(k)}{' tensors' if k is None else ''} ({sizes.get(k, 0) / 2**20:.1f} MiB)"
        for k in keys)

"""Human-readable description of a prepared export: architecture, settings and the per-weight plan.

Printed by `ortbuild inspect` and `--dry-run` before any weight is read.
"""

from __future__ import annotations

from builder.spec import LinearAttentionSpec, MlpSpec, MoeSpec


def plan_rows(prepared) -> list[tuple[str, str]]:
    """(weight, format) for every weight the plan decides, in graph order."""
    spec, plan = prepared.spec, prepared.settings.plan
    embed = plan.format_for("embed")
    rows = [("embed", embed.describe() + ("" if embed.is_float else " (GatherBlockQuantized)"))]
    for i, layer in enumerate(spec.layers):
        if isinstance(layer.attention, LinearAttentionSpec):
            rows.append((f"layers.{i}.linear_attn.qkv_z", plan.format_for("linear_attn.qkv", i).describe()))
            rows.append((f"layers.{i}.linear_attn.a_b", "float"))
            rows.append((f"layers.{i}.linear_attn.out", plan.format_for("linear_attn.out", i).describe()))
        else:
            rows.append((f"layers.{i}.attn.qkv", plan.format_for("attn.q", i).describe()))
            rows.append((f"layers.{i}.attn.o", plan.format_for("attn.o", i).describe()))
        if isinstance(layer.ffn, MlpSpec):
            if layer.ffn.gated:
                rows.append((f"layers.{i}.mlp.gate_up", plan.format_for("mlp.gate", i).describe()))
            else:
                rows.append((f"layers.{i}.mlp.up", plan.format_for("mlp.up", i).describe()))
            rows.append((f"layers.{i}.mlp.down", plan.format_for("mlp.down", i).describe()))
        elif isinstance(layer.ffn, MoeSpec):
            moe = prepared.settings.moe
            experts = "float (MoE)" if moe.bits is None else (
                f"int{moe.bits} QMoE " + (f"block {moe.block_size}" if moe.block_size > 0 else "per-channel"))
            rows.append((f"layers.{i}.moe.router", plan.format_for("moe.router", i).describe()))
            rows.append((f"layers.{i}.moe.experts", experts))
            if layer.ffn.shared_expert_size:
                rows.append((f"layers.{i}.moe.shared.gate_up", plan.format_for("moe.shared.gate", i).describe()))
                rows.append((f"layers.{i}.moe.shared.down", plan.format_for("moe.shared.down", i).describe()))
    head = plan.format_for("lm_head").describe()
    if plan.shares_embedding:
        head += " (reads the embed bytes)"
    rows.append(("lm_head" + (" (tied)" if spec.tie_embeddings else ""), head))
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


def describe(prepared) -> str:
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
    lines.append(f"quantization: {settings.plan.summary()}")
    lines += [f"note: {note}" for note in settings.plan.notes]
    rows = plan_rows(prepared)
    width = max(len(name) for name, _ in rows)
    lines.append("plan:")
    lines += [f"  {name.ljust(width)}  {fmt}" for name, fmt in rows]
    return "\n".join(lines)

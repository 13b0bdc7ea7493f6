"""Human-readable description of a prepared export: architecture, settings and the per-weight plan.

Printed by `ortbuild inspect` and `--dry-run` before any weight is read. The plan table has a row for every weight
whose storage the QuantPlan decides (every projection, expert, embedding table and head the graph writes), named by
the initializer prefix the graph gives it; per-expert weights are grouped per layer (`experts.*`). Norms, biases,
sinks, layer scalars and rotary caches are always stored in the model's float dtype.
"""

from __future__ import annotations

from builder.spec import DenseMoeSpec, LinearAttentionSpec, MlpSpec, MoeSpec

ALWAYS_MODEL_DTYPE = "norms, biases, attention sinks, layer scalars, rotary caches"


def _layer_rows(plan, i: int, layer) -> list[tuple[str, str]]:
    attn, ffn = layer.attention, layer.ffn
    fmt = lambda role: plan.format_for(role, i).describe()  # noqa: E731
    if isinstance(attn, LinearAttentionSpec):  # qkv+z in one MatMul, a+b in another, then out
        rows = [(f"layers.{i}.linear_attn.in_proj", fmt("linear_attn.qkv")),
                (f"layers.{i}.linear_attn.ab", fmt("linear_attn.ab")),
                (f"layers.{i}.linear_attn.out", fmt("linear_attn.out"))]
    else:
        rows = [(f"layers.{i}.attn.{'qkv' if attn.kv_source is None else 'q'}", fmt("attn.q")),
                (f"layers.{i}.attn.o", fmt("attn.o"))]
    mlp = ffn.mlp if isinstance(ffn, DenseMoeSpec) else ffn if isinstance(ffn, MlpSpec) else None
    if mlp is not None:
        rows += [(f"layers.{i}.mlp.gate_up", fmt("mlp.gate")) if mlp.gated else (f"layers.{i}.mlp.up", fmt("mlp.up")),
                 (f"layers.{i}.mlp.down", fmt("mlp.down"))]
    if isinstance(ffn, MoeSpec):
        experts = plan.format_for("moe.experts", i)
        op = " (MoE)" if experts.is_float else " (QMoE)"
        rows += [(f"layers.{i}.moe.router", fmt("moe.router")), (f"layers.{i}.moe.fc1", experts.describe() + op),
                 (f"layers.{i}.moe.fc2", experts.describe() + op)]
        if ffn.shared_expert_size:
            rows += [(f"layers.{i}.moe.shared.gate_up", fmt("moe.shared.gate")),
                     (f"layers.{i}.moe.shared.down", fmt("moe.shared.down"))]
            if ffn.shared_expert_gated:
                rows.append((f"layers.{i}.moe.shared_gate", fmt("moe.shared_gate")))
    elif isinstance(ffn, DenseMoeSpec):
        each = f" ({ffn.moe.num_experts} experts, one MatMul each)"
        rows += [(f"layers.{i}.moe.router", fmt("moe.router")),
                 (f"layers.{i}.moe.experts.*.gate_up", fmt("moe.experts") + each),
                 (f"layers.{i}.moe.experts.*.down", fmt("moe.experts") + each)]
    return rows


def plan_rows(prepared) -> list[tuple[str, str]]:
    """(weight, format) for every weight the plan decides, in graph order."""
    spec, plan = prepared.spec, prepared.settings.plan
    embed = plan.format_for("embed")
    rows = [("embed", embed.describe() + ("" if embed.is_float else " (GatherBlockQuantized)"))]
    if spec.per_layer_input_size:
        rows += [("per_layer.embed", plan.format_for("per_layer.embed").describe()),
                 ("per_layer.projection", plan.format_for("per_layer.projection").describe())]
    for i, layer in enumerate(spec.layers):
        rows += _layer_rows(plan, i, layer)
        if spec.per_layer_input_size:
            rows += [(f"layers.{i}.per_layer.gate", plan.format_for("per_layer.gate", i).describe()),
                     (f"layers.{i}.per_layer.projection", plan.format_for("per_layer.projection", i).describe())]
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
    lines += [f"note: {note}" for note in prepared.notes]
    rows = plan_rows(prepared)
    width = max(len(name) for name, _ in rows)
    lines.append(f"stored as {settings.io_dtype} whatever the plan: {ALWAYS_MODEL_DTYPE}")
    lines.append("plan:")
    lines += [f"  {name.ljust(width)}  {fmt}" for name, fmt in rows]
    return "\n".join(lines)

"""Human-readable description of an export: the plan before any weight is read (`ortbuild inspect`, `--dry-run`)
and, after writing, what the graph actually stores (the export's closing line).

The plan table has a row for every weight whose storage the QuantPlan decides (every projection, expert, embedding
table and head the graph writes), named by the initializer prefix the graph gives it; per-expert weights are grouped
per layer (`experts.*`). Norms, biases, sinks, layer scalars and rotary caches are always stored in the model's float
dtype.
"""

from __future__ import annotations

from builder.spec import AttentionSpec, DenseMoeSpec, LinearAttentionSpec, MlpSpec, MoeSpec

ALWAYS_MODEL_DTYPE = "norms, biases, attention sinks, layer scalars, rotary caches"
# Quantized contrib ops: (bits attribute, its default, inputs holding the packed weights).
QUANTIZED_OPS = {"MatMulNBits": ("bits", 4, (1,)), "GatherBlockQuantized": ("bits", 4, (0,)),
                 "QMoE": ("expert_weight_bits", 4, (2, 5, 8))}


def _row(name: str, fmt, suffix: str = "") -> tuple[str, str, int | None]:
    return name, fmt.describe() + suffix, fmt.bits


def _layer_rows(plan, i: int, layer) -> list[tuple[str, str, int | None]]:
    attn, ffn = layer.attention, layer.ffn
    fmt = lambda role: plan.format_for(role, i)  # noqa: E731
    if isinstance(attn, LinearAttentionSpec):  # qkv+z in one MatMul, a+b in another, then out
        rows = [_row(f"layers.{i}.linear_attn.in_proj", fmt("linear_attn.qkv")),
                _row(f"layers.{i}.linear_attn.ab", fmt("linear_attn.ab")),
                _row(f"layers.{i}.linear_attn.out", fmt("linear_attn.out"))]
    elif attn.latent is not None:  # q_a (or q) + kv_a in one MatMul, q_b, the absorbed kv_b halves, then o
        rows = [_row(f"layers.{i}.attn.qkv_a", fmt("attn.q"))]
        rows += [_row(f"layers.{i}.attn.q_b", fmt("attn.q"))] if attn.latent.q_lora_rank is not None else []
        rows += ([_row(f"layers.{i}.attn.kv_b", fmt("attn.kv_b"))] if attn.latent.form == "decompressed" else
                 [_row(f"layers.{i}.attn.kv_b_{part}", fmt("attn.kv_b"), " (per-head MatMul)")
                  for part in ("key", "value")])
        rows.append(_row(f"layers.{i}.attn.o", fmt("attn.o")))
    else:
        rows = [_row(f"layers.{i}.attn.{'qkv' if attn.kv_source is None else 'q'}", fmt("attn.q")),
                _row(f"layers.{i}.attn.o", fmt("attn.o"))]
    mlp = ffn.mlp if isinstance(ffn, DenseMoeSpec) else ffn if isinstance(ffn, MlpSpec) else None
    if mlp is not None:
        rows += [_row(f"layers.{i}.mlp.gate_up", fmt("mlp.gate")) if mlp.gated else
                 _row(f"layers.{i}.mlp.up", fmt("mlp.up")), _row(f"layers.{i}.mlp.down", fmt("mlp.down"))]
    if isinstance(ffn, MoeSpec):
        experts = plan.format_for("moe.experts", i)
        op = " (MoE)" if experts.is_float else " (QMoE)"
        rows += [_row(f"layers.{i}.moe.router", fmt("moe.router")), _row(f"layers.{i}.moe.fc1", experts, op),
                 _row(f"layers.{i}.moe.fc2", experts, op)]
        if ffn.shared_expert_size:
            rows += [_row(f"layers.{i}.moe.shared.gate_up", fmt("moe.shared.gate")),
                     _row(f"layers.{i}.moe.shared.down", fmt("moe.shared.down"))]
            if ffn.shared_expert_gated:
                rows.append(_row(f"layers.{i}.moe.shared_gate", fmt("moe.shared_gate")))
    elif isinstance(ffn, DenseMoeSpec):
        each = f" ({ffn.moe.num_experts} experts, one MatMul each)"
        rows += [_row(f"layers.{i}.moe.router", fmt("moe.router")),
                 _row(f"layers.{i}.moe.experts.*.gate_up", fmt("moe.experts"), each),
                 _row(f"layers.{i}.moe.experts.*.down", fmt("moe.experts"), each)]
    return rows


def plan_rows(prepared) -> list[tuple[str, str, int | None]]:
    """(weight, format, bits or None for float) for every weight the plan decides, in graph order."""
    spec, plan = prepared.spec, prepared.settings.plan
    embed = plan.format_for("embed")
    rows = [_row("embed", embed, "" if embed.is_float else " (GatherBlockQuantized)")]
    if spec.per_layer_input_size:
        rows += [_row("per_layer.embed", plan.format_for("per_layer.embed")),
                 _row("per_layer.projection", plan.format_for("per_layer.projection"))]
    for i, layer in enumerate(spec.layers):
        rows += _layer_rows(plan, i, layer)
        if spec.per_layer_input_size:
            rows += [_row(f"layers.{i}.per_layer.gate", plan.format_for("per_layer.gate", i)),
                     _row(f"layers.{i}.per_layer.projection", plan.format_for("per_layer.projection", i))]
    head_note = (" (reads the embed bytes)" if plan.shares_embedding else
                 " (CUDA fpA_intB layout: lm_head_prepacked)" if prepared.settings.lm_head_prepacked else "")
    rows.append(_row("lm_head" + (" (tied)" if spec.tie_embeddings else ""), plan.format_for("lm_head"), head_note))
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


def qk_norm_rows(spec, settings) -> list[str]:
    """Where each attention layer's q/k norm runs (fused into GroupQueryAttention or as nodes, and why), by layer."""
    from builder.layers.attention import kv_sharing_layers, qk_norm_placement

    sharing = kv_sharing_layers(spec)
    groups: dict[str, list[int]] = {}
    for i, layer in enumerate(spec.layers):
        if isinstance(layer.attention, LinearAttentionSpec):
            continue  # its q/k L2 normalisation is part of the linear-attention layer
        where = qk_norm_placement(layer.attention, settings.fuse_qk_norm, i in sharing)
        text = ("none" if where is None else "fused into GroupQueryAttention" if where == "fused"
                else f"RMSNorm nodes ({where})")
        groups.setdefault(text, []).append(i)
    return [f"{_layer_ranges(indices)}: {text}" for text, indices in groups.items()]


def moe_rows(spec) -> list[str]:
    """How each fused-MoE layer routes, by layer (builder/layers/routing.py)."""
    from builder.layers.routing import describe as describe_routing

    groups: dict[str, list[int]] = {}
    for i, layer in enumerate(spec.layers):
        if isinstance(layer.ffn, MoeSpec):
            groups.setdefault(describe_routing(layer.ffn), []).append(i)
    return [f"{_layer_ranges(indices)}: {text}" for text, indices in groups.items()]


def _latent_text(attn) -> str:
    lat = attn.latent
    q = f"q_a {lat.q_lora_rank} -> norm -> q_b" if lat.q_lora_rank is not None else "one q projection"
    cached = (f"key and value rows of {lat.cache_width}" if lat.form == "absorbed" else
              f"{attn.num_kv_heads} key and value heads of {attn.head_dim}"
              + (f" (values padded from {lat.v_head_dim})" if lat.v_head_dim != attn.head_dim else ""))
    return (f"latent (MLA): {q}, kv latent {lat.kv_lora_rank}, heads of nope {lat.qk_nope_head_dim} + rope "
            f"{lat.qk_rope_head_dim} (v {lat.v_head_dim}); {lat.form}, cached per token: {cached}")


def attention_rows(spec) -> list[str]:
    """Attention variants that change which keys a query sees or how it is scaled (chunks, windows, temperature), and
    latent attention (its ranks and what it caches)."""
    groups: dict[str, list[int]] = {}
    for i, layer in enumerate(spec.layers):
        attn = layer.attention
        if not isinstance(attn, AttentionSpec):
            continue
        parts = [_latent_text(attn)] if attn.latent is not None else []
        if attn.attention_chunk:
            parts.append(f"chunks of {attn.attention_chunk} (attention_bias)")
        if attn.sliding_window:
            parts.append(f"sliding window {attn.sliding_window}")
        if attn.query_position_scale:
            beta, period = attn.query_position_scale
            parts.append(f"q x (1 + {beta:g} ln(1 + floor((pos + {attn.query_position_offset}) / {period})))")
        if parts:
            groups.setdefault(", ".join(parts), []).append(i)
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
        f"precision: {settings.precision}, ep: {settings.ep}, io dtype: {settings.io_dtype}",
        "logits: " + ("[batch, 1, vocab], each row's last real token (last_token_logits)"
                      if settings.last_token_logits else "[batch, sequence, vocab], every position"),
        "padded batches: " + ("left or right, exact" if settings.left_padding else
                              "right-padded or unpadded only (left_padding=false: no reorder)"),
    ]
    lines += [f"rope: {row}" for row in rope_rows(spec)]
    lines += [f"q/k norm: {row}" for row in qk_norm_rows(spec, settings)]
    lines += [f"attention: {row}" for row in attention_rows(spec)]
    lines += [f"moe: {row}" for row in moe_rows(spec)]
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
        lines += [f"note: {note}" for note in prepared.notes]
    width = max(len(name) for name, _, _ in rows)
    lines.append(f"stored as {settings.io_dtype} whatever the plan: {ALWAYS_MODEL_DTYPE}")
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

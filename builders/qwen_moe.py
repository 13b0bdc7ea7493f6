"""Sparse MoE decoders with the Llama attention layout: Qwen2-MoE, Qwen3-MoE, Mixtral.

Per-expert checkpoint tensors are stacked lazily into expert-major [E, N, K] (fc1 with gate/up rows interleaved);
routing and shared experts are data on the MoeSpec, the graph is the shared MoE layer.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import LayerSpec, MlpSpec, ModelSpec, MoeSpec
from builder.weights import InterleavedGateUp, Stacked, Stored, WeightMap
from builders import Family, register
from builders.common import map_table, reject_fields
from builders.llama import MLP_TABLE, attention_specs, map_base, model_spec

# Per-architecture data: where the block lives, the expert projection names (gate, up, down), the router name.
VARIANTS = {
    "Qwen3MoeForCausalLM": dict(block="mlp", experts=("gate_proj", "up_proj", "down_proj"), router="gate",
                                qk_norm=True, fixed_bias=None),
    "Qwen2MoeForCausalLM": dict(block="mlp", experts=("gate_proj", "up_proj", "down_proj"), router="gate",
                                qk_norm=False, fixed_bias=(True, False)),
    "MixtralForCausalLM": dict(block="block_sparse_moe", experts=("w1", "w3", "w2"), router="gate",
                               qk_norm=False, fixed_bias=(False, False)),
}


def is_moe_layer(config: dict, index: int) -> bool:
    """Qwen's mlp_only_layers / decoder_sparse_step select dense layers; Mixtral is sparse everywhere."""
    if index in (config.get("mlp_only_layers") or []):
        return False
    step = config.get("decoder_sparse_step") or 1
    return (index + 1) % step == 0


def moe_spec(config: dict) -> MoeSpec:
    arch = config["architectures"][0]
    experts = config.get("num_experts") or config.get("num_local_experts")
    shared = config.get("shared_expert_intermediate_size") or 0
    return MoeSpec(num_experts=experts, top_k=config["num_experts_per_tok"],
                   intermediate_size=config.get("moe_intermediate_size") or config["intermediate_size"],
                   activation="silu", swiglu_alpha=1.0, swiglu_beta=0.0,
                   normalize_topk=bool(config.get("norm_topk_prob", arch == "MixtralForCausalLM")),
                   shared_expert_size=shared, shared_expert_gated=bool(shared))


def make_spec(config: dict) -> ModelSpec:
    arch = config["architectures"][0]
    variant = VARIANTS[arch]
    reject_fields(config, arch, {"hidden_act": "silu"})
    moe = moe_spec(config)
    dense = MlpSpec(intermediate_size=config["intermediate_size"])
    attentions = attention_specs(config, qk_norm=variant["qk_norm"], fixed_bias=variant["fixed_bias"])
    layers = tuple(LayerSpec(attention=a, ffn=moe if is_moe_layer(config, i) else dense)
                   for i, a in enumerate(attentions))
    return model_spec(config, layers)


def stack_experts(ckpt: Checkpoint, template: str, experts: int) -> Stacked:
    return Stacked(tuple(Stored(ckpt.tensor(template.format(e=e))) for e in range(experts)))


def map_weights(spec: ModelSpec, ckpt: Checkpoint, config: dict) -> WeightMap:
    variant = VARIANTS[spec.architecture]
    weights = map_base(spec, ckpt)
    gate_name, up_name, down_name = variant["experts"]
    for i, layer in enumerate(spec.layers):
        if not isinstance(layer.ffn, MoeSpec):
            map_table(ckpt, weights, {k.replace("{i}", str(i)): v.replace("{i}", str(i))
                                      for k, v in MLP_TABLE.items()}, 0)
            continue
        block = f"model.layers.{i}.{variant['block']}"
        moe = layer.ffn
        weights.add(f"layers.{i}.moe.router.weight", Stored(ckpt.tensor(f"{block}.{variant['router']}.weight")))
        expert = f"{block}.experts.{{e}}.{{name}}.weight"
        gate = stack_experts(ckpt, expert.replace("{name}", gate_name), moe.num_experts)
        up = stack_experts(ckpt, expert.replace("{name}", up_name), moe.num_experts)
        weights.add(f"layers.{i}.moe.fc1.weight", InterleavedGateUp(gate, up))
        weights.add(f"layers.{i}.moe.fc2.weight", stack_experts(ckpt, expert.replace("{name}", down_name),
                                                               moe.num_experts))
        if moe.shared_expert_size:
            for part in ("gate", "up", "down"):
                weights.add(f"layers.{i}.moe.shared.{part}.weight",
                            Stored(ckpt.tensor(f"{block}.shared_expert.{part}_proj.weight")))
            weights.add(f"layers.{i}.moe.shared_gate.weight", Stored(ckpt.tensor(f"{block}.shared_expert_gate.weight")))
    return weights


register(Family("qwen_moe", tuple(VARIANTS), make_spec, map_weights,
                notes="Qwen3-MoE (q/k norm, mlp_only_layers), Qwen2-MoE (shared expert, no top-k renorm), Mixtral"))

"""Sparse MoE decoders with the Llama attention layout: Qwen2-MoE, Qwen3-MoE, Mixtral.

Per-expert checkpoint tensors are stacked lazily into expert-major [E, N, K] (fc1 with gate/up rows interleaved);
routing and shared experts are data on the MoeSpec, the graph is the shared MoE layer.
"""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import LayerSpec, MlpSpec, ModelSpec, MoeSpec, RoutingSpec
from builder.weights import InterleavedGateUp, Stacked, Stored, WeightMap
from builders import Family, register
from builders.common import map_table
from builders.config import Config
from builders.llama import MLP_TABLE, attention_specs, map_base, model_spec

# Per-architecture data: where the block lives, the expert projection names (gate, up, down), the router name, the
# config field counting the experts.
VARIANTS = {
    "Qwen3MoeForCausalLM": dict(block="mlp", experts=("gate_proj", "up_proj", "down_proj"), router="gate",
                                count="num_experts", qk_norm=True, fixed_bias=None),
    "Qwen2MoeForCausalLM": dict(block="mlp", experts=("gate_proj", "up_proj", "down_proj"), router="gate",
                                count="num_experts", qk_norm=False, fixed_bias=(True, False)),
    "MixtralForCausalLM": dict(block="block_sparse_moe", experts=("w1", "w3", "w2"), router="gate",
                               count="num_local_experts", qk_norm=False, fixed_bias=(False, False)),
}


def is_moe_layer(cfg: Config, index: int) -> bool:
    """Qwen's mlp_only_layers / decoder_sparse_step select dense layers; Mixtral is sparse everywhere."""
    if index in cfg.list("mlp_only_layers", [], of=int):
        return False
    return (index + 1) % cfg.int("decoder_sparse_step", 1, minimum=1) == 0


def moe_spec(cfg: Config) -> MoeSpec:
    variant = VARIANTS[cfg.architecture]
    shared = cfg.int("shared_expert_intermediate_size", 0, minimum=0)
    return MoeSpec(num_experts=cfg.int(variant["count"], minimum=1),
                   top_k=cfg.int("num_experts_per_tok", minimum=1),
                   intermediate_size=cfg.int("moe_intermediate_size", None, minimum=1) or cfg.int("intermediate_size",
                                                                                                  minimum=1),
                   activation="silu", swiglu_alpha=1.0, swiglu_beta=0.0,
                   routing=RoutingSpec(normalize_topk=cfg.bool("norm_topk_prob",
                                                               cfg.architecture == "MixtralForCausalLM")),
                   shared_expert_size=shared, shared_expert_gated=bool(shared))


def make_spec(cfg: Config) -> ModelSpec:
    variant = VARIANTS[cfg.architecture]
    cfg.str("hidden_act", "silu", choices=("silu",))
    moe = moe_spec(cfg)
    if moe.top_k > moe.num_experts:
        raise cfg.bad("num_experts_per_tok", moe.top_k, f"at most {variant['count']}={moe.num_experts}")
    dense = MlpSpec(intermediate_size=cfg.int("intermediate_size", minimum=1))
    attentions = attention_specs(cfg, qk_norm=variant["qk_norm"], fixed_bias=variant["fixed_bias"])
    layers = tuple(LayerSpec(attention=a, ffn=moe if is_moe_layer(cfg, i) else dense)
                   for i, a in enumerate(attentions))
    return model_spec(cfg, layers)


def stack_experts(ckpt: Checkpoint, template: str, experts: int) -> Stacked:
    return Stacked(tuple(Stored(ckpt.tensor(template.format(e=e))) for e in range(experts)))


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
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
        router = f"{block}.{variant['router']}.weight"
        weights.add(f"layers.{i}.moe.router.weight", Stored(ckpt.tensor(router)), router)
        expert = f"{block}.experts.{{e}}.{{name}}.weight"
        gate = stack_experts(ckpt, expert.replace("{name}", gate_name), moe.num_experts)
        up = stack_experts(ckpt, expert.replace("{name}", up_name), moe.num_experts)
        weights.add(f"layers.{i}.moe.fc1.weight", InterleavedGateUp.from_gate_up(gate, up),
                    expert.replace("{name}", f"{{{gate_name},{up_name}}}"))
        weights.add(f"layers.{i}.moe.fc2.weight", stack_experts(ckpt, expert.replace("{name}", down_name),
                                                               moe.num_experts), expert.replace("{name}", down_name))
        if moe.shared_expert_size:
            for part in ("gate", "up", "down"):
                name = f"{block}.shared_expert.{part}_proj.weight"
                weights.add(f"layers.{i}.moe.shared.{part}.weight", Stored(ckpt.tensor(name)), name)
            name = f"{block}.shared_expert_gate.weight"
            weights.add(f"layers.{i}.moe.shared_gate.weight", Stored(ckpt.tensor(name)), name)
    return weights


register(Family("qwen_moe", tuple(VARIANTS), make_spec, map_weights,
                notes="Qwen3-MoE (q/k norm, mlp_only_layers), Qwen2-MoE (shared expert, no top-k renorm), Mixtral"))

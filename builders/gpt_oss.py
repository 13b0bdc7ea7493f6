"""GPT-OSS (openai/gpt-oss-20b, -120b and their fine-tunes): Llama-layout attention with learned attention sinks,
biases on every projection, alternating sliding/full layers and YaRN rope; every layer is a sparse MoE whose
experts use a clamped SwiGLU, gate.clamp(max=L) * sigmoid(1.702 * gate) * (up.clamp(-L, L) + 1), with biases.

Experts come in two on-disk formats, both exported to every precision:
  bf16 (fine-tunes, community copies): `mlp.experts.gate_up_proj` [E, H, 2I] with gate/up alternating on the last
      axis, `down_proj` [E, I, H] (the `x @ W[e]` orientation) -> to_expert_major;
  MXFP4 (the original release): `*_blocks` / `*_scales`, already [E, out, in] -> decoded lazily per expert.
The router is a biased linear whose top-k logits are softmaxed, which is what MoE/QMoE compute (softmax over all
experts, top-k, renormalise).
"""

from __future__ import annotations

from dataclasses import replace

from builder.checkpoint import Checkpoint
from builder.errors import CheckpointError, UnsupportedModelError
from builder.mxfp4 import Mxfp4Experts
from builder.spec import LayerSpec, ModelSpec, MoeSpec, RoutingSpec
from builder.weights import Stored, Weight, WeightMap, to_expert_major
from builders import Family, register
from builders.common import map_table
from builders.config import Config
from builders.llama import attention_specs, map_base, model_spec

ARCH = "GptOssForCausalLM"

# What transformers' GptOssConfig assumes when config.json names no rope (the released configs always do).
DEFAULT_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}

TABLE = {
    "layers.{i}.attn.sinks": "model.layers.{i}.self_attn.sinks",
    "layers.{i}.moe.router.weight": "model.layers.{i}.mlp.router.weight",
    "layers.{i}.moe.router.bias": "model.layers.{i}.mlp.router.bias",
    "layers.{i}.moe.fc1.bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",  # [E, 2I], gate/up alternate
    "layers.{i}.moe.fc2.bias": "model.layers.{i}.mlp.experts.down_proj_bias",  # [E, H]
}
# canonical expert weight -> checkpoint projection name
EXPERT_PROJECTIONS = {"fc1": "gate_up_proj", "fc2": "down_proj"}


def _with_rope_default(cfg: Config) -> Config:
    if "rope_parameters" in cfg or "rope_scaling" in cfg:
        return cfg
    return cfg.updated(rope_parameters={**DEFAULT_ROPE, "rope_theta": cfg.float("rope_theta", 150000.0)})


def _check_quantization(cfg: Config) -> None:
    quant = cfg.sub("quantization_config", None)
    method = quant.str("quant_method", None) if quant is not None else None
    if quant is not None and quant.keys() and method != "mxfp4":
        raise UnsupportedModelError(
            f"{ARCH}: quantization_config.quant_method={method!r} is not supported; ortbuild reads GPT-OSS experts "
            "in bf16/fp16/fp32 or the original MXFP4 format. Use the original or a dequantized checkpoint.")


def make_spec(cfg: Config) -> ModelSpec:
    _check_quantization(cfg)
    cfg = _with_rope_default(cfg)
    experts = cfg.int("num_local_experts", minimum=1)
    top_k = (cfg.int("num_experts_per_tok", None, minimum=1) or cfg.int("experts_per_token", None, minimum=1)
             or cfg.int("num_experts_per_tok"))  # neither: name the current spelling
    if top_k > experts:
        raise cfg.bad("num_experts_per_tok", top_k, f"at most num_local_experts={experts}")
    moe = MoeSpec(num_experts=experts, top_k=top_k, intermediate_size=cfg.int("intermediate_size", minimum=1),
                  activation="gpt_oss", swiglu_limit=cfg.float("swiglu_limit", 7.0),
                  swiglu_alpha=cfg.float("swiglu_alpha", 1.702), swiglu_beta=1.0,
                  expert_bias=True, router_bias=True, routing=RoutingSpec(normalize_topk=True))
    attentions = attention_specs(cfg, qk_norm=False, fixed_bias=None)
    layers = tuple(LayerSpec(attention=replace(a, sinks=True), ffn=moe) for a in attentions)
    return model_spec(cfg, layers)


def expert_weight(ckpt: Checkpoint, prefix: str, projection: str) -> Weight:
    """[E, N, K] float weight of one fused expert projection, from whichever format the checkpoint holds."""
    name = f"{prefix}.{projection}"
    if ckpt.has(name):
        return to_expert_major(Stored(ckpt.tensor(name)))
    if ckpt.has(f"{name}_blocks") and ckpt.has(f"{name}_scales"):
        return Mxfp4Experts(ckpt.tensor(f"{name}_blocks"), ckpt.tensor(f"{name}_scales"))
    raise CheckpointError(f"{ARCH}: neither {name} (bf16 experts) nor {name}_blocks + {name}_scales (MXFP4 experts) "
                          f"is in the checkpoint in {ckpt.folder}. The checkpoint is incomplete; re-download it.")


def map_weights(spec: ModelSpec, ckpt: Checkpoint) -> WeightMap:
    weights = map_base(spec, ckpt)
    map_table(ckpt, weights, TABLE, spec.num_layers)
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        for canonical, projection in EXPERT_PROJECTIONS.items():
            weights.add(f"layers.{i}.moe.{canonical}.weight", expert_weight(ckpt, prefix, projection),
                        f"{prefix}.{projection}")
    return weights


register(Family("gpt_oss", (ARCH,), make_spec, map_weights,
                notes="GPT-OSS: attention sinks, yarn, sliding/full layers, clamped-SwiGLU MoE; bf16 or MXFP4 experts"))

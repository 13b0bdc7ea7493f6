"""Config readers and weight tables shared by the MoE families: routing fields -> RoutingSpec, per-expert checkpoint
tensors -> the fused op's [E, N, K] experts, shared experts, and the extra layers (multi-token prediction) released
checkpoints carry after the decoder."""

from __future__ import annotations

from builder.checkpoint import Checkpoint
from builder.spec import RoutingSpec
from builder.weights import InterleavedGateUp, Stacked, WeightMap
from builders.common import checkpoint_weight
from builders.config import Config

# DeepSeek-V3 / GLM-4.5 router: sigmoid scores, correction bias for selection, group-limited top-k ("noaux_tc").
NOAUX_TC = "noaux_tc"


def noaux_tc_routing(cfg: Config, num_experts: int, top_k: int) -> RoutingSpec:
    """The noaux_tc router (transformers' DeepseekV3TopkRouter / Glm4MoeTopkRouter): sigmoid scores plus
    e_score_correction_bias select, groups ranked by their top-2 sum, top-k, optional renormalisation, then
    routed_scaling_factor. transformers computes this whatever `topk_method` / `scoring_func` say, so any other value
    is refused (exit 3) rather than exported as something the config does not describe."""
    cfg.str("topk_method", NOAUX_TC, choices=(NOAUX_TC,))
    cfg.str("scoring_func", "sigmoid", choices=("sigmoid",))
    n_group = cfg.int("n_group", 1, minimum=1)
    topk_group = cfg.int("topk_group", 1, minimum=1)
    if num_experts % n_group:
        raise cfg.bad("n_group", n_group, f"a divisor of the expert count {num_experts}")
    if topk_group > n_group:
        raise cfg.bad("topk_group", topk_group, f"at most n_group={n_group}")
    if n_group > 1 and topk_group < n_group:
        if num_experts // n_group < 2:
            raise cfg.unsupported("n_group", n_group, why=f"groups of {num_experts // n_group} expert have no top-2 "
                                  "score to rank them by")
        if top_k > topk_group * (num_experts // n_group):
            raise cfg.bad("topk_group", topk_group, f"enough groups to hold num_experts_per_tok={top_k} experts")
    return RoutingSpec(scoring="sigmoid", correction_bias=True, n_group=n_group, topk_group=topk_group,
                       normalize_topk=cfg.bool("norm_topk_prob", True),
                       scaling_factor=cfg.float("routed_scaling_factor", 1.0), float32_logits=True)


def top_k(cfg: Config, num_experts: int, key: str = "num_experts_per_tok") -> int:
    k = cfg.int(key, minimum=1)
    if k > num_experts:
        raise cfg.bad(key, k, f"at most the expert count {num_experts}")
    return k


def stacked(ckpt: Checkpoint, template: str, count: int) -> Stacked:
    """Per-expert tensors `template.format(e=...)` stacked into [E, ...], read expert by expert."""
    return Stacked(tuple(checkpoint_weight(ckpt, template.format(e=e)) for e in range(count)))


def map_experts(ckpt: Checkpoint, weights: WeightMap, index: int, experts: str, count: int,
                names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
    """Per-expert `{experts}.{e}.{gate,up,down}.weight` -> fc1 [E, 2I, H] (gate/up rows interleaved), fc2 [E, H, I]."""
    gate, up, down = names
    template = f"{experts}.{{e}}.{{name}}.weight"
    fc1 = InterleavedGateUp.from_gate_up(stacked(ckpt, template.replace("{name}", gate), count),
                                         stacked(ckpt, template.replace("{name}", up), count))
    weights.add(f"layers.{index}.moe.fc1.weight", fc1, template.replace("{name}", f"{{{gate},{up}}}"))
    weights.add(f"layers.{index}.moe.fc2.weight", stacked(ckpt, template.replace("{name}", down), count),
                template.replace("{name}", down))


def map_shared_expert(ckpt: Checkpoint, weights: WeightMap, index: int, source: str, *, bias: bool = False) -> None:
    """`{source}.{gate,up,down}_proj` -> layers.{i}.moe.shared.{gate,up,down} (with biases when `bias`)."""
    for part in ("gate", "up", "down"):
        for kind in ("weight", "bias") if bias else ("weight",):
            name = f"{source}.{part}_proj.{kind}"
            if ckpt.has(name):
                weights.add(f"layers.{index}.moe.shared.{part}.{kind}", checkpoint_weight(ckpt, name), name)
            else:
                weights.expect(f"layers.{index}.moe.shared.{part}.{kind}", name)


def ignore_layers_after(ckpt: Checkpoint, prefix: str, num_layers: int, why: str) -> None:
    """Leave out checkpoint layers `{prefix}{j}.` with j >= num_layers (e.g. GLM-4.5 / DeepSeek-V3 multi-token
    prediction layers stored after the decoder), saying why."""
    extra = []
    for name in ckpt.names():
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit() and int(head) >= num_layers:
                extra.append(name)
    if extra:
        ckpt.ignore(*extra, reason=why)

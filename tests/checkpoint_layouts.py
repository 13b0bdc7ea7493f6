"""On-disk layouts of released checkpoints that transformers' save_pretrained does not write (tests/factory.py
ArchRecipe.layout): experts fused 3-D, a multi-token-prediction head, and MoE selection biases of a size that matters."""

from __future__ import annotations

import torch

# Router probabilities / sigmoid scores of the tiny models spread over about 0.1-0.3: a bias of this size reorders them
CORRECTION_BIAS_STD = 0.15


def apply_layout(tensors: dict[str, torch.Tensor], layout: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    """`tensors` with the layout changes named in `layout` ("fused_experts", "mtp", "mtp_layer", "correction_bias") applied."""
    out = dict(tensors)
    if "fused_experts" in layout:
        for gate in sorted(n for n in tensors if n.endswith(".experts.0.gate_proj.weight")):
            base = gate.removesuffix(".0.gate_proj.weight")
            count = sum(1 for n in tensors if n.startswith(base + ".") and n.endswith(".gate_proj.weight"))
            parts = {p: torch.stack([out.pop(f"{base}.{e}.{p}_proj.weight") for e in range(count)])
                     for p in ("gate", "up", "down")}
            out[f"{base}.gate_up_proj"] = torch.cat([parts["gate"], parts["up"]], dim=1).contiguous()
            out[f"{base}.down_proj"] = parts["down"].contiguous()
    if "correction_bias" in layout:  # MoE routers' selection biases, large enough to change which experts win
        gen = torch.Generator().manual_seed(seed + 3)
        for name in sorted(n for n in out if n.endswith("e_score_correction_bias")):
            t = out[name]
            out[name] = (torch.randn(t.shape, generator=gen) * CORRECTION_BIAS_STD).to(t.dtype)
    if "mtp_layer" in layout:  # a multi-token-prediction layer stored after the decoder (GLM-4.5, DeepSeek-V3)
        layers = {int(n.split(".")[2]) for n in out if n.startswith("model.layers.")}
        last, extra = max(layers), max(layers) + 1
        for name in sorted(n for n in out if n.startswith(f"model.layers.{last}.")):
            out[name.replace(f"model.layers.{last}.", f"model.layers.{extra}.", 1)] = out[name].clone()
        gen = torch.Generator().manual_seed(seed + 4)
        hidden = out["model.embed_tokens.weight"].shape[1]
        out[f"model.layers.{extra}.eh_proj.weight"] = torch.randn((hidden, 2 * hidden), generator=gen).to(
            out["model.embed_tokens.weight"].dtype)
    if "mtp" in layout:  # names as released; transformers ignores mtp.* when loading
        gen = torch.Generator().manual_seed(seed + 2)
        for name, shape in (("mtp.fc.weight", (64, 128)), ("mtp.norm.weight", (64,)),
                            ("mtp.layers.0.mlp.down_proj.weight", (64, 32))):
            out[name] = torch.randn(shape, generator=gen).to(next(iter(tensors.values())).dtype)
    return dict(sorted(out.items()))

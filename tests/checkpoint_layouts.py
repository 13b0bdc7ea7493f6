"""On-disk layouts of released checkpoints that transformers' save_pretrained does not write (tests/factory.py
ArchRecipe.layout): experts fused 3-D, and a multi-token-prediction head (Qwen3.5 `mtp.*`; DeepSeek-V3 an extra
decoder layer after the last, `model.layers.{num_hidden_layers}.*`)."""

from __future__ import annotations

import torch


def apply_layout(tensors: dict[str, torch.Tensor], layout: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    """`tensors` with the layout changes named in `layout` ("fused_experts", "mtp", "deepseek_mtp") applied."""
    out = dict(tensors)
    if "fused_experts" in layout:
        for gate in sorted(n for n in tensors if n.endswith(".experts.0.gate_proj.weight")):
            base = gate.removesuffix(".0.gate_proj.weight")
            count = sum(1 for n in tensors if n.startswith(base + ".") and n.endswith(".gate_proj.weight"))
            parts = {p: torch.stack([out.pop(f"{base}.{e}.{p}_proj.weight") for e in range(count)])
                     for p in ("gate", "up", "down")}
            out[f"{base}.gate_up_proj"] = torch.cat([parts["gate"], parts["up"]], dim=1).contiguous()
            out[f"{base}.down_proj"] = parts["down"].contiguous()
    if "mtp" in layout:  # names as released; transformers ignores mtp.* when loading
        gen = torch.Generator().manual_seed(seed + 2)
        for name, shape in (("mtp.fc.weight", (64, 128)), ("mtp.norm.weight", (64,)),
                            ("mtp.layers.0.mlp.down_proj.weight", (64, 32))):
            out[name] = torch.randn(shape, generator=gen).to(next(iter(tensors.values())).dtype)
    if "deepseek_mtp" in layout:  # DeepSeek-V3's num_nextn_predict_layers=1 layer (a few of its tensors)
        layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
        gen = torch.Generator().manual_seed(seed + 3)
        dtype = next(iter(tensors.values())).dtype
        for name, shape in (("eh_proj.weight", (64, 128)), ("enorm.weight", (64,)), ("hnorm.weight", (64,)),
                            ("shared_head.norm.weight", (64,)), ("self_attn.kv_b_proj.weight", (160, 32))):
            values = torch.randn(shape, generator=gen) if len(shape) > 1 else 1.1 + torch.rand(shape, generator=gen)
            out[f"model.layers.{layers}.{name}"] = values.to(dtype)
    return dict(sorted(out.items()))

"""ExportSettings: EP x precision x extra options resolved once into a frozen object that layers read.

Every cross-option rule lives here (bf16 needs CUDA, fused Q/K-norm needs CUDA, ...), so graph code never
re-checks `ep == "cuda"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import onnx_ir as ir

from builder import options as opts
from builder.capture import GraphCapture, decide as decide_capture
from builder.errors import UsageError
from builder.graph import FLOAT_DTYPES
from builder.quant.plan import QuantPlan
from builder.spec import DenseMoeSpec, ModelSpec, MoeSpec

PRECISIONS = ("fp32", "fp16", "bf16", "int4", "int8")
EPS = ("cpu", "cuda")
# Activation dtypes that ONNX Runtime's CUDA GroupQueryAttention has kernels for (onnxruntime
# contrib_ops/cuda/bert/group_query_attention.cc registers MLFloat16 and BFloat16 only): with float32 activations on
# -e cuda every attention node runs on the CPU EP, whose kernel rejects fused q/k norms (and capture is off:
# builder/capture.py).
HALF_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class QmoeLayout:
    """How QMoE expert bytes are laid out for the CUDA kernel (their bits and blocks are the QuantPlan's)."""

    prepacked: int  # -1 auto (prepacked bytes, attribute omitted), 0 raw, 1 prepacked + attribute (CUDA only)
    prepack_arch: int


@dataclass(frozen=True)
class ExportSettings:
    precision: str
    ep: str
    io_dtype: str  # "float32" | "float16" | "bfloat16": activations, KV cache, float weights
    fuse_qk_norm: bool
    qmoe_layout: QmoeLayout
    # QMoE takes its routing weights in a router_weights input: the CPU kernel honours it (tests/test_routing_op.py);
    # the CUDA kernel of onnxruntime-gpu 1.31.1 ignores router_weights and normalize_routing_weights=0 (it weights by
    # the renormalised softmax of the selected router_probs; scripts/moe_routing_check.py on an H200), so cuda exports
    # feed QMoE like MoE: masked log-weights in router_probs (builder/layers/routing.py).
    qmoe_router_weights: bool = False
    # MoE honours normalize_routing_weights=0 for a plain softmax router: not on the CPU EP of onnxruntime 1.31.1
    # (1.32.0 is right), which returns zeros for float16 (tests/test_routing_op.py) and, inside a whole decoder, wrong
    # float32 values (max-abs 0.64 on the tiny Qwen2-MoE, exact again once the op's input or output is also a graph
    # output: the kernel's in-place handling); so cpu exports let the op renormalise the top-k softmax and scale it
    # back by the top-k mass (builder/layers/routing.py).
    moe_raw_softmax: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
    given: frozenset[str] = frozenset()  # the extra options the user set (the others are defaults)
    plan: QuantPlan | None = None  # set once the model is known (see with_plan)
    graph_capture: GraphCapture | None = None  # CUDA-graph capture under onnxruntime-genai (see with_plan)
    # the lm_head's MatMulNBits weight in the CUDA fpA_intB layout (weight_prepacked=1; see with_plan)
    lm_head_prepacked: bool = False

    @property
    def ir_dtype(self) -> ir.DataType:
        return FLOAT_DTYPES[self.io_dtype][0]

    @property
    def numpy_dtype(self):
        return FLOAT_DTYPES[self.io_dtype][1]

    @property
    def left_padding(self) -> bool:
        """Exact left-padded batches: the "real tokens first" reorder of builder/layers/padding.py."""
        return bool(self.extra.get("left_padding", True))

    @property
    def last_token_logits(self) -> bool:
        """Logits [batch, 1, vocab] of each row's last real token (builder/layers/padding.py's last_token_rows)."""
        return bool(self.extra.get("last_token_logits", False))

    @property
    def linear_attn_dtype(self) -> str:
        """The dtype linear-attention layers compute their core in and keep their conv / recurrent state in: float32
        (transformers keeps the recurrent state in float32) unless linear_attn_fp32=false: the activation dtype."""
        return "float32" if self.extra.get("linear_attn_fp32", True) else self.io_dtype

    @classmethod
    def resolve(cls, precision: str, ep: str, extra_items: list[str] | dict | None = None) -> "ExportSettings":
        if precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}.")
        if ep not in EPS:
            raise UsageError(f"execution provider {ep!r} is not supported; choose one of {', '.join(EPS)}.")
        given = dict(extra_items) if isinstance(extra_items, Mapping) else opts.parse_extra_options(extra_items or [])
        extra = {**opts.defaults(), **given}
        if precision == "bf16" and ep != "cuda":
            raise UsageError("-p bf16 needs -e cuda: ONNX Runtime's CPU kernels for attention and MatMul have no "
                             "bfloat16 support. Use -p fp32 (or int4/int8) for cpu.")
        if precision in ("fp32", "int4", "int8"):
            io_dtype = "float32" if (precision == "fp32" or ep == "cpu") else "float16"
        else:
            io_dtype = {"fp16": "float16", "bf16": "bfloat16"}[precision]
        fuse = extra["fuse_qk_norm_gqa"]
        if fuse and ep != "cuda":
            raise UsageError("fuse_qk_norm_gqa=true needs -e cuda: ONNX Runtime's CPU GroupQueryAttention rejects the "
                             "q_norm_weight/k_norm_weight inputs, so CPU models keep separate norm nodes. Drop the option "
                             "or export with -e cuda.")
        if fuse and io_dtype == "float32":
            raise UsageError(f"fuse_qk_norm_gqa=true needs float16/bfloat16 activations (-p {precision} -e {ep} has "
                             "float32): GroupQueryAttention has no float32 CUDA kernel, so ONNX Runtime runs a float32 "
                             "model's attention on the CPU EP, which rejects the q_norm_weight/k_norm_weight inputs. "
                             "Drop the option or export with -p fp16/bf16/int4/int8.")
        if fuse is None:
            fuse = ep == "cuda" and io_dtype in HALF_DTYPES
        if ep != "cuda" and extra["enable_cuda_graph"]:
            raise UsageError("enable_cuda_graph=true needs -e cuda: CUDA graphs are a CUDA execution provider "
                             "feature (a cpu export's genai_config has no CUDA options). Drop the option or export "
                             "with -e cuda.")
        if ep != "cuda" and "qmoe_weights_prepacked" in given and given["qmoe_weights_prepacked"] != -1:
            raise UsageError("qmoe_weights_prepacked applies to -e cuda only (the CPU QMoE kernel has a single layout "
                             "and the attribute would be ignored). Drop the option or export with -e cuda.")
        if extra["qmoe_prepack_arch"] == 90:
            raise UsageError("qmoe_prepack_arch=90: ONNX Runtime's CUDA QMoE reads the SM80 CUTLASS layout on every GPU, "
                             "Hopper (SM90) included; SM90-layout expert weights give wrong results (measured on an "
                             "H100). Use qmoe_prepack_arch=80 (the default).")
        layout = QmoeLayout(extra["qmoe_weights_prepacked"], extra["qmoe_prepack_arch"])
        return cls(precision=precision, ep=ep, io_dtype=io_dtype, fuse_qk_norm=bool(fuse), qmoe_layout=layout,
                   qmoe_router_weights=ep == "cpu", moe_raw_softmax=ep != "cpu", extra=MappingProxyType(extra),
                   given=frozenset(given))

    def with_plan(self, spec: ModelSpec) -> "ExportSettings":
        """Attach the QuantPlan, told the facts of the model that decide formats (layers, tying, experts), and the
        CUDA-graph capture decision (builder/capture.py)."""
        from dataclasses import replace

        fused = [i for i, layer in enumerate(spec.layers) if isinstance(layer.ffn, MoeSpec)]
        per_expert = [i for i, layer in enumerate(spec.layers) if isinstance(layer.ffn, DenseMoeSpec)]
        expert_k = {k for i in fused for k in (spec.hidden_size, spec.layers[i].ffn.intermediate_size)}
        plan = QuantPlan.from_options(self.precision, dict(self.extra), self.ep, spec.num_layers,
                                      tied_embeddings=spec.tie_embeddings,
                                      linear_attn_layers=spec.linear_attention_layers, fused_expert_layers=fused,
                                      per_expert_layers=per_expert, expert_k=expert_k, given=self.given,
                                      model=spec.architecture)
        capture = decide_capture(spec, self.ep, self.extra.get("enable_cuda_graph"), self.io_dtype)
        return replace(self, plan=plan, graph_capture=capture, lm_head_prepacked=self._head_prepacked(spec, plan))

    def _head_prepacked(self, spec: ModelSpec, plan: QuantPlan) -> bool:
        """lm_head_prepacked: auto (None) where head_prepack_blocker finds nothing against it; true where it does is
        a usage error saying what."""
        from builder.quant.cuda_layout import head_prepack_blocker

        wanted = self.extra.get("lm_head_prepacked")
        if wanted is False or plan.bits is None:
            return False
        blocker = head_prepack_blocker(self.ep, self.io_dtype, plan.format_for("lm_head"), spec.vocab_size,
                                       spec.hidden_size, spec.lm_head_bias,
                                       plan.shares_embedding and spec.tie_embeddings)
        if wanted and blocker:
            raise UsageError(f"lm_head_prepacked=true cannot apply to {spec.architecture} -p {self.precision} -e "
                             f"{self.ep}: {blocker}. Drop the option.")
        return blocker is None

"""CUDA-graph capture of the decode step under onnxruntime-genai: decided once per export from the spec, written to
genai_config.json.

onnxruntime-genai 0.18 turns capture on when the decoder's CUDA provider options say `"enable_cuda_graph": "1"`
(model.decoder.session_options.provider_options = [{"cuda": {...}}]). It then keeps input_ids, the logits and a static
attention mask [batch, max_length] (ones up to the current length, zeros after) in fixed device buffers, runs the
prompt uncaptured and every one-token step through ONNX Runtime's CUDA graph, and requires
search.past_present_share_buffer (one [batch, kv_heads, max_length, head] buffer per cache: every export writes it).
ONNX Runtime captures a session only without control-flow nodes (If/Loop/Scan) and without Memcpy nodes; the graph
must give the same result for the static mask as for a growing one (builder/layers/padding.py: a single new token is
real whatever its mask column says, and seqlens_k comes from the mask's sum).

Measured on an H200 with onnxruntime-gpu 1.31.1 (shared/reference/ort-ops.md): a Qwen3-0.6B-shaped int4 and fp16
export captured and replayed with greedy tokens identical to an uncaptured run, 569 -> 698 tok/s (int4).
scripts/gpu_decode_bench.py measures every probe family of the driver again (modes "static mask + capture" and
onnxruntime-genai with this config).

Not captured (the export says why in a note and genai_config carries "enable_cuda_graph": "0"):
- a rotary length switch (longrope: Phi-3/Phi-4 long-context checkpoints) is an If node, which ONNX Runtime refuses
  to capture;
- per-expert MoE layers (DenseMoeSpec, Gemma 4): each expert gathers the tokens routed to it (NonZero -> Gather ->
  ... -> ScatterND), shapes that change with the routing at every step; a replay reuses the sizes of the captured
  step (measured on an H200, onnxruntime-gpu 1.31.1: CUDA error 700, an illegal memory access, in cudaGraphLaunch).
  tests/shape_flow.py finds every node whose shape depends on input values, and tests/test_capture_shapes.py checks
  that no graph with capture on has one (latent attention in both forms, Llama 4's chunked attention on CUDA, the
  hybrids and the fused MoE/QMoE layers have none);
- float32 activations (-p fp32 -e cuda): GroupQueryAttention's CUDA kernel is registered for float16 and bfloat16 only
  (onnxruntime contrib_ops/cuda/bert/group_query_attention.cc), so ONNX Runtime places every attention node on the
  CPU EP (measured: the -p fp32 -e cuda Qwen3-Next export failed on an H200 in "GroupQueryAttention (CPU)"), and it
  refuses to capture a session whose compute nodes are not all on the CUDA EP;
Captured since their fix: linear-attention layers (Qwen3.5, Qwen3.5-MoE, Qwen3-Next). Under capture
onnxruntime-genai feeds the static [batch, max_length] mask from the prompt on (DefaultPositionInputs::
InitializeStaticMask), and these layers read how many new tokens are real from the mask. Measured on an H200
(onnxruntime-genai-cuda 0.18, scripts/gpu_hybrid_capture.py, scripts/results/gpu_hybrid_capture_h200.json): while they
read the mask's last S columns, captured generation differed from the first token for every prompt; reading min(S,
ones in the row) where those columns hold none, a 77-token prompt (whose ones reach into the last columns) still
differed. The count now follows the mask's newest column (builder/layers/padding.py), and 12-, 3- and 77-token prompts
generate the same 48 greedy tokens captured and uncaptured for all three families; tests/test_batched_generation.py
feeds genai's static mask from the prompt on for every family on CPU.
`--extra_options enable_cuda_graph=true/false` overrides the decision (true is refused where ONNX Runtime would refuse
the graph; false always works).
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.errors import UsageError
from builder.spec import AttentionSpec, DenseMoeSpec, LinearAttentionSpec, ModelSpec

OPTION = "enable_cuda_graph"


@dataclass(frozen=True)
class GraphCapture:
    enabled: bool
    reason: str  # why, either way (recorded in ortbuild.json)

    def note(self, ep: str) -> str | None:
        """What the export says about capture: why it is off for a CUDA export, or why it is on unproven."""
        if ep != "cuda":
            return None
        if not self.enabled:
            return f"CUDA graph capture is off in genai_config.json: {self.reason}."
        if self.reason.startswith(f"{OPTION}=true although"):
            return f"CUDA graph capture is on in genai_config.json ({self.reason})."
        return None


def _rope_switch(spec: ModelSpec) -> bool:
    from builder.layers.rotary import length_switch  # a pure function of the RopeSpec

    return any(isinstance(layer.attention, AttentionSpec) and layer.attention.rope is not None
               and length_switch(layer.attention.rope) is not None for layer in spec.layers)


def refusal(spec: ModelSpec, io_dtype: str) -> str | None:
    """Why ONNX Runtime would refuse to capture this model's graph, or fail replaying it, or None."""
    if _rope_switch(spec):
        return ("its rotary embedding switches frequency sets with the sequence length (longrope), an If node, and "
                "ONNX Runtime cannot capture control flow")
    if any(isinstance(layer.ffn, DenseMoeSpec) for layer in spec.layers):
        return ("its per-expert MoE layers gather the tokens routed to each expert (NonZero), a shape that changes "
                "with the routing at every step, and a captured graph replays the shapes of the step it captured "
                "(CUDA error 700 in cudaGraphLaunch, measured on an H200 with onnxruntime-gpu 1.31.1)")
    if io_dtype == "float32":
        return ("GroupQueryAttention has no float32 CUDA kernel, so ONNX Runtime runs attention on the CPU EP, and it "
                "captures only sessions whose compute nodes all run on the CUDA EP (export -p fp16, bf16, int4 or int8 "
                "for float16/bfloat16 activations)")
    return None


def unproven(spec: ModelSpec) -> str | None:
    """Why capture is not promised for this model although ONNX Runtime would accept the graph, or None."""
    unknown = {type(layer.attention).__name__ for layer in spec.layers
               if not isinstance(layer.attention, (AttentionSpec, LinearAttentionSpec))}
    if unknown:
        return f"its {', '.join(sorted(unknown))} layers have not been measured under capture"
    return None


def decide(spec: ModelSpec, ep: str, requested: bool | None, io_dtype: str) -> GraphCapture:
    """The capture decision for an export (`requested`: the enable_cuda_graph option, None when not given;
    `io_dtype`: the activation dtype)."""
    if ep != "cuda":
        return GraphCapture(False, f"-e {ep}: CUDA graphs apply to the CUDA execution provider only")
    refused = refusal(spec, io_dtype)
    if requested is False:
        return GraphCapture(False, f"{OPTION}=false")
    if refused:
        if requested:
            raise UsageError(f"{OPTION}=true: {spec.architecture} cannot be captured: {refused}. Drop the option "
                             "(capture stays off for this model).")
        return GraphCapture(False, refused)
    doubt = unproven(spec)
    if doubt and not requested:
        return GraphCapture(False, f"{doubt} (set {OPTION}=true to try it)")
    if doubt:
        return GraphCapture(True, f"{OPTION}=true although {doubt}")
    return GraphCapture(True, "decode steps are captured (static mask, one shared KV buffer per cache)")

"""ModelSpec: everything the decoder graph needs to know about a model, as plain frozen data.

Family builders translate a Hugging Face config into these objects; the graph code reads only these and never a
HF config. A new architecture feature is a new field here plus a small layer variant that any family can switch on.

Canonical weight names (what family weight maps produce, what layers consume); linear weights keep the Hugging Face
orientation [out_features, in_features]:
    embed.weight                       [vocab, hidden]
    layers.{i}.attn_norm.weight        norm before attention (every norm also has .bias when norm_kind="layer")
    layers.{i}.post_attn_norm.weight   norm on the attention output (sandwich and post norm schemes)
    layers.{i}.ffn_norm.weight         norm before the MLP / MoE
    layers.{i}.post_ffn_norm.weight    norm on the MLP output (sandwich and post norm schemes)
    layers.{i}.attn.{q,k,v,o}.weight / .bias   (no v when k_eq_v; no k/v for KV-sharing layers)
    layers.{i}.attn.qkv.weight / .bias  [q + 2 * kv, hidden] q, k, v stored fused (Phi-3): replaces q/k/v
    layers.{i}.attn.{q_norm,k_norm}.weight   per-head RMSNorm weights [head_dim]; [q_size] / [kv_size] when
                                             qk_norm_scope="projection"
    layers.{i}.attn.sinks              [num_heads]
    layers.{i}.attn.gate.weight        [num_heads * head_dim, hidden] output gate rows (AttentionSpec.output_gate)
    multi-head latent attention (AttentionSpec.latent, see LatentSpec), instead of q/k/v:
    layers.{i}.attn.q_a.weight / .bias  [q_lora_rank, hidden], then layers.{i}.attn.q_a_norm.weight [q_lora_rank]
    layers.{i}.attn.q_b.weight         [num_heads * (nope + rope), q_lora_rank]   (or attn.q.weight from hidden when
                                       q_lora_rank is None); each head's rows are nope then rope
    layers.{i}.attn.kv_a.weight / .bias [kv_lora_rank + rope, hidden]: latent rows then the shared rope key's rows
    layers.{i}.attn.kv_a_norm.weight   [kv_lora_rank]
    layers.{i}.attn.kv_b.weight        [num_heads * (nope + v_head_dim), kv_lora_rank]: per head, k_nope then v rows
    layers.{i}.linear_attn.qkv.weight  [2 * key_size + value_size, hidden] q | k | v rows, heads in order
    layers.{i}.linear_attn.z.weight    [value_size, hidden] output-gate projection
    layers.{i}.linear_attn.{a,b}.weight   [value_heads, hidden] decay / update-rate projections
    layers.{i}.linear_attn.conv.weight    [2 * key_size + value_size, 1, conv_kernel] depthwise causal conv
    layers.{i}.linear_attn.{A_log,dt_bias}  [value_heads]
    layers.{i}.linear_attn.norm.weight    [value_head_dim] gated RMSNorm scale, applied as w (never 1 + w)
    layers.{i}.linear_attn.out.weight  [hidden, value_size]
    layers.{i}.mlp.{gate,up,down}.weight / .bias   (no gate when MlpSpec.gated is False)
    layers.{i}.mlp.gate_up.weight      [2 * intermediate, hidden] gate then up, stored fused (Phi-3): replaces gate/up
    layers.{i}.moe.router.weight / .bias      [num_experts, hidden]
    layers.{i}.moe.router.correction_bias     [num_experts] added to the scores for selection only (RoutingSpec)
    layers.{i}.moe.fc1.weight / .bias         [E, 2*I, hidden] in the layout its consumer reads: gate/up rows
                                              interleaved (g0, u0, g1, u1, ...) for the fused MoE op (MoeSpec),
                                              [gate; up] per expert for per-expert MatMuls (DenseMoeSpec)
    layers.{i}.moe.fc2.weight / .bias         [E, hidden, I]
    layers.{i}.moe.shared.{gate,up,down}.weight, layers.{i}.moe.shared_gate.weight
    layers.{i}.mlp.post_norm.weight, layers.{i}.moe.{pre_norm,post_norm}.weight   DenseMoeSpec branch norms
    layers.{i}.layer_scalar            [1] output scale (LayerSpec.output_scale)
    per_layer.embed.weight             [per_layer_vocab, layers * per_layer_input_size]
    per_layer.projection.weight        [layers * per_layer_input_size, hidden]
    per_layer.projection_norm.weight   [per_layer_input_size]
    layers.{i}.per_layer.{gate,projection}.weight, layers.{i}.per_layer.norm.weight
    final_norm.weight
    lm_head.weight / .bias             absent when tie_embeddings
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.state import StateTensor, kv_state, linear_attention_state, model_state


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rotary_dim: int  # dimensions rotated per head (head_dim unless partial rotary)
    # Hugging Face rope type and its parameters: "default", "linear", "llama3", "yarn", "dynamic", ...
    rope_type: str = "default"
    params: tuple[tuple[str, object], ...] = ()  # sorted (name, value) pairs, hashable
    interleaved: bool = False
    max_positions: int = 4096

    def param(self, name: str, default=None):
        return dict(self.params).get(name, default)


@dataclass(frozen=True)
class LatentSpec:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): keys and values are decompressed per head from one
    normalised latent of kv_lora_rank per token (kv_b); a rope key of qk_rope_head_dim, shared by every head, is
    concatenated to the per-head nope keys; q comes from a low-rank q_a -> norm -> q_b (q_lora_rank) or one plain
    projection (q_lora_rank None). Query heads are qk_nope_head_dim + qk_rope_head_dim wide, value heads
    v_head_dim. How the layer attends and what it caches is `form` (builder/layers/mla.py), decided per export by
    `fit_latent_attention` from the EP's GroupQueryAttention limits:
        "absorbed"      one kv head of [rope key | latent] rows (cache_width), kv_b folded into q and the output;
        "decompressed"  kv_b applied to the latent: num_heads kv heads of [rope key | nope key] (values padded to it).
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    form: str = "absorbed"  # a LATENT_FORMS value

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """One cached row per token: the rotated rope key, then the normalised latent."""
        return self.qk_rope_head_dim + self.kv_lora_rank


LATENT_FORMS = ("absorbed", "decompressed")


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec | None  # None: no rotary in this layer (NoPE layers, SmolLM3)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3, Gemma 3)
    # "head": one RMSNorm per head over head_dim; "projection": one RMSNorm over the whole q / k projection (OLMo 2)
    qk_norm_scope: str = "head"
    qk_norm_after_rope: bool = False  # the q/k norm comes after rotary instead (HunYuan): rotary runs outside GQA
    # (beta, period): q *= 1 + beta * ln(1 + floor((position + query_position_offset) / period)) (Ministral 3's
    # llama_4_scaling_beta; Llama 4's attention temperature tuning on NoPE layers counts from 1: offset 1)
    query_position_scale: tuple[float, int] | None = None
    query_position_offset: int = 0
    qk_norm_weightless: bool = False  # the q/k norm has no weight: x / rms(x) per head (Llama 4's L2Norm)
    # keys only from the query's own chunk of this many positions (position // chunk equal; Llama 4 chunked attention)
    attention_chunk: int | None = None
    scale: float | None = None  # softmax scale; None means 1/sqrt(head_dim)
    softcap: float = 0.0  # attention logit softcapping (Gemma 2)
    sliding_window: int | None = None  # keys within the last `sliding_window` positions (HF semantics)
    sinks: bool = False  # learned per-head attention sinks (GPT-OSS)
    v_norm: bool = False  # per-head RMSNorm without weight on v (Gemma 4)
    # Reuse the keys/values of layer `kv_source` (Gemma 4 num_kv_shared_layers): no k/v projection, no own cache
    kv_source: int | None = None
    k_eq_v: bool = False  # values come from the key projection (Gemma 4 attention_k_eq_v): no v weights
    # Output gate (Qwen3.5, Qwen3-Next): out = attention(x) * sigmoid(gate(x)) before o_proj, gate weight [q_size, hidden]
    output_gate: bool = False
    # Multi-head latent attention: q/k/v come from the latent projections of LatentSpec (builder/layers/mla.py). Then
    # num_kv_heads and head_dim are the cache's: 1 and LatentSpec.cache_width in the absorbed form (one latent row per
    # token), num_heads and the padded qk head size in the decompressed form; the rope rotates qk_rope_head_dim dims,
    # qkv_bias means the q_a / kv_a biases and a None scale is 1/sqrt(qk_head_dim).
    latent: LatentSpec | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    def state(self, layer: int) -> tuple[StateTensor, ...]:
        """A KV cache, unless the layer reads another layer's (kv_source)."""
        return () if self.kv_source is not None else kv_state(layer, self.num_kv_heads, self.head_dim)

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class LinearAttentionSpec:
    """Gated DeltaNet token mixer (Qwen3.5, Qwen3-Next): causal depthwise conv over q|k|v, L2-normalised q/k, a
    per-value-head decay and update rate, the gated delta rule over a [key_dim, value_dim] state per value head, and a
    gated RMSNorm. Value heads are grouped per key head (value head j reads key head j // (value_heads / key_heads)).
    """

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int  # the conv state holds the last conv_kernel - 1 inputs
    qk_norm_eps: float = 1e-6  # q/k L2 normalisation: x / sqrt(sum(x^2) + eps)

    @property
    def key_size(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_size(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_size + self.value_size

    def state(self, layer: int) -> tuple[StateTensor, ...]:
        """The conv state (last conv_kernel - 1 inputs) and the recurrent state."""
        return linear_attention_state(layer, self.conv_channels, self.conv_kernel, self.num_value_heads,
                                      self.key_head_dim, self.value_head_dim)


@dataclass(frozen=True)
class MlpSpec:
    intermediate_size: int
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu" | "relu2" (relu(x)^2)
    bias: bool = False
    gated: bool = True  # True: down(act(gate(x)) * up(x)); False: down(act(up(x))) (Nemotron)


@dataclass(frozen=True)
class RoutingSpec:
    """How a token picks its experts and what weight each picked expert's output gets.

        scores    = scoring(router logits)       "softmax" over all experts | "sigmoid" per expert
        selection = scores + correction_bias     (canonical weight layers.{i}.moe.router.correction_bias [E]),
                                                 used to choose experts only, never as a weight
        groups    : experts split into n_group equal groups, each ranked by the sum of its top-2 selection
                    scores; only the best topk_group groups compete (DeepSeek-V3 / GLM-4.5 noaux_tc)
        experts   = top-k of the selection
        weights   = scores at the chosen experts, renormalised to sum to one when normalize_topk,
                    times scaling_factor (routed_scaling_factor)
        weight_on_input: the weight multiplies the expert's input instead of its output (Llama 4, top-1)
    float32_logits: the router computes in float32 whatever the model dtype: the input cast to float32 times a float32
                    weight, then scores and selection (transformers' DeepSeek-V2/V3, GLM-4.5 MoE, ERNIE-4.5-MoE)
    scoring "sparsemixer" (PhiMoE, top-2): experts are the top-2 logits; expert j's weight is the softmax at j over
    the logits l_i with (l_j - l_i) / max(|l_i|, l_j) <= 2 * sparsemixer_eps, the first pick left out for the second.
    """

    scoring: str = "softmax"  # "softmax" | "sigmoid" | "sparsemixer"
    normalize_topk: bool = True  # Mixtral, Qwen3-MoE norm_topk_prob, GPT-OSS; False: Qwen2-MoE
    correction_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    scaling_factor: float = 1.0
    weight_on_input: bool = False
    sparsemixer_eps: float = 0.0  # PhiMoE router_jitter_noise
    float32_logits: bool = False


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    # "silu": SwiGLU silu(g) * u;  "gpt_oss": clamp(g, max=limit) * sigmoid(alpha * g) * (clip(u, +-limit) + beta);
    # "gelu_tanh" / "gelu": GeGLU, per-expert path only (DenseMoeSpec). A layer that cannot compute it refuses it.
    activation: str = "silu"
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.0
    swiglu_beta: float = 0.0
    expert_bias: bool = False
    router_bias: bool = False
    routing: RoutingSpec = RoutingSpec()
    shared_expert_size: int = 0  # Qwen2-MoE shared expert intermediate size, 0 when absent
    shared_expert_gated: bool = False  # sigmoid(shared_expert_gate(x)) scales the shared expert
    shared_expert_bias: bool = False  # the shared expert's projections have biases (ERNIE-4.5-MoE use_bias)


@dataclass(frozen=True)
class DenseMoeSpec:
    """A dense MLP and an MoE block side by side, summed (Gemma 4 "enable_moe_block").

    The MLP sees the usual ffn_norm(x); the experts see their own pre-norm (moe.pre_norm) of the residual and are
    routed on a weightless RMSNorm of it; each branch has its own post-norm (mlp.post_norm, moe.post_norm).
    Experts use MoeSpec.activation ("gelu_tanh": GeGLU) and the router weights fold any input/expert scaling.
    """

    mlp: MlpSpec
    moe: MoeSpec


@dataclass(frozen=True)
class LayerSpec:
    attention: AttentionSpec | LinearAttentionSpec  # the token mixer: full attention or linear attention
    ffn: MlpSpec | MoeSpec | DenseMoeSpec
    # "pre": x + attn(norm(x)), x + ffn(norm(x)).  "sandwich": x + post_norm(attn(norm(x))) (Gemma 2/3).
    # "post": x + post_norm(attn(x)), no norm before a sublayer (OLMo 2/3). See layers/residual.py.
    norm_scheme: str = "pre"
    residual_scale: float = 1.0  # each sublayer output is multiplied by this before the add (Granite)
    output_scale: bool = False  # the layer's output is multiplied by weight layers.{i}.layer_scalar [1] (Gemma 4)


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # the HF architectures[0] name
    model_type: str  # the HF model_type, used for genai_config "type"
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    context_length: int
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0  # Gemma stores RMSNorm weights as w, applied as (1 + w); Nemotron's LayerNorm too
    norm_kind: str = "rms"  # the residual-stream norms: "rms" RMSNorm, "layer" LayerNorm with bias (Nemotron)
    # Embeddings are multiplied by this (in model dtype): Gemma sqrt(hidden), Granite embedding_multiplier
    embedding_scale: float | None = None
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    final_softcap: float = 0.0
    logits_divisor: float = 1.0  # logits are divided by this (Granite logits_scaling)
    # Per-layer input embeddings (Gemma 4 hidden_size_per_layer_input): 0 when absent; see layers/per_layer_input.py
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    per_layer_activation: str = "gelu_tanh"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attention(self) -> AttentionSpec | None:
        """The first full-attention layer's spec (what genai_config and reports describe); None if there is none."""
        return next((layer.attention for layer in self.layers if isinstance(layer.attention, AttentionSpec)), None)

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Indices of the full-attention layers that own a KV cache (all but KV-sharing consumers)."""
        return tuple(i for i, layer in enumerate(self.layers)
                     if isinstance(layer.attention, AttentionSpec) and layer.attention.kv_source is None)

    @property
    def state(self) -> tuple[StateTensor, ...]:
        """Every layer's declared state (builder/state.py), in layer order."""
        return model_state(self)

    @property
    def linear_attention_layers(self) -> tuple[int, ...]:
        """Indices of the linear-attention layers."""
        return tuple(i for i, layer in enumerate(self.layers) if isinstance(layer.attention, LinearAttentionSpec))

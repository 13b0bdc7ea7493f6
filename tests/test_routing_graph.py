"""builder/layers/routing.py against transformers' own routers: the router subgraph is run alone on ONNX Runtime, its
outputs are turned into (experts, weights) the way the op reads them (tests/test_routing_op.py measures those
semantics), and the result must equal the transformers router's choice and weights, for the float MoE form (one
router_probs input, an output scale) and the QMoE form (router_probs + router_weights) alike."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from builder.graph import GraphBuilder
from builder.layers import LayerContext
from builder.layers.routing import router_feed
from builder.settings import ExportSettings
from builder.spec import AttentionSpec, LayerSpec, ModelSpec, MoeSpec, RoutingSpec
from builder.weights import Constant, WeightMap

H, E, B, S = 16, 8, 2, 5
RNG = np.random.default_rng(7)
ROUTER = (RNG.standard_normal((E, H)) * 0.6).astype(np.float32)
BIAS = (RNG.standard_normal(E) * 0.5).astype(np.float32)  # large enough to reorder sigmoid scores
X = RNG.standard_normal((B, S, H)).astype(np.float32)

CASES = {
    "softmax-norm": (2, RoutingSpec()),
    "softmax-raw": (2, RoutingSpec(normalize_topk=False)),
    "ernie": (2, RoutingSpec(correction_bias=True)),
    "ernie-raw": (2, RoutingSpec(correction_bias=True, normalize_topk=False)),
    "sigmoid-norm": (2, RoutingSpec(scoring="sigmoid")),
    "sigmoid-raw": (2, RoutingSpec(scoring="sigmoid", normalize_topk=False)),
    "glm": (3, RoutingSpec(scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2, scaling_factor=2.5)),
    "glm-raw": (3, RoutingSpec(scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2,
                               normalize_topk=False)),
    "sparsemixer": (2, RoutingSpec(scoring="sparsemixer", normalize_topk=False, sparsemixer_eps=0.01)),
    "llama4": (1, RoutingSpec(scoring="sigmoid", weight_on_input=True)),
}


def _run_router(top_k: int, routing: RoutingSpec, *, quantized: bool, precision: str = "fp32"):
    moe = MoeSpec(num_experts=E, top_k=top_k, intermediate_size=8, routing=routing)
    attention = AttentionSpec(num_heads=1, num_kv_heads=1, head_dim=H, rope=None)
    spec = ModelSpec("Test", "test", 32, H, (LayerSpec(attention, moe),), 64)
    settings = ExportSettings.resolve(precision, "cpu").with_plan(spec)
    weights = WeightMap("Test")
    weights.add("layers.0.moe.router.weight", Constant(ROUTER))
    weights.add("layers.0.moe.router.correction_bias", Constant(BIAS))
    g = GraphBuilder()
    dtype = settings.ir_dtype
    x = g.input("x", dtype, ["B", "S", H])
    feed = router_feed(LayerContext(g, spec, settings, weights), x, 0, moe, quantized=quantized)
    names = {"expert_input": feed.expert_input, "probs": feed.probs, "weights": feed.weights,
             "output_scale": feed.output_scale}
    for name, value in names.items():
        if value is not None:
            g.output(g.op("Identity", [value]), name, dtype, [])
    model = ir.Model(g.graph, ir_version=10)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"x": X.astype(settings.numpy_dtype)})))
    return feed.normalize, {k: v.astype(np.float64) for k, v in out.items()}


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _as_op_reads(top_k: int, normalize: bool, out: dict, *, quantized: bool) -> tuple[np.ndarray, np.ndarray]:
    """(experts [T, k] sorted, weights [T, k]) as MoE / QMoE compute them from these router inputs."""
    probs = out["probs"]
    chosen = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    if quantized and "weights" in out:
        w = np.take_along_axis(out["weights"], chosen, axis=1)
        w = w / w.sum(1, keepdims=True) if normalize else w
    elif quantized:
        w = _softmax(np.take_along_axis(probs, chosen, axis=1))
    else:
        w = np.take_along_axis(_softmax(probs), chosen, axis=1)
        w = w / w.sum(1, keepdims=True) if normalize else w
    if "output_scale" in out:
        w = w * out["output_scale"].reshape(-1, 1)
    order = np.argsort(chosen, axis=1)
    return np.take_along_axis(chosen, order, axis=1), np.take_along_axis(w, order, axis=1)


def _transformers(case: str, top_k: int, routing: RoutingSpec) -> tuple[np.ndarray, np.ndarray]:
    """(experts sorted, weights) from transformers' router for this routing, scaling factor left out (the MoE layer
    folds it into fc2)."""
    x = torch.from_numpy(X.reshape(-1, H))
    logits = x @ torch.from_numpy(ROUTER).T
    if case == "glm" or case == "glm-raw":
        from transformers import Glm4MoeConfig
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

        cfg = Glm4MoeConfig(hidden_size=H, n_routed_experts=E, num_experts_per_tok=top_k, n_group=routing.n_group,
                            topk_group=routing.topk_group, norm_topk_prob=routing.normalize_topk,
                            routed_scaling_factor=routing.scaling_factor)
        router = Glm4MoeTopkRouter(cfg)
        with torch.no_grad():
            router.weight.copy_(torch.from_numpy(ROUTER))
            router.e_score_correction_bias.copy_(torch.from_numpy(BIAS))
            _, w, idx = router(x)
        w = w / routing.scaling_factor
    elif case.startswith("ernie"):
        probs = torch.softmax(logits, -1)
        _, idx = torch.topk(probs + torch.from_numpy(BIAS), top_k, dim=-1)
        w = probs.gather(1, idx)
        if routing.normalize_topk:  # transformers' Ernie4_5_MoeTopKRouter: / clamp(sum, min=norm_min=1e-12)
            w = w / torch.clamp(w.sum(-1, keepdim=True), min=1e-12)
    elif case == "sparsemixer":
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        w, idx = sparsemixer(logits, jitter_eps=routing.sparsemixer_eps, training=False)
    elif case == "llama4":
        top, idx = torch.topk(logits, 1, dim=-1)
        w = torch.ones_like(top)  # the weight is on the input (checked separately)
    else:
        scores = torch.softmax(logits, -1) if routing.scoring == "softmax" else torch.sigmoid(logits)
        w, idx = torch.topk(scores, top_k, dim=-1)
        if routing.normalize_topk:
            w = w / w.sum(-1, keepdim=True)
    w, idx = w.double().numpy(), idx.numpy()
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(w, order, axis=1)


@pytest.mark.parametrize("quantized", [False, True], ids=["MoE", "QMoE"])
@pytest.mark.parametrize("case", CASES)
def test_router_graph_matches_transformers(case, quantized):
    top_k, routing = CASES[case]
    normalize, out = _run_router(top_k, routing, quantized=quantized)
    experts, weights = _as_op_reads(top_k, normalize, out, quantized=quantized)
    ref_experts, ref_weights = _transformers(case, top_k, routing)
    np.testing.assert_array_equal(experts, ref_experts)
    np.testing.assert_allclose(weights, ref_weights, rtol=0, atol=2e-6)
    if routing.weight_on_input:  # Llama 4: the expert input is x * sigmoid(top logit)
        top = (X.reshape(-1, H) @ ROUTER.T).max(-1, keepdims=True)
        np.testing.assert_allclose(out["expert_input"].reshape(-1, H), X.reshape(-1, H) / (1 + np.exp(-top)),
                                   rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(out["expert_input"], X)


def test_group_limit_and_correction_bias_change_the_selection():
    """Controls: with these weights the group limit and the correction bias each change which experts are chosen
    (so the GLM case above would fail without either)."""
    top_k, routing = CASES["glm"]
    experts, _ = _transformers("glm", top_k, routing)
    ungrouped, _ = _transformers("glm", top_k, replace(routing, n_group=1, topk_group=1))
    assert (experts != ungrouped).any(axis=1).sum() >= 3
    x = torch.from_numpy(X.reshape(-1, H))
    no_bias = torch.topk(torch.sigmoid(x @ torch.from_numpy(ROUTER).T), top_k, dim=-1)[1].sort(-1)[0].numpy()
    assert (np.sort(ungrouped, 1) != no_bias).any(axis=1).sum() >= 3


def test_float16_cpu_raw_softmax_avoids_normalize_zero():
    """A float16 CPU export never asks MoE for normalize_routing_weights=0 (zeros on onnxruntime 1.31.1): the op
    renormalises and the output is scaled back by the top-k probability mass, with the same weights."""
    top_k, routing = CASES["softmax-raw"]
    normalize, out = _run_router(top_k, routing, quantized=False, precision="fp16")
    assert normalize and "output_scale" in out
    experts, weights = _as_op_reads(top_k, normalize, out, quantized=False)
    ref_experts, ref_weights = _transformers("softmax-raw", top_k, routing)
    np.testing.assert_array_equal(experts, ref_experts)
    np.testing.assert_allclose(weights, ref_weights, rtol=0, atol=2e-3)


def test_sparsemixer_weights_are_not_softmax_weights():
    """Control: on these logits sparsemixer's two weights differ from the renormalised softmax of the same two
    experts (and from plain ones), so the sparsemixer case above would fail if the graph routed like Mixtral."""
    top_k, routing = CASES["sparsemixer"]
    _, weights = _transformers("sparsemixer", top_k, routing)
    _, softmax_weights = _transformers("softmax-norm", 2, RoutingSpec())
    assert np.abs(weights - softmax_weights).max() > 0.1
    assert np.abs(weights - 1.0).max() > 0.1

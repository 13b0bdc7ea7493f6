"""QuantPlan: option spellings -> one per-weight decision; notes for deprecated or ineffective options.

These tests read no checkpoint: the plan is decided from (precision, options, layer count, tied, linear-attention
layers) alone. The end-to-end consequences (bits written into MatMulNBits, byte-equal aliases) are in
test_recipes.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder import options as opts
from builder.errors import UsageError
from builder.quant.plan import FLOAT, QuantPlan, WeightFormat, mixed_layer_indices


def plan(precision="int4", *items, ep="cpu", layers=8, **model) -> QuantPlan:
    extra = {**opts.defaults(), **opts.parse_extra_options(list(items))}
    return QuantPlan.from_options(precision, extra, ep, layers, **model)


def table(p: QuantPlan, layers: int = 8) -> dict:
    """Every decision of a dense model with `layers` layers, keyed like `ortbuild inspect` rows."""
    rows = {"embed": p.format_for("embed"), "lm_head": p.format_for("lm_head")}
    for i in range(layers):
        for role in ("attn.q", "attn.o", "mlp.gate", "mlp.down"):
            rows[f"{i}.{role}"] = p.format_for(role, i)
    return rows


# ------------------------------------------------------------------------------------------------- mixed layers


@pytest.mark.parametrize("layers, expected", [
    (1, {0}), (2, {0, 1}), (3, {0, 2}), (8, {0, 7}), (15, {0, 14}), (16, {0, 1, 14, 15}),
    (24, {0, 1, 2, 21, 22, 23}), (28, {0, 1, 2, 25, 26, 27}), (36, {0, 1, 2, 3, 32, 33, 34, 35}),
])
def test_mixed_layers_are_first_and_last_eighth(layers, expected):
    assert mixed_layer_indices(layers) == frozenset(expected)


def test_mixed_layers_move_only_projections_of_those_layers():
    p = plan("int4", "int8_mixed_layers=true")
    int8 = WeightFormat(8, "rtn", 32, True, 4)
    int4 = WeightFormat(4, "default", 32, True, 4)
    for i in range(8):
        for role in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"):
            assert p.format_for(role, i) == (int8 if i in (0, 7) else int4), (role, i)
    assert p.format_for("lm_head") == int4
    assert p.format_for("embed") == FLOAT
    assert p.format_for("moe.router", 0) == FLOAT


# ---------------------------------------------------------------------------------------------- base + flags


def test_default_int4_plan():
    p = plan("int4")
    assert set(table(p).values()) - {FLOAT} == {WeightFormat(4, "default", 32, True, 4)}
    assert p.format_for("embed") == FLOAT
    assert p.notes == ()


def test_base_options_reach_every_weight():
    p = plan("int4", "int4_algo_config=rtn", "int4_block_size=128", "int4_is_symmetric=false",
             "int4_accuracy_level=1", "quantize_embeddings=true")
    assert set(table(p).values()) == {WeightFormat(4, "rtn", 128, False, 1)}


def test_k_quant_is_asymmetric_and_int8_follows_the_symmetry_option():
    p = plan("int4", "int4_algo_config=k_quant", "last_matmul_weight_int8=true")
    assert p.format_for("attn.q", 3) == WeightFormat(4, "k_quant", 32, False, 4)
    assert p.format_for("lm_head") == WeightFormat(8, "rtn", 32, True, 4)
    p = plan("int4", "int4_algo_config=k_quant", "last_matmul_weight_int8=true", "int4_is_symmetric=false")
    assert p.format_for("lm_head") == WeightFormat(8, "rtn", 32, False, 4)


@pytest.mark.parametrize("ep, level", [("cpu", 4), ("cuda", 0)])
def test_accuracy_level_default_depends_on_ep(ep, level):
    assert plan("int4", ep=ep).format_for("attn.q", 0).accuracy_level == level
    assert plan("int4", "int4_accuracy_level=2", ep=ep).format_for("attn.q", 0).accuracy_level == 2


def test_int8_precision_stores_every_matmul_in_8_bit_rtn():
    p = plan("int8", "int4_block_size=64")
    assert set(table(p).values()) - {FLOAT} == {WeightFormat(8, "rtn", 64, True, 4)}
    assert p.format_for("embed") == FLOAT


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_float_precisions_quantize_nothing(precision):
    p = plan(precision, "last_matmul_weight_int8=true", "quantize_embeddings=true")
    assert set(table(p).values()) == {FLOAT}
    assert len(p.notes) == 1
    assert "ignoring last_matmul_weight_int8, quantize_embeddings" in p.notes[0]


# ------------------------------------------------------------------------------------------ aliases / spellings


ALIASES = {
    "rtn_last": ["int4_algo_config=rtn", "last_matmul_weight_int8=true"],
    "k_quant_last": ["int4_algo_config=k_quant", "last_matmul_weight_int8=true"],
    "k_quant_mixed": ["int4_algo_config=k_quant", "last_matmul_weight_int8=true", "int8_mixed_layers=true"],
    "k_quant_linear": ["int4_algo_config=k_quant", "int8_linear_attn=true"],
}
MIXED_SPELLING = {
    "rtn_last": ["int4_algo_config=rtn", "matmul_mixed_precision=last_matmul:int8"],
    "k_quant_last": ["int4_algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8"],
    "k_quant_mixed": ["int4_algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"],
    "k_quant_linear": ["int4_algo_config=k_quant", "matmul_mixed_precision=linear_attn:int8"],
}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_equals_its_decoupled_spellings(alias):
    legacy = plan("int4", f"int4_algo_config={alias}", linear_attn_layers={1, 2})
    decoupled = plan("int4", *ALIASES[alias], linear_attn_layers={1, 2})
    mixed = plan("int4", *MIXED_SPELLING[alias], linear_attn_layers={1, 2})
    strip = lambda p: p.__class__(**{**p.__dict__, "notes": ()})  # noqa: E731
    assert strip(legacy) == strip(decoupled) == strip(mixed)
    assert any(f"int4_algo_config={alias} is deprecated" in note for note in legacy.notes)
    assert not any("deprecated" in note for note in decoupled.notes + mixed.notes)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UsageError) as info:
        plan("int4", "int4_algo_config=gptq")
    for name in ("default", "rtn", "k_quant", "k_quant_mixed"):
        assert name in str(info.value)


@pytest.mark.parametrize("text, fragment", [
    ("last_matmul:int4", "must be int8"), ("lm_head:int8", "unknown target 'lm_head'"),
    ("mixed_layers", "must be int8"),
])
def test_bad_mixed_precision_spelling_is_a_usage_error(text, fragment):
    with pytest.raises(UsageError, match=fragment):
        opts.parse_extra_options([f"matmul_mixed_precision={text}"])


# ----------------------------------------------------------------------------------- targets that do not exist


def test_linear_attn_flag_without_linear_attention_says_so():
    p = plan("int4", "int8_linear_attn=true", model="Qwen3ForCausalLM")
    assert any("int8_linear_attn has no target" in n and "Qwen3ForCausalLM" in n for n in p.notes)
    assert set(table(p).values()) - {FLOAT} == {WeightFormat(4, "default", 32, True, 4)}


def test_linear_attn_flag_with_linear_layers_moves_them_to_int8():
    p = plan("int4", "int8_linear_attn=true", linear_attn_layers={0, 2})
    assert p.format_for("linear_attn.qkv", 0) == WeightFormat(8, "rtn", 32, True, 4)
    assert p.format_for("attn.q", 1) == WeightFormat(4, "default", 32, True, 4)
    assert not any("no target" in n for n in p.notes)


def test_int8_precision_notes_flags_that_change_nothing():
    p = plan("int8", "last_matmul_weight_int8=true", "int4_algo_config=k_quant")
    assert any("last_matmul_weight_int8" in n and "int4_algo_config=k_quant" in n and "changes nothing" in n
               for n in p.notes)


# ---------------------------------------------------------------------------------------------- embeddings


def test_untied_quantized_embedding_takes_the_base_format():
    p = plan("int4", "quantize_embeddings=true", "last_matmul_weight_int8=true", tied_embeddings=False)
    assert p.format_for("embed") == WeightFormat(4, "default", 32, True, 4)
    assert p.format_for("lm_head").bits == 8
    assert not p.shares_embedding


def test_tied_quantized_embedding_shares_the_lm_head_format_and_says_why():
    p = plan("int4", "quantize_embeddings=true", "last_matmul_weight_int8=true", tied_embeddings=True)
    assert p.shares_embedding
    assert p.format_for("embed") == p.format_for("lm_head") == WeightFormat(8, "rtn", 32, True, 4)
    assert any("tied" in n and "int8 rtn" in n for n in p.notes)
    quiet = plan("int4", "quantize_embeddings=true", tied_embeddings=True)
    assert quiet.shares_embedding and quiet.notes == ()


def test_tied_float_embedding_does_not_share():
    p = plan("int4", "quantize_embeddings=false", tied_embeddings=True)
    assert not p.shares_embedding
    assert p.format_for("embed") == FLOAT and p.format_for("lm_head").bits == 4


def test_int4_shares_a_tied_embedding_by_default():
    """Default (auto): a tied embedding and a 4-bit lm_head read one int4 table; nothing else is quantized unasked."""
    assert plan("int4", tied_embeddings=True).shares_embedding
    assert plan("int4", tied_embeddings=True).format_for("embed") == WeightFormat(4, "default", 32, True, 4)
    for p in (plan("int4", tied_embeddings=False), plan("int8", tied_embeddings=True),
              plan("int4", "last_matmul_weight_int8=true", tied_embeddings=True)):
        assert p.format_for("embed") == FLOAT and not p.shares_embedding and p.notes == ()


# ------------------------------------------------------------------------------------------- property: oracle


def oracle(precision, method, symmetric, flags, quantize_embeddings, tied, role, layer, layers):
    """The rules of quantization.md, restated independently of the implementation."""
    if precision not in ("int4", "int8") or role == "moe.router":
        return None
    int8 = (8, "rtn", symmetric)
    base = int8 if precision == "int8" else (4, method, symmetric and method != "k_quant")
    head = int8 if "last_matmul" in flags else base
    if quantize_embeddings is None:  # auto: a tied 4-bit lm_head shares its table
        quantize_embeddings = precision == "int4" and tied and "last_matmul" not in flags
    if role == "embed":
        return (head if tied else base) if quantize_embeddings else None
    if role == "lm_head":
        return head
    edge = max(1, layers // 8)
    if "mixed_layers" in flags and (layer < edge or layer >= layers - edge):
        return int8
    return base


@settings(max_examples=300, deadline=None)
@given(precision=st.sampled_from(["fp32", "fp16", "int4", "int8"]),
       method=st.sampled_from(["default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed",
                               "k_quant_linear"]),
       symmetric=st.booleans(), last=st.booleans(), mixed=st.booleans(),
       via_mixed_precision=st.booleans(), quantize_embeddings=st.sampled_from([True, False, None]),
       tied=st.booleans(),
       layers=st.integers(1, 40), data=st.data())
def test_every_decision_matches_the_documented_rules(precision, method, symmetric, last, mixed, via_mixed_precision,
                                                     quantize_embeddings, tied, layers, data):
    items = [f"int4_algo_config={method}", f"int4_is_symmetric={symmetric}"]
    items += [] if quantize_embeddings is None else [f"quantize_embeddings={quantize_embeddings}"]
    if via_mixed_precision:
        chosen = [t for t, on in (("last_matmul", last), ("mixed_layers", mixed)) if on]
        items.append("matmul_mixed_precision=" + ",".join(f"{t}:int8" for t in chosen))
    else:
        items += [f"last_matmul_weight_int8={last}", f"int8_mixed_layers={mixed}"]
    p = plan(precision, *items, layers=layers, tied_embeddings=tied)
    base, implied = {"rtn_last": ("rtn", {"last_matmul"}), "k_quant_last": ("k_quant", {"last_matmul"}),
                     "k_quant_mixed": ("k_quant", {"last_matmul", "mixed_layers"}),
                     "k_quant_linear": ("k_quant", set())}.get(method, (method, set()))
    flags = implied | ({"last_matmul"} if last else set()) | ({"mixed_layers"} if mixed else set())
    role = data.draw(st.sampled_from(["embed", "lm_head", "attn.q", "attn.o", "mlp.gate", "mlp.down", "moe.router"]))
    layer = data.draw(st.integers(0, layers - 1))
    got = p.format_for(role, layer)
    want = oracle(precision, base, symmetric, flags, quantize_embeddings, tied, role, layer, layers)
    assert (None if got.is_float else (got.bits, got.method, got.symmetric)) == want
    if not got.is_float:
        assert got.block_size == 32 and got.accuracy_level == 4

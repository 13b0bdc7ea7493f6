"""Phi-3 LongRoPE: both sides of the short/long switch, what happens across it, and onnxruntime-genai's rewind.

transformers 5 picks the frequency set per forward pass from that pass's sequence length (max position + 1): short
factors when it is <= original_max_position_embeddings, long factors otherwise, for every position of the pass. Its
generate() re-runs the whole sequence without cache at the first step past the switch, so generated tokens always
equal the argmax of a cache-free forward pass. The export selects its cos/sin caches with an If on the run's total
length. What is proved here:
- a prompt on either side of the switch (12 and 40 tokens, switch at 32) and its decode steps match transformers'
  cache-free logits within 1e-4, and onnxruntime-genai reproduces transformers' 16 greedy tokens for a 40-token prompt;
- a sequence that grows across the switch: every decode step equals transformers' forward *with its KV cache* (which
  keeps keys cached under the short set, as the export does); past the switch that differs from a cache-free pass
  (measured, not hidden), and re-prefilling at the crossing, as transformers' generate does, gives those exactly;
  `ortbuild verify` compares against that cached decode, so it passes the export across the switch and still fails
  one with wrong long factors;
- onnxruntime-genai's model type "phi3" rewinds (re-prefills) at length 4097, the switch of the released Phi-3 /
  Phi-3.5 / Phi-4-mini checkpoints (original 4096): with that switch, greedy generation crossing it matches
  transformers 16/16, while the same model as a generic "decoder" (no rewind) does not;
- the frequencies and attention factor equal transformers' own longrope and HunYuan ntk_alpha initialisers, and the
  switch length is read the way Phi3Config reads it (top-level original_max_position_embeddings, default 4096).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import factory
import parity
from builders import family_for
from builders.config import Config

TOL = 1e-4
SWITCH = 32  # factory.PHI3_LONGROPE original_max_position_embeddings
LONG_PROMPT = [int(i) for i in np.random.RandomState(40).randint(4, 500, 40)]
# a Phi-3 whose switch is the released checkpoints' (4096), with room past it
PHI3_4K_SWITCH = {"original_max_position_embeddings": 4096, "max_position_embeddings": 8192,
                  "rope_parameters": {**factory.PHI3_LONGROPE, "original_max_position_embeddings": 4096}}


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    return parity.export_cache(lambda case: tiny_checkpoint(case), tmp_path_factory, "longrope")


@pytest.mark.parametrize("arch", ["phi3", "phi4_mini"])
def test_prompt_past_the_switch_matches_transformers(arch, tiny_checkpoint, exported):
    prompt_err, decode_err, _, full = parity.compare_with_hf(exported(arch), tiny_checkpoint(arch), 4, LONG_PROMPT)
    assert prompt_err <= TOL and decode_err <= TOL, (prompt_err, decode_err)
    # control: the long factors matter, the same prompt with the short set only is far off
    short = {**factory.PHI3_LONGROPE, "long_factor": factory.PHI3_LONGROPE["short_factor"]}
    if arch == "phi3":
        other = tiny_checkpoint("phi3", rope_parameters=short)
        assert parity.max_abs(parity.hf_logits(parity.load_hf(other), LONG_PROMPT), full[:40]) > 1000 * TOL


@pytest.mark.genai
def test_genai_greedy_past_the_switch(tiny_checkpoint, exported):
    expected = parity.hf_greedy(parity.load_hf(tiny_checkpoint("phi3")), LONG_PROMPT, 16)
    assert parity.genai_greedy(exported("phi3"), LONG_PROMPT, 16) == expected


def test_across_the_switch_the_graph_is_transformers_cached_forward(tiny_checkpoint, exported):
    """Decoding from a 28-token prompt to 36 tokens (switch at 32): every step equals transformers' own forward with
    its KV cache (that pass too picks the set by its total length and keeps the cached keys as rotated). It differs
    from a cache-free pass past the switch, which is what transformers' generate uses there (it re-prefills), and
    re-prefilling the export at the crossing gives those logits exactly."""
    model, out = parity.load_hf(tiny_checkpoint("phi3")), exported("phi3")
    ids = [int(i) for i in np.random.RandomState(0).randint(4, 500, SWITCH - 4)]
    continuation = parity.hf_greedy(model, ids, 8)
    run = parity.run_onnx(out, ids, 8, feed_tokens=continuation)
    with torch.no_grad():
        step = model(input_ids=torch.tensor([ids]), use_cache=True)
        assert parity.max_abs(run.prompt_logits, step.logits[0].numpy()) <= TOL
        for k, token in enumerate(continuation):
            step = model(input_ids=torch.tensor([[token]]), cache=step.cache, use_cache=True)
            assert parity.max_abs(run.step_logits[k], step.logits[0, -1].numpy()) <= TOL, k

    # transformers' generate = argmax of a cache-free pass at every step (it re-prefills at the crossing)
    passes = [parity.hf_logits(model, ids + continuation[:k])[-1] for k in range(9)]  # pass k predicts token k
    assert continuation == [int(np.argmax(p)) for p in passes[:8]]
    errors = [parity.max_abs(step, passes[k + 1]) for k, step in enumerate(run.step_logits)]
    totals = [len(ids) + k + 1 for k in range(8)]
    assert all(e <= TOL for e, t in zip(errors, totals) if t <= SWITCH), errors
    assert all(e > 0.1 for e, t in zip(errors, totals) if t > SWITCH), errors  # measured 1.3-2.7
    # re-prefilled at the crossing (the 33-token sequence as a prompt), then decoding: the cache-free logits
    crossing = SWITCH + 1 - len(ids)
    seq = ids + continuation[:crossing]
    again = parity.run_onnx(out, seq, 8 - crossing, feed_tokens=continuation[crossing:])
    reference = parity.hf_logits(model, ids + continuation)  # every pass from here on is past the switch
    assert parity.max_abs(again.prompt_logits, reference[:len(seq)]) <= TOL
    assert max(parity.max_abs(s, reference[len(seq) + k]) for k, s in enumerate(again.step_logits)) <= TOL


def test_verify_across_the_switch_passes_and_still_catches_a_wrong_rope(tiny_checkpoint, exported, tmp_path):
    """`ortbuild verify` takes its decode references from transformers' cached decode (the computation the graph
    does; a cache-free pass differs past the switch, see above): a 28-token prompt decoding 8 tokens across the switch
    passes. An export whose long factors are wrong (made from a config with the short set twice, verified against
    the real checkpoint) matches on the prompt, below the switch, and fails on the decode positions past it."""
    from builder.verify import verify

    reference = str(tiny_checkpoint("phi3"))
    ids = [int(i) for i in np.random.RandomState(0).randint(4, 500, SWITCH - 4)]
    good = verify(exported("phi3"), reference, prompt_ids=[ids], steps=8, use_genai=False)
    assert good.passed, good.failures()
    assert good.max_abs_error <= TOL and good.greedy("onnxruntime") == (8, 8)

    short = {**factory.PHI3_LONGROPE, "long_factor": factory.PHI3_LONGROPE["short_factor"]}
    wrong = parity.export(tiny_checkpoint("phi3", rope_parameters=short), tmp_path / "wrong-rope")
    bad = verify(wrong, reference, prompt_ids=[ids], steps=8, use_genai=False)
    assert not bad.passed and "max-abs logit error" in bad.failures()[0]
    assert bad.prompts[0].prompt_error <= TOL and bad.prompts[0].decode_error > 0.1


@pytest.mark.genai
def test_genai_phi3_rewind_makes_generation_across_the_switch_exact(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("phi3", **PHI3_4K_SWITCH)
    out = parity.export(ckpt, tmp_path / "phi3")
    assert parity.genai_config(out)["model"]["type"] == "phi3"
    ids = [int(i) for i in np.random.RandomState(1).randint(4, 500, 4090)]  # crosses 4096 at the 7th new token
    expected = parity.hf_greedy(parity.load_hf(ckpt), ids, 16)
    assert parity.genai_greedy(out, ids, 16) == expected
    # control: as a generic decoder genai does not rewind, and the tokens after the crossing differ
    generic = tmp_path / "generic"
    shutil.copytree(out, generic)
    config = parity.genai_config(generic)
    config["model"]["type"] = "decoder"
    (generic / "genai_config.json").write_text(json.dumps(config))
    produced = parity.genai_greedy(generic, ids, 16)
    assert produced[:6] == expected[:6] and produced != expected


# --------------------------------------------------------------------------------------------- numbers


def _spec(config: dict):
    return family_for("Phi3ForCausalLM").make_spec(Config(config, "Phi3ForCausalLM"))


@pytest.mark.parametrize("extra", [{}, {"factor": 4.0}, {"attention_factor": 1.3}])
@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_longrope_frequencies_match_transformers(extra, partial):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from builder.layers.rotary import inverse_frequencies, length_switch

    dim = int(64 * partial) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "partial_rotary_factor": partial, "short_factor": [1.0 + 0.05 * i for i in range(dim)],
            "long_factor": [1.5 + 0.25 * i for i in range(dim)], **extra}
    config = factory.build_config("phi4_mini", rope_parameters=rope, partial_rotary_factor=partial)
    spec_rope = _spec(config.to_dict()).attention.rope
    assert length_switch(spec_rope) == 32
    for long, seq_len in ((False, None), (True, 33)):
        theirs, their_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)
        ours, our_factor = inverse_frequencies(spec_rope, long=long)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
        assert our_factor == pytest.approx(their_factor, rel=1e-9)
    expected = extra.get("attention_factor") or math.sqrt(1 + math.log(extra.get("factor", 256 / 32)) / math.log(32))
    assert inverse_frequencies(spec_rope)[1] == pytest.approx(expected)


def test_ntk_alpha_matches_hunyuan():
    from transformers.models.hunyuan_v1_dense.modeling_hunyuan_v1_dense import HunYuanDenseV1RotaryEmbedding

    from builder.layers.rotary import inverse_frequencies

    config = factory.build_config("hunyuan")
    hunyuan = "HunYuanDenseV1ForCausalLM"
    ours, factor = inverse_frequencies(family_for(hunyuan).make_spec(Config(config.to_dict(), hunyuan)).attention.rope)
    theirs = HunYuanDenseV1RotaryEmbedding(config).inv_freq
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert factor == 1.0 and not np.allclose(ours, inverse_frequencies(
        family_for(hunyuan).make_spec(Config({**config.to_dict(), "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0}}, hunyuan)).attention.rope)[0])


def test_switch_length_is_read_as_phi3config_reads_it():
    """Phi3Config's top-level original_max_position_embeddings (default 4096) overrides rope_parameters'; the legacy
    rope types su / yarn are longrope."""
    from transformers import Phi3Config

    from builder.layers.rotary import length_switch

    base = factory.build_config("phi3").to_dict()
    for top, expected in ((16, 16), (None, 4096)):
        config = {k: v for k, v in base.items() if k != "original_max_position_embeddings"}
        if top is not None:
            config["original_max_position_embeddings"] = top
        assert Phi3Config(**config).rope_parameters["original_max_position_embeddings"] == expected
        assert length_switch(_spec(config).attention.rope) == expected
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    legacy["rope_scaling"] = {k: v for k, v in factory.PHI3_LONGROPE.items() if k not in ("rope_type", "rope_theta")}
    legacy["rope_scaling"]["type"], legacy["rope_theta"] = "su", 10000.0
    rope = _spec(legacy).attention.rope
    assert rope.rope_type == "longrope" and rope.param("short_factor") == tuple(factory.PHI3_LONGROPE["short_factor"])

"""scripts/router_quant_accuracy.py (quantization.md's case for float routers) measures what it says: a router that
int4 represents exactly changes no selection, and a random one loses selections the way its table reports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import router_quant_accuracy as rqa  # noqa: E402


def test_an_exactly_representable_router_changes_nothing():
    rng = np.random.default_rng(0)
    # the MLAS symmetric int4 grid: a block's signed anchor (its largest magnitude) sits at code 0 and the scale is
    # -anchor / 8, so values -8s .. 7s in steps of s with an anchor of -8s quantize exactly
    codes = rng.integers(-7, 8, size=(16, 64)).astype(np.float32)
    codes[:, ::32] = -8
    weight = codes * 0.01
    x = rng.standard_normal((512, 64)).astype(np.float32)
    r = rqa.compare(weight, np.zeros(16, np.float32), x, k=4)
    assert r["int4"]["top_k_set_changed"] == r["int4"]["top1_changed"] == 0.0
    assert r["int4"]["max_weight_change_where_same"] < 1e-5


def test_a_random_router_loses_selections_to_int4_more_than_to_int8():
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.02, (32, 256)).astype(np.float32)
    x = rng.standard_normal((2048, 256)).astype(np.float32)
    r = rqa.compare(weight, np.zeros(32, np.float32), x, k=4)
    changed = [r[q]["top_k_set_changed"] for q in ("int4", "int8")]
    ref_top = np.sort(np.argsort(-(x @ weight.T), axis=-1)[:, :4], axis=-1)
    assert changed[0] > changed[1] > 0.0
    # the fraction is a count over tokens: recompute it from the selections directly
    top4, _ = rqa._selection(x @ rqa.dequantize_blockwise(rqa.quantize_blockwise(
        weight, bits=4, block_size=32, symmetric=True, method="default")).T, 4)
    assert changed[0] == float(1 - (top4 == ref_top).all(-1).mean())

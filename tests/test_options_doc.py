"""quantization.md stays true: the options table is the generated one, and the claims it spells out hold.

The table must equal builder.options.markdown_table() (fix: `python scripts/sync_options_doc.py`); the legacy
alias table, the mixed-layer examples and the --help text are checked against the code's behaviour, not its text.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from builder import options as opts
from builder.quant.plan import LEGACY_METHODS, QuantPlan, mixed_layer_indices

DOC = Path(__file__).resolve().parent.parent / "quantization.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def test_doc_contains_exactly_the_generated_options_table(doc):
    table = opts.markdown_table()
    assert doc.count(table) == 1, "quantization.md is out of date: run `python scripts/sync_options_doc.py`"
    begin = doc.index("<!-- options-table:begin")
    end = doc.index("<!-- options-table:end -->")
    between = doc[begin:end].split("\n", 1)[1].strip()
    assert between == table  # nothing stale left next to it


def test_every_option_is_a_table_row(doc):
    rows = re.findall(r"^\| `(\w+)` \|", opts.markdown_table(), flags=re.M)
    assert rows == [o.name for o in opts.OPTIONS]
    assert len(rows) >= 15


def legacy_rows(doc: str) -> dict[str, str]:
    return dict(re.findall(r"^\| `(\w+)` \| `(int4_algo_config=[^`]+)` \|$", doc, flags=re.M))


def plan_of(items: list[str], linear: frozenset = frozenset({3})) -> QuantPlan:
    extra = {**opts.defaults(), **opts.parse_extra_options(items)}
    p = QuantPlan.from_options("int4", extra, "cpu", 16, linear_attn_layers=linear)
    return p.__class__(**{**p.__dict__, "notes": ()})


def test_legacy_alias_table_lists_every_alias_and_tells_the_truth(doc):
    rows = legacy_rows(doc)
    assert sorted(rows) == sorted(LEGACY_METHODS)
    for alias, spelled in rows.items():
        assert plan_of([f"int4_algo_config={alias}"]) == plan_of(spelled.split()), alias
        # and the spelling is not vacuous: it differs from the base method alone
        assert plan_of(spelled.split()) != plan_of([spelled.split()[0]]), alias


def test_mixed_layer_examples_in_the_doc_hold(doc):
    examples = re.findall(r"n=(\d+) → \{([^}]*)\}", doc)
    assert len(examples) >= 4
    for n, listed in examples:
        members: set[int] = set()
        for part in listed.split(","):
            if ".." in part:
                lo, hi = part.split("..")
                members |= set(range(int(lo), int(hi) + 1))
            else:
                members.add(int(part))
        assert mixed_layer_indices(int(n)) == members, n


def test_help_text_names_every_option_with_its_values():
    text = opts.help_text()
    for option in opts.OPTIONS:
        assert f"  {option.name} [{option.allowed_text}]" in text


def test_doc_carries_the_measured_figures(doc):
    assert "| model | recipe | weight rel. RMS error | max abs logit error |" in doc
    rows = re.findall(r"^\| [^|]* \| (int4|int8|fp32)[^|]* \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+/16 \| [\d.]+ \|$",
                      doc, flags=re.M)
    assert len(rows) >= 50

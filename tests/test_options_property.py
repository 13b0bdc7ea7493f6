"""Property tests of the `--extra_options` parser (builder/options.py) and the CLI's flag grouping.

The table is the one source of truth, so the strategies are derived from it: every option's valid values must
parse back to themselves whatever the spelling and grouping; anything else must be a UsageError naming the
option (never another exception, never a silently different value).
"""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from builder import options as opts
from builder.output import TOKENIZER_FILES
from builder.cli import normalize_extra_options
from builder.errors import UsageError
from builder.options import BY_NAME, OPTIONS, Option, parse_extra_options

BOOL_SPELLINGS = {True: ("1", "true", "yes", "on"), False: ("0", "false", "no", "off")}


def _valid_values(option: Option) -> st.SearchStrategy:
    """Values the option accepts, as typed values."""
    if option.choices is not None:
        return st.sampled_from(option.choices + option.legacy_values)
    if option.kind == "bool":
        return st.booleans()
    if option.name == "qmoe_block_size":
        return st.sampled_from(opts.BLOCK_SIZES) | st.integers(max_value=0)
    if option.name == "matmul_mixed_precision":
        return st.lists(st.sampled_from(["last_matmul", "mixed_layers", "linear_attn"]), unique=True).map(
            lambda targets: ",".join(f"{t}:int8" for t in targets))
    if option.name == "filename":
        return st.text(string.ascii_letters + string.digits + "_-.", min_size=1, max_size=20).filter(
            lambda name: not name.startswith(".") and name not in ("genai_config.json", *TOKENIZER_FILES))
    raise AssertionError(f"no strategy for option {option.name}: add one when adding the option")


def _spell(option: Option, value, draw) -> str:
    """One accepted textual spelling of `value` (case and sign variants for bools/ints)."""
    if option.kind == "bool":
        word = draw(st.sampled_from(BOOL_SPELLINGS[value]))
        return draw(st.sampled_from([word, word.upper(), word.capitalize()]))
    if option.kind == "int":
        return draw(st.sampled_from([str(value), f"+{value}" if value >= 0 else str(value)]))
    return str(value)


@st.composite
def assignments(draw) -> dict:
    """A random subset of options with valid values, each with its chosen spelling: name -> (value, text)."""
    chosen = draw(st.lists(st.sampled_from(OPTIONS), unique_by=lambda o: o.name, max_size=len(OPTIONS)))
    out = {}
    for option in chosen:
        value = draw(_valid_values(option))
        out[option.name] = (value, _spell(option, value, draw))
    return out


def test_every_option_has_a_strategy():
    for option in OPTIONS:
        _valid_values(option)  # raises for an option added to the table without one here


@settings(max_examples=200, deadline=None)
@given(given_=assignments(), data=st.data())
def test_valid_values_round_trip_in_any_order_and_grouping(given_, data):
    tokens = [f"{name}={text}" for name, (_, text) in given_.items()]
    tokens = data.draw(st.permutations(tokens))
    # split the tokens into argv items: several pairs may share one space-separated item
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(tokens) - 1)), max_size=len(tokens))))
    items = [" ".join(tokens[a:b]) for a, b in zip([0, *cuts], [*cuts, len(tokens)]) if tokens[a:b]]
    parsed = parse_extra_options(items)
    assert parsed == {name: value for name, (value, _) in given_.items()}
    for name, value in parsed.items():
        assert type(value) is {"bool": bool, "int": int, "str": str}[BY_NAME[name].kind]


@settings(max_examples=200, deadline=None)
@given(option=st.sampled_from(OPTIONS), text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)),
                                                     max_size=12).filter(lambda t: not any(c.isspace() for c in t)))
@example(option=BY_NAME["int4_block_size"], text="")
@example(option=BY_NAME["int4_block_size"], text="32.0")
@example(option=BY_NAME["int4_is_symmetric"], text="2")
@example(option=BY_NAME["filename"], text="../model.onnx")
@example(option=BY_NAME["matmul_mixed_precision"], text=",,:")
def test_any_value_is_accepted_validly_or_refused_by_name(option, text):
    """Never a crash and never an out-of-table value: either a valid typed value or a UsageError naming the option."""
    try:
        value = parse_extra_options([f"{option.name}={text}"])[option.name]
    except UsageError as exc:
        assert f"extra option {option.name}=" in str(exc) or f"{option.name}:" in str(exc)
        return
    if option.kind == "bool":
        assert value is (text.lower() in BOOL_SPELLINGS[True])
        assert text.lower() in BOOL_SPELLINGS[value]
    elif option.kind == "int":
        assert isinstance(value, int) and value == int(text)
    else:
        assert value == text.strip()
    if option.choices is not None:
        assert value in option.choices + option.legacy_values
    if option.check is not None:
        assert option.check(value) is None


@settings(max_examples=200, deadline=None)
@given(option=st.sampled_from(OPTIONS), data=st.data())
def test_single_character_typos_suggest_the_intended_option(option, data):
    name = option.name
    i = data.draw(st.integers(0, len(name) - 1))
    edit = data.draw(st.sampled_from(["delete", "replace", "swap", "insert"]))
    letter = data.draw(st.sampled_from(string.ascii_lowercase + "_"))
    typo = {"delete": name[:i] + name[i + 1:],
            "replace": name[:i] + letter + name[i + 1:],
            "swap": name[:i] + name[i + 1:i + 2] + name[i] + name[i + 2:],
            "insert": name[:i] + letter + name[i:]}[edit]
    assume(typo not in BY_NAME)
    with pytest.raises(UsageError) as info:
        parse_extra_options([f"{typo}=1"])
    assert str(info.value) == (f"unknown extra option '{typo}'. Did you mean '{name}'? "
                               "Run `ortbuild --help` for the list.")


@settings(max_examples=200, deadline=None)
@given(key=st.text(string.ascii_lowercase + string.digits + "_", min_size=1, max_size=24))
def test_unknown_keys_are_refused_with_a_real_suggestion_or_none(key):
    assume(key not in BY_NAME)
    with pytest.raises(UsageError) as info:
        parse_extra_options([f"{key}=1"])
    message = str(info.value)
    assert message.startswith(f"unknown extra option '{key}'.")
    if "Did you mean" in message:
        suggested = message.split("Did you mean '")[1].split("'")[0]
        assert suggested in BY_NAME


@settings(max_examples=100, deadline=None)
@given(given_=assignments(), data=st.data())
def test_repeating_any_option_is_refused(given_, data):
    assume(given_)
    name = data.draw(st.sampled_from(sorted(given_)))
    tokens = [f"{n}={text}" for n, (_, text) in given_.items()] + [f"{name}={given_[name][1]}"]
    with pytest.raises(UsageError, match=f"^extra option '{name}' is given twice.$"):
        parse_extra_options(data.draw(st.permutations(tokens)))


@settings(max_examples=100, deadline=None)
@given(token=st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=16))
def test_tokens_without_equals_are_refused(token):
    with pytest.raises(UsageError, match="is not of the form key=value"):
        parse_extra_options([token])


_flag_free = st.text(string.ascii_lowercase, min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(groups=st.lists(st.lists(st.tuples(_flag_free, _flag_free), min_size=1, max_size=3), max_size=3),
       before=st.lists(_flag_free, max_size=3), after=st.lists(_flag_free, max_size=3),
       spelling=st.sampled_from(["--extra_options", "--extra-options"]))
def test_cli_flag_grouping_keeps_every_pair_and_every_other_token(groups, before, after, spelling):
    """`--extra_options a=1 b=2` and `--extra_options a=1 --extra_options b=2` reach click identically."""
    argv = list(before)
    for group in groups:
        argv += [spelling, *(f"{k}={v}" for k, v in group)]
    argv += ["-p", *after]
    normalized = normalize_extra_options(argv)
    pairs = [f"{k}={v}" for group in groups for k, v in group]
    expected = list(before) + [x for pair in pairs for x in ("--extra_options", pair)] + ["-p", *after]
    assert normalized == expected

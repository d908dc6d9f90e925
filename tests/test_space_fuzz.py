"""Property-based inputs for the space loader and --set: any key with any value ends in a spec or one UserError
naming that key, quickly; never another exception."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tune_inat.errors import UserError
from tune_inat.settings import FIELD_TYPES
from tune_inat.space import load_space, parse_space, with_fixed
from tune_inat.vocabulary import FREEZE_KEYS, KEY_ALIASES, PLUMBING, printable

KEYS = sorted(FIELD_TYPES) + sorted(KEY_ALIASES) + sorted(FREEZE_KEYS) + sorted(PLUMBING)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "resnet", "ViT", "fc_only", "layer4", "1e-3", ".inf", "~", "yes", "native", "from:x"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=6,
)
specs = st.one_of(
    values,
    st.fixed_dictionaries({"value": values}),
    st.fixed_dictionaries({"values": st.lists(values, max_size=4)}),
    st.fixed_dictionaries({"min": values, "max": values}),
    st.fixed_dictionaries(
        {
            "distribution": st.sampled_from(["uniform", "log_uniform_values", "q_uniform", "int_uniform", "bogus"]),
            "min": scalars,
            "max": scalars,
        }
    ),
    st.fixed_dictionaries(
        {"values": st.lists(scalars, min_size=1, max_size=3), "probabilities": st.lists(scalars, max_size=3)}
    ),
)


def problems_of(message: str, source: str) -> list[str]:
    """The problems of one message: 'source: a' or 'source: N problems: a | b'."""
    body = message.removeprefix(f"{source}: ")
    head, _, rest = body.partition(" problems: ")
    return rest.split(" | ") if head.isdigit() else [body]


FAST = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(key=st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=15)), spec=specs)
def test_any_parameter_ends_in_a_spec_or_one_error_naming_it(key: str, spec) -> None:
    raw = {"parameters": {"backbone": {"value": "resnet18"}, key: spec} if key != "backbone" else {key: spec}}
    try:
        parse_space(raw, "fuzz.yaml")
    except UserError as err:
        message = str(err)
        assert "\n" not in message and message.startswith("fuzz.yaml: ")
        for problem in problems_of(message, "fuzz.yaml"):  # each one names the key, never another
            assert f"parameters.{printable(key)}" in problem or "given twice" in problem, message


@FAST
@given(key=st.sampled_from(KEYS), value=values)
def test_any_set_value_ends_in_a_spec_or_one_error_naming_the_key(key: str, value) -> None:
    try:
        with_fixed(load_space("demo"), {key: value})
    except UserError as err:
        message = str(err)
        assert "\n" not in message and message.startswith("--set: ")
        for problem in problems_of(message, "--set"):
            assert problem.startswith(printable(key)) or "given twice" in problem, message


@FAST
@given(text=st.text(max_size=200))
def test_any_yaml_text_as_a_space_ends_in_a_spec_or_one_error(text: str) -> None:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # read_yaml turns these into one line (tested in test_bad_input.py)
    try:
        parse_space(raw, "fuzz.yaml")
    except UserError as err:
        assert "\n" not in str(err)


def test_non_finite_and_huge_numbers_are_refused_by_name() -> None:
    for value in (math.inf, -math.inf, math.nan, 1e308 * 10, 10**400):
        try:
            parse_space({"parameters": {"lr": {"value": value}}}, "fuzz.yaml")
        except UserError as err:
            assert "parameters.lr" in str(err)
        else:
            raise AssertionError(f"lr {value} was accepted")


def test_a_bad_value_is_told_once_under_the_key_its_author_wrote() -> None:
    """A bad fixed value is not blamed on the searched keys beside it (each is checked against the good ones)."""
    raw = {
        "parameters": {
            "model": {"value": "resnet18"},
            "num_epochs": {"value": 0},
            "learning_rate": {"values": [1e-3, 1e-2]},
            "freeze_strategy": {"values": ["fc_only", "all_unfrozen"]},
        }
    }
    with pytest.raises(UserError) as err:
        parse_space(raw, "f.yaml")
    assert str(err.value) == "f.yaml: parameters.num_epochs (epochs): epochs must be an integer >= 1, got 0"
    with pytest.raises(UserError) as err:
        with_fixed(load_space("demo"), {"learning_rate": -1})
    assert str(err.value) == "--set: learning_rate (lr): lr must be a positive number, got -1.0"
    raw["parameters"] |= {"num_epochs": {"value": 2}, "batch_size": {"value": 6}, "accumulation_steps": {"value": 4}}
    with pytest.raises(UserError, match=r"^f.yaml: parameters: grad_accum_steps must be an integer >= 1 that divides"):
        parse_space(raw, "f.yaml")

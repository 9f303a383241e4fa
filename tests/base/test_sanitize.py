from __future__ import annotations

import enum
import json
from datetime import UTC, datetime

import pytest

from base.sanitize import MAX_DEPTH, clean_json, clean_json_text


def nested(depth: int, leaf: object = 1, kind: str = "list") -> object:
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


class Colour(enum.StrEnum):
    RED = "red"


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, None, True, "x"], "b": {"c": "d"}},
        [],
        {"nul": "a\x00b", "k\x00": 1},
        {"surrogate": "x\ud800y"},
        ["\udfff"],
        {"nan": float("nan"), "inf": [float("inf"), -float("inf")]},
        {"big": 2**80},
        {"tuple": (1, "a\x00")},
        {"literal": "a \\u0000 b", "quote": 'say "[[{{" \\" ]]'},
        {"brackets": "[[{{" * 50},
        {"when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)},
        {"enum": Colour.RED},
        {1: "int key"},
        nested(MAX_DEPTH - 1),
        nested(MAX_DEPTH),
        nested(MAX_DEPTH + 1),
        nested(MAX_DEPTH + 5, kind="dict"),
        nested(MAX_DEPTH, leaf=[]),
        nested(MAX_DEPTH, leaf={}),
        [nested(MAX_DEPTH - 1), "[" * 100],
    ],
)
def test_json_text_is_what_clean_json_stores(value):
    text, cleaned = clean_json_text(value)
    expected = clean_json(value)
    assert json.loads(text) == json.loads(json.dumps(expected))
    # Passed through when only its text needed care (NaN is written as null), else cleaned.
    assert cleaned is value or cleaned == expected
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogates


@pytest.mark.parametrize(
    "value",
    [{"k\x00": "v"}, ["x\ud800"], nested(MAX_DEPTH + 1), {"big": 2**80}],
)
def test_a_value_that_needs_cleaning_comes_back_cleaned(value):
    assert clean_json_text(value)[1] == clean_json(value)


def test_a_clean_value_is_passed_through_unwalked():
    value = {"messages": [{"role": "user", "content": "[{" * 200}]}
    text, cleaned = clean_json_text(value)
    assert cleaned is value
    assert json.loads(text) == value

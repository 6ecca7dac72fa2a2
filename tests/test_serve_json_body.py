"""The request body's JSON parser: bounded depth, integer length and finite numbers, errors that say which."""

from __future__ import annotations

import json

import pytest

from pyvl.serve.json_body import MAX_DEPTH, MAX_INT_DIGITS, BodyError, parse


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def test_ordinary_bodies_parse_as_json_loads_would():
    raw = b'{"a": [1, -2, 3.5, "\\u00e9", null, true, {"b": []}], "seed": ' + b"9" * MAX_INT_DIGITS + b"}"
    assert parse(raw) == {"a": [1, -2, 3.5, "é", None, True, {"b": []}], "seed": int("9" * MAX_INT_DIGITS)}
    assert parse(_nested(MAX_DEPTH).encode()) == json.loads(_nested(MAX_DEPTH))  # exactly at the bound


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (_nested(MAX_DEPTH + 1).encode(), f"deeper than {MAX_DEPTH} levels"),
        (_nested(900).encode(), f"deeper than {MAX_DEPTH} levels"),  # below the recursion limit
        (_nested(100_000).encode(), f"deeper than {MAX_DEPTH} levels"),  # past it
        ('{"a":' * 50_000 + "1" + "}" * 50_000, f"deeper than {MAX_DEPTH} levels"),
        (b'{"n": ' + b"9" * 5000 + b"}", f"at most {MAX_INT_DIGITS} digits"),
        (b'{"n": -' + b"9" * (MAX_INT_DIGITS + 1) + b"}", f"at most {MAX_INT_DIGITS} digits"),
        (b'{"t": NaN}', "NaN is not a JSON value"),
        (b'{"t": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"t": 1e999}', "1e999 is out of range"),
        (b"\xff\xfe{}", "not UTF-8 (byte 0)"),
        (b'{"a": 1', "Expecting ',' delimiter"),
        (b"", "Expecting value"),
    ],
)
def test_hostile_bodies_are_body_errors(raw, says):
    with pytest.raises(BodyError) as info:
        parse(raw if isinstance(raw, bytes) else raw.encode())
    assert says in str(info.value)

"""Request bodies parsed as JSON within bounds a hostile client cannot get past.

``json.loads`` alone lets a body reach Python's limits: arrays nested 10,000 deep raise RecursionError (here, or
later in whatever walks the value), a 5,000-digit integer raises ValueError past the int-to-str limit (or costs
quadratic time below it), ``NaN``, ``Infinity`` and ``1e999`` arrive as non-finite floats. Here every one of
them is a :class:`BodyError` (a 400) that says which bound it broke, and what comes back is at most
``MAX_DEPTH`` deep with integers of at most ``MAX_INT_DIGITS`` digits and only finite floats.
"""

from __future__ import annotations

import json
import math

__all__ = ["BodyError", "MAX_DEPTH", "MAX_INT_DIGITS", "parse"]

MAX_DEPTH = 64  # the deepest JSON schema or tool definition people send is far shallower
MAX_INT_DIGITS = 40  # a 128-bit seed has 39


class BodyError(ValueError):
    """The body is not JSON pyvl accepts; the message says why."""


def _int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise BodyError(f"an integer of {len(text)} characters; at most {MAX_INT_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"the number {text[:40]} is out of range")
    return value


def _constant(name: str):
    raise BodyError(f"{name} is not a JSON value")


def _check_depth(value) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_DEPTH:
                    raise BodyError(f"arrays and objects nest deeper than {MAX_DEPTH} levels")
                stack.append((child, depth + 1))


def parse(raw: bytes):
    """The JSON value of ``raw`` (UTF-8), within the bounds above; BodyError otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise BodyError(f"arrays and objects nest deeper than {MAX_DEPTH} levels") from None
    except BodyError:
        raise
    except ValueError as exc:  # json.JSONDecodeError included
        raise BodyError(str(exc)[:200]) from None
    _check_depth(value)
    return value

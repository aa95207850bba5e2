"""strict_json reads bodies with jiter where it can and with Python's json where jiter would
differ. What an event body reads as must not depend on which one read it: the same value,
of the same types, or a refusal from both."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orderonce.errors import BadEvent
from schemas.parsing import _read_fast, _read_python, strict_json


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1, 1.0 and True are == in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _both(body: bytes) -> None:
    try:
        expected = _read_python(body)
    except BadEvent:
        with pytest.raises(ValueError):
            _read_fast(body)
        return
    try:
        fast = _read_fast(body)
    except ValueError:
        return  # the Python path reads it: strict_json falls back
    assert _same(fast, expected), (body, fast, expected)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_values, st.booleans())
def test_a_json_value_reads_the_same_on_both_paths(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    _both(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_read_the_same_on_both_paths(body: bytes) -> None:
    _both(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "a": 2}',
        b'{"a": {"b": [1, {"c": 1, "c": 1}]}}',
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": "\\ud800"}',
        b'{"a": "\\ud83d\\ude00"}',
        b'{"a": 1e400}',
        b'{"a": -0.0, "b": -0, "c": 1E5, "d": 0.1}',
        b'{"a": "\xff"}',
        b'\xef\xbb\xbf{"a": 1}',
        b'{"a": "tab\there"}',
        b'{"a": 01}',
        b'{"a": 1} x',
        b' \n{"a": [ ] }\r\n',
        b'{"a": 12345678901234567890123456789}',
    ],
)
def test_the_edges_read_the_same_on_both_paths(body: bytes) -> None:
    _both(body)


@pytest.mark.parametrize("extra", [0, 1])
def test_an_integer_at_and_past_pythons_limit_of_digits_reads_as_before(extra: int) -> None:
    _both(b'{"a": ' + b"7" * (sys.get_int_max_str_digits() + extra) + b"}")


def test_a_duplicate_key_is_named_whatever_path_found_it() -> None:
    with pytest.raises(BadEvent, match="duplicate key 'c'"):
        strict_json(b'{"a": {"b": [1, {"c": 1, "c": 1}]}}')

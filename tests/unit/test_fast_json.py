"""worker/messaging/fast_json.py: the transport reads list entries, and the consumer task
bodies, with jiter; what Python's json reads must read the same (not become unreadable, nor
another value), and what it refuses must be refused."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.messaging.fast_json import loads


@pytest.mark.parametrize(
    "raw",
    [
        b'{"body": "e30=", "properties": {"delivery_tag": "t"}}',
        b'{"x": NaN, "y": Infinity}',  # orjson refuses these constants
        b'{"x": "\\ud800"}',  # a lone surrogate escape
        b'{"x": 123456789012345678901234567890}',  # past 64 bits: orjson gives a float
        b'{"x": -9223372036854775809, "y": 18446744073709551616}',
        b'{"x": "12345678901234567890 in a string"}',
        b'{"x": 1e400}',
        b'{"x": 1, "x": 2}',  # the last one wins
        b'{"x": [' + b"[" * 300 + b"]" * 300 + b"]}",  # deeper than jiter reads
        b'\xef\xbb\xbf{"x": 1}',  # a byte order mark
        b'{"x": "\xed\xa0\x80"}',  # a lone surrogate's bytes
    ],
)
def test_what_pythons_json_reads_reads_the_same(raw: bytes) -> None:
    got, expected = loads(raw), json.loads(raw)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key])
        else:
            assert got[key] == value


def test_what_neither_reads_is_an_error() -> None:
    with pytest.raises(ValueError):
        loads(b"\x00not json")


def _same(got: Any, expected: Any) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(got, float) and math.isnan(got)
    return type(got) is type(expected) and got == expected


_NUMBER = r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,3})?"


@given(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.integers().map(str),
        st.from_regex(_NUMBER, fullmatch=True),
    )
)
def test_every_number_reads_as_pythons_json_reads_it(number: str) -> None:
    raw = f'{{"x": {number}}}'.encode()
    assert _same(loads(raw)["x"], json.loads(raw)["x"])


@given(st.text())
def test_every_string_reads_as_pythons_json_reads_it(text: str) -> None:
    raw = json.dumps({"x": text}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert loads(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b'{"x": 1} x', b'{"x": "\x01"}', b"[1,]", b'{"x": tru}'])
def test_what_pythons_json_refuses_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(ValueError):
        loads(raw)

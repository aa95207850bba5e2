"""worker/messaging/fast_json.py: the transport reads list entries, and the consumer task
bodies, with orjson; what Python's json reads must read the same (not become unreadable, nor
another value)."""

from __future__ import annotations

import json
import math

import pytest

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

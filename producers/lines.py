"""Reading CloudEvents as JSON lines (``orderonce publish``): each line checked as it arrives, as
the worker would check it, so that a bad line is reported with its number and reason, and
never sent, while the good ones are."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from orderonce.errors import BadEvent
from schemas.parsing import parse_event


@dataclass(frozen=True)
class Line:
    number: int
    body: str | None  # the event's JSON, when it is one
    refusal: str | None = None  # why it is not

    @property
    def size(self) -> int:
        return len(self.body or "")


def lines_of(stream: BinaryIO, max_bytes: int) -> Iterator[Line]:
    """Each non-blank line: its event, or why it is none (not UTF-8, too long, what the
    parser refuses). A line is never read past ``max_bytes``, however long it is."""
    number = 0
    while True:
        raw = stream.readline(max_bytes + 2)
        if not raw:
            return
        number += 1
        if not raw.endswith(b"\n") and len(raw) > max_bytes:
            while (rest := stream.readline(64 * 1024)) and not rest.endswith(b"\n"):
                pass
            yield Line(number, None, f"oversized: longer than {max_bytes} bytes")
            continue
        text = raw.strip()
        if not text:
            continue
        try:
            body = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Line(number, None, f"malformed_json: not UTF-8 (byte {exc.start + 1})")
            continue
        try:
            parse_event(body, max_bytes)
        except BadEvent as bad:
            at = f" [{bad.field}]" if bad.field else ""
            yield Line(number, None, f"{bad.reason}{at}: {bad.detail}")
            continue
        yield Line(number, body)

"""Buffered mode's message handling (worker/buffered.py) with stand-ins for kombu messages and
for the batch protocol: which messages are buffered, and what happens to each message after a
commit, a hand-back, a database outage and a bug. The real thing, with real workers and
kills, is tests/integration/test_buffered.py."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from orderonce.broker import BATCH_TASK_NAME, TASK_NAME
from worker import buffered
from worker.exactly_once import Outcome
from worker.exactly_once_batch import HandedBack


class FakeMessage:
    def __init__(
        self, body: Any = None, *, task: str = TASK_NAME, raw: bytes | None = None, **headers: Any
    ) -> None:
        self.headers = {"task": task, "id": f"id-{body}", **headers}
        self.delivery_info: dict[str, Any] = {}
        self.channel = None
        self.acknowledged = False
        self._raw = raw if raw is not None else json.dumps([[body], {}, {}]).encode()
        self.fate: str | None = None

    def decode(self) -> Any:
        return json.loads(self._raw)

    def ack_log_error(self, *_: Any) -> None:
        assert self.fate is None
        self.fate = "acked"

    def reject_log_error(self, *_: Any, requeue: bool = False) -> None:
        assert self.fate is None and requeue
        self.fate = "requeued"


@pytest.fixture
def batch(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A stand-in for worker.celery_app (which would build the Celery app) and its
    apply_batch: ``batch["result"]`` is returned, or raised if it is an exception."""
    state: dict[str, Any] = {"calls": [], "result": ([], [])}

    def apply_batch(bodies: list[bytes], *, message_ids: list[str | None]) -> Any:
        state["calls"].append((bodies, message_ids))
        if isinstance(state["result"], Exception):
            raise state["result"]
        return state["result"]

    module = types.ModuleType("worker.celery_app")
    module.apply_batch = apply_batch  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.celery_app", module)
    monkeypatch.setattr(buffered.time, "sleep", lambda _: None)
    yield state


def _buffer(size: int = 3) -> tuple[buffered.Buffer, list[FakeMessage]]:
    singles: list[FakeMessage] = []
    # A timer that never fires: the buffer is applied when full.
    return buffered.Buffer(size, 0.005, 0.05, singles.append, lambda d, fn: _Timer()), singles


def test_only_plain_event_messages_are_buffered() -> None:
    assert buffered.plain_event(FakeMessage("e")) is not None
    assert buffered.plain_event(FakeMessage("e", task=BATCH_TASK_NAME)) is None
    assert buffered.plain_event(FakeMessage("e", eta="2026-01-01T00:00:00")) is None
    assert buffered.plain_event(FakeMessage("e", orderonce_attempts={"too_early": 1})) is None
    assert buffered.plain_event(FakeMessage("e", redelivered=True)) is None
    redelivered = FakeMessage("e")
    redelivered.delivery_info["redelivered"] = True
    assert buffered.plain_event(redelivered) is None
    assert buffered.plain_event(FakeMessage(raw=b"\x00not json")) is None
    assert buffered.plain_event(FakeMessage(raw=b'{"x": 1}')) is None
    assert buffered.plain_event(FakeMessage(raw=b'[["a", "b"], {}, {}]')) is None
    assert buffered.plain_event(FakeMessage(raw=b'[["a"], {"k": 1}, {}]')) is None
    assert buffered.plain_event(FakeMessage(raw=b"[[1], {}, {}]")) is None


def test_a_full_buffer_commits_then_acks_and_hands_back_in_order(batch: dict[str, Any]) -> None:
    buf, singles = _buffer(4)
    msgs = [FakeMessage(f"e{i}") for i in range(4)]
    batch["result"] = (
        [Outcome("applied"), Outcome("duplicate")],
        [
            HandedBack(b"e3", "lock_busy", "", 3),
            HandedBack(b"e1", "too_early", "", 1),
        ],
    )
    for m in msgs[:3]:
        assert buf.offer(m)
    assert batch["calls"] == []  # not full yet
    assert buf.offer(msgs[3])
    (bodies, ids), *_ = batch["calls"]
    assert bodies == [b"e0", b"e1", b"e2", b"e3"]
    assert ids == ["id-e0", "id-e1", "id-e2", "id-e3"]
    assert [m.fate for m in msgs] == ["acked", None, "acked", None]
    assert singles == [msgs[1], msgs[3]]  # the default path, in message order, unacked


def test_a_database_outage_requeues_every_message_and_acks_none(batch: dict[str, Any]) -> None:
    buf, singles = _buffer(2)
    msgs = [FakeMessage("a"), FakeMessage("b")]
    batch["result"] = OperationalError("COMMIT", {}, Exception("connection lost"))
    for m in msgs:
        buf.offer(m)
    assert [m.fate for m in msgs] == ["requeued", "requeued"]
    assert singles == []


def test_a_bug_sends_each_message_alone_down_the_default_path(batch: dict[str, Any]) -> None:
    buf, singles = _buffer(2)
    msgs = [FakeMessage("a"), FakeMessage("b")]
    batch["result"] = RuntimeError("a bug")
    for m in msgs:
        buf.offer(m)
    assert [m.fate for m in msgs] == [None, None]
    assert singles == msgs


def test_a_lost_connection_drops_the_buffer_unapplied(batch: dict[str, Any]) -> None:
    buf = buffered.Buffer(10, 1.0, 1.0, lambda m: None, lambda delay, fn: _Timer())
    msgs = [FakeMessage("a"), FakeMessage("b")]
    for m in msgs:
        buf.offer(m)
    assert buf.discard() == 2
    buf.flush()
    assert batch["calls"] == []
    assert [m.fate for m in msgs] == [None, None]


class _Timer:
    def cancel(self) -> None:
        pass

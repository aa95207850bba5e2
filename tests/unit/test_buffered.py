"""Buffered mode's message handling (worker/messaging/buffered.py) with stand-ins for kombu
messages and for the batch protocol: which messages are buffered, and what happens to each
message after a commit, a hand-back, a database outage and a bug. The real thing, with real
workers and kills, is tests/integration/test_buffered.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from worker.messaging import buffered
from worker.messaging.broker import BATCH_TASK_NAME, TASK_NAME
from worker.protocol.batch import HandedBack
from worker.protocol.single import Outcome


class FakeMessage:
    def __init__(
        self, body: Any = None, *, task: str = TASK_NAME, raw: bytes | None = None, **headers: Any
    ) -> None:
        self.headers = {"task": task, "id": f"id-{body}", **headers}
        self.delivery_info: dict[str, Any] = {}
        self.channel = None
        self.acknowledged = False
        self.body = raw if raw is not None else json.dumps([[body], {}, {}]).encode()
        self.content_type = "application/json"
        self.content_encoding = "utf-8"
        self.accept = None
        self._decoded_cache: Any = None
        self.fate: str | None = None

    def decode(self) -> Any:
        if not self._decoded_cache:
            self._decoded_cache = json.loads(self.body)
        return self._decoded_cache

    def ack_log_error(self, *_: Any) -> None:
        assert self.fate is None
        self.fate = "acked"

    def reject_log_error(self, *_: Any, requeue: bool = False) -> None:
        assert self.fate is None and requeue
        self.fate = "requeued"


_APPLY: dict[str, Any] = {}


@pytest.fixture
def batch(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A stand-in for the batch protocol the consumer gives the buffer: ``batch["result"]`` is
    returned, or raised if it is an exception."""
    state: dict[str, Any] = {"calls": [], "result": ([], [])}

    def apply_batch(bodies: list[bytes], *, message_ids: list[str | None], quick_tries: int) -> Any:
        state["calls"].append((bodies, message_ids))
        state["quick_tries"] = quick_tries
        result = state["result"]
        if isinstance(result, list):  # one result per call
            result = result[len(state["calls"]) - 1]
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setitem(_APPLY, "apply", apply_batch)
    monkeypatch.setattr(buffered.time, "sleep", lambda _: None)
    yield state


def _buffer(
    size: int = 3, *, loop: _Loop | None = None, tries_again: int = 0
) -> tuple[buffered.Buffer, list[FakeMessage]]:
    """A buffer whose default path collects its messages; without ``loop``, with a timer that
    never fires (the buffer is applied when full)."""
    singles: list[FakeMessage] = []
    call_later = loop.call_later if loop is not None else lambda d, fn: _Timer()
    buf = buffered.Buffer(
        size, 0.005, 0.05, singles.append, _APPLY["apply"], call_later, tries_again=tries_again
    )
    return buf, singles


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


def test_a_task_body_reads_as_kombu_decodes_it() -> None:
    """orjson reads the usual body; what it refuses, a kombu-typed value, or a body of another
    content type or one the consumer does not accept, goes to kombu's decoder: same result,
    same refusals."""
    plain = FakeMessage("e")
    assert buffered.plain_event(plain) is not None
    lenient = FakeMessage(raw=b'[["e"], {}, {"x": NaN}]')  # Python's json reads NaN, orjson not
    assert buffered.plain_event(lenient) is not None
    other = FakeMessage("e")
    other.content_type = "application/x-other"
    other.decode = lambda: (_ for _ in ()).throw(ValueError("refused"))  # type: ignore[method-assign]
    assert buffered.plain_event(other) is None
    refused = FakeMessage("e")
    refused.accept = {"application/x-other"}
    refused.decode = other.decode  # type: ignore[method-assign]
    assert buffered.plain_event(refused) is None
    typed = FakeMessage(raw=b'[["e"], {}, {"x": {"__type__": "uuid", "__value__": "0"}}]')
    typed.decode = lambda: [["kombu"], {}, {}]  # type: ignore[method-assign]
    assert buffered.decoded_body(typed) == [["kombu"], {}, {}]
    assert buffered.decoded_body(plain) is plain._decoded_cache  # what Celery reads later
    huge = FakeMessage(raw=b'[["e"], {}, {"n": 123456789012345678901234567890}]')
    assert buffered.decoded_body(huge)[2]["n"] == 123456789012345678901234567890  # not a float


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


class _Loop:
    """The consumer's event loop, as far as the buffer uses it: timers that fire when told."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        self.timers.append((delay, fn))
        return _Timer()

    def fire(self) -> None:
        (_, fn), *self.timers = self.timers
        fn()


def test_an_event_too_early_waits_in_the_buffer_for_the_next_batches_not_the_worker(
    batch: dict[str, Any],
) -> None:
    loop = _Loop()
    buf, singles = _buffer(3, loop=loop, tries_again=3)
    msgs = [FakeMessage(f"e{i}") for i in range(6)]
    batch["result"] = [
        ([Outcome("applied")], [HandedBack(b"e1", "too_early", "", 1)]),
        # e1 still too early, and e4 (a later event of its order) with it.
        (
            [Outcome("applied")],
            [HandedBack(b"e1", "too_early", "", 0), HandedBack(b"e4", "too_early", "", 2)],
        ),
        ([Outcome("applied"), Outcome("applied"), Outcome("applied")], []),
    ]
    for m in msgs[:3]:
        buf.offer(m)
    # One quick try within the batch; then e1 stays, unacked, for the next batch.
    assert batch["quick_tries"] == 1
    assert [m.fate for m in msgs[:3]] == ["acked", None, "acked"]
    assert len(buf) == 1 and singles == []
    assert loop.timers, "a batch must come even if no message does"
    buf.offer(msgs[3])
    buf.offer(msgs[4])  # full: e1 first, ahead of what came since
    assert batch["calls"][1][0] == [b"e1", b"e3", b"e4"]
    assert [m.fate for m in msgs[:5]] == ["acked", None, "acked", "acked", None]
    assert len(buf) == 2 and singles == []
    buf.offer(msgs[5])
    assert batch["calls"][2][0] == [b"e1", b"e4", b"e5"]  # an order's events stay in sequence
    assert [m.fate for m in msgs] == ["acked"] * 6
    assert singles == [] and len(buf) == 0


def test_an_event_still_too_early_after_its_tries_goes_down_the_default_path(
    batch: dict[str, Any],
) -> None:
    loop = _Loop()
    buf, singles = _buffer(10, loop=loop, tries_again=3)
    msg = FakeMessage("e")
    batch["result"] = ([], [HandedBack(b"e", "lock_busy", "", 0)])
    buf.offer(msg)
    for _ in range(3):  # the first batch, then two later ones: a quick try in each
        loop.fire()
    assert len(batch["calls"]) == 3
    assert singles == [msg] and msg.fate is None and len(buf) == 0
    assert loop.timers == []


def test_an_event_handed_back_alone_is_tried_again_after_a_pause_or_with_the_next_message(
    batch: dict[str, Any],
) -> None:
    # What it waits for is another worker's batch, tens of milliseconds under load: tried
    # again at once, alone, its tries were gone in a few milliseconds and it took the single
    # path (and its half-second pause) while that batch still ran.
    loop = _Loop()
    buf, singles = _buffer(10, loop=loop, tries_again=5)
    msg = FakeMessage("e")
    batch["result"] = ([], [HandedBack(b"e", "lock_busy", "", 0)])
    buf.offer(msg)
    loop.fire()  # the receive's batch: handed back
    pauses = []
    for _ in range(4):
        ((delay, _),) = loop.timers
        pauses.append(delay)
        loop.fire()
    assert pauses == [0.01, 0.02, 0.04, 0.05]  # doubling, up to buffered_max_wait_ms
    assert singles == [msg] and len(batch["calls"]) == 5

    # A message that comes during the pause is not held back by it: both go at once.
    buf, singles = _buffer(10, loop=loop, tries_again=5)
    loop.timers.clear()
    first, second = FakeMessage("e1"), FakeMessage("e2")
    batch["calls"].clear()
    batch["result"] = [
        ([], [HandedBack(b"e1", "lock_busy", "", 0)]),
        ([Outcome("applied")] * 2, []),
    ]
    buf.offer(first)
    loop.fire()
    assert [delay for delay, _ in loop.timers] == [0.01]
    buf.offer(second)
    assert [delay for delay, _ in loop.timers][-1] == 0.005  # the buffer's own wait
    loop.timers = loop.timers[-1:]  # (the pause's timer was cancelled)
    loop.fire()
    assert [bodies for bodies, _ in batch["calls"]] == [[b"e1"], [b"e1", b"e2"]]
    assert first.fate == second.fate == "acked" and singles == []


def test_a_shutdown_keeps_nothing_for_later(batch: dict[str, Any]) -> None:
    loop = _Loop()
    buf, singles = _buffer(10, loop=loop, tries_again=5)
    msgs = [FakeMessage("a"), FakeMessage("b")]
    batch["result"] = ([Outcome("applied")], [HandedBack(b"b", "too_early", "", 1)])
    for m in msgs:
        buf.offer(m)
    buf.flush(last=True)
    assert [m.fate for m in msgs] == ["acked", None]
    assert singles == [msgs[1]] and len(buf) == 0


def test_without_an_event_loop_nothing_is_kept_for_later(batch: dict[str, Any]) -> None:
    singles: list[FakeMessage] = []
    buf = buffered.Buffer(
        10, 0.005, 0.05, singles.append, _APPLY["apply"], None, tries_again=5
    )  # no event loop
    msg = FakeMessage("a")
    batch["result"] = ([], [HandedBack(b"a", "too_early", "", 0)])
    buf.offer(msg)
    assert batch["quick_tries"] == 1
    assert singles == [msg] and len(buf) == 0


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
    buf = buffered.Buffer(
        10, 1.0, 1.0, lambda m: None, _APPLY.get("apply"), lambda delay, fn: _Timer()
    )
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


def test_with_no_wait_a_receive_is_applied_as_soon_as_it_is_all_offered(
    batch: dict[str, Any],
) -> None:
    # The default (buffered_wait_ms 0): no timer longer than the current loop turn, so a lone
    # event waits for nothing, and what one receive brought goes in one transaction.
    loop = _Loop()
    singles: list[FakeMessage] = []
    buf = buffered.Buffer(10, 0.0, 0.05, singles.append, _APPLY["apply"], loop.call_later)
    msgs = [FakeMessage(f"e{i}") for i in range(3)]
    batch["result"] = ([Outcome("applied")] * 3, [])
    for m in msgs:
        buf.offer(m)
    assert [delay for delay, _ in loop.timers] == [0.0]  # one timer, for the turn's end
    assert batch["calls"] == []
    loop.fire()
    assert [ids for _, ids in batch["calls"]] == [["id-e0", "id-e1", "id-e2"]]
    assert [m.fate for m in msgs] == ["acked"] * 3 and singles == []
    # Nor after a transaction that took time (group commit would wait as long again).
    later = FakeMessage("e3")
    batch["result"] = ([Outcome("applied")], [])
    buf.offer(later)
    assert [delay for delay, _ in loop.timers] == [0.0]
    loop.fire()
    assert later.fate == "acked"

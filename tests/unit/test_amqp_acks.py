"""worker/messaging/amqp_acks.py: a multiple ack never covers a delivery that is neither in
the batch nor settled, nor a tag the consumer never saw; everything else goes in one frame."""

from __future__ import annotations

import contextlib
from typing import Any

from worker.messaging.amqp_acks import Deliveries, ack_all


class FakeChannel:
    def __init__(self) -> None:
        self.frames: list[tuple[int, bool]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.frames.append((tag, multiple))


class FakeMessage:
    def __init__(self, channel: FakeChannel, tag: int) -> None:
        self.channel = channel
        self.delivery_tag = tag
        self._state = "RECEIVED"

    @property
    def acknowledged(self) -> bool:
        return self._state in ("ACK", "REJECTED", "REQUEUED")

    def ack(self) -> None:
        self.channel.basic_ack(self.delivery_tag)
        self._state = "ACK"


def _delivered(tags: list[int]) -> tuple[FakeChannel, Deliveries, dict[int, FakeMessage]]:
    channel, deliveries = FakeChannel(), Deliveries()
    messages = {t: FakeMessage(channel, t) for t in tags}
    for m in messages.values():
        deliveries.delivered(m)
    return channel, deliveries, messages


def _ack(deliveries: Deliveries, messages: list[FakeMessage]) -> None:
    ack_all(deliveries, messages, lambda m: m.ack())
    assert all(m.acknowledged for m in messages)


def test_a_whole_run_of_deliveries_is_acked_with_one_frame() -> None:
    channel, deliveries, m = _delivered(list(range(1, 11)))
    _ack(deliveries, [m[t] for t in range(1, 11)])
    assert channel.frames == [(10, True)]


def test_an_unsettled_delivery_below_stops_the_multiple_ack_there() -> None:
    # Tag 5: a message handed back and kept for a later batch, or one Celery holds until its
    # ETA. Only 1-4 go in one frame; 6-10 are acked one by one.
    channel, deliveries, m = _delivered(list(range(1, 11)))
    _ack(deliveries, [m[t] for t in range(1, 11) if t != 5])
    assert channel.frames == [(4, True)] + [(t, False) for t in range(6, 11)]
    assert not m[5].acknowledged


def test_an_unsettled_first_delivery_means_one_frame_each() -> None:
    channel, deliveries, m = _delivered(list(range(1, 5)))
    _ack(deliveries, [m[2], m[3], m[4]])
    assert channel.frames == [(2, False), (3, False), (4, False)]


def test_deliveries_settled_elsewhere_do_not_stop_it() -> None:
    channel, deliveries, m = _delivered(list(range(1, 8)))
    m[1].ack()  # the single path acked it
    m[4]._state = "REQUEUED"  # or gave it back
    channel.frames.clear()
    _ack(deliveries, [m[t] for t in (2, 3, 5, 6, 7)])
    assert channel.frames == [(7, True)]


def test_a_tag_never_seen_stops_multiple_acks_for_good() -> None:
    channel, deliveries, m = _delivered([1, 2, 4, 5])  # 3 went elsewhere
    _ack(deliveries, [m[1], m[2], m[4], m[5]])
    assert channel.frames == [(2, True), (4, False), (5, False)]
    later = FakeMessage(channel, 6)
    more = FakeMessage(channel, 7)
    deliveries.delivered(later)
    deliveries.delivered(more)
    channel.frames.clear()
    _ack(deliveries, [later, more])
    assert channel.frames == [(6, False), (7, False)]


def test_one_message_is_acked_alone() -> None:
    channel, deliveries, m = _delivered([1])
    _ack(deliveries, [m[1]])
    assert channel.frames == [(1, False)]


def test_a_failed_multiple_ack_leaves_every_message_unacked() -> None:
    channel, deliveries, m = _delivered([1, 2, 3])

    def broken(tag: int, multiple: bool = False) -> Any:
        raise ConnectionError("gone")

    channel.basic_ack = broken  # type: ignore[method-assign]
    with contextlib.suppress(ConnectionError):
        ack_all(deliveries, [m[1], m[2], m[3]], lambda msg: msg.ack())
    assert not any(msg.acknowledged for msg in m.values())


def test_deliveries_settled_elsewhere_are_not_kept_forever() -> None:
    """A consumer whose messages all take the single path (batch messages, retries) acks no
    batch; what it tracks must stay bounded, while what is unsettled stays tracked."""
    channel, deliveries = FakeChannel(), Deliveries()
    held = FakeMessage(channel, 1)
    deliveries.delivered(held)
    for tag in range(2, 50_000):
        m = FakeMessage(channel, tag)
        deliveries.delivered(m)
        m.ack()
    assert len(deliveries) < 2_100
    more = FakeMessage(channel, 50_000)
    deliveries.delivered(more)
    _ack(deliveries, [more])  # tag 1 still open below it: acked alone
    assert channel.frames[-1] == (50_000, False)
    assert not held.acknowledged

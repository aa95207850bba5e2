"""The benchmark's paced producer (bench/harness.py) against a real Redis: every message goes
onto the queue in order and never before it is due, and messages due within a tick share one
LPUSH (one push per message took a fifth of the 2 cores from the system it measured)."""

from __future__ import annotations

import time
from typing import Any

import redis

from bench.harness import PUSH_TICK_S, push_paced
from tests.servers import ServerUrls


class _Timed(redis.Redis):
    """A real client that notes when each LPUSH was sent and how many entries it carried."""

    pushes: list[tuple[float, int]]

    def lpush(self, name: Any, *values: Any) -> Any:
        self.pushes.append((time.time(), len(values)))
        return super().lpush(name, *values)


def test_paced_messages_arrive_in_order_never_early_and_a_tick_at_a_time(
    servers: ServerUrls,
) -> None:
    r = _Timed.from_url(servers.redis_url)
    r.pushes = []
    queue = "bench.paced-push-test"
    r.delete(queue)
    entries = [f"m{i}".encode() for i in range(200)]
    rate = 10_000.0  # 20 ms of messages, 10 due per tick
    try:
        start = push_paced(r, queue, entries, rate)
        assert [r.rpop(queue) for _ in entries] == entries  # consumers pop from the tail
        assert r.llen(queue) == 0
    finally:
        r.delete(queue)
        r.close()
    pushed = 0
    for at, n in r.pushes:
        pushed += n
        assert at >= start + (pushed - 1) / rate  # its last entry was due already
    assert pushed == len(entries)
    # One push per message would be 200 of them.
    assert len(r.pushes) <= (len(entries) / rate) / PUSH_TICK_S + 1

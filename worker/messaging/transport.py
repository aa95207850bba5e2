"""kombu's Redis transport, with one Redis client per channel instead of one per call.

kombu's Redis channel builds a new ``redis.Redis`` object every time it needs one without a
connection of its own (``conn_or_acquire``): to record each received message as unacked, to
ack it, to publish. The object owns no connection (each command takes one from the channel's
pool), but building it is costly: redis-py fills a fresh case-insensitive table of about 170
response callbacks every time (redis/redis-py#3624). A buffered worker draining the demo stream
spent 13% of its samples there (py-spy); with this transport its CPU per event fell by a third
(docs/performance.md, "Fifth pass").

This channel builds that client once per pool and hands it out again. Nothing else changes:
commands still take and return a pool connection each, pipelines are still one per use, the
wire protocol and the keys are the same, so workers with and without it can share a broker.
A pool kombu replaces (after a connection error) gets a new client.

Used for ``redis://`` brokers (``worker.messaging.broker.make_celery``); other schemes keep kombu's
own transport.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

TRANSPORT = "worker.messaging.transport:Transport"


class Channel(kombu_redis.Channel):
    _shared: Any = None  # the client built on the current pool

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._shared is None or self._shared.connection_pool is not self.pool:
            self._shared = self._create_client()  # type: ignore[no-untyped-call]  # kombu
        yield self._shared


class Transport(kombu_redis.Transport):
    Channel = Channel

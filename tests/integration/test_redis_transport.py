"""orderonce's Redis transport (worker/messaging/transport.py) against a real Redis: one client
per channel, messages recorded as unacked in the step that receives them (a consumer killed
right there loses nothing; kombu's own transport does), many per round trip, kept unacked
until acked."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
import redis
from kombu import Queue

from orderonce.config import Settings
from tests.servers import ServerUrls
from worker.messaging import transport as redis_transport
from worker.messaging.broker import make_celery


def test_a_channel_reuses_its_client_and_builds_a_new_one_for_a_new_pool(
    servers: ServerUrls,
) -> None:
    app = make_celery(servers.redis_url, Settings(queue="transport-test"))
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, redis_transport.Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as again:
            assert first is again
            assert first.ping()
        given = object()
        with channel.conn_or_acquire(given) as client:
            assert client is given
        channel._disconnect_pools()  # type: ignore[no-untyped-call]  # as kombu after an error
        with channel.conn_or_acquire() as after:
            assert after is not first
            assert after.connection_pool is channel.pool
            assert after.ping()


def test_a_received_message_stays_unacked_until_acked(servers: ServerUrls) -> None:
    app = make_celery(servers.redis_url, Settings(queue="transport-test"))
    with app.connection_for_write() as conn, conn.SimpleQueue("transport-test") as simple:
        simple.put({"n": 1}, serializer="json")
        message = simple.get(timeout=5)
        assert message.payload == {"n": 1}
        with conn.default_channel.conn_or_acquire() as client:
            assert client.hlen("unacked") == 1
            message.ack()
            assert client.hlen("unacked") == 0


# A consumer that dies the instant its transport hands over a received message, before
# anything else runs (what a SIGKILL there does): kombu's transport calls _deliver right after
# BRPOP popped the message and before recording it as unacked; orderonce's has recorded it in
# the same script that popped it.
_DIE_ON_RECEIVE = """
import os, sys
from kombu import Connection, Consumer, Queue
from kombu.transport.virtual import base
base.Transport._deliver = lambda self, message, queue: os._exit(9)
url, queue, transport = sys.argv[1:]
options = {"visibility_timeout": 2}
with Connection(url, transport=transport or None, transport_options=options) as conn:
    with Consumer(conn, [Queue(queue)], accept=["json"], callbacks=[lambda b, m: None]):
        conn.drain_events(timeout=10)
os._exit(3)  # nothing arrived
"""


@pytest.mark.parametrize("transport", ["orderonce", "kombu"])
def test_a_consumer_killed_on_receive_leaves_the_message_to_come_back(
    servers: ServerUrls, transport: str
) -> None:
    """The receive window: with orderonce's transport the message is always in its queue or
    recorded as unacked, so kombu's restore brings it back; kombu's own transport loses it
    (the negative control, celery/kombu#305)."""
    queue = f"transport-kill-{transport}"
    app = make_celery(servers.redis_url, Settings(queue=queue))
    client = redis.Redis.from_url(servers.redis_url)
    client.delete(queue, "unacked", "unacked_index")
    try:
        with app.connection_for_write() as conn, conn.SimpleQueue(queue) as simple:
            simple.put({"n": 1}, serializer="json")
        name = redis_transport.TRANSPORT if transport == "orderonce" else ""
        died = subprocess.run(
            [sys.executable, "-c", _DIE_ON_RECEIVE, servers.redis_url, queue, name],
            timeout=60,
            capture_output=True,
        )
        assert died.returncode == 9, died.stderr.decode()[-2000:]
        queued, unacked = client.llen(queue), client.hlen("unacked")
        if transport == "kombu":
            assert (queued, unacked) == (0, 0), "kombu's window no longer loses it?"
            return
        assert (queued, unacked) == (0, 1)
        # kombu's visibility-timeout restore (any consumer on either transport runs it)
        # gives it back, and it is received again.
        time.sleep(2.5)
        with app.connection_for_write() as conn:
            conn.transport_options["visibility_timeout"] = 2
            with conn.SimpleQueue(queue) as simple:
                conn.default_channel.qos.restore_visible()
                again = simple.get(timeout=10)
                assert again.payload == {"n": 1}
                again.ack()
        assert (client.llen(queue), client.hlen("unacked")) == (0, 0)
    finally:
        client.delete(queue, "unacked", "unacked_index")
        client.close()


def test_many_messages_per_round_trip_up_to_the_prefetch(servers: ServerUrls) -> None:
    """One EVALSHA takes as many messages as the prefetch leaves room for."""
    queue = "transport-many"
    app = make_celery(servers.redis_url, Settings(queue=queue))
    client = redis.Redis.from_url(servers.redis_url)
    client.delete(queue)
    got: list[Any] = []
    try:
        with app.connection_for_write() as conn:
            with conn.SimpleQueue(queue) as simple:
                for n in range(30):
                    simple.put({"n": n}, serializer="json")
            before = _calls(client)
            with conn.Consumer(
                [Queue(queue)], accept=["json"], callbacks=[lambda b, m: got.append(m)]
            ) as consumer:
                consumer.qos(prefetch_count=10)
                while len(got) < 10:
                    conn.drain_events(timeout=5)
                assert _calls(client) - before <= 2  # (and BLMOVE, had the queue been empty)
                assert client.hlen("unacked") == 10
                for m in got:
                    m.ack()
        assert client.hlen("unacked") == 0
    finally:
        client.delete(queue, "unacked", "unacked_index")
        client.close()


def _calls(client: redis.Redis) -> int:
    stats: dict[str, dict[str, int]] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_redis_that_forgot_the_script_is_given_it_again(servers: ServerUrls) -> None:
    """After a restart Redis has no scripts: the first EVALSHA answers NOSCRIPT, and the
    channel loads the script and receives on."""
    queue = "transport-noscript"
    app = make_celery(servers.redis_url, Settings(queue=queue))
    client = redis.Redis.from_url(servers.redis_url)
    client.delete(queue)
    try:
        with app.connection_for_write() as conn, conn.SimpleQueue(queue) as simple:
            simple.put({"n": 1}, serializer="json")
            simple.put({"n": 2}, serializer="json")
            client.script_flush()
            got = [simple.get(timeout=10), simple.get(timeout=10)]
            assert sorted(m.payload["n"] for m in got) == [1, 2]
            for m in got:
                m.ack()
    finally:
        client.delete(queue, "unacked", "unacked_index")
        client.close()


def test_global_keyprefix_applies_to_every_key(servers: ServerUrls) -> None:
    queue = "transport-prefixed"
    app = make_celery(servers.redis_url, Settings(queue=queue))
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "global_keyprefix": "tenant1:",
    }
    client = redis.Redis.from_url(servers.redis_url)
    try:
        with app.connection_for_write() as conn, conn.SimpleQueue(queue) as simple:
            simple.put({"n": 1}, serializer="json")
            assert client.llen(f"tenant1:{queue}") == 1
            message = simple.get(timeout=10)
            assert client.hlen("tenant1:unacked") == 1
            assert client.zcard("tenant1:unacked_index") == 1
            assert not client.exists("unacked")
            message.ack()
            assert client.hlen("tenant1:unacked") == 0
    finally:
        client.delete(f"tenant1:{queue}", "tenant1:unacked", "tenant1:unacked_index")
        client.close()

"""orderonce's Redis transport (worker/messaging/transport.py) against a real Redis: one client
per channel, a new one for a new pool, and messages still recorded as unacked until acked."""

from __future__ import annotations

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

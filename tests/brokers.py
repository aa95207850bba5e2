"""The brokers the integration tests run on: Redis (always) and RabbitMQ (when one listens).

RabbitMQ comes from ``ORDERONCE_TEST_AMQP_URL`` (default: guest on 127.0.0.1:5672). No
RabbitMQ can be installed from pip, so when nothing listens there the RabbitMQ cases skip,
saying why. The session works in a virtual host of its own when ``rabbitmqctl`` may create
one (deleted at the end, with everything in it); otherwise in the URL's virtual host, where
each test's queues and exchanges are deleted after it (Celery's shared delay exchanges and
queues, ``celery_delayed_*``, are left for the other applications of that virtual host).
Every RabbitMQ test gets queue names of its own, so nothing a test leaves in flight (a delayed
retry) reaches the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import redis
from sqlalchemy import Engine

from orderonce.config import Settings
from orderonce.dev.sandboxes import connect, redis_broker_holds_nothing
from producers import Publisher
from producers.relay import RelayPass, relay_once

BROKER_NAMES = ("redis", "rabbitmq")


@dataclass(frozen=True)
class Broker:
    """One broker as a test sees it: the URL, and the environment and settings that go with it
    (workers and publishers must agree on the queue and its arguments)."""

    name: str
    url: str
    env: dict[str, str]
    settings: Settings = field(repr=False)

    def with_env(self, **overrides: str) -> Broker:
        """The same broker with more settings, for the workers and the publishers alike."""
        env = {**self.env, **overrides}
        return Broker(self.name, self.url, env, settings_from_env(env))


def settings_from_env(env: dict[str, str]) -> Settings:
    values = {k.removeprefix("ORDERONCE_").lower(): v for k, v in env.items()}
    return Settings(**values)  # type: ignore[arg-type]


def message_count(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare: it must exist)."""
    with connect(url) as conn:
        declared = conn.default_channel.queue_declare(queue, passive=True)
        return int(declared.message_count)


def relay_pass(db: Engine, publisher: Publisher) -> RelayPass:
    """One relay pass over the outbox: what has no outcome after a second is sent again."""
    return relay_once(
        db,
        lambda body: publisher.send(body, retry=False),
        batch_size=500,
        resend_after=timedelta(seconds=1),
    )


def redis_holds_nothing(url: str, queue: str) -> bool:
    """No message left in a Redis broker: the queue is empty and none is unacked. A message
    with no outcome then is lost (kombu's receive window), not late, and a relayed copy of it
    is no duplicate."""
    client = redis.Redis.from_url(url)
    try:
        return redis_broker_holds_nothing(client, queue)
    finally:
        client.close()

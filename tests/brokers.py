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

import contextlib
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
from kombu.connection import Connection
from sqlalchemy import Engine

from orderonce.broker import dead_letter_exchange_name, dead_letter_queue
from orderonce.config import Settings
from producers import Publisher
from producers.relay import RelayPass, relay_once

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
BROKER_NAMES = ("redis", "rabbitmq")
# Ordered-queue tests use a few shards; their queues are deleted by name up to this many.
MAX_SHARDS_DELETED = 16


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


def listening(url: str, timeout_s: float = 1.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 5672), timeout_s
        ):
            return True
    except OSError:
        return False


def _vhost_url(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


def _rabbitmqctl(*args: str) -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        done = subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@contextlib.contextmanager
def session_vhost(url: str) -> Iterator[tuple[str, bool]]:
    """A private virtual host's URL and True, or the given URL and False when none can be made."""
    user = unquote(urlsplit(url).username or "guest")
    vhost = f"orderonce-test-{uuid.uuid4().hex[:8]}"
    if not (
        _rabbitmqctl("add_vhost", vhost)
        and _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    ):
        _rabbitmqctl("delete_vhost", vhost)
        yield url, False
        return
    private = _vhost_url(url, vhost)
    try:
        if not _can_connect(private):
            yield url, False
        else:
            yield private, True
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def _connect(url: str) -> Any:
    return Connection(url, connect_timeout=5)  # type: ignore[no-untyped-call]  # kombu: no hints


def _can_connect(url: str) -> bool:
    try:
        with _connect(url) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


def delete_declared(url: str, settings: Settings) -> None:
    """Delete the queues and exchanges orderonce declares for ``settings.queue``."""
    base = settings.queue
    queues = [base, *(f"{base}.{i}" for i in range(MAX_SHARDS_DELETED))]
    with _connect(url) as conn:
        for name in [*queues, dead_letter_queue(settings).name]:
            with contextlib.suppress(Exception):
                conn.default_channel.queue_delete(name)
        for name in [*queues, dead_letter_exchange_name(settings)]:
            with contextlib.suppress(Exception):
                conn.default_channel.exchange_delete(name)


def message_count(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare: it must exist)."""
    with _connect(url) as conn:
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
        return client.llen(queue) == 0 and client.hlen("unacked") == 0
    finally:
        client.close()

"""Throwaway places for tests and benchmarks: a fresh PostgreSQL database, an empty Redis
database, a private RabbitMQ virtual host, each removed afterwards."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
import redis
from kombu.connection import Connection
from sqlalchemy import create_engine, make_url

from orderonce.config import Settings
from worker.messaging.broker import dead_letter_exchange_name, dead_letter_queue
from worker.store.db import libpq_url
from worker.store.migrate import upgrade

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
# Ordered-queue tests use a few shards; their queues are deleted by name up to this many.
MAX_SHARDS_DELETED = 16


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, migrated database on the server of ``server_url``; dropped afterwards."""
    name = f"orderonce_test_{uuid.uuid4().hex[:10]}"
    admin = libpq_url(str(make_url(server_url).set(database="postgres")))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _with_db(url: str, db: int) -> str:
    # The URL's path names the database and wins over a db= argument: replace the path.
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@contextlib.contextmanager
def empty_redis_db(server_url: str) -> Iterator[str]:
    """An empty logical Redis database (1-15) nobody else is using; flushed afterwards."""
    for db in range(15, 0, -1):
        url = _with_db(server_url, db)
        client = redis.Redis.from_url(url)
        # Claim an empty one with a marker key, so a parallel session looks elsewhere.
        if client.dbsize() == 0 and client.set("orderonce:test:claimed", "1", nx=True):
            break
        client.close()
    else:
        raise RuntimeError("no empty Redis database between 1 and 15 for the tests")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def redis_broker_holds_nothing(client: redis.Redis, queue: str) -> bool:
    """No message left in a Redis broker: the queue is empty and none is unacked (kombu's
    ``unacked`` hash holds what workers have taken and not yet acked; orderonce acks only after
    an event's outcome commits)."""
    return client.llen(queue) == 0 and client.hlen("unacked") == 0


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


def connect(url: str) -> Any:
    return Connection(url, connect_timeout=5)  # type: ignore[no-untyped-call]  # kombu: no hints


def _can_connect(url: str) -> bool:
    try:
        with connect(url) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


def delete_declared(url: str, settings: Settings) -> None:
    """Delete the queues and exchanges orderonce declares for ``settings.queue``."""
    base = settings.queue
    queues = [base, *(f"{base}.{i}" for i in range(MAX_SHARDS_DELETED))]
    with connect(url) as conn:
        for name in [*queues, settings.ingest_queue, dead_letter_queue(settings).name]:
            with contextlib.suppress(Exception):
                conn.default_channel.queue_delete(name)
        for name in [*queues, settings.ingest_queue, dead_letter_exchange_name(settings)]:
            with contextlib.suppress(Exception):
                conn.default_channel.exchange_delete(name)

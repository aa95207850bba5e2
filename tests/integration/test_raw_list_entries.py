"""Below kombu: whatever bytes land on a Redis broker's queue list, a real worker keeps each as a
dead letter with its reason, or applies it, and stays up. Before orderonce's transport, an entry
that was not JSON, one nested 10,000 levels deep and a body that was not base64 each stopped the
worker ("Unrecoverable error") and were lost; task arguments of the wrong shape and a bare
CloudEvent vanished with no trace."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from orderonce.config import Settings
from producers import Publisher
from producers.publisher import to_json
from tests import events
from tests.raw_broker import task_headers
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until


def envelope(body: bytes | str, settings: Settings, change: dict[str, Any] | None = None) -> bytes:
    """A list entry as kombu writes it for a Celery task message, with ``body`` its body."""
    raw = body.encode() if isinstance(body, str) else body
    message: dict[str, Any] = {
        "body": base64.b64encode(raw).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": task_headers(settings),
        "properties": {
            "correlation_id": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": settings.queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    message.update(change or {})
    return json.dumps(message).encode()


def _dead(db: Engine) -> dict[str, str]:
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT body_sha256, reason FROM dead_letters")).all())


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def test_raw_entries_are_dead_lettered_with_their_reason_and_the_worker_goes_on(
    db: Engine, workers: WorkerFactory, servers: ServerUrls, settings: Settings
) -> None:
    worker = workers.start()
    bare_event = to_json(events.restock("SKU-BARE", 1)).encode()
    cases = {
        # entry -> (the bytes the dead letter keeps, its reason)
        b"not json at all \xff\xfe": (b"not json at all \xff\xfe", "undecodable"),
        b"[" * 10_000 + b"]" * 10_000: (b"[" * 10_000 + b"]" * 10_000, "undecodable"),
        bare_event: (bare_event, "invalid_message"),
        b'{"properties": {"delivery_tag": 7}}': (
            b'{"properties": {"delivery_tag": 7}}',
            "invalid_message",
        ),
    }
    not_base64 = envelope(b"", settings, {"body": "%%% not base64 @@"})
    cases[not_base64] = (not_base64, "undecodable")
    for body in (b"[5, {}, {}]", b'[["x"], [1, 2], {}]', b'"just a string"'):
        cases[envelope(body, settings)] = (body, "bad_task_arguments")

    client = redis.Redis.from_url(servers.redis_url)
    try:
        for entry in cases:
            client.lpush(settings.queue, entry)
    finally:
        client.close()
    publisher = Publisher(servers.redis_url, settings)
    try:
        publisher.publish(events.restock("SKU-AFTER", 1))  # and good input still flows
    finally:
        publisher.close()

    expected = {_sha(kept): reason for kept, reason in cases.values()}
    wait_until(lambda: _dead(db).items() >= expected.items(), 30, f"dead letters {expected}")
    wait_until(
        lambda: _count(db, "SELECT count(*) FROM inventory WHERE sku = 'SKU-AFTER'") == 1,
        30,
        "the good event",
    )
    assert _dead(db) == expected
    assert _count(db, "SELECT count(*) FROM processed_messages") == 1
    # Every entry settled: nothing waits unacked to be redelivered.
    client = redis.Redis.from_url(servers.redis_url)
    try:
        wait_until(lambda: client.hlen("unacked") == 0, 10, "every entry acked")
    finally:
        client.close()
    assert worker.alive()


def _count(db: Engine, sql: str) -> int:
    with db.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=st.lists(st.binary(min_size=1, max_size=400), min_size=8, max_size=8, unique=True))
def test_any_bytes_on_the_list_are_kept(
    entries: list[bytes],
    db: Engine,
    workers: WorkerFactory,
    servers: ServerUrls,
    settings: Settings,
) -> None:
    with db.begin() as conn:
        conn.execute(text("TRUNCATE processed_messages, dead_letters"))
    if not workers.started:
        workers.start(pool="prefork", concurrency=2)
    client = redis.Redis.from_url(servers.redis_url)
    try:
        for entry in entries:
            client.lpush(settings.queue, entry)
    finally:
        client.close()
    wanted = {_sha(e) for e in entries}
    wait_until(lambda: wanted <= set(_dead(db)), 30, "every entry kept as a dead letter")
    assert workers.started[0].alive()


def test_entries_in_any_key_order_are_applied_once_and_acked(
    db: Engine, workers: WorkerFactory, servers: ServerUrls, settings: Settings
) -> None:
    # The transport reads a message's delivery tag from the entry's tail, where kombu writes
    # it. An entry with its properties elsewhere is read whole; one whose tail names another
    # tag (in a header) is acked by the tag it was recorded under. Each is applied once.
    worker = workers.start()
    entries = []
    for sku, tail_header in (("SKU-FIRST", None), ("SKU-TAIL", "not-its-tag")):
        task_body = json.dumps([[to_json(events.restock(sku, 1))], {}, {}])
        message = json.loads(envelope(task_body, settings))
        headers = message.pop("headers")
        properties = message.pop("properties")
        if tail_header is None:  # properties first, headers last: the tail has no tag
            message = {"properties": properties, **message, "headers": headers}
        else:  # properties, then headers with a delivery_tag of their own: the tail's
            message = {**message, "properties": properties}
            message["headers"] = {**headers, "delivery_tag": tail_header}
        entries.append(json.dumps(message).encode())
    assert entries[1].endswith(b'"delivery_tag": "not-its-tag"}}')
    client = redis.Redis.from_url(servers.redis_url)
    try:
        for entry in entries:
            client.lpush(settings.queue, entry)
        wait_until(
            lambda: _count(db, "SELECT count(*) FROM inventory WHERE sku LIKE 'SKU-%'") == 2,
            30,
            "both events",
        )
        wait_until(lambda: client.hlen("unacked") == 0, 10, "both entries acked")
    finally:
        client.close()
    assert _count(db, "SELECT count(*) FROM processed_messages") == 2
    assert _dead(db) == {}
    assert worker.alive()

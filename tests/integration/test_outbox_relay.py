"""Nothing lost when the broker loses messages (F16) or a producer never sends (a crash between
its commit and the publish): the outbox keeps every publication, the relay sends it again until
it has a terminal record, and the claim protocol absorbs the copies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text

from orderonce.config import Settings
from producers import Publisher
from producers.relay import horizon, relay_once
from schemas import CloudEvent
from tests import events
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until
from worker.messaging.broker import backlog
from worker.store import outbox

RESEND_AFTER = timedelta(seconds=1)


@pytest.fixture
def publisher(servers: ServerUrls, settings: Settings, db: Engine) -> Iterator[Publisher]:
    pub = Publisher(servers.redis_url, settings, outbox_engine=db)
    yield pub
    pub.close()


def _relay(db: Engine, publisher: Publisher) -> int:
    def send(body: str) -> None:
        publisher.send(body, retry=False)

    return relay_once(db, send, batch_size=500, resend_after=RESEND_AFTER).sent


def _scalar(db: Engine, sql: str) -> int:
    with db.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def _stream(orders: int) -> list[CloudEvent]:
    stream: list[CloudEvent] = [events.restock("SKU-R", 10_000)]
    for _ in range(orders):
        order = events.uid("ORD")
        stream += [events.created(order, [("SKU-R", 1, "4.00")]), events.paid(order, "4.00")]
    return stream


def _lose_queued_messages(servers: ServerUrls) -> None:
    """What a Redis broker without persistence does when it restarts: every queued message is
    gone (the lock keys too; the database still decides)."""
    client = redis.Redis.from_url(servers.redis_url)
    client.flushdb()
    client.close()


def test_events_the_broker_lost_are_sent_again_and_applied_once(
    db: Engine, publisher: Publisher, servers: ServerUrls, workers: WorkerFactory
) -> None:
    stream = _stream(30)
    publisher.publish_many(stream)
    _lose_queued_messages(servers)
    workers.start()
    # The control: with no relay, what the broker lost stays lost.
    wait_until(lambda: _relay_due(db) == len(stream), 10, "the outbox rows to become due")
    assert _scalar(db, "SELECT count(*) FROM processed_messages") == 0

    assert _relay(db, publisher) == len(stream)
    wait_until(
        lambda: _scalar(db, "SELECT count(*) FROM processed_messages") == len(stream),
        60,
        "every event to be processed",
    )
    assert _scalar(db, "SELECT count(*) FROM processed_messages WHERE outcome <> 'applied'") == 0
    assert _scalar(db, "SELECT count(*) FROM ledger_entries") == 30 * 2  # paid: two legs each
    # Once terminal, the rows settle and are never sent again.
    wait_until(lambda: _relay_due(db) == len(stream), 10, "the rows to become due again")
    assert _relay(db, publisher) == 0
    assert _scalar(db, "SELECT count(*) FROM outbox WHERE settled_at IS NULL") == 0


def test_an_upstream_transaction_that_commits_is_sent_and_one_that_rolls_back_is_not(
    db: Engine, publisher: Publisher, workers: WorkerFactory
) -> None:
    kept, dropped = events.restock("SKU-K", 5), events.restock("SKU-D", 5)
    with db.begin() as conn:
        outbox.add(conn, [publisher.body(kept)])
    with pytest.raises(RuntimeError), db.begin() as conn:
        outbox.add(conn, [publisher.body(dropped)])
        raise RuntimeError("the upstream change failed")
    workers.start()
    assert _relay(db, publisher) == 1  # never sent by anyone: due at once
    wait_until(
        lambda: _scalar(db, "SELECT count(*) FROM inventory WHERE sku = 'SKU-K'") == 1,
        30,
        "the committed event to apply",
    )
    assert _scalar(db, "SELECT count(*) FROM inventory WHERE sku = 'SKU-D'") == 0


def test_a_body_that_is_not_an_event_settles_by_its_dead_letter(
    db: Engine, publisher: Publisher, servers: ServerUrls, workers: WorkerFactory
) -> None:
    publisher.publish_raw('{"not": "an event"')
    _lose_queued_messages(servers)
    workers.start()
    wait_until(lambda: _relay_due(db) == 1, 10, "the row to become due")
    assert _relay(db, publisher) == 1
    wait_until(
        lambda: (
            _scalar(db, "SELECT count(*) FROM dead_letters WHERE reason = 'malformed_json'") == 1
        ),
        30,
        "the dead letter",
    )
    wait_until(lambda: _relay_due(db) == 1, 10, "the row to become due again")
    assert _relay(db, publisher) == 0
    assert _scalar(db, "SELECT count(*) FROM outbox WHERE settled_at IS NOT NULL") == 1


def _relay_due(db: Engine) -> int:
    return _scalar(db, "SELECT count(*) FROM outbox WHERE settled_at IS NULL AND due_at <= now()")


def test_prune_deletes_old_settled_rows_and_never_unsettled_ones(
    db: Engine, publisher: Publisher
) -> None:
    with db.begin() as conn:
        outbox.add(conn, [publisher.body(events.restock("SKU-P", n)) for n in range(1, 4)])
        conn.execute(
            text(
                "UPDATE outbox SET settled_at = now() - interval '2 days',"
                " created_at = now() - interval '3 days'"
                " WHERE body_sha256 IN (SELECT body_sha256 FROM outbox LIMIT 2)"
            )
        )
        conn.execute(text("UPDATE outbox SET created_at = now() - interval '3 days'"))
    assert outbox.prune_settled(db, timedelta(days=1), dry_run=True) == 2
    assert outbox.prune_settled(db, timedelta(days=3)) == 0
    assert outbox.prune_settled(db, timedelta(days=1)) == 2
    assert _scalar(db, "SELECT count(*) FROM outbox WHERE settled_at IS NULL") == 1


def _horizon(servers: ServerUrls, settings: Settings) -> Any:
    return horizon(backlog(servers.redis_url, [settings.queue]), timedelta(minutes=10))


def test_the_relay_does_not_resend_what_the_broker_still_holds(
    db: Engine,
    servers: ServerUrls,
    settings: Settings,
    publisher: Publisher,
    workers: WorkerFactory,
) -> None:
    """Workers far behind: every row is due for a resend, and every message still waits in
    the queue. Resending them would only add load (a retry storm); once the broker has lost
    them, the relay sends them all."""
    stream = _stream(40)
    publisher.publish_many(stream)
    time.sleep(RESEND_AFTER.total_seconds() + 0.5)  # every row is due again

    def send(body: str) -> None:
        publisher.send(body, retry=False)

    held = relay_once(
        db,
        send,
        batch_size=500,
        resend_after=RESEND_AFTER,
        horizon=_horizon(servers, settings),
    )
    assert held.sent == 0
    # The oldest message is taken (a worker took it, say): what was sent before the new
    # oldest one may go again, nothing after it.
    client = redis.Redis.from_url(servers.redis_url)
    try:
        client.rpop(settings.queue)
        some = relay_once(
            db, send, batch_size=500, resend_after=RESEND_AFTER, horizon=_horizon(servers, settings)
        )
        assert some.sent <= 1
        _lose_queued_messages(servers)
    finally:
        client.close()
    assert _horizon(servers, settings) is None  # an empty broker holds nothing back
    lost = relay_once(db, send, batch_size=500, resend_after=RESEND_AFTER, horizon=None)
    assert lost.sent == len(stream) - some.sent
    workers.start()
    wait_until(
        lambda: _scalar(db, "SELECT count(*) FROM processed_messages") == len(stream),
        60,
        "every event",
    )

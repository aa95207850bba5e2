"""The durable "kills its worker" count (worker/store/processed.py: ``start_run``) blames
a message only for the crashes that ended one of its own runs.

Its other side, a message that kills its worker every time is dead-lettered after a few, is
``test_poison_gets_bounded_attempts_then_a_dead_letter`` (tests/integration/test_bad_input.py).
"""

from __future__ import annotations

import uuid

import redis
from sqlalchemy import Engine

from producers import Publisher
from tests import events
from tests.db import assert_verified, scalar
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until
from worker.protocol.locks import lock_name
from worker.store.deliveries import finish_run, start_run


def test_only_runs_a_crash_ended_are_counted(db: Engine) -> None:
    first_crashed = f"msg-{uuid.uuid4()}"
    assert start_run(db, first_crashed, redelivered=True) == 2  # the unrecorded first run
    assert start_run(db, first_crashed, redelivered=True) == 3  # the last run never finished
    finish_run(db, first_crashed)
    assert start_run(db, first_crashed, redelivered=True) == 3  # it had finished: only waited
    finish_run(db, first_crashed)  # ... with a retry:
    assert start_run(db, first_crashed, redelivered=False) == 3
    assert start_run(db, first_crashed, redelivered=True) == 4  # the retry's run crashed

    retried = f"msg-{uuid.uuid4()}"
    assert start_run(db, retried, redelivered=False) == 1  # its first run sent the retry
    assert start_run(db, retried, redelivered=False) == 1  # so did this one (end not recorded)
    assert start_run(db, retried, redelivered=True) == 2


def test_a_message_waiting_in_killed_workers_is_not_taken_for_poison(
    db: Engine, workers: WorkerFactory, publisher: Publisher, servers: ServerUrls
) -> None:
    # Another worker holds the event's lock, so each run ends in a lock-busy retry: a new
    # message with a countdown that the worker keeps, unacked, until it is due. Every worker
    # that holds it is killed: on Redis each kill redelivers it. Those crashes ended no run of
    # it, so it must not reach the poison limit (3: the old count, one per redelivery, reached
    # it at the third kill), and it applies once the lock is free.
    event = events.restock("SKU-WAITING", 3)
    lock = redis.Redis.from_url(servers.redis_url)
    name = lock_name(event.source, event.id)
    lock.set(name, "holder-elsewhere", px=300_000)
    publisher.publish(event)
    for _ in range(3):
        worker = workers.start(ORDERONCE_POISON_MAX_RETRIES="3")
        wait_until(
            lambda: worker.text().count("Retry in") >= 2,  # noqa: B023  # waited for here
            60,
            "a lock-busy retry waiting in the worker",
        )
        worker.kill()
    worker = workers.start(ORDERONCE_POISON_MAX_RETRIES="3")
    wait_until(
        lambda: (
            worker.text().count("Retry in") >= 1
            or scalar(db, "SELECT count(*) FROM dead_letters") > 0
        ),
        60,
        "the redelivered message's run",
    )
    assert scalar(db, "SELECT count(*) FROM dead_letters") == 0, "taken for poison"
    lock.delete(name)
    lock.close()
    wait_until(lambda: scalar(db, "SELECT count(*) FROM processed_messages") == 1, 30, "the event")
    assert scalar(db, "SELECT count(*) FROM dead_letters") == 0
    assert scalar(db, "SELECT on_hand FROM inventory WHERE sku = 'SKU-WAITING'") == 3
    # Its first run sent a retry, and every later run ended too: no crash ended a run of it.
    assert scalar(db, "SELECT deliveries FROM message_deliveries") == 1
    assert_verified(db)

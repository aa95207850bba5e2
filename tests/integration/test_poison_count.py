"""The durable "kills its worker" count (worker/store/deliveries.py: ``start_run``) blames
a message only for the crashes that ended one of its own runs.

Its other side, a message that kills its worker every time is dead-lettered after a few, is
``test_poison_gets_bounded_attempts_then_a_dead_letter`` (tests/integration/test_bad_input.py).
"""

from __future__ import annotations

import uuid

import pytest
import redis
from sqlalchemy import Engine, text

from producers import Publisher
from producers.publisher import to_json
from tests import events
from tests.brokers import BROKER_NAMES, Broker
from tests.db import assert_verified, scalar
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until
from worker.messaging.broker import TASK_NAME, make_celery
from worker.protocol.locks import lock_name
from worker.store.deliveries import finish_run, start_run


def test_only_runs_a_crash_ended_are_counted(db: Engine) -> None:
    first_crashed = f"msg-{uuid.uuid4()}"
    assert start_run(db, first_crashed, "r1", redelivered=True) == 2  # the unrecorded first run
    assert start_run(db, first_crashed, "r2", redelivered=True) == 3  # r1 never finished
    finish_run(db, first_crashed, "r2")
    assert start_run(db, first_crashed, "r3", redelivered=True) == 3  # r2 had: it only waited
    finish_run(db, first_crashed, "r3")  # ... with a retry:
    assert start_run(db, first_crashed, "r4", redelivered=False) == 3
    assert start_run(db, first_crashed, "r5", redelivered=True) == 4  # the retry's run crashed

    retried = f"msg-{uuid.uuid4()}"
    assert start_run(db, retried, "r1", redelivered=False) == 1  # its first run sent the retry
    assert start_run(db, retried, "r2", redelivered=False) == 1  # so did r1 (end not recorded)
    assert start_run(db, retried, "r3", redelivered=True) == 2


def test_a_copy_that_ends_at_once_does_not_clear_the_crash_of_another(db: Engine) -> None:
    # Two copies of one message (same id): A's run takes the event's lock and kills its worker;
    # B's run finds the lock held and ends in a retry, between A's crash and A's redelivery.
    # With one shared "running" flag, B's end cleared A's mark, A's redelivery counted
    # nothing, and a message that kills every worker that takes it never reached the limit
    # while a copy of it kept retrying (seen in the no-outbox chaos run).
    message = f"msg-{uuid.uuid4()}"
    assert start_run(db, message, "a1", redelivered=False) == 1  # A, a retry, crashes
    assert start_run(db, message, "b1", redelivered=False) == 1  # B, lock busy ...
    finish_run(db, message, "b1")  # ... ends
    assert start_run(db, message, "a2", redelivered=True) == 2  # A's crash is counted
    assert start_run(db, message, "b2", redelivered=False) == 2  # B again, lock busy
    finish_run(db, message, "b2")
    assert start_run(db, message, "a3", redelivered=True) == 3  # and a2's crash
    finish_run(db, message, "a3")
    # Every crash was counted once: a finished run leaves nothing for a later redelivery.
    assert start_run(db, message, "a4", redelivered=True) == 3


def test_a_start_recorded_twice_counts_once(db: Engine) -> None:
    # A commit whose answer was lost is tried again (with_db_retries) with the same token.
    message = f"msg-{uuid.uuid4()}"
    assert start_run(db, message, "a1", redelivered=False) == 1  # crashes
    assert start_run(db, message, "a2", redelivered=True) == 2
    assert start_run(db, message, "a2", redelivered=True) == 2
    finish_run(db, message, "a2")
    assert start_run(db, message, "a3", redelivered=True) == 2


def test_the_previous_releases_flag_is_kept_and_counted(db: Engine) -> None:
    # During a rolling upgrade the previous release's workers mark a run with `running` (set at
    # its start, cleared at its end) and count a redelivery when it is set.
    old_workers_crash = f"msg-{uuid.uuid4()}"
    with db.begin() as conn:
        conn.execute(
            text("INSERT INTO message_deliveries (message_id, running) VALUES (:m, true)"),
            {"m": old_workers_crash},
        )
    assert start_run(db, old_workers_crash, "r1", redelivered=True) == 2
    # Their next start must see a crash of ours: the flag stays set while a token is left,
    # even when a copy of ours ends meanwhile.
    ours = f"msg-{uuid.uuid4()}"
    start_run(db, ours, "a1", redelivered=False)  # crashes
    start_run(db, ours, "b1", redelivered=False)
    finish_run(db, ours, "b1")
    running = "SELECT running::int FROM message_deliveries WHERE message_id = :m"
    assert scalar(db, running, m=ours) == 1
    finish_run(db, ours, "a1")  # had it ended after all, the flag goes with it
    assert scalar(db, running, m=ours) == 0


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


@pytest.mark.parametrize("broker", BROKER_NAMES, indirect=True)
def test_a_message_that_kills_every_worker_is_stopped_while_a_copy_of_it_waits(
    db: Engine, workers: WorkerFactory, broker: Broker
) -> None:
    # Two copies of one message, as a retry sent just before a crash leaves them: each run
    # that takes the event's lock kills its pool process, and the other copy's runs meanwhile
    # find the lock held and end in a retry. The copy that waits must not wipe out the count
    # of the one that crashes: the message is a poison dead letter after the limit's crashes,
    # one more for the first run (never recorded) and one for a copy's first run that the
    # other's record hides. With one shared flag it took 9 to 20 kills in four runs, and a
    # chaos run's poison message never got there.
    limit = 3
    worker = workers.start(
        pool="prefork",
        concurrency=2,
        ORDERONCE_FAILPOINTS="before_commit=kill~SKU-POISON",
        ORDERONCE_POISON_MAX_RETRIES=str(limit),
    )
    body = to_json(events.restock("SKU-POISON", 1))
    app = make_celery(broker.url, broker.settings)
    message_id = str(uuid.uuid4())
    for _ in range(2):
        app.send_task(TASK_NAME, args=[body], task_id=message_id, queue=broker.settings.queue)
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM dead_letters WHERE reason = 'poison'") >= 1,
        120,
        "the poison dead letter",
    )
    kills = worker.text().count("exited with 'signal 9")
    # At least the limit's kills less one: a redelivery may count the token of the other
    # copy's run while that run is still going (a lock-busy retry about to end).
    assert limit - 1 <= kills <= limit + 2, f"{kills} pool processes killed before the dead letter"
    assert scalar(db, "SELECT count(*) FROM inventory WHERE sku = 'SKU-POISON'") == 0
    assert worker.alive()

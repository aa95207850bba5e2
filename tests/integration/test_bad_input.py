"""Bad input never crashes a worker and is never silently dropped: every message a real worker
cannot apply becomes a dead letter with its reason, and the worker keeps going."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, text

from producers import Publisher
from producers.publisher import to_json
from schemas.signing import sign
from tests import events
from tests.brokers import BROKER_NAMES, Broker
from tests.raw_broker import publish_raw_message, task_headers
from tests.workers import WorkerFactory, wait_until


class _TouchOnUnpickle:
    """A pickle canary: unpickling it creates a file. It must never be unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))


def _dead_letters(db: Engine) -> dict[str, int]:
    with db.connect() as conn:
        rows = conn.execute(text("SELECT reason, sum(attempts) FROM dead_letters GROUP BY 1"))
        return {r: int(n) for r, n in rows}


def _processed(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM processed_messages")).scalar_one())


# Every test here runs on Redis and on RabbitMQ (tests/brokers.py).
pytestmark = pytest.mark.parametrize("broker", BROKER_NAMES, indirect=True)


def test_messages_celery_cannot_run_are_dead_lettered(
    db: Engine,
    workers: WorkerFactory,
    broker: Broker,
    publisher: Publisher,
    tmp_path: Path,
) -> None:
    settings = broker.settings
    worker = workers.start(pool="prefork", concurrency=1)
    canary = tmp_path / "unpickled"
    publish_raw_message(
        broker.url,
        settings,
        pickle.dumps(_TouchOnUnpickle(canary)),
        content_type="application/x-python-serialize",
        headers=task_headers(settings),
    )
    publish_raw_message(
        broker.url,
        settings,
        json.dumps([["x"], {}, {}]),
        content_type="application/json",
        headers=task_headers(settings, task="orderonce.no_such_task"),
    )
    publish_raw_message(
        broker.url,
        settings,
        b"\x00\xffnot even json",
        content_type="application/json",
        headers=task_headers(settings),
    )
    publish_raw_message(broker.url, settings, "hello", content_type="text/plain", headers=None)
    publish_raw_message(
        broker.url,
        settings,
        '{"hello": 1}',
        content_type="application/json",
        headers=None,
    )
    publisher._app.send_task(
        "orderonce.process_event",
        args=["one", "two"],
        queue=settings.queue,
    )
    publisher.publish_raw("[1, 2, 3]")
    publisher.publish(events.restock("SKU-OK", 1))  # and good input still flows

    expected = {
        "content_type_refused": 2,
        "unknown_task": 1,
        "undecodable": 1,
        "not_a_task": 1,
        "bad_task_arguments": 1,
        "bad_envelope": 1,
    }
    wait_until(lambda: _dead_letters(db) == expected, 30, f"dead letters {expected}")
    # The good event was published last: it may still be committing when the last dead letter
    # shows up (seen under load).
    wait_until(lambda: _processed(db) == 1, 30, "the good event")
    assert _dead_letters(db) == expected  # and nothing was recorded twice meanwhile
    with db.connect() as conn:
        kept = conn.execute(
            text("SELECT min(body_size) FROM dead_letters WHERE reason = 'content_type_refused'")
        ).scalar_one()
    assert kept > 0
    assert not canary.exists(), "the pickle was unpickled"
    assert worker.alive()


@pytest.mark.parametrize("action", ["kill", "raise"])
def test_poison_gets_bounded_attempts_then_a_dead_letter(
    db: Engine, workers: WorkerFactory, publisher: Publisher, action: str
) -> None:
    # The message kills its pool process every time (or raises every time): Redis has no
    # delivery limit, so without a durable count this would go on forever.
    worker = workers.start(
        pool="prefork",
        concurrency=1,
        ORDERONCE_FAILPOINTS=f"before_commit={action}~SKU-POISON",
        ORDERONCE_POISON_MAX_RETRIES="3",
    )
    poison = events.restock("SKU-POISON", 1)
    publisher.publish(poison)
    publisher.publish(events.restock("SKU-FINE", 1))
    wait_until(lambda: _dead_letters(db).get("poison") == 1, 60, "the poison dead letter")
    with db.connect() as conn:
        wait_until(
            lambda: conn.execute(text("SELECT count(*) FROM processed_messages")).scalar_one() == 1,
            30,
            "the good event",
        )
        conn.rollback()
        assert (
            conn.execute(
                text("SELECT count(*) FROM inventory WHERE sku = 'SKU-POISON'")
            ).scalar_one()
            == 0
        )
        body = conn.execute(text("SELECT body_sha256 FROM dead_letters")).scalar_one()
    assert body == hashlib.sha256(to_json(poison).encode()).hexdigest()
    assert worker.alive()


def test_unsigned_and_forged_events_are_refused_when_keys_are_set(
    db: Engine, workers: WorkerFactory, broker: Broker
) -> None:
    settings = broker.settings
    # Workers verify with the new and the old key (a rotation in progress).
    workers.start(ORDERONCE_VERIFY_KEYS="new-key,old-key")
    signer = Publisher(
        broker.url, settings.model_copy(update={"signing_key": SecretStr("old-key")})
    )
    forger = Publisher(
        broker.url, settings.model_copy(update={"signing_key": SecretStr("guessed-key")})
    )
    plain = Publisher(broker.url, settings)
    try:
        signer.publish(events.restock("SKU-SIGNED", 1))
        forger.publish(events.restock("SKU-FORGED", 1))
        plain.publish(events.restock("SKU-UNSIGNED", 1))
        tampered = json.loads(to_json(sign(events.restock("SKU-T", 1), b"old-key")))
        tampered["data"]["quantity"] = 1000
        plain.publish_raw(json.dumps(tampered))
    finally:
        for p in (signer, forger, plain):
            p.close()
    wait_until(lambda: _dead_letters(db) == {"bad_signature": 3}, 30, "three refusals")
    with db.connect() as conn:
        wait_until(
            lambda: conn.execute(text("SELECT count(*) FROM processed_messages")).scalar_one() == 1,
            30,
            "the signed event",
        )
        conn.rollback()
        assert conn.execute(text("SELECT sku FROM inventory")).scalars().all() == ["SKU-SIGNED"]

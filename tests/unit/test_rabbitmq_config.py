"""The RabbitMQ side of the Celery configuration, and the broker dead letters, without a broker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orderonce.config import Settings, check_safety
from orderonce.errors import UnsafeSettings
from worker.messaging.broker import (
    TASK_NAME,
    check_celery_safety,
    dead_letter_queue,
    is_amqp,
    make_celery,
    retry_countdown,
    task_queue_names,
)
from worker.messaging.rabbitmq_dead_letters import describe

AMQP = "amqp://guest:guest@127.0.0.1:5672//"
REDIS = "redis://127.0.0.1:6379/1"


def test_broker_kinds() -> None:
    assert is_amqp(AMQP) and is_amqp("amqps://h//") and is_amqp("pyamqp://h//")
    assert not is_amqp(REDIS) and not is_amqp("memory://")


def test_rabbitmq_queues_are_quorum_with_a_delivery_limit_and_a_dead_letter_exchange() -> None:
    s = Settings(delivery_limit=7)
    app = make_celery(AMQP, s)
    check_celery_safety(app.conf, s)
    [queue] = app.conf.task_queues
    assert queue.name == s.queue and queue.durable
    assert queue.exchange.type == "topic"  # native delayed delivery cannot use a direct one
    assert queue.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": f"{s.queue}.dlx",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert app.conf.worker_detect_quorum_queues is True
    assert app.conf.task_create_missing_queues is False
    dlq = dead_letter_queue(s)
    assert dlq.exchange.type == "fanout"
    assert dlq.queue_arguments == {"x-queue-type": "quorum"}


def test_redis_keeps_its_transport_options_and_no_declared_queues() -> None:
    s = Settings()
    app = make_celery(REDIS, s)
    check_celery_safety(app.conf, s)
    assert app.conf.broker_transport_options["visibility_timeout"] == s.visibility_timeout_s
    assert "confirm_publish" not in app.conf.broker_transport_options


def test_ordered_queues_are_declared_each_with_a_single_active_consumer() -> None:
    s = Settings(ordered_queues=3)
    assert task_queue_names(s) == [f"{s.queue}.0", f"{s.queue}.1", f"{s.queue}.2"]
    app = make_celery(AMQP, s)
    check_celery_safety(app.conf, s)
    assert [q.name for q in app.conf.task_queues] == task_queue_names(s)
    assert all(q.queue_arguments["x-single-active-consumer"] for q in app.conf.task_queues)


def _unsafe(conf: Any, setting: str, value: Any) -> None:
    setattr(conf, setting, value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: _unsafe(c, "broker_transport_options", {}), "publisher confirms"),
        (lambda c: _unsafe(c, "task_create_missing_queues", True), "task_create_missing_queues"),
        (lambda c: c.task_queues[0].queue_arguments.pop("x-queue-type"), "quorum"),
        (lambda c: c.task_queues[0].queue_arguments.pop("x-delivery-limit"), "delivery limit"),
        (lambda c: c.task_queues[0].queue_arguments.pop("x-dead-letter-exchange"), "dead-letter"),
        (lambda c: _unsafe(c, "task_queues", []), "quorum"),
    ],
)
def test_check_celery_safety_refuses_an_unsafe_rabbitmq_setup(change: Any, message: str) -> None:
    s = Settings()
    app = make_celery(AMQP, s)
    change(app.conf)
    with pytest.raises(UnsafeSettings, match=message):
        check_celery_safety(app.conf, s)


@pytest.mark.parametrize(("field", "value"), [("delivery_limit", 0), ("ordered_queues", -1)])
def test_settings_refuse_a_zero_delivery_limit_and_negative_queue_counts(
    field: str, value: int
) -> None:
    with pytest.raises(UnsafeSettings):
        check_safety(Settings(**{field: value}))  # type: ignore[arg-type]


def test_retry_countdowns_are_whole_seconds_on_rabbitmq_only() -> None:
    assert retry_countdown(AMQP, 0.25) == 1.0
    assert retry_countdown(AMQP, 1.5) == 2.0
    assert retry_countdown(AMQP, 0.0) == 1.0
    assert retry_countdown(REDIS, 0.25) == 0.25


def _death_headers(reason: str = "delivery_limit") -> dict[str, Any]:
    return {
        "task": TASK_NAME,
        "id": "task-1",
        "x-first-death-reason": reason,
        "x-first-death-queue": "orderonce.events",
        "x-death": [{"reason": reason, "queue": "orderonce.events", "count": 1}],
    }


def test_a_dead_lettered_task_keeps_its_event_body() -> None:
    event = '{"id": "e1", "subject": "ORD-1"}'
    body = json.dumps([[event], {}, {"callbacks": None}]).encode()
    letter = describe(body, "application/json", _death_headers())
    assert letter.body == event.encode()
    assert letter.reason == "delivery_limit"
    assert "orderonce.events" in letter.detail and "task-1" in letter.detail


@pytest.mark.parametrize(
    ("death", "reason"),
    [("rejected", "broker_rejected"), ("expired", "broker_expired"), ("odd", "broker_odd")],
)
def test_other_deaths_have_reasons_of_their_own(death: str, reason: str) -> None:
    body = json.dumps([["{}"], {}, {}]).encode()
    assert describe(body, "application/json", _death_headers(death)).reason == reason


@pytest.mark.parametrize(
    ("body", "content_type", "task"),
    [
        (b"\x80\x04pickle", "application/x-python-serialize", TASK_NAME),
        (b"{not json", "application/json", TASK_NAME),
        (json.dumps([["a", "b"], {}, {}]).encode(), "application/json", TASK_NAME),
        (json.dumps([["{}"], {}, {}]).encode(), "application/json", "other.task"),
        (json.dumps({"hello": 1}).encode(), "application/json", TASK_NAME),
    ],
)
def test_anything_else_is_kept_whole_under_a_reason_replay_refuses(
    body: bytes, content_type: str, task: str
) -> None:
    headers = {**_death_headers(), "task": task}
    letter = describe(body, content_type, headers)
    assert (letter.body, letter.reason) == (body, "invalid_message")
    assert "delivery_limit" in letter.detail


def test_missing_death_headers_still_give_a_reason() -> None:
    body = json.dumps([["{}"], {}, {}]).encode()
    assert describe(body, "application/json", {"task": TASK_NAME}).reason == "broker_unknown"

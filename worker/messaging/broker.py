"""The Celery app both sides share: JSON only, late acks, one message at a time.

Producers use it to send; the worker registers its task on it. The settings here are the ones
the exactly-once and nothing-lost guarantees depend on; ``check_celery_safety`` refuses a
worker whose configuration drifted from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from celery import Celery
from celery.app.amqp import AMQP
from kombu.entity import Exchange, Queue

from orderonce.config import Settings
from orderonce.errors import UnsafeSettings
from worker.messaging.routing import shard_queues
from worker.messaging.transport import TRANSPORT as REDIS_TRANSPORT

TASK_NAME = "orderonce.process_event"
# Batch mode: one message carries a list of events (producer-side batches, see
# worker/protocol/batch.py). Consumption is unchanged: one message at a time, prefetch 1,
# acked after its commit, so none of the settings below needs to change for it.
BATCH_TASK_NAME = "orderonce.process_batch"
# Buffered consumption (settings.buffered = N > 0, worker/messaging/buffered.py) is the one
# exception to prefetch 1: the worker reserves up to N single-event messages, applies them in one
# transaction and acks each only after that commit. It stays safe for the reason prefetch 1 is
# safe with late acks: a reserved message is unacked, so a worker that dies holding it gives
# it back (visibility timeout, or at once on a warm shutdown), and nothing is acked before its
# outcome is durable.

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})


def is_amqp(broker_url: str) -> bool:
    return urlsplit(broker_url).scheme in AMQP_SCHEMES


def task_queue_names(settings: Settings) -> list[str]:
    """The queues events go to: the one queue, or the N ordered ones."""
    if settings.ordered_queues:
        return shard_queues(settings.queue, settings.ordered_queues)
    return [settings.queue]


def dead_letter_exchange_name(settings: Settings) -> str:
    return f"{settings.queue}.dlx"


def ingest_queue(settings: Settings) -> Queue:
    """The queue of plain CloudEvents on RabbitMQ (``orderonce.ingest``; the AMQP binding,
    worker/messaging/amqp_ingest.py), set up as the task queues are: quorum, with a delivery
    limit, dead-lettering into the dead_letters table."""
    return amqp_task_queue(settings.ingest_queue, settings.model_copy(update={"ordered_queues": 0}))


def dead_letter_queue(settings: Settings) -> Queue:
    """Where RabbitMQ puts what it dead-letters; worker/messaging/rabbitmq_dead_letters.py
    empties it into the dead_letters table. Fanout: a retried message's routing key carries a
    delay prefix, and every task queue's messages must land here whatever their key."""
    return Queue(  # type: ignore[no-untyped-call]  # kombu: no hints
        f"{settings.queue}.dead",
        Exchange(dead_letter_exchange_name(settings), type="fanout", durable=True),  # type: ignore[no-untyped-call]  # kombu: no hints
        routing_key="",
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def amqp_task_queue(name: str, settings: Settings) -> Queue:
    """A RabbitMQ task queue with the guarantees of docs/operations.md#rabbitmq.

    Quorum: replicated, durable, and it counts deliveries. A message returned more than
    ``delivery_limit`` times (its worker died, or it was rejected) is dead-lettered, with
    at-least-once dead-lettering (RabbitMQ drops a dead letter it cannot route otherwise; this
    needs ``x-overflow: reject-publish``). A topic exchange, because Celery's native delayed
    delivery (how a retry's countdown works on quorum queues) cannot route through a direct one.
    An ordered queue has a single active consumer: a second worker started on it waits.
    """
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": dead_letter_exchange_name(settings),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if settings.ordered_queues:
        arguments["x-single-active-consumer"] = True
    return Queue(  # type: ignore[no-untyped-call]  # kombu: no hints
        name,
        Exchange(name, type="topic", durable=True),  # type: ignore[no-untyped-call]  # kombu: no hints
        routing_key=name,
        durable=True,
        queue_arguments=arguments,
    )


def _amqp_conf(settings: Settings) -> dict[str, Any]:
    return {
        "task_queues": [amqp_task_queue(name, settings) for name in task_queue_names(settings)],
        # A queue name Celery does not know would be created as a classic queue, without a
        # delivery limit or dead-letter exchange: refuse it instead.
        "task_create_missing_queues": False,
        "task_default_exchange_type": "topic",
        # Quorum queues refuse a global prefetch; Celery sees them and uses a per-consumer one.
        "worker_detect_quorum_queues": True,
        # A retry's countdown waits in RabbitMQ's delay queues, not unacknowledged in a worker.
        "broker_native_delayed_delivery_queue_type": "quorum",
        "broker_transport_options": {
            # Each publish (a producer's, or a worker's delayed retry copy sent before it acks
            # the original) returns only once RabbitMQ has the message, or raises.
            "confirm_publish": True,
        },
        "broker_connection_timeout": 5,
        "broker_heartbeat": 60,
    }


# kombu runs each scan for dead workers' messages under a Redis mutex that expires after this
# long. A worker killed during its scan leaves the mutex behind, and until it expires no worker
# gives any message back: kombu's default of 300 s added five minutes to every take-over that
# followed such a kill. A scan takes milliseconds; two scans that overlap are harmless (each
# message is given back in a WATCH transaction, once).
RESTORE_MUTEX_EXPIRE_S = 10


def _redis_conf(broker_url: str, settings: Settings) -> dict[str, Any]:
    return {
        # orderonce's transport receives atomically, many messages per round trip, and keeps
        # one Redis client per channel (worker/messaging/transport.py); kombu's own can lose a
        # message a killed worker had just popped. rediss:// and other schemes keep kombu's.
        "broker_transport": REDIS_TRANSPORT
        if urlsplit(broker_url).scheme == "redis" and settings.redis_transport == "orderonce"
        else None,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Scan for messages of dead workers every few seconds (kombu's default is about
            # every 100 s), so a redelivery comes within visibility timeout + this interval.
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": RESTORE_MUTEX_EXPIRE_S,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
    }


class _SummarisingAMQP(AMQP):  # type: ignore[misc]  # celery has no type hints
    """Celery's message building, with a summary of the task's argument (an event's body, or a
    batch's list of them) in the ``argsrepr`` header of every message this app sends
    (producers, retries, hand-backs, the AMQP binding) instead of Celery's default, a repr of
    the arguments. That repr is the whole event a second time, a customer's address included,
    in a header that broker consoles and monitors show, and that the broker stores and every
    worker copies and parses on every delivery: a demo message on Redis is 19% smaller
    without it (1,500 bytes against 1,858 on average)."""

    def as_task_v2(
        self, task_id: str, name: str, args: Any = None, *more: Any, **options: Any
    ) -> Any:
        if options.get("argsrepr") is None:
            options["argsrepr"] = _summary(args[0] if args else None)
        return super().as_task_v2(task_id, name, args, *more, **options)


def _summary(argument: object) -> str:
    if isinstance(argument, list | tuple):
        return f"[<{len(argument)} events>]"
    if isinstance(argument, str | bytes):
        return f"[<event of {len(argument)} bytes>]"
    return f"[<{type(argument).__name__}>]"


def make_celery(broker_url: str, settings: Settings) -> Celery:
    app = Celery("orderonce", broker=broker_url, set_as_current=False, amqp=_SummarisingAMQP)
    app.conf.update(
        # Never pickle: a message body must not be able to run code in the worker.
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=settings.queue,
        # Ack only after the outcome is committed; a lost worker's message goes back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_timeout=False,
        worker_prefetch_multiplier=max(1, settings.buffered),
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    app.conf.update(
        _amqp_conf(settings) if is_amqp(broker_url) else _redis_conf(broker_url, settings)
    )
    return app


def retry_countdown(broker_url: str, seconds: float) -> float:
    """A retry's countdown as the broker can keep it.

    On RabbitMQ a delayed message waits in queues of whole seconds (Celery's native delayed
    delivery); a countdown under one second would make Celery's send raise.
    """
    if is_amqp(broker_url):
        return float(max(1, math.ceil(seconds)))
    return seconds


def check_celery_safety(conf: Any, settings: Settings) -> None:
    """Raise UnsafeSettings if the Celery configuration could ack, drop or unpickle."""
    problems = []
    if set(conf.accept_content) != {"json"} or conf.task_serializer != "json":
        problems.append("only JSON may be accepted (accept_content=['json'])")
    if not conf.task_acks_late:
        problems.append("task_acks_late must be on, or a crash loses the message")
    if not conf.task_reject_on_worker_lost:
        problems.append("task_reject_on_worker_lost must be on with late acks")
    if conf.worker_prefetch_multiplier != max(1, settings.buffered):
        # Buffered mode (--pool solo, one process) reserves exactly the messages its buffer
        # holds; any other prefetch would reserve messages that no code path is working on.
        problems.append(
            "worker_prefetch_multiplier must be 1 (or, in buffered mode, the buffer size)"
        )
    options = conf.broker_transport_options or {}
    if is_amqp(str(conf.broker_url)):
        problems += _amqp_problems(conf, settings)
        if conf.task_time_limit is None:
            problems.append("a task time limit is needed")
    else:
        visibility = options.get("visibility_timeout", 3600)
        if conf.task_time_limit is None or visibility <= conf.task_time_limit:
            problems.append("the broker visibility timeout must exceed the task time limit")
    if settings.lock_ttl_ms / 1000 <= (conf.task_time_limit or float("inf")):
        problems.append("the lock TTL must exceed the task time limit")
    if problems:
        raise UnsafeSettings("; ".join(problems))


def _amqp_problems(conf: Any, settings: Settings) -> list[str]:
    problems = []
    if not (conf.broker_transport_options or {}).get("confirm_publish"):
        problems.append("RabbitMQ needs publisher confirms (confirm_publish)")
    if conf.task_create_missing_queues:
        problems.append("task_create_missing_queues would create queues without a delivery limit")
    queues = {q.name: q for q in conf.task_queues or ()}
    for name in task_queue_names(settings):
        arguments = (queues[name].queue_arguments if name in queues else None) or {}
        if arguments.get("x-queue-type") != "quorum":
            problems.append(f"queue {name} must be a quorum queue")
        if not arguments.get("x-delivery-limit"):
            problems.append(f"queue {name} needs a delivery limit")
        if not arguments.get("x-dead-letter-exchange"):
            problems.append(f"queue {name} needs a dead-letter exchange")
    return problems


# What every message orderonce's producers send carries: when it was sent (epoch seconds), so
# that the relay can tell what the broker still holds (producers/relay.py).
SENT_AT_HEADER = "orderonce_sent_at"


@dataclass(frozen=True)
class Backlog:
    """Messages waiting in the task queues (not yet taken by a worker), and when the oldest
    of them was sent: known on Redis for messages orderonce's producers sent, else None."""

    messages: int
    oldest_sent_at: float | None


def backlog(broker_url: str, queues: list[str], timeout_s: float = 2.0) -> Backlog:
    """Redis: LLEN and the oldest entry (kombu's queues are lists, oldest at the right end);
    RabbitMQ: the queues' message counts. Raises when the broker cannot be reached."""
    if not is_amqp(broker_url):
        import redis

        client = redis.Redis.from_url(
            broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            pipe = client.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
                pipe.lindex(queue, -1)
            replies = pipe.execute()
        finally:
            client.close()
        stamps = [_sent_at(entry) for entry in replies[1::2] if entry is not None]
        known = [s for s in stamps if s is not None]
        oldest = min(known) if known and len(known) == len(stamps) else None
        return Backlog(sum(int(n) for n in replies[0::2]), oldest)
    from kombu.connection import Connection

    total = 0
    with Connection(broker_url, connect_timeout=timeout_s) as conn:  # type: ignore[no-untyped-call]  # kombu: no hints
        channel = conn.channel()
        for queue in queues:
            try:
                total += int(channel.queue_declare(queue, passive=True).message_count)
            except Exception:  # not declared yet: nothing waits in it
                channel = conn.channel()
    return Backlog(total, None)


def _sent_at(entry: bytes) -> float | None:
    try:
        stamp = orjson.loads(entry)["headers"][SENT_AT_HEADER]
    except Exception:  # not a message orderonce sent: when it was sent is unknown
        return None
    return float(stamp) if isinstance(stamp, int | float) else None

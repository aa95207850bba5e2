"""The worker's Celery app, built on demand: ``create_app(settings, urls)``.

Nothing happens when this module is imported. The caller (the CLI, a test, the benchmark)
decides which servers to use and passes them in; each process then builds its own engine and
Redis client on first use (worker/messaging/runtime.py).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from orderonce.config import Settings, Urls
from orderonce.heap import freeze_startup_heap
from worker.messaging import cold_shutdown, tasks
from worker.messaging.amqp_ingest import AmqpIngest
from worker.messaging.broker import check_celery_safety, make_celery
from worker.messaging.event_loop_tick import EventLoopTick
from worker.messaging.rabbitmq_dead_letters import RabbitMQDeadLetters
from worker.messaging.runtime import Runtimes
from worker.ops import metrics


def create_app(settings: Settings, urls: Urls) -> Celery:
    """A worker app on ``urls.broker_url`` with both tasks, the dead-lettering consumer and
    the safety check; raises UnsafeSettings rather than build an unsafe one."""
    app = make_celery(urls.broker_url, settings)
    app.conf.worker_consumer = "worker.messaging.consumer:DeadLetteringConsumer"
    # RabbitMQ's dead-letter queue, emptied into the dead_letters table (a no-op on Redis).
    app.steps["worker"].add(RabbitMQDeadLetters)
    # RabbitMQ's queue of plain CloudEvents (the AMQP binding), handed to the task queue.
    app.steps["worker"].add(AmqpIngest)
    app.steps["consumer"].add(EventLoopTick)
    check_celery_safety(app.conf, settings)
    app.orderonce_runtimes = Runtimes(settings, urls)
    tasks.register(app)
    metrics.install_celery_hooks()
    app.steps["consumer"].add(cold_shutdown.PreforkColdShutdownFromTheLoop)
    signals.worker_ready.connect(
        cold_shutdown.solo_exits_at_once, weak=False, dispatch_uid="orderonce.solo_cold"
    )
    # The process that runs tasks: the worker itself (solo, each consumer of the default
    # pool), or each prefork child.
    signals.worker_ready.connect(_freeze, weak=False, dispatch_uid="orderonce.freeze")
    signals.worker_process_init.connect(_freeze, weak=False, dispatch_uid="orderonce.freeze_child")
    return app


def _freeze(**_: Any) -> None:
    freeze_startup_heap()

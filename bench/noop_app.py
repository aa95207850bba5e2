"""The plain-Celery baseline of ``bench.throughput``: a no-op task on orderonce's Celery settings.

The app is made by ``worker.messaging.broker.make_celery`` (JSON only, late acks, reject on worker
lost, prefetch 1, the same transport options) with its own queue, so the only differences from
an orderonce worker are the task and, unless ``BENCH_NOOP_TRANSPORT=orderonce``, kombu's own
Redis transport (see below). The task does one thing: it appends ``"<published> <started>"``
to a Redis list named in its arguments, one RPUSH, so the benchmark can count completions and
compute end-to-end latency (``started`` is a Unix time; ``published`` is what the sender gave:
the paced phase gives each task's index, from which its due time follows). Run by
``bench.throughput`` as ``celery -A bench.noop_app worker --pool=solo`` with
``BENCH_BROKER_URL`` set.
"""

from __future__ import annotations

import os
import time

import redis

from orderonce.config import Settings
from worker.messaging.broker import make_celery

QUEUE = "bench.noop"
TASK_NAME = "bench.noop"
BROKER_ENV = "BENCH_BROKER_URL"

app = make_celery(os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/15"), Settings(queue=QUEUE))
# Plain Celery as its users run it: kombu's own Redis transport, not orderonce's, which builds
# one Redis client per channel instead of one per message (worker/messaging/transport.py).
# BENCH_NOOP_TRANSPORT=orderonce runs the no-op on orderonce's transport instead.
if os.environ.get("BENCH_NOOP_TRANSPORT") != "orderonce":
    app.conf.broker_transport = None
_client: redis.Redis | None = None


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type hints
    name=TASK_NAME, acks_late=True, reject_on_worker_lost=True
)
def noop(published: float, results: str) -> None:
    global _client
    started = time.time()
    if _client is None:
        _client = redis.Redis.from_url(os.environ[BROKER_ENV])
    _client.rpush(results, f"{published} {started}")

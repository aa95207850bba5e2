"""The worker a user starts (``orderonce worker``, no flags): buffered consumer processes,
one per --concurrency, under a supervisor (worker/messaging/supervisor.py). Killed consumers
are replaced and their messages applied once; a killed supervisor leaves no consumer behind; a
warm shutdown stops them all cleanly."""

from __future__ import annotations

import os
import signal

import pytest
from sqlalchemy import Engine

from producers import Publisher
from tests import events
from tests.brokers import Broker, redis_holds_nothing
from tests.db import assert_verified, scalar
from tests.workers import WorkerFactory, wait_until

READY = " ready."


def test_the_default_worker_replaces_a_killed_consumer_and_applies_everything_once(
    db: Engine, workers: WorkerFactory, publisher: Publisher, broker: Broker
) -> None:
    worker = workers.start(pool="buffered", concurrency=2)
    consumers = worker.children()
    assert len(consumers) == 2
    first = [events.restock(f"SKU-{i % 5}", 1) for i in range(300)]
    for e in first[:150]:
        publisher.publish(e)
    os.kill(consumers[0], signal.SIGKILL)  # whatever it holds comes back through the broker
    for e in first[150:]:
        publisher.publish(e)
    wait_until(lambda: worker.text().count(READY) == 3, 30, "a new consumer in its place")
    assert len(worker.children()) == 2 and consumers[0] not in worker.children()
    # Kombu's Redis restore gives a dead consumer's unacked messages back after the visibility
    # timeout; the test settings keep it short.
    wait_until(
        lambda: scalar(db, "SELECT count(*) FROM processed_messages") == len(first),
        60,
        "every event applied",
    )
    # A consumer killed between its commit and its acks leaves messages whose events are
    # applied but which the broker still holds as unacked: a live consumer restores them after
    # the visibility timeout. Redelivered, they must change nothing (the counts below).
    wait_until(
        lambda: redis_holds_nothing(broker.url, broker.settings.queue),
        60,
        "the killed consumer's messages restored and acked",
    )
    assert scalar(db, "SELECT count(*) FROM processed_messages") == len(first)
    assert scalar(db, "SELECT sum(on_hand) FROM inventory") == len(first)
    assert scalar(db, "SELECT count(*) FROM dead_letters") == 0
    assert "batch of " in worker.text()  # applied in buffered transactions
    worker.terminate()
    assert worker.proc.returncode == 0
    assert worker.children() == []
    assert redis_holds_nothing(broker.url, broker.settings.queue)  # the warm shutdown acked all
    assert_verified(db)


def test_a_killed_supervisor_leaves_no_consumer_behind(workers: WorkerFactory) -> None:
    worker = workers.start(pool="buffered", concurrency=2)
    consumers = worker.children()
    assert len(consumers) == 2
    worker.signal_main(signal.SIGKILL)
    worker.proc.wait(timeout=10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init counts as gone
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_until(lambda: all(gone(p) for p in consumers), 30, "the consumers to exit")


def test_settings_a_consumer_would_refuse_stop_the_pool_before_it_starts(
    workers: WorkerFactory,
) -> None:
    worker = workers.start(
        pool="buffered", concurrency=2, ready=False, args=["--buffered", "100000"]
    )
    wait_until(lambda: not worker.alive(), 30, "the worker to stop")
    assert worker.proc.returncode == 2
    assert "refusing to start" in worker.text() and "buffered" in worker.text()
    assert "supervising" not in worker.text()


# ``orderonce worker`` in a process that may use one CPU (taskset -c 0, a cpuset): the
# affinity is set on the real process before the CLI runs, and its consumers inherit it.
_ON_ONE_CPU = (
    "-c",
    "import os, runpy, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
    " sys.argv[0] = 'orderonce'; runpy.run_module('orderonce', run_name='__main__')",
)
# The same, with no --concurrency: the default decides.
_ON_ONE_CPU_BY_DEFAULT = (
    "-c",
    _ON_ONE_CPU[1].replace(
        "sys.argv[0] = 'orderonce';",
        "sys.argv = ['orderonce'] + [a for a in sys.argv[1:] if '--concurrency' not in a];",
    ),
)


def test_the_default_pool_has_one_consumer_per_cpu_the_process_may_use(
    workers: WorkerFactory,
) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: the host's count and the process's are the same")
    worker = workers.start(pool="buffered", concurrency=1, entry=_ON_ONE_CPU_BY_DEFAULT)
    assert "supervising 1 worker processes" in worker.text()
    assert "more consumers than CPUs" not in worker.text()


def test_the_pool_warns_of_more_consumers_than_cpus(workers: WorkerFactory) -> None:
    worker = workers.start(pool="buffered", concurrency=2, entry=_ON_ONE_CPU)
    assert "supervising 2 worker processes" in worker.text()
    assert "2 consumer processes on 1 CPUs: more consumers than CPUs drain slower" in (
        worker.text()
    )

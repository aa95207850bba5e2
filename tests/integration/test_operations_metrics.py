"""Operations: a real worker's Prometheus metrics, ``orderonce health`` and the new stats."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection, Engine, text

from orderonce.config import Settings
from producers import Publisher
from tests import events
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until
from worker.ops import metrics, reports
from worker.protocol.locks import lock_name
from worker.store import dead_letters

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orderonce", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _events_total(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "orderonce_events_total")


def _scrape_when_counted(port: int, events: int, what: str) -> Samples:
    def counted() -> Samples:
        found = _scrape(port)
        return found if _events_total(found) >= events else {}  # falsy: keep waiting

    return wait_until(counted, 45, what)


def _events_by_labels(samples: Samples) -> dict[tuple[str, str, str], float]:
    """orderonce_events_total by (outcome, cause, type)."""
    return {
        (dict(labels)["outcome"], dict(labels)["cause"], dict(labels)["type"]): v
        for (name, labels), v in samples.items()
        if name == "orderonce_events_total"
    }


def test_worker_serves_metrics_summed_over_its_pool(
    db: Engine, workers: WorkerFactory, servers: ServerUrls, settings: Settings
) -> None:
    port = _free_port()
    # Two pool children: the served figures must be the sum of every process's files.
    worker = workers.start(pool="prefork", concurrency=2, args=["--metrics-port", str(port)])
    order = events.uid("ORD")
    paid = events.paid(order, "9.00")
    publisher = Publisher(servers.redis_url, settings)
    try:
        # Stock first: an order the two children take before its stock arrives is rejected.
        publisher.publish(events.restock("SKU-MET", 5))
        wait_until(
            lambda: _events_total(_scrape(port)) == 1, 30, "the restock to be counted (wired?)"
        )
        publisher.publish(events.created(order, [("SKU-MET", 1, "9.00")]))
        publisher.publish(paid)
        publisher.publish(paid)  # a producer's retry: the same event in another message
        publisher.publish_raw('{"specversion": "1.0", "id": ')  # cut short: malformed JSON
    finally:
        publisher.close()

    samples = _scrape_when_counted(
        port, 5, "five events counted in the scraped metrics (is observe_event wired?)"
    )
    assert _events_by_labels(samples) == {
        ("applied", "", "inventory.restocked"): 1,
        ("applied", "", "order.created"): 1,
        ("applied", "", "order.paid"): 1,
        ("duplicate", "producer_retry", "order.paid"): 1,
        ("dead_lettered", "", ""): 1,
    }
    assert _value(samples, "orderonce_processing_seconds_count") == 5
    # Every event that could be read has a time, hence a lag; the malformed one has none.
    assert _value(samples, "orderonce_lag_seconds_count") == 4
    assert _value(samples, "orderonce_dead_letters_total", reason="malformed_json") == 1
    assert _value(samples, "orderonce_dead_letter_backlog") == 1

    # The backlog is read from the database at scrape time: a resolved dead letter leaves it.
    with db.begin() as conn:
        conn.execute(text("UPDATE dead_letters SET status = 'discarded'"))
    assert _value(_scrape(port), "orderonce_dead_letter_backlog") == 0

    # The multiprocess directory the worker made for itself goes away with it.
    found = re.search(r"(/\S*orderonce-metrics-[^\s\"]+)", worker.text())
    assert found, worker.text()[-2000:]
    directory = Path(found.group(1))
    assert directory.is_dir()
    worker.terminate()
    assert not directory.exists()


def test_a_batch_counts_each_of_its_events(
    workers: WorkerFactory, servers: ServerUrls, settings: Settings
) -> None:
    # A batch's counter goes up once per label set (observe_outcomes): by as many events as
    # share it, so the figures must equal one count per event.
    port = _free_port()
    workers.start(args=["--metrics-port", str(port)])
    first, second = events.uid("ORD"), events.uid("ORD")
    paid = events.paid(first, "9.00")
    publisher = Publisher(servers.redis_url, settings)
    try:
        publisher.publish_raw_batch(
            [
                publisher.body(events.restock("SKU-MB", 5)),
                publisher.body(events.created(first, [("SKU-MB", 1, "9.00")])),
                publisher.body(events.created(second, [("SKU-MB", 1, "4.50")])),
                publisher.body(paid),
                publisher.body(paid),  # a copy in the same batch: a duplicate
                '{"specversion": "1.0", "id": ',  # cut short: malformed JSON
            ]
        )
    finally:
        publisher.close()

    samples = _scrape_when_counted(port, 6, "the batch's six events counted")
    assert _events_by_labels(samples) == {
        ("applied", "", "inventory.restocked"): 1,
        ("applied", "", "order.created"): 2,
        ("applied", "", "order.paid"): 1,
        ("duplicate", "producer_retry", "order.paid"): 1,
        ("dead_lettered", "", ""): 1,
    }
    assert _value(samples, "orderonce_processing_seconds_count") == 6
    assert _value(samples, "orderonce_lag_seconds_count") == 5
    assert _value(samples, "orderonce_dead_letters_total", reason="malformed_json") == 1


@pytest.mark.parametrize(
    ("pool", "as_batch", "env"),
    [
        # The default pool: the event waits in the buffer for later batches, 50 ms apart at
        # most (tries enough to outlast the lock below, about 2 s).
        ("buffered", False, {"ORDERONCE_BATCH_TOO_EARLY_RETRIES": "40"}),
        # A batch message: quick tries (150 ms in all), then the single path with a countdown
        # of 1.5 to 6 s, by when the lock is gone.
        ("solo", True, {"ORDERONCE_LOCK_BUSY_COUNTDOWN_S": "3"}),
    ],
)
def test_a_batch_that_finds_an_event_lock_held_counts_it(
    workers: WorkerFactory,
    servers: ServerUrls,
    settings: Settings,
    pool: str,
    as_batch: bool,
    env: dict[str, str],
) -> None:
    # The batch protocol hands such an event back instead of retrying it. The lock expires
    # in a second, so the event then applies from the buffer, or from the single path, which
    # finds the lock free and counts nothing itself: what is counted is the hand-back.
    port = _free_port()
    workers.start(pool=pool, args=["--metrics-port", str(port)], **env)
    event = events.restock("SKU-LB", 1)
    publisher = Publisher(servers.redis_url, settings)
    body = publisher.body(event)
    try:
        redis.Redis.from_url(servers.redis_url).set(
            lock_name(event.source, event.id), "another-worker", px=1000
        )
        if as_batch:
            publisher.publish_raw_batch([body])
        else:
            publisher.publish_raw(body)
    finally:
        publisher.close()

    samples = _scrape_when_counted(port, 1, "the event applied once its lock expired")
    assert _events_by_labels(samples) == {("applied", "", "inventory.restocked"): 1}
    assert (_value(samples, "orderonce_lock_contention_total") or 0) >= 1
    assert (_value(samples, "orderonce_retries_total", reason="lock_busy") or 0) >= 1


def test_metrics_are_no_ops_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    metrics.observe_event("applied", None, "order.paid", 0.01, 1.0)
    metrics.observe_lock_busy()
    metrics.observe_retry("lock_busy")
    metrics.observe_dead_letter("poison")
    assert metrics._metrics is None
    assert metrics.lag_since(None) is None
    lag = metrics.lag_since(datetime.now(UTC) - timedelta(seconds=5))
    assert lag is not None and lag >= 5


def test_metric_labels_stay_bounded() -> None:
    assert metrics._cause("duplicate", "same_key") == "same_key"
    assert metrics._cause("duplicate", "something new") == "other"
    assert metrics._cause("applied", "held: suspected duplicate of ORD-1") == "fingerprint"
    assert metrics._cause("rejected", "out_of_stock: SKU-1") == ""
    assert metrics._bounded("parked: order unknown", metrics.DEAD_LETTER_REASONS) == "parked"
    assert metrics._bounded("made_up", metrics.RETRY_REASONS) == "other"


def test_health_passes_and_names_what_fails(worker_env: dict[str, str]) -> None:
    good = _cli(worker_env, "health", "--json")
    assert good.returncode == 0, good.stdout + good.stderr[-2000:]
    report = json.loads(good.stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == ["postgres", "redis", "broker"]

    dead_redis = {**worker_env, "ORDERONCE_REDIS_URL": "redis://127.0.0.1:1/0"}
    bad = _cli(dead_redis, "health", "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr[-2000:]
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["redis"]


def _processed(conn: Connection, event_id: str, outcome: str, age: str, **extra: object) -> None:
    conn.execute(
        text(
            "INSERT INTO processed_messages (source, event_id, event_type, payload_hash,"
            " outcome, reason, duplicates, redeliveries, processed_at)"
            " VALUES ('test/stats', :id, 'order.paid', 'h', :outcome, :reason, :dups, :redel,"
            " now() - CAST(:age AS interval))"
        ),
        {
            "id": event_id,
            "outcome": outcome,
            "age": age,
            "reason": extra.get("reason"),
            "dups": extra.get("duplicates", 0),
            "redel": extra.get("redeliveries", 0),
        },
    )


def test_stats_throughput_rates_backlog_and_oldest_queued(
    db: Engine, worker_env: dict[str, str], servers: ServerUrls, settings: Settings
) -> None:
    with db.begin() as conn:
        _processed(conn, "e1", "applied", "5 seconds", duplicates=2, redeliveries=1)
        _processed(conn, "e2", "applied", "30 seconds")
        _processed(conn, "e3", "applied", "20 minutes")
        _processed(conn, "e4", "duplicate", "3 hours", reason="same_key")
    dead_letters.record_now(db, b"not json", "malformed_json", "cut short")
    dead_letters.record_now(db, b"{}", "bad_envelope", "empty")
    with db.begin() as conn:
        conn.execute(
            text("UPDATE dead_letters SET first_seen = now() - interval '1 hour' WHERE body = '{}'")
        )
        conn.execute(text("UPDATE dead_letters SET status = 'discarded' WHERE body = 'not json'"))

    # No worker runs: what is published stays queued, the first one sent oldest.
    first = events.restock("SKU-Q", 1, time=datetime.now(UTC) - timedelta(minutes=2))
    publisher = Publisher(servers.redis_url, settings)
    try:
        for event in (first, events.restock("SKU-Q", 2), events.restock("SKU-Q", 3)):
            publisher.publish(event)
    finally:
        publisher.close()

    client = redis.Redis.from_url(servers.redis_url)
    try:
        queued = reports.queue_backlog(client, settings.queue)
        assert queued["length"] == 3
        assert datetime.fromisoformat(queued["oldest_event_time"]) == first.time
        assert queued["oldest_age_seconds"] >= 120

        figures = json.loads(_cli(worker_env, "stats", "--json").stdout)
        assert figures["throughput"] == {"last_minute": 2, "last_hour": 3}
        # 4 processed rows and 2 suppressed copies: 6 deliveries, 3 of them duplicates.
        rate = figures["duplicate_rate"]
        assert rate["total"] == 0.5
        assert rate["redelivery"] == rate["producer_retry"] == rate["same_key"] == 0.1667
        backlog = figures["dead_letter_backlog"]
        assert backlog["open"] == 1 and backlog["oldest_age_seconds"] >= 3600
        assert figures["oldest_queued"]["length"] == 3
        assert figures["oldest_queued"]["oldest_age_seconds"] >= 0

        # A malformed message at the head of the queue has no readable time.
        odd = settings.model_copy(update={"queue": f"{settings.queue}.odd"})
        publisher = Publisher(servers.redis_url, odd)
        try:
            publisher.publish_raw("garbage")
        finally:
            publisher.close()
        assert reports.queue_backlog(client, odd.queue)["oldest_age_seconds"] is None
        assert reports.queue_backlog(client, "no.such.queue")["length"] == 0
    finally:
        client.delete(settings.queue, f"{settings.queue}.odd")
        client.close()
    assert reports.queued_on_broker("amqp://guest@127.0.0.1:1//", settings.queue) is None

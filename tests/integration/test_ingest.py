"""The HTTP front door (`orderonce ingest`) with a client nobody here wrote: the CloudEvents SDK
for Python, in structured, binary and batched mode, against a real server process, a real
worker, PostgreSQL and Redis. A 2xx must mean durable, a resend must be idempotent whatever its
time, and every refusal must say why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent
from sqlalchemy import Engine

from orderonce.dev.processes import IngestProcess, free_port
from tests.brokers import Broker
from tests.db import scalar
from tests.workers import WorkerFactory, wait_until

SOURCE = "shop/warehouse"


def restock(sku: str, quantity: int, event_id: str | None = None, **attributes: Any) -> SdkEvent:
    """A restock built with the SDK; it stamps the id when none is given and ``time`` now."""
    base = {"type": "inventory.restocked", "source": SOURCE, **attributes}
    if event_id is not None:
        base["id"] = event_id
    return SdkEvent(base, {"sku": sku, "quantity": quantity})


def post(url: str, message: Any, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/events", content=message.body, headers={**message.headers, **headers}, timeout=30
    )


def post_batch(url: str, events: list[SdkEvent], **headers: str) -> httpx.Response:
    body = b"[" + b",".join(JSONFormat().write(e) for e in events) + b"]"
    return httpx.post(
        f"{url}/events",
        content=body,
        headers={"content-type": "application/cloudevents-batch+json", **headers},
        timeout=30,
    )


def on_hand(db: Engine, sku: str) -> int:
    return scalar(db, "SELECT coalesce(sum(on_hand), 0) FROM inventory WHERE sku = :sku", sku=sku)


def test_all_three_modes_are_applied_exactly_once(
    db: Engine, ingest: IngestProcess, workers: WorkerFactory
) -> None:
    workers.start()
    fmt = JSONFormat()
    structured = post(ingest.url, to_structured(restock("SKU-HTTP", 1), fmt))
    binary = post(ingest.url, to_binary(restock("SKU-HTTP", 2), fmt))
    batched = post_batch(ingest.url, [restock("SKU-HTTP", 4), restock("SKU-HTTP", 8)])
    for response in (structured, binary, batched):
        assert response.status_code == 202, response.text
    assert batched.json()["accepted"] == 2
    wait_until(lambda: on_hand(db, "SKU-HTTP") == 15, 30, "all four restocks")
    assert scalar(db, "SELECT count(*) FROM processed_messages") == 4


def test_a_resend_with_a_rebuilt_time_is_a_duplicate_and_other_content_a_conflict(
    db: Engine, ingest: IngestProcess, workers: WorkerFactory
) -> None:
    """An SDK's retry builds the event again: same id, a new time. Same content: 202, nothing
    stored twice. Other content under the same id: 409, whatever the mode."""
    fmt = JSONFormat()
    event_id = str(uuid.uuid4())
    first = post(ingest.url, to_structured(restock("SKU-RESEND", 3, event_id), fmt))
    assert first.status_code == 202
    assert first.json()["events"][0]["status"] == "accepted"
    time.sleep(0.01)
    rebuilt = restock("SKU-RESEND", 3, event_id, traceparent=f"00-{uuid.uuid4().hex}-{'1' * 16}-01")
    assert rebuilt.get_time() != SdkEvent({**restock("x", 1).get_attributes()}).get_time()
    again = post(ingest.url, to_binary(rebuilt, fmt))
    assert again.status_code == 202, again.text
    assert again.json() == {
        "accepted": 0,
        "duplicates": 1,
        "events": [{"source": SOURCE, "id": event_id, "status": "duplicate"}],
    }
    other = post(ingest.url, to_structured(restock("SKU-RESEND", 300, event_id), fmt))
    assert other.status_code == 409
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["reason"] == "id_conflict"
    assert other.json()["errors"] == [
        {"index": 0, "source": SOURCE, "id": event_id, "reason": "id_conflict"}
    ]
    assert scalar(db, "SELECT count(*) FROM outbox") == 1

    workers.start()
    wait_until(lambda: on_hand(db, "SKU-RESEND") == 3, 30, "the restock")
    # Applied now: a resend is still a duplicate, found on the processed row.
    late = post(ingest.url, to_structured(restock("SKU-RESEND", 3, event_id), fmt))
    assert late.json()["duplicates"] == 1
    assert post(ingest.url, to_binary(restock("SKU-RESEND", 4, event_id), fmt)).status_code == 409


def test_a_batch_is_accepted_or_refused_whole(db: Engine, ingest: IngestProcess) -> None:
    good = [restock("SKU-BATCH", 1) for _ in range(3)]
    bad = SdkEvent({"type": "inventory.restocked", "source": SOURCE}, {"sku": "SKU-BATCH"})
    unknown = SdkEvent({"type": "order.deleted", "source": SOURCE, "subject": "O-1"}, {})
    refused = post_batch(ingest.url, [good[0], bad, good[1], unknown, good[2]])
    assert refused.status_code == 400
    problem = refused.json()
    assert problem["reason"] == "invalid_batch"
    assert [(e["index"], e["reason"]) for e in problem["errors"]] == [
        (1, "bad_schema"),
        (3, "unknown_type"),
    ]
    assert problem["errors"][0]["field"] == "data.quantity"
    assert problem["errors"][0]["id"] == bad.get_id()
    assert scalar(db, "SELECT count(*) FROM outbox") == 0  # nothing of it

    taken = restock("SKU-BATCH", 1)
    assert post_batch(ingest.url, [taken]).status_code == 202
    conflicting = restock("SKU-BATCH", 99, taken.get_id())
    clash = post_batch(ingest.url, [good[0], conflicting])
    assert clash.status_code == 409
    assert [e["index"] for e in clash.json()["errors"]] == [1]
    assert scalar(db, "SELECT count(*) FROM outbox") == 1  # still only the first


@pytest.mark.parametrize(
    ("headers", "body", "status", "reason"),
    [
        ({"content-type": "text/plain"}, b"hello", 415, "not_a_cloudevent"),
        ({"content-type": "application/cloudevents+json"}, b'{"id": ', 400, "malformed_json"),
        ({"content-type": "application/cloudevents+json"}, b"[1]", 400, "bad_envelope"),
        (
            {
                "content-type": "text/xml",
                "ce-specversion": "1.0",
                "ce-id": "x",
                "ce-source": SOURCE,
                "ce-type": "inventory.restocked",
                "ce-time": "2026-12-04T10:00:00Z",
            },
            b"<restock/>",
            415,
            "content_type_refused",
        ),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"specversion": "1.0"}' + b" " * (5 * 1024 * 1024),
            413,
            "oversized",
        ),
    ],
)
def test_refusals_say_why(
    ingest: IngestProcess, headers: dict[str, str], body: bytes, status: int, reason: str
) -> None:
    response = httpx.post(f"{ingest.url}/events", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["status"], problem["reason"], problem["type"]) == (
        status,
        reason,
        f"/problems/{reason}",
    )
    assert problem["detail"]
    assert httpx.get(f"{ingest.url}/problems/{reason}").status_code == 200


def test_binary_mode_reports_the_attribute_at_fault(ingest: IngestProcess) -> None:
    message = to_binary(restock("SKU-1", 1), JSONFormat())
    headers = {**message.headers, "ce-time": "yesterday", "content-type": "application/json"}
    response = httpx.post(f"{ingest.url}/events", content=message.body, headers=headers)
    assert response.status_code == 400
    assert (response.json()["reason"], response.json()["field"]) == ("bad_envelope", "time")


def test_service_endpoints(ingest: IngestProcess) -> None:
    assert httpx.get(f"{ingest.url}/healthz").json() == {"ok": True}
    assert httpx.get(f"{ingest.url}/readyz").json()["ready"] is True
    served = httpx.get(f"{ingest.url}/openapi.json").json()
    published = Path(__file__).parents[2] / "schemas" / "api" / "openapi.json"
    assert served == json.loads(published.read_text())
    post(ingest.url, to_structured(restock("SKU-M", 1), JSONFormat()))
    metrics = httpx.get(f"{ingest.url}/metrics").text
    assert 'orderonce_ingest_requests_total{mode="structured",status="202"} 1.0' in metrics
    assert 'orderonce_ingest_events_total{result="accepted"} 1.0' in metrics
    assert "swagger-ui" in httpx.get(f"{ingest.url}/docs").text


# --- tokens ---------------------------------------------------------------------------------


@pytest.fixture
def guarded(db: Engine, broker: Broker, tmp_path: Path) -> Iterator[IngestProcess]:
    env = {**os.environ, **broker.env, "ORDERONCE_INGEST_TOKENS": "tok-shop:shop/,tok-any"}
    front = IngestProcess("guarded", env, tmp_path / "guarded.log", free_port())
    try:
        front.wait_ready()
        yield front
    finally:
        front.terminate()


def test_tokens_and_their_source_prefixes(db: Engine, guarded: IngestProcess) -> None:
    message = to_structured(restock("SKU-T", 1), JSONFormat())
    missing = post(guarded.url, message)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert post(guarded.url, message, authorization="Bearer wrong").status_code == 401
    assert post(guarded.url, message, authorization="Bearer tok-shop").status_code == 202

    other = SdkEvent(
        {"type": "inventory.restocked", "source": "partner/x"}, {"sku": "S", "quantity": 1}
    )
    denied = post_batch(guarded.url, [restock("SKU-T", 1), other], authorization="Bearer tok-shop")
    assert denied.status_code == 403
    assert [e["index"] for e in denied.json()["errors"]] == [1]
    assert scalar(db, "SELECT count(*) FROM outbox") == 1
    # A token with no prefix may publish any source.
    assert post_batch(guarded.url, [other], authorization="Bearer tok-any").status_code == 202


def test_without_tokens_only_loopback_is_served(broker: Broker) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "orderonce", "ingest", "--host", "0.0.0.0", "--port", "1"],
        env={**os.environ, **broker.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "ORDERONCE_INGEST_TOKENS" in refused.stdout


# --- backpressure and a database that stops -------------------------------------------------


def test_backpressure_when_the_workers_are_behind(
    db: Engine, broker: Broker, tmp_path: Path
) -> None:
    env = {**os.environ, **broker.env, "ORDERONCE_INGEST_MAX_BACKLOG": "5"}
    front = IngestProcess("busy", env, tmp_path / "busy.log", free_port())
    client = redis.Redis.from_url(broker.url)
    try:
        front.wait_ready()
        client.lpush(broker.settings.queue, *[b"waiting"] * 10)  # no worker takes them
        time.sleep(2.5)  # the front door looks once a second
        refused = post(front.url, to_structured(restock("SKU-BP", 1), JSONFormat()))
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "5"
        assert refused.json()["reason"] == "backlog"
        client.delete(broker.settings.queue)
        time.sleep(2.5)
        assert post(front.url, to_structured(restock("SKU-BP", 1), JSONFormat())).status_code == 202
    finally:
        client.close()
        front.terminate()

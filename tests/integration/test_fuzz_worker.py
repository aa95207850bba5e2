"""Property: whatever a publisher sends — arbitrary text, mutated envelopes, valid events — a
real worker accounts for every input (applied, or dead-lettered with the reason the parser
gives it) and stays up."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from orderonce.config import Settings
from orderonce.errors import BadEvent
from producers import Publisher
from producers.publisher import to_json
from schemas import parse_event
from tests import events
from tests.raw_broker import publish_raw_message, task_headers
from tests.servers import ServerUrls
from tests.workers import WorkerFactory, wait_until

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def mutated_events(draw: st.DrawFn) -> str:
    event = json.loads(
        to_json(
            draw(
                st.sampled_from(
                    [
                        events.restock("SKU-F", 2),
                        events.created("ORD-F", [("SKU-F", 1, "1.00")]),
                        events.paid("ORD-F", "1.00"),
                        events.cancelled("ORD-F"),
                    ]
                )
            )
        )
    )
    target: dict[str, Any] = draw(st.sampled_from([event, event["data"]]))
    key = draw(st.sampled_from(sorted(target)))
    mutation = draw(st.sampled_from(["drop", "replace", "add", "keep"]))
    if mutation == "drop":
        del target[key]
    elif mutation == "replace":
        target[key] = draw(json_values)
    elif mutation == "add":
        target[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    event["id"] = draw(st.uuids()).hex  # distinct events: no id conflicts between examples
    return json.dumps(event)


inputs = st.one_of(st.text(max_size=200), mutated_events(), json_values.map(json.dumps))


def _expected_reason(body: str, max_bytes: int) -> str | None:
    try:
        parse_event(body, max_bytes)
    except BadEvent as bad:
        return bad.reason
    return None


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(batch=st.lists(inputs, min_size=25, max_size=25))
def test_every_input_is_accounted_for(
    batch: list[str],
    db: Engine,
    workers: WorkerFactory,
    servers: ServerUrls,
    settings: Settings,
) -> None:
    with db.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE processed_messages, dead_letters, inventory,"
                " inventory_movements, orders, order_lines, ledger_entries,"
                " deferred_events"
            )
        )
    if not workers.started:
        # Follow-ups of orders that never come are parked after a few quick retries.
        workers.start(pool="prefork", concurrency=2, ORDERONCE_TOO_EARLY_MAX_RETRIES="2")
    worker = workers.started[0]
    publisher = Publisher(servers.redis_url, settings)
    try:
        for body in batch:
            publisher.publish_raw(body)
    finally:
        publisher.close()

    expected_dead: dict[str, str] = {}  # sha256 -> reason
    valid = 0
    for body in batch:
        reason = _expected_reason(body, settings.max_body_bytes)
        if reason is None:
            valid += 1
        else:
            raw = body.encode("utf-8", "surrogatepass")
            expected_dead[hashlib.sha256(raw).hexdigest()] = reason

    def accounted() -> bool:
        with db.connect() as conn:
            dead = dict(conn.execute(text("SELECT body_sha256, reason FROM dead_letters")).all())
            settled = conn.execute(
                text("SELECT count(*) + coalesce(sum(duplicates), 0) FROM processed_messages")
            ).scalar_one()
            parked = conn.execute(
                text("SELECT count(*) FROM dead_letters WHERE reason = 'parked'")
            ).scalar_one()
        # Valid events whose order never comes are parked (dead letters too), after retries.
        return dead.items() >= expected_dead.items() and settled + parked >= valid

    wait_until(accounted, 120, "every input to be applied or dead-lettered")
    with db.connect() as conn:
        reasons = dict(conn.execute(text("SELECT body_sha256, reason FROM dead_letters")).all())
    for digest, reason in expected_dead.items():
        assert reasons[digest] == reason
    assert worker.alive()


CONTENT_TYPES = [
    "application/json",
    "application/x-python-serialize",
    "application/x-yaml",
    "application/x-msgpack",
    "text/plain",
    "application/data",
]


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batch=st.lists(
        st.tuples(
            st.binary(min_size=1, max_size=300), st.sampled_from(CONTENT_TYPES), st.booleans()
        ),
        min_size=10,
        max_size=10,
        unique_by=lambda t: t[0],
    )
)
def test_arbitrary_broker_messages_are_kept_not_dropped(
    batch: list[tuple[bytes, str, bool]],
    db: Engine,
    workers: WorkerFactory,
    servers: ServerUrls,
    settings: Settings,
) -> None:
    # Below the task: raw broker messages with any bytes, any content type, with or without
    # Celery's task headers. None may be unpickled, none may vanish, the worker stays up.
    with db.begin() as conn:
        conn.execute(text("TRUNCATE processed_messages, dead_letters"))
    if not workers.started:
        workers.start(pool="prefork", concurrency=2)
    for body, content_type, with_headers in batch:
        publish_raw_message(
            servers.redis_url,
            settings,
            body,
            content_type=content_type,
            headers=task_headers(settings) if with_headers else None,
        )
    wanted = {hashlib.sha256(body).hexdigest() for body, _, _ in batch}

    def kept() -> bool:
        with db.connect() as conn:
            dead = set(conn.execute(text("SELECT body_sha256 FROM dead_letters")).scalars())
            valid = conn.execute(text("SELECT count(*) FROM processed_messages")).scalar_one()
        # A random body that happens to be a valid task message is processed instead.
        return len(wanted & dead) + valid >= len(wanted)

    wait_until(kept, 60, "every raw message to be dead-lettered")
    assert workers.started[0].alive()

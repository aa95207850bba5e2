"""What the harness publishes: the demo's order stream, with producer copies, hostile input and
events marked for failpoints. Pure: bodies and their kinds, no I/O.

Marked events carry a marker in their id (``fp-bc-…``); the workers' failpoints match it, with
``~once`` so each marked event hits its window exactly once (worker/protocol/failpoints.py).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Literal

import orjson

from orderonce.dev.demo_stream import build_stream
from schemas import CLOUD_EVENT
from schemas.parsing import canonical_json

Kind = Literal[
    "valid", "duplicate_copy", "malformed", "oversized", "wrong_schema", "key_conflict", "poison"
]
HOSTILE: tuple[Kind, ...] = ("malformed", "oversized", "wrong_schema", "key_conflict", "poison")

# The dead-letter reasons each hostile kind may end with.
EXPECTED_REASONS: dict[str, frozenset[str]] = {
    "malformed": frozenset({"malformed_json"}),
    "oversized": frozenset({"oversized"}),
    "wrong_schema": frozenset({"bad_schema", "bad_envelope", "unknown_type"}),
    "key_conflict": frozenset({"idempotency_key_conflict"}),
    "poison": frozenset({"poison"}),
}

# Failpoint windows (worker/protocol/single.py) and what a marked event does there.
WINDOWS = {
    "fp-bl-": ("before_lock", "kill"),
    "fp-bc-": ("before_commit", "kill"),
    "fp-ac-": ("after_commit", "kill"),
    "fp-st-": ("before_commit", "stop"),  # paused holding the lock, past its TTL (F8)
    "fp-sl-": ("before_commit", "sleep:0.5"),  # a slow commit, published as a racing pair (F6)
}
POISON_SKU = "SKU-POISON"  # its handler always fails
KILLER_SKU = "SKU-KILLER"  # it kills its worker every time


def failpoint_spec() -> str:
    rules = [f"{point}={action}~{marker}~once" for marker, (point, action) in WINDOWS.items()]
    rules += [f"before_commit=kill~{KILLER_SKU}~always", f"before_commit=raise~{POISON_SKU}~always"]
    return ",".join(rules)


@dataclass(frozen=True)
class Publication:
    body: str
    kind: Kind
    # (source, id) of a parseable event; None for raw hostile bodies.
    identity: tuple[str, str] | None
    # A key-conflict pair shares a group: exactly one of them may be applied.
    group: str | None = None


@dataclass
class Workload:
    restocks: list[Publication]
    publications: list[Publication]
    marked: dict[str, int]  # failpoint marker -> events carrying it


def build(
    events: int,
    *,
    seed: int,
    max_body_bytes: int,
    duplicate_rate: float = 0.05,
    hostile_rate: float = 0.01,
    marked_per_window: int = 3,
    windows: tuple[str, ...] = tuple(WINDOWS),
    killers: int = 1,
) -> Workload:
    rng = random.Random(seed)
    run = f"CHAOS{seed}"
    # The demo's stream has about 2.7 events per order (created, paid, shipped, ...): at least
    # `events` distinct events come out.
    stream = build_stream(run, max(10, round(events / 2.75)), duplicate_rate, seed)
    restocks = [Publication(p.body, "valid", p.key) for p in stream.restocks]
    pubs = [
        Publication(p.body, "duplicate_copy" if p.kind == "producer_retry" else "valid", p.key)
        for p in stream.publications
    ]
    pubs, marked = _mark(pubs, rng, marked_per_window, windows)
    hostile = max(len(HOSTILE), round(len(pubs) * hostile_rate))
    source = f"chaos/{run}/hostile"
    for n in range(hostile):
        for p in _hostile(HOSTILE[n % len(HOSTILE)], n, source, rng, max_body_bytes):
            pubs.insert(rng.randrange(len(pubs) + 1), p)
    for n in range(killers):
        body = _order(source, f"killer-{n}", [(KILLER_SKU, 1)], f"C-killer-{n}")
        pubs.insert(rng.randrange(len(pubs) + 1), Publication(body, "poison", _identity(body)))
    return Workload(restocks, pubs, marked)


def _mark(
    pubs: list[Publication], rng: random.Random, per_window: int, windows: tuple[str, ...]
) -> tuple[list[Publication], dict[str, int]]:
    """Give some events a marked id (all copies of one event alike); the slow ones get a racing
    copy right behind them."""
    by_identity = [p.identity for p in pubs if p.kind == "valid" and p.identity]
    chosen = rng.sample(by_identity, min(len(by_identity), per_window * len(windows)))
    renamed = {
        identity: f"{marker}{uuid.UUID(int=rng.getrandbits(128))}"
        for identity, marker in zip(
            chosen, [m for m in windows for _ in range(per_window)], strict=False
        )
    }
    out: list[Publication] = []
    for p in pubs:
        new_id = renamed.get(p.identity) if p.identity else None
        if new_id is None:
            out.append(p)
            continue
        envelope = orjson.loads(p.body) | {"id": new_id}
        body = canonical_json(CLOUD_EVENT.validate_python(envelope)).decode()
        moved = Publication(body, p.kind, (envelope["source"], new_id))
        out.append(moved)
        if new_id.startswith("fp-sl-") and p.kind == "valid":
            out.append(Publication(body, "duplicate_copy", moved.identity))
    counts = {m: sum(new.startswith(m) for new in renamed.values()) for m in windows}
    return out, counts


def _identity(body: str) -> tuple[str, str]:
    envelope = orjson.loads(body)
    return envelope["source"], envelope["id"]


def _order(
    source: str, name: str, lines: list[tuple[str, int]], customer: str, key: str | None = None
) -> str:
    envelope = {
        "specversion": "1.0",
        "id": f"{name}-{uuid.uuid4()}",
        "source": source,
        "type": "order.created",
        "subject": f"ORD-{name}",
        "time": "2026-01-01T00:00:00Z",
        "data": {
            "customer_id": customer,
            "currency": "EUR",
            "items": [{"sku": s, "quantity": q, "unit_price": "1.00"} for s, q in lines],
        },
    }
    if key:
        envelope["idempotencykey"] = key
    return canonical_json(CLOUD_EVENT.validate_python(envelope)).decode()


def _hostile(
    kind: Kind, n: int, source: str, rng: random.Random, max_body_bytes: int
) -> list[Publication]:
    if kind == "malformed":
        good = _order(source, f"malformed-{n}", [("SKU-001", 1)], f"C-m-{n}")
        cut = rng.randrange(1, len(good) - 1)
        return [Publication(good[:cut] + f" #{n}", kind, None)]
    if kind == "oversized":
        padding = "x" * (max_body_bytes + 1 + n)
        return [Publication(f'{{"pad": "{padding}"}}', kind, None)]
    if kind == "wrong_schema":
        bad = orjson.loads(_order(source, f"schema-{n}", [("SKU-001", 1)], f"C-s-{n}"))
        bad["data"]["items"][0]["quantity"] = [0, -3, 1.5, "two"][n % 4]
        return [Publication(orjson.dumps(bad).decode(), kind, None)]
    if kind == "key_conflict":
        key = f"conflict-{n}-{uuid.UUID(int=rng.getrandbits(128))}"
        first = _order(source, f"conflict-{n}a", [("SKU-001", 1)], f"C-k-{n}", key)
        second = _order(source, f"conflict-{n}b", [("SKU-002", 2)], f"C-k-{n}", key)
        group = f"conflict-{n}"
        return [
            Publication(first, kind, _identity(first), group),
            Publication(second, kind, _identity(second), group),
        ]
    body = _order(source, f"poison-{n}", [(POISON_SKU, 1)], f"C-p-{n}")
    return [Publication(body, "poison", _identity(body))]

"""The harness's verdict: every published event took effect exactly once, judged from the
database and the publish log alone.

- lost: an event published ok (or possibly published, and found in the outbox) with no
  terminal record: no processed row and no dead letter of its body.
- duplicated effects: a processed row or an effect stored twice for one event, or more stock
  restocked than the published restocks add up to.
- unexpected effects: a processed row or effect from an event nobody published.
- accounting: valid events never dead-lettered; each key-conflict pair one applied, one refused;
  each hostile input dead-lettered for its own reason; and no dead letter besides them.
- the database's own invariants (worker/reports.verify): ledger balanced, inventory conserved,
  orders agreeing with their effects.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import orjson
from sqlalchemy import Connection, text

from orderonce.dev.chaos.publog import Attempt, body_sha256
from orderonce.dev.chaos.workload import EXPECTED_REASONS, Publication
from worker.ops import reports

Identity = tuple[str, str]


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    count: int
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _finding(name: str, bad: list[str], what: str) -> Finding:
    detail = "ok" if not bad else f"{what}: " + ", ".join(bad[:5])
    return Finding(name, not bad, len(bad), detail)


def invariants(conn: Connection) -> list[Finding]:
    """The checks that must hold at any moment, also on snapshots while faults run."""
    return [
        Finding(c.name, c.ok, 0 if c.ok else 1, c.detail) for c in reports.verify(conn, sample=3)
    ]


def final(conn: Connection, attempts: list[Attempt], restocks: list[Publication]) -> list[Finding]:
    processed: dict[Identity, list[tuple[str, str | None]]] = defaultdict(list)
    for source, event_id, outcome, reason in conn.execute(
        text("SELECT source, event_id, outcome, reason FROM processed_messages")
    ):
        processed[(source, event_id)].append((outcome, reason))
    dead: dict[str, set[str]] = defaultdict(set)
    for sha, reason in conn.execute(text("SELECT body_sha256, reason FROM dead_letters")):
        dead[sha].add(reason)
    in_outbox = set(conn.execute(text("SELECT body_sha256 FROM outbox")).scalars())

    reached = [a for a in attempts if a.outcome == "ok" or a.sha256 in in_outbox]
    lost = _lost(reached, processed, dead)

    published = {a.identity for a in attempts if a.identity is not None}
    twice = [f"{k[0]}/{k[1]}" for k, rows in processed.items() if len(rows) > 1]
    unexpected = [f"{k[0]}/{k[1]}" for k in processed if k not in published]
    for row in conn.execute(
        text(
            "SELECT source, event_id FROM ledger_entries"
            " UNION SELECT source, event_id FROM inventory_movements"
            " UNION SELECT created_by_source, created_by_event FROM orders"
        )
    ):
        if (row.source, row.event_id) not in published:
            unexpected.append(f"effect of {row.source}/{row.event_id}")

    # Restocks must add up to what was published and applied, not more: a second application
    # of a restock shows here even with every unique constraint gone.
    expected_stock: Counter[str] = Counter()
    for p in restocks:
        if p.identity in processed and processed[p.identity][0][0] == "applied":
            data = orjson.loads(p.body)["data"]
            expected_stock[data["sku"]] += data["quantity"]
    for sku, restocked in conn.execute(
        text(
            "SELECT sku, sum(on_hand_delta) FROM inventory_movements"
            " WHERE kind = 'restock' GROUP BY sku"
        )
    ):
        if restocked != expected_stock.get(sku, 0):
            twice.append(f"{sku} restocked {restocked}, published {expected_stock.get(sku, 0)}")

    misaccounted: list[str] = []
    hostile_shas: set[str] = set()
    groups: dict[str, set[Identity]] = defaultdict(set)
    for a in reached:
        if a.kind in ("valid", "duplicate_copy"):
            outcomes = processed.get(a.identity or ("", ""), [])
            if any(o == "dead_lettered" for o, _ in outcomes) or a.sha256 in dead:
                misaccounted.append(f"valid event {a.identity} dead-lettered")
        elif a.kind == "key_conflict" and a.group and a.identity:
            groups[a.group].add(a.identity)
            hostile_shas.add(a.sha256)
        else:  # a hostile body: its dead letter, for its own reason
            hostile_shas.add(a.sha256)
            reasons = dead.get(a.sha256, set())
            if not reasons & EXPECTED_REASONS[a.kind]:
                got = sorted(reasons) or processed.get(a.identity or ("", ""))
                misaccounted.append(f"{a.kind} {a.identity or a.sha256[:12]} ended as {got}")
    for group, members in groups.items():
        # (a member with no processed row at all is reported as lost)
        pair = sorted(processed[m][0][0] for m in members if m in processed)
        if len(pair) == 2 and pair != ["applied", "dead_lettered"]:
            misaccounted.append(f"{group}: {pair}")
    extra_dead = [f"{sha[:12]} {sorted(r)}" for sha, r in dead.items() if sha not in hostile_shas]

    return [
        _finding("lost", lost, "published, never terminal"),
        _finding("duplicated_effects", twice, "applied more than once"),
        _finding("unexpected_effects", unexpected, "from no published event"),
        _finding("accounting", misaccounted, "not the outcome their kind calls for"),
        _finding("dead_letters_are_the_injected_bad_inputs", extra_dead, "unexpected dead letters"),
        *invariants(conn),
    ]


def _lost(
    reached: list[Attempt],
    processed: dict[Identity, list[tuple[str, str | None]]],
    dead: dict[str, set[str]],
) -> list[str]:
    """Published ok, or maybe published and durably in the outbox, yet never terminal (no
    processed row, no dead letter of its body)."""

    def terminal(a: Attempt) -> bool:
        return (a.identity is not None and a.identity in processed) or a.sha256 in dead

    return sorted({f"{a.kind}:{a.identity or a.sha256[:12]}" for a in reached if not terminal(a)})


def lost(conn: Connection, attempts: list[Attempt]) -> list[str]:
    """The events published ok that have no terminal record yet (no outbox involved)."""
    processed: dict[Identity, list[tuple[str, str | None]]] = defaultdict(list)
    for source, event_id in conn.execute(text("SELECT source, event_id FROM processed_messages")):
        processed[(source, event_id)].append(("", None))
    dead: dict[str, set[str]] = defaultdict(set)
    for sha in conn.execute(text("SELECT body_sha256 FROM dead_letters")).scalars():
        dead[sha].add("")
    return _lost([a for a in attempts if a.outcome == "ok"], processed, dead)


def attempt_outcomes(conn: Connection, attempts: list[Attempt]) -> dict[str, int]:
    """Each ok publish attempt as exactly one of applied (the first of its event), duplicate
    (a later copy) or dead-lettered."""
    dead = set(conn.execute(text("SELECT body_sha256 FROM dead_letters")).scalars())
    seen: set[object] = set()
    counts: Counter[str] = Counter()
    for a in attempts:
        if a.outcome != "ok":
            counts[f"publish_{a.outcome}"] += 1
            continue
        key = a.identity or a.sha256
        if a.sha256 in dead and (a.identity is None or key not in seen):
            counts["dead_lettered"] += 1
        elif key in seen:
            counts["duplicate"] += 1
        else:
            counts["applied"] += 1
        seen.add(key)
    return dict(counts)


__all__ = ["Finding", "attempt_outcomes", "body_sha256", "final", "invariants", "lost"]

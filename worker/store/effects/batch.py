"""The effects of many claimed events at once, with set-based SQL (batch mode).

The same rules as ``worker.store.effects.orders`` and ``worker.store.effects.stock`` — the pure ones
are shared: ``rules.decide``, ``rules.missing_stock``, ``submissions.fingerprint`` and ``judge`` —
applied to an in-memory copy of the rows the batch touches, loaded and locked first, then written
back in a handful of statements. Events are applied in batch order, each seeing the ones before it.

Locks are taken in a fixed order so that concurrent batches (and single events) cannot
deadlock: advisory locks on customers and orders sorted by key, then order rows sorted by id,
then stock rows sorted by SKU; each kind in one statement.

What this module does not do, it hands back (``Punt``) for the single-event protocol to do
later, under its own claim: anything about held orders (deferred follow-ups, releases),
submissions that conflict with another one, events that are too early, and every later event
of an order after one of its events was handed back, so that an order's events keep their
order. The batch protocol removes a handed-back event's claim before it commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import orjson
from psycopg.rows import dict_row
from sqlalchemy import Connection

from orderonce.errors import BatchRace
from schemas.events import (
    CloudEvent,
    InventoryRestockedEvent,
    OrderCreatedEvent,
    OrderEvent,
)
from schemas.vocabulary import HELD_AS_SUSPECTED_DUPLICATE, SUSPECTED_DUPLICATE
from worker.domain import rules, submissions
from worker.domain.results import Applied, Duplicate, Rejected, Result
from worker.store.db import execute_raw
from worker.store.effects import orders, stock


@dataclass(frozen=True)
class Punt:
    """Not applied here: left to the single-event protocol (``too_early`` after a while)."""

    why: Literal["too_early", "single_path"]
    reason: str


@dataclass
class _Order:
    order_id: str
    customer_id: str
    status: rules.Status
    total: Decimal
    currency: str
    fingerprint: str | None
    submitted_at: datetime | None
    idempotency: tuple[str, str] | None
    held: bool  # ever held as a suspected duplicate: its follow-ups go the single path
    lines: dict[str, int] | None = None  # quantities by SKU, loaded when needed
    status_reason: str | None = None
    changes: int = 0  # transitions applied here (the row's version goes up by as many)
    new: bool = False  # created by this batch
    row: dict[str, object] = field(default_factory=dict)  # the insert, for a new order


# Transaction-scoped advisory locks, taken before any order or stock row: each customer with a new
# order (as worker.store.effects.orders takes it for one submission), and each order the batch
# creates or follows up. The order's key makes a batch with a payment wait for the batch creating
# that order at the same moment, and then see it, instead of finding it "too early" and handing the
# payment to the single path; overlapping batches otherwise run side by side. All keys are sorted by
# their hash, in one statement (sorted in a subquery, locked in the outer scan): the same order in
# every batch, whatever collides.
_LOCK_KEYS = (
    "SELECT pg_advisory_xact_lock(h) FROM"
    " (SELECT DISTINCT hashtextextended(k, 0) AS h"
    "  FROM unnest(CAST(%(keys)s AS text[])) AS k ORDER BY h) AS sorted"
)
_ORDER_COLUMNS = (
    "order_id, customer_id, status, total, currency, fingerprint, submitted_at,"
    " idempotency_source, idempotency_key, duplicate_of IS NOT NULL AS held"
)
# The orders a batch reads, in one statement (one round trip): its follow-ups' orders, locked
# in order_id order with their lines, then the orders a new submission may repeat (priors,
# not locked). Lines never change once their order is inserted (in the same transaction), so
# a locked order's lines are those of the version the lock returns; an order committed after
# this statement's snapshot is not returned at all: its events are too early here (found with
# batches running at the same time). The priors are three lookups, each on its own index: one
# WHERE with the three ORed together was planned as a scan of every order, and a batch got
# slower as the table grew (4 ms at 7,000 orders).
_PRIORS = (
    f"SELECT {_ORDER_COLUMNS}, false AS locked, NULL::json AS lines FROM orders"
    " WHERE order_id = ANY(CAST(%(order_ids)s AS text[]))"
    f" UNION ALL SELECT {_ORDER_COLUMNS}, false, NULL FROM orders"
    " WHERE (idempotency_source, idempotency_key) IN"
    "   (SELECT * FROM unnest(CAST(%(key_sources)s AS text[]), CAST(%(keys)s AS text[])))"
    "   AND idempotency_key IS NOT NULL"
    f" UNION ALL SELECT {_ORDER_COLUMNS}, false, NULL FROM orders"
    " WHERE customer_id = ANY(CAST(%(customers)s AS text[]))"
    " AND fingerprint = ANY(CAST(%(fingerprints)s AS text[]))"
)
_READ_ORDERS = (
    f"WITH locked AS (SELECT {_ORDER_COLUMNS}, true AS locked,"
    "   (SELECT json_object_agg(sku, quantity) FROM"
    "     (SELECT sku, sum(quantity) AS quantity FROM order_lines AS l"
    "      WHERE l.order_id = o.order_id GROUP BY sku) AS by_sku) AS lines"
    " FROM orders AS o WHERE order_id = ANY(CAST(%(locked_ids)s AS text[]))"
    " ORDER BY order_id FOR UPDATE OF o)"
    f" SELECT * FROM locked UNION ALL {_PRIORS}"
)
_NEW_SKUS = (
    "INSERT INTO inventory (sku, on_hand, reserved)"
    " SELECT s, 0, 0 FROM unnest(CAST(%(skus)s AS text[])) AS s ORDER BY s"
    " ON CONFLICT (sku) DO NOTHING"
)
_LOCK_STOCK = (
    "SELECT sku, on_hand, reserved FROM inventory WHERE sku = ANY(CAST(%(skus)s AS text[]))"
    " ORDER BY sku FOR UPDATE"
)
_INSERT_ORDERS = (
    "INSERT INTO orders (order_id, customer_id, currency, total, status, status_reason,"
    " version, created_by_source, created_by_event, idempotency_source, idempotency_key,"
    " fingerprint, submitted_at, duplicate_of)"
    " SELECT order_id, customer_id, currency, total, status, status_reason, version,"
    " created_by_source, created_by_event, idempotency_source, idempotency_key, fingerprint,"
    " submitted_at, duplicate_of FROM json_to_recordset(CAST(%(orders)s AS json)) AS v("
    " order_id text, customer_id text, currency text, total numeric, status text,"
    " status_reason text, version integer, created_by_source text, created_by_event text,"
    " idempotency_source text, idempotency_key text, fingerprint text,"
    " submitted_at timestamptz, duplicate_of text)"
    " ON CONFLICT DO NOTHING RETURNING order_id"
)
_INSERT_LINES = (
    "INSERT INTO order_lines (order_id, line_no, sku, quantity, unit_price)"
    " SELECT order_id, line_no, sku, quantity, unit_price"
    " FROM json_to_recordset(CAST(%(lines)s AS json))"
    " AS v(order_id text, line_no integer, sku text, quantity integer, unit_price numeric)"
    # Only lines of orders this statement inserted: on a BatchRace, none (rolled back anyway).
    " WHERE v.order_id IN (SELECT order_id FROM new_orders)"
)
_UPDATE_ORDERS = (
    "UPDATE orders AS o SET status = v.status, status_reason = v.reason,"
    " version = o.version + v.changes, updated_at = now()"
    " FROM unnest(CAST(%(order_id)s AS text[]), CAST(%(status)s AS text[]),"
    " CAST(%(reason)s AS text[]), CAST(%(changes)s AS integer[]))"
    " AS v(order_id, status, reason, changes)"
    " WHERE o.order_id = v.order_id"
)
_UPDATE_STOCK = (
    "UPDATE inventory AS i SET on_hand = v.on_hand, reserved = v.reserved"
    " FROM unnest(CAST(%(sku)s AS text[]), CAST(%(on_hand)s AS bigint[]),"
    " CAST(%(reserved)s AS bigint[]))"
    " AS v(sku, on_hand, reserved) WHERE i.sku = v.sku"
)
_INSERT_MOVEMENTS = (
    "INSERT INTO inventory_movements (source, event_id, sku, kind, order_id, on_hand_delta,"
    " reserved_delta)"
    " SELECT source, event_id, sku, kind, order_id, on_hand_delta, reserved_delta"
    " FROM json_to_recordset(CAST(%(movements)s AS json))"
    " AS v(source text, event_id text, sku text, kind text, order_id text,"
    " on_hand_delta bigint, reserved_delta bigint)"
)
_INSERT_LEDGER = (
    "INSERT INTO ledger_entries (source, event_id, leg, order_id, account, amount, currency)"
    " SELECT source, event_id, leg, order_id, account, amount, currency"
    " FROM json_to_recordset(CAST(%(ledger)s AS json)) AS v(source text, event_id text, leg text,"
    " order_id text, account text, amount numeric, currency text)"
)


def json_rows(rows: Sequence[Mapping[str, object]]) -> str:
    """Rows as one JSON parameter, for ``json_to_recordset``: one statement however many rows.
    (Arrays, one per column, cost more than the statement itself: psycopg adapts them in
    Python, element by element. Money goes as a string, never a float.)"""
    return orjson.dumps(rows, default=_exact).decode()


def _exact(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value")


def _order_from_row(row: dict[str, Any]) -> _Order:
    key = row["idempotency_key"]
    return _Order(
        order_id=row["order_id"],
        customer_id=row["customer_id"],
        status=rules.Status(row["status"]),
        total=row["total"],
        currency=row["currency"],
        fingerprint=row["fingerprint"],
        submitted_at=row["submitted_at"],
        idempotency=(row["idempotency_source"], key) if key is not None else None,
        held=bool(row["held"]),
    )


class BatchEffects:
    """One batch's effects: ``load`` locks and reads, ``apply`` decides each event in memory,
    ``flush`` writes everything back. Runs inside the batch's transaction; never commits."""

    def __init__(self, conn: Connection, *, policy: submissions.Policy, window: timedelta) -> None:
        self._conn = conn
        self._policy = policy
        self._window = window
        self._orders: dict[str, _Order] = {}  # locked (follow-ups) or created here
        self._priors: dict[str, _Order] = {}  # orders a new submission may repeat (not locked)
        # Every order above by idempotency key and by (customer, fingerprint), in the order
        # first seen: a submission's look-ups cost the same whatever the batch's size.
        self._by_key: dict[tuple[str, str], dict[str, None]] = {}
        self._by_fingerprint: dict[tuple[str, str | None], dict[str, None]] = {}
        self._stock: dict[str, rules.Stock] = {}
        self._stock_before: dict[str, rules.Stock] = {}
        # Orders with an event handed back, and why: their later events follow it there.
        self._tainted: dict[str, Literal["too_early", "single_path"]] = {}
        self._movements: list[dict[str, object]] = []
        self._ledger: list[dict[str, object]] = []
        self._lines: list[dict[str, object]] = []
        self._fingerprints: dict[tuple[str, str], str] = {}

    # --- load and lock -------------------------------------------------------------------

    def load(self, events: list[CloudEvent]) -> None:
        created = [e for e in events if isinstance(e, OrderCreatedEvent)]
        follow_ups = sorted(
            {
                e.order_id
                for e in events
                if not isinstance(e, InventoryRestockedEvent | OrderCreatedEvent)
            }
        )
        conn = self._conn
        keys = {f"orderonce/customer/{e.data.customer_id}" for e in created}
        keys |= {f"orderonce/order/{e.order_id}" for e in created}
        keys |= {f"orderonce/order/{order_id}" for order_id in follow_ups}
        if keys:
            execute_raw(conn, _LOCK_KEYS, {"keys": sorted(keys)})
        for e in created:
            self._fingerprints[e.key] = submissions.fingerprint(e.data)
        if created or follow_ups:
            keyed = [e for e in created if e.idempotencykey]
            rows = execute_raw(
                conn,
                _READ_ORDERS,
                {
                    "locked_ids": follow_ups,
                    "order_ids": [e.order_id for e in created],
                    "key_sources": [e.source for e in keyed],
                    "keys": [e.idempotencykey for e in keyed],
                    "customers": [e.data.customer_id for e in created],
                    "fingerprints": list(self._fingerprints.values()),
                },
                row_factory=dict_row,
                prepare=False,  # planned for these arrays (execute_raw)
            ).fetchall()
            for r in rows:
                order = _order_from_row(r)
                if r["locked"]:
                    order.lines = {sku: int(qty) for sku, qty in (r["lines"] or {}).items()}
                    self._orders[order.order_id] = order
                else:
                    self._priors[order.order_id] = order
                self._index(order)
        skus: set[str] = set()
        restocked = {e.data.sku for e in events if isinstance(e, InventoryRestockedEvent)}
        skus |= restocked
        for e in created:
            skus |= {i.sku for i in e.data.items}
        for order in self._orders.values():
            skus |= set(order.lines or {})
        if restocked:
            execute_raw(conn, _NEW_SKUS, {"skus": sorted(restocked)})
        if skus:
            locked = execute_raw(conn, _LOCK_STOCK, {"skus": sorted(skus)}).fetchall()
            for sku, on_hand, reserved in locked:
                self._stock[sku] = rules.Stock(int(on_hand), int(reserved))
        self._stock_before = dict(self._stock)

    # --- decide, in memory ---------------------------------------------------------------

    def apply(self, event: CloudEvent) -> Result | Punt:
        if isinstance(event, InventoryRestockedEvent):
            self._move(event, None, "restock", {event.data.sku: event.data.quantity})
            return Applied()
        order_id = event.order_id
        if order_id in self._tainted:
            return self._punt(order_id, self._tainted[order_id], "after an earlier event of it")
        if isinstance(event, OrderCreatedEvent):
            return self._create(event)
        return self._transition(event)

    def _punt(self, order_id: str, why: Literal["too_early", "single_path"], reason: str) -> Punt:
        self._tainted.setdefault(order_id, why)
        return Punt(why, reason)

    def _index(self, order: _Order) -> None:
        if order.idempotency is not None:
            self._by_key.setdefault(order.idempotency, {})[order.order_id] = None
        by_fingerprint = self._by_fingerprint.setdefault((order.customer_id, order.fingerprint), {})
        by_fingerprint[order.order_id] = None

    def _current(self, order_ids: Iterable[str]) -> list[_Order]:
        """These orders as this batch knows them: its locked or new copy wins over the prior
        read without a lock (it is up to date)."""
        found = (self._orders.get(i) or self._priors.get(i) for i in order_ids)
        return [o for o in found if o is not None]

    def _prior(self, match: Iterable[_Order]) -> submissions.Prior | None:
        found = next(iter(match), None)
        return submissions.Prior(found.order_id, found.fingerprint) if found else None

    def _create(self, event: OrderCreatedEvent) -> Result | Punt:
        data = event.data
        digest = self._fingerprints[event.key]
        key = (event.source, event.idempotencykey) if event.idempotencykey else None
        since, until = event.time - self._window, event.time + self._window
        similar = sorted(
            (
                o
                for o in self._current(self._by_fingerprint.get((data.customer_id, digest), ()))
                if self._policy != "allow"
                and o.status not in (rules.Status.CANCELLED, rules.Status.REJECTED)
                and o.order_id != event.order_id
                and o.submitted_at is not None
                and since <= o.submitted_at <= until
            ),
            key=lambda o: o.submitted_at or since,
        )
        verdict = submissions.judge(
            digest,
            same_key=self._prior(self._current(self._by_key.get(key, ()) if key else ())),
            same_order_id=self._prior(self._current([event.order_id])),
            similar=self._prior(similar),
            policy=self._policy,
        )
        match verdict:
            case submissions.Duplicate(cause, original):
                return Duplicate(cause, original)
            case submissions.Conflict():
                # A dead letter with both hashes: the single path words it.
                return self._punt(event.order_id, "single_path", "conflicting submission")
            case submissions.SuspectRejected(original):
                return Rejected(f"{SUSPECTED_DUPLICATE}: same order as {original}", original)
            case submissions.NewOrder(hold_of):
                return self._insert(event, digest, hold_of)
        raise AssertionError(f"unhandled verdict {verdict!r}")  # pragma: no cover

    def _insert(self, event: OrderCreatedEvent, digest: str, hold_of: str | None) -> Result:
        data = event.data
        wanted = rules.quantities_by_sku(data.items)
        status, reason = rules.Status.CREATED, None
        result: Result = Applied()
        if hold_of:
            status = rules.Status.ON_HOLD
            reason = f"{SUSPECTED_DUPLICATE}: same order as {hold_of}"
            result = Applied(f"{HELD_AS_SUSPECTED_DUPLICATE} of {hold_of}", hold_of)
        order = _Order(
            order_id=event.order_id,
            customer_id=data.customer_id,
            status=status,
            total=data.total,
            currency=data.currency,
            fingerprint=digest,
            submitted_at=event.time,
            idempotency=(event.source, event.idempotencykey) if event.idempotencykey else None,
            held=bool(hold_of),
            lines=wanted,
            status_reason=reason,
            new=True,
        )
        order.row = orders.order_row(event, digest, hold_of)  # status: set at flush
        self._orders[event.order_id] = order
        self._index(order)
        self._lines += orders.line_rows(event)
        if hold_of:
            return result
        missing = rules.missing_stock(wanted, self._stock)
        if missing:
            # As worker.store.effects.orders does it: created, then turned down (one change).
            reason = f"out_of_stock: {', '.join(missing)}"
            self._set_status(order, rules.Status.REJECTED, reason)
            return Applied(reason)
        self._move(event, event.order_id, "reserve", wanted)
        return result

    def _transition(self, event: OrderEvent) -> Result | Punt:
        order = self._orders.get(event.order_id)
        if order is None:
            return self._punt(event.order_id, "too_early", "order_not_found")
        if order.held or order.status is rules.Status.ON_HOLD:
            return self._punt(event.order_id, "single_path", "held order")
        current = rules.Order(order.order_id, order.status, order.total, order.currency)
        decision = rules.decide(current, event)
        match decision:
            case rules.TooEarly(reason):
                return self._punt(event.order_id, "too_early", reason)
            case rules.Rejected(reason):
                return Rejected(reason)
            case rules.Deferred(reason):  # pragma: no cover  (held orders punted above)
                return self._punt(event.order_id, "single_path", reason)
        assert isinstance(decision, rules.Transition)
        if decision.reserve_stock:  # pragma: no cover  (only a held order reserves later)
            return self._punt(event.order_id, "single_path", "reserve on transition")
        if decision.release_stock or decision.ship_stock:
            kind = "release" if decision.release_stock else "ship"
            self._move(event, order.order_id, kind, order.lines or {})
        self._set_status(order, decision.status, None)
        self._ledger += [
            {
                "source": event.source,
                "event_id": event.id,
                "leg": leg.leg,
                "order_id": order.order_id,
                "account": leg.account,
                "amount": leg.amount,
                "currency": order.currency,
            }
            for leg in decision.legs
        ]
        return Applied()

    def _set_status(self, order: _Order, status: rules.Status, reason: str | None) -> None:
        order.status, order.status_reason = status, reason
        order.changes += 1

    def _move(
        self, event: CloudEvent, order_id: str | None, kind: str, quantities: dict[str, int]
    ) -> None:
        on_hand_sign, reserved_sign = stock.MOVES[kind]  # one table of signs for both paths
        for sku, qty in sorted(quantities.items()):
            before = self._stock[sku]
            self._stock[sku] = rules.Stock(
                before.on_hand + on_hand_sign * qty, before.reserved + reserved_sign * qty
            )
            self._movements.append(stock.movement_row(event, kind, sku, qty, order_id))

    # --- write back ----------------------------------------------------------------------

    def flush(self, also: Iterable[tuple[str, str, dict[str, object]]] = ()) -> None:
        """Write everything back in ONE statement: each write is a data-modifying CTE of it,
        with the caller's own writes (``also``: name, statement, parameters; rows apart from
        these). One round trip instead of eight, and the stock rows (locked since ``load``,
        and what concurrent batches wait for) are held that much less."""
        writes: list[str] = [f"{name} AS ({sql})" for name, sql, _ in also]
        params: dict[str, object] = {}
        for _, _, values in also:
            params |= values
        new = [o for o in self._orders.values() if o.new]
        if new:
            rows = [
                o.row
                | {"status": o.status, "status_reason": o.status_reason, "version": 1 + o.changes}
                for o in new
            ]
            writes += [f"new_orders AS ({_INSERT_ORDERS})", f"new_lines AS ({_INSERT_LINES})"]
            params |= {"orders": json_rows(rows), "lines": json_rows(self._lines)}
        changed = [o for o in self._orders.values() if o.changes and not o.new]
        if changed:
            writes.append(f"changed_orders AS ({_UPDATE_ORDERS})")
            params |= {
                "order_id": [o.order_id for o in changed],
                "status": [str(o.status) for o in changed],
                "reason": [o.status_reason for o in changed],
                "changes": [o.changes for o in changed],
            }
        moved = sorted(s for s, now in self._stock.items() if now != self._stock_before[s])
        if moved:
            writes.append(f"moved_stock AS ({_UPDATE_STOCK})")
            params |= {
                "sku": moved,
                "on_hand": [self._stock[s].on_hand for s in moved],
                "reserved": [self._stock[s].reserved for s in moved],
            }
        if self._movements:
            writes.append(f"movements AS ({_INSERT_MOVEMENTS})")
            params["movements"] = json_rows(self._movements)
        if self._ledger:
            writes.append(f"ledger AS ({_INSERT_LEDGER})")
            params["ledger"] = json_rows(self._ledger)
        if not writes:
            return
        statement = f"WITH {', '.join(writes)} SELECT " + (
            "(SELECT count(*) FROM new_orders)" if new else "0"
        )
        row = execute_raw(self._conn, statement, params).fetchone()
        assert row is not None  # the statement's SELECT returns one row
        if new and row[0] != len(new):
            raise BatchRace(f"{len(new) - row[0]} orders were inserted meanwhile")

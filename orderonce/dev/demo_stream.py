"""The demo's order stream: realistic, seeded, and with the duplicates shops really see.

Pure: it builds event bodies and says what each publication is; publishing and checking are
``orderonce.dev.demo``'s job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from producers.publisher import build_event, to_json
from schemas import CloudEvent

Kind = Literal["event", "producer_retry", "checkout_retry", "double_click"]


@dataclass(frozen=True)
class Publication:
    body: str
    kind: Kind
    key: tuple[str, str]


@dataclass
class DemoStream:
    run: str
    restocks: list[Publication] = field(default_factory=list)
    publications: list[Publication] = field(default_factory=list)

    @property
    def unique_events(self) -> int:
        keys = {p.key for p in self.restocks} | {p.key for p in self.publications}
        return len(keys)

    @property
    def producer_retries(self) -> int:
        return sum(p.kind == "producer_retry" for p in self.publications)

    # (second order id, first order id) of customers who placed one order twice
    double_clicks: list[tuple[str, str]] = field(default_factory=list)

    @property
    def checkout_retries(self) -> int:
        return sum(p.kind == "checkout_retry" for p in self.publications)

    @property
    def sources_prefix(self) -> str:
        return f"demo/{self.run}/"


SKUS = [f"SKU-{n:03d}" for n in range(1, 31)]


def _price(sku: str) -> Decimal:
    return Decimal(int(sku[-3:]) * 137 % 4000 + 199) / 100


def build_stream(run: str, orders: int, duplicate_rate: float, seed: int = 1) -> DemoStream:
    rng = random.Random(seed)
    stream = DemoStream(run)
    start = datetime.now(UTC)
    limited = f"LTD-{run}"  # a scarce item: some orders will be rejected as out of stock
    src = {name: f"demo/{run}/{name}" for name in ("warehouse", "checkout", "payments")}

    def event(
        type_: str,
        data: dict[str, Any],
        source: str,
        at: float,
        subject: str | None = None,
        key: str | None = None,
    ) -> CloudEvent:
        return build_event(
            type_,
            data,
            source=src[source],
            subject=subject,
            time=start + timedelta(milliseconds=at),
            idempotency_key=key,
        )

    demand = 5 * orders // len(SKUS) + 20  # ample: only the limited item runs out
    for n, sku in enumerate([*SKUS, limited]):
        qty = max(5, orders // 100) if sku == limited else demand
        restock = event("inventory.restocked", {"sku": sku, "quantity": qty}, "warehouse", n)
        stream.restocks.append(Publication(to_json(restock), "event", restock.key))

    timeline: list[tuple[float, Publication]] = []

    def add(at: float, ev: CloudEvent, kind: Kind = "event") -> None:
        timeline.append((at, Publication(to_json(ev), kind, ev.key)))
        if kind == "event" and rng.random() < duplicate_rate:
            # A producer that timed out on the broker and sent the very same event again.
            timeline.append(
                (at + rng.uniform(0, 30), Publication(to_json(ev), "producer_retry", ev.key))
            )

    for i in range(orders):
        order_id = f"{run}-{i:06d}"
        at = float(i)
        lines = [
            (sku, rng.randint(1, 3), _price(sku)) for sku in rng.sample(SKUS, rng.randint(1, 3))
        ]
        if rng.random() < 0.05:
            lines[0] = (limited, 1, Decimal("99.00"))
        total = sum((price * qty for _, qty, price in lines), start=Decimal("0.00"))
        items = [{"sku": s, "quantity": q, "unit_price": f"{p:.2f}"} for s, q, p in lines]
        data = {
            # One customer per order: equal baskets of one customer are suspects by design, and
            # the demo's suspects should be the double clicks it planted.
            "customer_id": f"C-{run}-{i:06d}",
            "currency": "EUR",
            "items": items,
        }
        key = f"checkout-{order_id}"  # the checkout session's token
        add(at, event("order.created", data, "checkout", at, order_id, key))
        doubled = rng.random()
        if doubled < 0.02:
            # The shop's client timed out and submitted the checkout again: a new message.
            again = at + rng.uniform(0.1, 3)
            add(
                again,
                event("order.created", data, "checkout", again, order_id, key),
                "checkout_retry",
            )
        elif doubled < 0.04:
            # The customer clicked "buy" twice and got two order numbers for one order.
            again = at + rng.uniform(2, 10)
            twin = f"{order_id}-2"
            add(
                again,
                event("order.created", data, "checkout", again, twin, f"{key}-2"),
                "double_click",
            )
            stream.double_clicks.append((twin, order_id))
        fate = rng.random()
        money = {"amount": f"{total:.2f}", "currency": "EUR"}
        t = at + rng.uniform(1, 40)
        if fate < 0.08:
            add(t, event("order.cancelled", {"reason": "changed my mind"}, "checkout", t, order_id))
            continue
        if fate < 0.15:
            continue  # never paid: stays created, its stock reserved
        add(
            t,
            event(
                "order.paid", {"payment_id": f"PAY-{order_id}", **money}, "payments", t, order_id
            ),
        )
        t += rng.uniform(1, 40)
        if fate < 0.22:
            add(t, event("order.cancelled", {"reason": "out of patience"}, "checkout", t, order_id))
        elif fate < 0.90:
            add(
                t,
                event(
                    "order.shipped", {"shipment_id": f"SHP-{order_id}"}, "warehouse", t, order_id
                ),
            )
            if fate > 0.86:
                t += rng.uniform(1, 40)
                add(
                    t,
                    event(
                        "order.refunded",
                        {"refund_id": f"REF-{order_id}", **money},
                        "payments",
                        t,
                        order_id,
                    ),
                )
    timeline.sort(key=lambda item: item[0])
    stream.publications = [p for _, p in timeline]
    return stream

"""Looking at orders and acting on them: show, release, cancel; stock, figures, verify."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from orderonce.cli.common import JsonFlag, console, engine, print_json, table, urls


def order_show(order_id: str, as_json: JsonFlag = False) -> None:
    """An order: status, lines, totals and the events applied to it."""
    from worker.ops import reports

    with engine().connect() as conn:
        found = reports.order(conn, order_id)
    if found is None:
        console.print(f"no order {order_id}")
        raise typer.Exit(1)
    if as_json:
        print_json(found)
        return
    console.print(
        f"[bold]{order_id}[/] {found['status']} total {found['total']} "
        f"{found['currency']} customer {found['customer_id']}"
    )
    if found.get("duplicate_of"):
        console.print(f"suspected duplicate of order {found['duplicate_of']}")
    for title in ("lines", "events", "ledger", "duplicates", "deferred"):
        rows = found[title]
        if rows:
            console.print(table(title, rows))


OPERATOR_SOURCE = "orderonce/operator"


def _operator_event(
    action: str, type_: str, order_id: str, reason: str, wait: bool, as_json: bool
) -> None:
    """Publish an operator's decision as an event, so it too takes effect exactly once: its id
    is derived from the order, so running the command twice is a duplicate, not a second act."""
    import time

    from sqlalchemy import text

    from orderonce.config import settings
    from producers import Publisher, build_event

    event = build_event(
        type_,
        {"reason": reason},
        source=OPERATOR_SOURCE,
        subject=order_id,
        id=f"{action}/{order_id}",
    )
    db = engine()

    def recorded() -> dict[str, Any] | None:
        with db.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT outcome, reason FROM processed_messages"
                    " WHERE source = :s AND event_id = :e"
                ),
                {"s": OPERATOR_SOURCE, "e": event.id},
            ).first()
        return None if row is None else {"outcome": row.outcome, "reason": row.reason}

    result: dict[str, Any] = {"event_id": event.id, "order_id": order_id, "outcome": "published"}
    # Done before: say so. (Publishing again would change nothing either; looking first is what
    # lets us tell the operator.)
    if (before := recorded()) is not None:
        result |= before | {"repeated": True}
        wait = False
    else:
        publisher = Publisher(urls().broker_url, settings(), outbox_engine=db)
        try:
            publisher.publish(event)
        finally:
            publisher.close()
    if wait:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (now := recorded()) is not None:
                result |= now | {"repeated": False}
                break
            time.sleep(0.2)
        else:
            result["outcome"] = "pending: no worker handled it within 30 s"
    if as_json:
        print_json(result)
    else:
        again = " (this was done before: nothing changed)" if result.get("repeated") else ""
        reason_text = f" ({result['reason']})" if result.get("reason") else ""
        console.print(f"{type_} {order_id}: {result['outcome']}{reason_text}{again}")
    if result["outcome"] == "rejected":
        raise typer.Exit(1)


def order_release(
    order_id: str,
    reason: Annotated[str, typer.Option(help="Why it is genuine.")] = "released by an operator",
    wait: Annotated[bool, typer.Option(help="Wait for a worker to apply it.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Release a held order (a suspected duplicate that is genuine): reserve its stock and
    apply its deferred follow-ups."""
    _operator_event("release", "order.released", order_id, reason, wait, as_json)


def order_cancel(
    order_id: str,
    reason: Annotated[str, typer.Option(help="Why.")] = "cancelled by an operator",
    wait: Annotated[bool, typer.Option(help="Wait for a worker to apply it.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Cancel an order (a held duplicate, or any order not yet shipped)."""
    _operator_event("cancel", "order.cancelled", order_id, reason, wait, as_json)


def inventory(as_json: JsonFlag = False) -> None:
    """Stock per SKU: on hand and reserved."""
    from worker.ops import reports

    with engine().connect() as conn:
        rows = reports.inventory(conn)
    if as_json:
        print_json(rows)
    else:
        console.print(table("inventory", rows))


def stats(as_json: JsonFlag = False) -> None:
    """Events processed by outcome, duplicates, rejections, dead letters, orders by status,
    throughput, and the broker's backlog."""
    from orderonce.config import settings
    from worker.ops import reports

    with engine().connect() as conn:
        figures = reports.stats(conn, broker_url=urls().broker_url, queue=settings().queue)
    if as_json:
        print_json(figures)
        return
    for key, value in figures.items():
        if isinstance(value, dict):
            console.print(table(key, [{"key": k, "value": v} for k, v in value.items()]))
        else:
            console.print(f"{key}: {value}")


def verify(as_json: JsonFlag = False) -> None:
    """Check from the database alone: nothing applied twice, ledger balanced, stock conserved."""
    from worker.ops import reports

    with engine().connect() as conn:
        checks = reports.verify(conn)
    ok = all(c.ok for c in checks)
    if as_json:
        print_json({"ok": ok, "checks": [c.__dict__ for c in checks]})
    else:
        for c in checks:
            console.print(f"{'[green]ok  [/]' if c.ok else '[red]FAIL[/]'} {c.name}: {c.detail}")
    raise typer.Exit(0 if ok else 1)

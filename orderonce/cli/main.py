"""The ``orderonce`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from orderonce.cli.common import JsonFlag, console, engine, print_json, urls
from orderonce.cli.dead_letters import app as dead_letters_app

app = typer.Typer(help="Order events applied exactly once.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
order_app = typer.Typer(help="Look at orders.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(order_app, name="order")
app.add_typer(dead_letters_app, name="dead-letters")


@app.callback()
def _load_settings() -> None:
    """Refuse to run at all with settings that would break a guarantee."""
    from pydantic import ValidationError

    from orderonce.config import settings
    from orderonce.errors import UnsafeSettings

    try:
        settings()
    except (UnsafeSettings, ValidationError) as exc:
        console.print(f"[red]refusing to start:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the latest version."""
    from worker.store.migrate import upgrade

    upgrade(engine())
    console.print("database schema is up to date")


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork or solo.")] = "prefork",
    name: Annotated[str | None, typer.Option(help="Worker node name.")] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    metrics_port: Annotated[
        int, typer.Option(help="Serve Prometheus metrics on this port (0: off).", min=0, max=65535)
    ] = 0,
    shard: Annotated[
        int | None,
        typer.Option(
            help="With ORDERONCE_ORDERED_QUEUES=N: consume ordered queue I only (0..N-1), "
            "one event at a time.",
            min=0,
        ),
    ] = None,
    buffered: Annotated[
        int | None,
        typer.Option(
            help="Buffered mode: apply up to N single-event messages per transaction "
            "(needs --pool solo; default: ORDERONCE_BUFFERED, 0 = off).",
            min=0,
        ),
    ] = None,
) -> None:
    """Run a Celery worker that applies events exactly once."""
    import os

    from orderonce import logs
    from orderonce.config import settings

    if buffered is not None:
        # Before the Celery app is built: its prefetch is the buffer's size.
        os.environ["ORDERONCE_BUFFERED"] = str(buffered)
        settings.cache_clear()
    if settings().buffered and (pool != "solo" or concurrency != 1):
        console.print(
            "[red]buffered mode applies events in the consumer's own process:[/] "
            "run it with --pool solo --concurrency 1 (one worker process per core)"
        )
        raise typer.Exit(2)
    queue = _worker_queue(shard)
    if queue is not None:
        # One order's events in sequence: one message at a time, in one process.
        pool, concurrency = "solo", 1
    logs.configure(loglevel)
    servers = urls()
    if metrics_port:
        from worker.ops import metrics

        # Before the app is built and the pool forks: every process must find the
        # multiprocess directory in its environment before it first touches prometheus_client.
        metrics.setup_multiprocess_dir()
        try:
            metrics.serve(metrics_port, servers.database_url)
        except OSError as exc:
            console.print(f"[red]cannot serve metrics on port {metrics_port}:[/] {exc}")
            raise typer.Exit(1) from None
    from worker.messaging.app import create_app

    argv = [
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if name:
        argv.append(f"--hostname={name}")
    if queue is not None:
        argv.append(f"--queues={queue}")
    create_app(settings(), servers).worker_main(argv)


def _worker_queue(shard: int | None) -> str | None:
    """The one ordered queue this worker consumes; None when ordering is off."""
    from orderonce.config import settings
    from worker.messaging.routing import shard_queue

    count = settings().ordered_queues
    if count == 0:
        if shard is not None:
            console.print("[red]--shard needs ORDERONCE_ORDERED_QUEUES set[/]")
            raise typer.Exit(2)
        return None
    if shard is None or shard >= count:
        console.print(
            f"[red]ORDERONCE_ORDERED_QUEUES={count}: start each worker with --shard I, "
            f"I in 0..{count - 1}, one worker per shard[/]"
        )
        raise typer.Exit(2)
    return shard_queue(settings().queue, shard)


@app.command()
def relay(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Send outbox events again until each has a terminal record (nothing lost by a broker)."""
    import signal
    import threading
    from datetime import timedelta

    from orderonce import logs
    from orderonce.config import settings
    from producers import Publisher
    from producers.relay import relay_once, run

    logs.configure(loglevel)
    s = settings()
    publisher = Publisher(urls().broker_url, s)
    resend_after = timedelta(seconds=s.relay_resend_after_s)

    def send(body: str) -> None:
        publisher.send(body, retry=False)  # a failed send is retried by the next pass

    try:
        if once:
            done = relay_once(
                engine(), send, batch_size=s.relay_batch_size, resend_after=resend_after
            )
            console.print(f"relay: {done.sent} sent, {done.settled} settled")
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        console.print("relay running")
        run(
            engine(),
            send,
            batch_size=s.relay_batch_size,
            resend_after=resend_after,
            interval_s=s.relay_interval_s,
            stop=stop,
        )
    finally:
        publisher.close()


@app.command()
def chaos(
    events: Annotated[
        int, typer.Option(help="Events to publish (copies and hostile input on top).")
    ] = 100_000,
    seed: Annotated[int, typer.Option(help="Seed of the workload and the fault schedule.")] = 1,
    profile: Annotated[str, typer.Option(help="full (every fault, relay on) or control.")] = "full",
    variant: Annotated[
        str, typer.Option(help="correct, or a deliberately broken worker (negative control).")
    ] = "correct",
    drain_timeout: Annotated[float, typer.Option(help="Seconds to wait for the drain.")] = 600.0,
    batch: Annotated[
        bool, typer.Option("--batch", help="Publish batch messages of 20 events (batch mode).")
    ] = False,
    broker_url: Annotated[
        str | None,
        typer.Option(help="A RabbitMQ URL to use as the broker (default: a private Redis)."),
    ] = None,
    buffered: Annotated[
        int, typer.Option(help="Run the workers in buffered mode with this buffer (0: off).")
    ] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep servers' data, logs and the publish log here.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Try to break exactly-once: real workers, private PostgreSQL and Redis, seeded faults
    (kills, pauses, restarts, lock wipes, copies, hostile input); exit 1 unless all checks hold."""
    import signal

    from orderonce.dev.chaos.runner import ChaosOptions, run

    if profile not in ("full", "control"):
        console.print("[red]--profile must be full or control[/]")
        raise typer.Exit(2)

    def interrupted(signum: int, _frame: object) -> None:
        # Unwind through the harness's cleanup: its workers and servers must not outlive it.
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    report = run(
        ChaosOptions(
            events=events,
            seed=seed,
            profile=profile,  # type: ignore[arg-type]  # checked above
            variant=variant,
            drain_timeout_s=drain_timeout,
            workdir=workdir,
            batch=batch,
            broker_url=broker_url,
            buffered=buffered,
        )
    )
    if out is not None:
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if as_json:
        print_json(report)
    else:
        _print_chaos(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _print_chaos(report: dict[str, Any]) -> None:
    table = Table(
        title=f"chaos run: {report['variant']} ({report['profile']}, seed {report['seed']})"
    )
    table.add_column("check")
    table.add_column("result")
    for f in report["findings"]:
        table.add_row(f["name"], "[green]ok[/]" if f["ok"] else f"[red]{f['detail']}[/]")
    console.print(table)
    for key in (
        "events_published",
        "publish_attempts",
        "attempt_outcomes",
        "faults",
        "failpoint_hits",
        "sigkills",
        "worker_deaths",
        "snapshots_checked",
        "publish_s",
        "drain_s",
        "deliveries_per_event",
        "max_deliveries",
    ):
        console.print(f"{key}: {report[key]}", highlight=False)


@app.command()
def publish(
    file: Annotated[str, typer.Argument(help="JSON lines of CloudEvents, or - for stdin.")] = "-",
    batch_size: Annotated[
        int,
        typer.Option(help="Events per message (batch mode); 1: one message per event.", min=1),
    ] = 1,
    as_json: JsonFlag = False,
) -> None:
    """Publish CloudEvents (one JSON object per line) to the broker."""
    from orderonce.config import settings
    from producers import Publisher

    stream = sys.stdin if file == "-" else Path(file).open(encoding="utf-8")  # noqa: SIM115
    publisher = Publisher(urls().broker_url, settings(), outbox_engine=engine())
    published = skipped = 0
    pending: list[str] = []

    def send() -> None:
        if batch_size == 1:
            publisher.publish_raw(pending[0])
        else:
            publisher.publish_raw_batch(pending)
        pending.clear()

    try:
        for line in stream:
            if line.strip():
                # Sent as-is: validating is the worker's job, and it dead-letters bad input
                # with a reason instead of losing it here.
                pending.append(line.strip())
                published += 1
                if len(pending) == batch_size:
                    send()
            else:
                skipped += 1
        if pending:
            send()
    finally:
        publisher.close()
    summary = {"published": published, "blank_lines": skipped}
    if as_json:
        print_json(summary)
    else:
        console.print(f"published {published} events")


@order_app.command("show")
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
            console.print(_table(title, rows))


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


@order_app.command("release")
def order_release(
    order_id: str,
    reason: Annotated[str, typer.Option(help="Why it is genuine.")] = "released by an operator",
    wait: Annotated[bool, typer.Option(help="Wait for a worker to apply it.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Release a held order (a suspected duplicate that is genuine): reserve its stock and
    apply its deferred follow-ups."""
    _operator_event("release", "order.released", order_id, reason, wait, as_json)


@order_app.command("cancel")
def order_cancel(
    order_id: str,
    reason: Annotated[str, typer.Option(help="Why.")] = "cancelled by an operator",
    wait: Annotated[bool, typer.Option(help="Wait for a worker to apply it.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Cancel an order (a held duplicate, or any order not yet shipped)."""
    _operator_event("cancel", "order.cancelled", order_id, reason, wait, as_json)


@app.command()
def inventory(as_json: JsonFlag = False) -> None:
    """Stock per SKU: on hand and reserved."""
    from worker.ops import reports

    with engine().connect() as conn:
        rows = reports.inventory(conn)
    if as_json:
        print_json(rows)
    else:
        console.print(_table("inventory", rows))


@app.command()
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
            console.print(_table(key, [{"key": k, "value": v} for k, v in value.items()]))
        else:
            console.print(f"{key}: {value}")


@app.command()
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


@app.command()
def health(
    timeout: Annotated[float, typer.Option(help="Seconds allowed per check.", min=0.1)] = 3.0,
    as_json: JsonFlag = False,
) -> None:
    """Check PostgreSQL (schema at head), the lock Redis and the broker; exit status 1 if any
    fails (for readiness probes)."""
    from worker.ops import health as checks

    try:
        servers = urls()
    except Exception as exc:  # settings, or an embedded server that would not start
        results = [checks.CheckResult("config", False, f"{type(exc).__name__}: {exc}", 0.0)]
    else:
        results = checks.run_all(servers, timeout)
    ok = all(r.ok for r in results)
    if as_json:
        print_json({"ok": ok, "checks": [r.__dict__ for r in results]})
    else:
        for r in results:
            mark = "[green]ok  [/]" if r.ok else "[red]FAIL[/]"
            console.print(f"{mark} {r.name}: {r.detail} ({r.seconds:.3f} s)", highlight=False)
    raise typer.Exit(0 if ok else 1)


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option(help="Move rows processed longer ago than this: 30d, 12h, 90m.")
    ],
    dry_run: Annotated[bool, typer.Option(help="Only count what would be moved.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Move old processed-messages rows to tombstones, which still catch late duplicates
    (worker/ops/retention.py); delete outbox rows settled as long ago. Deferred events are kept."""
    from orderonce.config import settings
    from worker.ops import retention
    from worker.store import outbox

    try:
        age = retention.parse_duration(older_than)
        report = retention.prune(
            engine(),
            age,
            statement_timeout_s=settings().statement_timeout_ms / 1000,
            dry_run=dry_run,
        )
    except ValueError as exc:  # a bad duration, or settings prune cannot be safe with
        console.print(f"[red]refusing to prune:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    outbox_rows = outbox.prune_settled(engine(), age, dry_run=dry_run)
    if as_json:
        print_json(report.__dict__ | {"outbox_rows_deleted": outbox_rows})
        return
    verb = "would move" if dry_run else "moved"
    console.print(
        f"{verb} {report.moved} processed rows from before {report.cutoff:%Y-%m-%d %H:%M:%S %Z}"
        f" to tombstones; kept {report.kept_deferred} deferred"
        + (" (dry run: nothing changed)" if dry_run else f" ({report.batches} batches)"),
        highlight=False,
    )
    deleted = "would delete" if dry_run else "deleted"
    console.print(f"{deleted} {outbox_rows} settled outbox rows", highlight=False)


@app.command()
def demo(
    orders: Annotated[int, typer.Option(help="Orders to place.", min=1)] = 2000,
    workers: Annotated[int, typer.Option(help="Worker processes.", min=1)] = 2,
    duplicate_rate: Annotated[
        float, typer.Option(help="Share of events a producer sends twice.", min=0, max=1)
    ] = 0.1,
    chaos: Annotated[bool, typer.Option(help="Kill a worker with SIGKILL mid-run.")] = True,
    keep: Annotated[bool, typer.Option(help="Leave the embedded servers running.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the order stream.")] = 1,
    as_json: JsonFlag = False,
) -> None:
    """Run the main job end to end and check that every event took effect exactly once."""
    from orderonce.config import settings
    from orderonce.dev import demo as demo_run

    options = demo_run.Options(
        orders=orders,
        workers=workers,
        duplicate_rate=duplicate_rate,
        chaos=chaos,
        keep=keep,
        seed=seed,
    )
    s = settings()
    embedded = s.database_url is None or s.redis_url is None
    if embedded and not as_json:
        console.print(
            f"no ORDERONCE_*_URL set: using the embedded PostgreSQL and Redis under {s.state_dir}/"
        )
    try:
        report = demo_run.run(options, urls(), console, show_live=not as_json)
    finally:
        if embedded and not keep:
            from orderonce.dev.embedded import stop_servers

            stop_servers(s.state_dir.resolve())
    if as_json:
        print_json(report)
    else:
        console.print()
        demo_run.render(report, console)
        if keep:
            console.print(
                "servers left running: try `orderonce stats`, `orderonce inventory`, "
                f"`orderonce order show {report['run']}-000001`; `orderonce down` "
                "stops them."
            )
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def down() -> None:
    """Stop the embedded PostgreSQL and Redis, if they are running."""
    from orderonce.config import settings
    from orderonce.dev.embedded import stop_servers

    stopped = stop_servers(settings().state_dir.resolve())
    console.print("embedded servers stopped" if stopped else "no embedded servers were running")


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in rows[0] if rows else []:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table

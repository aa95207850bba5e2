"""Keeping it running: the schema, health probes, retention."""

from __future__ import annotations

from typing import Annotated

import typer

from orderonce.cli.common import JsonFlag, console, engine, print_json, urls


def db_upgrade() -> None:
    """Create or migrate the schema to the latest version."""
    from worker.store.migrate import upgrade

    upgrade(engine())
    console.print("database schema is up to date")


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

"""Development and demonstration: the demo, the chaos harness, the embedded servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from orderonce.cli.common import JsonFlag, console, print_json, urls


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


def down() -> None:
    """Stop the embedded PostgreSQL and Redis, if they are running."""
    from orderonce.config import settings
    from orderonce.dev.embedded import stop_servers

    stopped = stop_servers(settings().state_dir.resolve())
    console.print("embedded servers stopped" if stopped else "no embedded servers were running")


def chaos(
    events: Annotated[
        int, typer.Option(help="Events to publish (copies and hostile input on top).")
    ] = 100_000,
    seed: Annotated[int, typer.Option(help="Seed of the workload and the fault schedule.")] = 1,
    profile: Annotated[
        str,
        typer.Option(
            help="full (every fault, relay on), control, or no-outbox (straight to the broker, "
            "frequent SIGKILLs, no relay)."
        ),
    ] = "full",
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
    kombu_worker: Annotated[
        bool,
        typer.Option(
            "--kombu-worker",
            help="no-outbox: one more worker, on kombu's own Redis transport, never killed.",
        ),
    ] = False,
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

    if profile not in ("full", "control", "no-outbox"):
        console.print("[red]--profile must be full, control or no-outbox[/]")
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
            kombu_worker=kombu_worker,
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

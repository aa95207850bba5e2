"""Running the system: workers, the relay, publishing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from orderonce.cli.common import JsonFlag, console, engine, print_json, urls


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

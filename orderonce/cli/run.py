"""Running the system: workers, the relay, publishing, the HTTP front door."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from orderonce.cli.common import JsonFlag, console, engine, print_json, urls

POOLS = ("buffered", "prefork", "solo")
DEFAULT_BUFFER = 100  # events per transaction in the buffered pool, unless told otherwise


def worker(
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="Worker processes (default: one per CPU this process may use: its affinity, "
            "capped by a container's CPU limit).",
            min=1,
        ),
    ] = None,
    pool: Annotated[
        str,
        typer.Option(
            help="buffered: one buffered consumer process per --concurrency, supervised "
            "(many events per transaction); prefork or solo: Celery's pools, one event per "
            "transaction."
        ),
    ] = "buffered",
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
            help="Events per transaction at most: the buffered pool's buffer size (default: "
            f"ORDERONCE_BUFFERED, else {DEFAULT_BUFFER}); with --pool solo, buffers that one "
            "process.",
            min=0,
        ),
    ] = None,
) -> None:
    """Run the workers that apply events exactly once."""
    from orderonce import logs
    from orderonce.config import settings
    from orderonce.cpus import usable_cpus

    if pool not in POOLS:
        console.print(f"[red]--pool must be one of {', '.join(POOLS)}[/]")
        raise typer.Exit(2)
    queue = _worker_queue(shard)
    if queue is not None:
        # One order's events in sequence: one message at a time, in one process.
        pool, concurrency = "solo", 1
    cpus = usable_cpus()
    concurrency = concurrency or cpus
    logs.configure(loglevel)
    servers = urls()
    if pool == "buffered":
        if concurrency > cpus:
            logging.getLogger(__name__).warning(
                "%d consumer processes on %d CPUs: more consumers than CPUs drain slower, not"
                " faster (docs/performance.md); the default is one per CPU",
                concurrency,
                cpus,
            )
        size = buffered or settings().buffered or DEFAULT_BUFFER
        _use_buffer(size)  # refused here, not by each consumer it would start
        _supervise(concurrency, size, name, loglevel, metrics_port, servers.database_url)
        return
    if buffered is not None:
        # Before the Celery app is built: its prefetch is the buffer's size.
        _use_buffer(buffered)
    if settings().buffered and (pool != "solo" or concurrency != 1):
        console.print(
            "[red]buffered mode applies events in the consumer's own process:[/] "
            "run it with --pool buffered (the default), or --pool solo --concurrency 1"
        )
        raise typer.Exit(2)
    from worker.messaging.supervisor import follow_supervisor

    follow_supervisor()
    if metrics_port:
        _serve_metrics(metrics_port, servers.database_url)
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


def _use_buffer(size: int) -> None:
    """This process's (and its children's) buffer size, checked like every setting at start."""
    import os

    from pydantic import ValidationError

    from orderonce.config import settings
    from orderonce.errors import UnsafeSettings

    os.environ["ORDERONCE_BUFFERED"] = str(size)
    settings.cache_clear()
    try:
        settings()
    except (UnsafeSettings, ValidationError) as exc:
        console.print(f"[red]refusing to start:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _serve_metrics(port: int, database_url: str) -> None:
    from worker.ops import metrics

    # Before the app is built and the pool forks (or the supervisor starts its children):
    # every process must find the multiprocess directory in its environment before it first
    # touches prometheus_client.
    metrics.setup_multiprocess_dir()
    try:
        metrics.serve(port, database_url)
    except OSError as exc:
        console.print(f"[red]cannot serve metrics on port {port}:[/] {exc}")
        raise typer.Exit(1) from None


def _supervise(
    concurrency: int,
    size: int,
    name: str | None,
    loglevel: str,
    metrics_port: int,
    database_url: str,
) -> None:
    """The buffered pool: ``concurrency`` single-process buffered workers, supervised."""
    from worker.messaging.supervisor import Supervisor
    from worker.ops import metrics

    if metrics_port:
        _serve_metrics(metrics_port, database_url)
    base, _, host = (name or "orderonce@%h").partition("@")
    argvs = [
        [
            sys.executable,
            "-m",
            "orderonce",
            "worker",
            "--pool=solo",
            "--concurrency=1",
            f"--buffered={size}",
            f"--loglevel={loglevel}",
            f"--name={base}-{i}@{host or '%h'}",
        ]
        for i in range(concurrency)
    ]
    raise typer.Exit(Supervisor(argvs, on_exit=metrics.process_exited).run())


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
    """Send outbox events again until each has a terminal record (nothing lost by a broker);
    never what the broker still holds."""
    import signal
    import threading
    from datetime import datetime, timedelta

    from orderonce import logs
    from orderonce.config import settings
    from producers import Publisher
    from producers.relay import horizon, relay_once, run
    from worker.messaging.broker import backlog, task_queue_names

    logs.configure(loglevel)
    s = settings()
    servers = urls()
    publisher = Publisher(servers.broker_url, s)
    resend_after = timedelta(seconds=s.relay_resend_after_s)
    queues, max_hold = task_queue_names(s), timedelta(seconds=s.relay_max_hold_s)

    def send(body: str) -> None:
        publisher.send(body, retry=False)  # a failed send is retried by the next pass

    def current_horizon() -> datetime | None:
        try:
            waiting = backlog(servers.broker_url, queues)
        except Exception:  # the broker is down: the sends will fail and be tried again
            return None
        return horizon(waiting, max_hold)

    try:
        if once:
            done = relay_once(
                engine(),
                send,
                batch_size=s.relay_batch_size,
                resend_after=resend_after,
                horizon=current_horizon(),
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
            horizon=current_horizon,
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
    """Publish CloudEvents, one JSON object per line, through the outbox. Each line is checked
    and sent as it arrives; a bad one is reported on stderr with its number and reason and not
    sent. Exit status 1 when any line was bad."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn

    from orderonce.config import settings
    from producers import Publisher
    from producers.lines import lines_of

    s = settings()
    try:
        stream = sys.stdin.buffer if file == "-" else Path(file).open("rb")  # noqa: SIM115
    except OSError as exc:
        console.print(f"[red]cannot read {file}:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    errors = Console(stderr=True)
    total = None if file == "-" else Path(file).stat().st_size
    progress = Progress(
        TextColumn("publishing"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} bytes"),
        TransferSpeedColumn(),
        console=errors,
        disable=as_json or not errors.is_terminal,
    )
    publisher = Publisher(urls().broker_url, s, outbox_engine=engine())
    published = refused = 0
    pending: list[str] = []

    def send() -> None:
        if len(pending) == 1:
            publisher.publish_raw(pending[0])
        else:
            publisher.publish_raw_batch(pending)
        pending.clear()

    try:
        with progress:
            task = progress.add_task("publish", total=total)
            for line in lines_of(stream, s.max_body_bytes):
                progress.update(task, completed=stream.tell() if total else None)
                if line.body is None:
                    refused += 1
                    errors.print(f"line {line.number}: {line.refusal}", highlight=False)
                    continue
                pending.append(line.body)
                published += 1
                if len(pending) >= batch_size:
                    send()
            if pending:
                send()
    finally:
        publisher.close()
        if stream is not sys.stdin.buffer:
            stream.close()
    summary = {"published": published, "refused": refused}
    if as_json:
        print_json(summary)
    else:
        console.print(
            f"published {published} events" + (f", refused {refused} lines" if refused else "")
        )
    if refused:
        raise typer.Exit(1)


def ingest(
    host: Annotated[str, typer.Option(help="Address to serve.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve.", min=1, max=65535)] = 8080,
    publish: Annotated[
        bool,
        typer.Option(
            help="Publish what was stored right after each commit (--no-publish: leave it "
            "to `orderonce relay`)."
        ),
    ] = True,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Serve the CloudEvents HTTP front door: POST /events (structured, binary, batched). A 2xx
    means the events are durable (committed to the outbox); each takes effect exactly once."""
    import uvicorn

    from orderonce import logs
    from orderonce.config import settings
    from orderonce.errors import UnsafeSettings
    from orderonce.heap import freeze_startup_heap
    from producers import Publisher
    from producers.ingest.app import create_app
    from producers.ingest.auth import is_loopback, parse_tokens
    from worker.ops.health import check_postgres

    s = settings()
    try:
        grants = parse_tokens(s.ingest_tokens.get_secret_value() if s.ingest_tokens else None)
    except UnsafeSettings as exc:
        console.print(f"[red]refusing to start:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if not grants and not is_loopback(host):
        console.print(
            f"[red]refusing to serve {host} without ORDERONCE_INGEST_TOKENS:[/] anyone who can "
            "reach it could publish orders. Set tokens, or serve 127.0.0.1 behind a proxy."
        )
        raise typer.Exit(2)
    servers = urls()
    schema = check_postgres(servers.database_url)
    if not schema.ok:
        console.print(f"[red]refusing to start:[/] {schema.detail}", highlight=False)
        raise typer.Exit(2)
    logs.configure(loglevel)
    publisher = None
    if publish and not s.ordered_queues:
        # Batch messages go to the one queue; with ordered queues the relay routes each event.
        publisher = Publisher(servers.broker_url, s)
    try:
        app = create_app(s, servers, publish=publisher.send_batch if publisher else None)
        # In bench.ingest p99 for single events fell from about 60 to 25 ms, batches gained ~20%.
        freeze_startup_heap()
        console.print(f"front door on http://{host}:{port}/events (API: /docs, /openapi.json)")
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_config=None,
            log_level=loglevel.lower(),
            access_log=False,
            server_header=False,
        )
    finally:
        if publisher is not None:
            publisher.close()

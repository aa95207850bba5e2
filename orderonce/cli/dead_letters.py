"""``orderonce dead-letters``: look at, replay and discard input that could not be applied.

The logic is in worker/ops/dead_letter_admin.py; this is only the command line around it.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from orderonce.cli.common import JsonFlag, console, engine, print_json, urls
from orderonce.errors import DeadLetterError

app = typer.Typer(
    help="Input that could not be applied: list, show, replay, discard.", no_args_is_help=True
)
# How long replay waits for a worker's outcome, as `order release` does.
REPLAY_WAIT_S = 30.0


class Status(StrEnum):
    open = "open"
    replayed = "replayed"
    discarded = "discarded"
    all = "all"


def _fail(message: str, as_json: bool) -> NoReturn:
    if as_json:
        print_json({"error": message})
    else:
        console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


_COLUMNS = {
    "dead_letter_id": "id",
    "reason": "reason",
    "event_id": "event id",
    "event_type": "type",
    "subject": "subject",
    "attempts": "attempts",
    "first_seen": "first seen",
    "last_seen": "last seen",
    "status": "status",
}


@app.command("list")
def list_(
    reason: Annotated[str | None, typer.Option(help="Only this reason code.")] = None,
    status: Annotated[Status, typer.Option(help="Which ones.")] = Status.open,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Dead letters, newest first (by last seen); open ones unless told."""
    from worker.ops import dead_letter_admin

    with engine().connect() as conn:
        rows = dead_letter_admin.list_dead_letters(
            conn, reason=reason, status=status.value, limit=limit
        )
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print(f"no {'' if status is Status.all else status.value + ' '}dead letters")
        return
    table = Table(title=f"dead letters ({status.value})")
    for column in _COLUMNS.values():
        table.add_column(column)
    for r in rows:
        table.add_row(*(_cell(key, r[key]) for key in _COLUMNS))
    console.print(table)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key.endswith("_seen"):  # ISO 8601 from the database: to the second is enough here
        return str(value)[:19].replace("T", " ")
    return str(value)


@app.command("show")
def show(dead_letter_id: int, as_json: JsonFlag = False) -> None:
    """One dead letter: everything about it, and its body."""
    from worker.ops import dead_letter_admin

    try:
        with engine().connect() as conn:
            found = dead_letter_admin.show(conn, dead_letter_id)
    except DeadLetterError as exc:
        _fail(str(exc), as_json)
    if as_json:
        print_json(found)
        return
    body = found.pop("body")
    for key, value in found.items():
        if value is not None:
            console.print(f"{key}: {value}", markup=False, highlight=False)
    if found["body_truncated"]:
        console.print(
            f"[yellow]body truncated:[/] {found['body_kept_bytes']} of {found['body_size']} "
            f"bytes kept; sha256 of the whole body {found['body_sha256']}",
            highlight=False,
        )
    console.print("body:")
    sys.stdout.write(body + "\n")


@app.command("replay")
def replay(
    dead_letter_id: int,
    as_new: Annotated[
        bool,
        typer.Option(
            "--as-new",
            help="Apply the body under a new event id (replay-<dead letter id>-<its id>), "
            "for an event whose own id is taken by other content.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Send the stored body through the exactly-once pipeline again and wait for the outcome.
    An event already processed changes nothing."""
    from orderonce.config import settings
    from producers import Publisher
    from worker.ops import dead_letter_admin

    publisher = Publisher(urls().broker_url, settings())
    try:
        outcome = dead_letter_admin.replay(
            engine(),
            dead_letter_id,
            publish_raw=publisher.publish_raw,
            publish_event=publisher.publish,
            as_new=as_new,
            max_body_bytes=settings().max_body_bytes,
            timeout_s=REPLAY_WAIT_S,
        )
    except DeadLetterError as exc:
        _fail(str(exc), as_json)
    finally:
        publisher.close()
    if as_json:
        print_json({**outcome.__dict__, "ok": outcome.ok})
    else:
        console.print(
            f"dead letter {dead_letter_id}: {outcome.message}", highlight=False, soft_wrap=True
        )
    raise typer.Exit(0 if outcome.ok else 1)


@app.command("discard")
def discard(
    dead_letter_id: int,
    reason: Annotated[str, typer.Option(help="Why: kept as the audit record.")],
    as_json: JsonFlag = False,
) -> None:
    """Mark a dead letter discarded, with why. The row is kept, never deleted."""
    from worker.ops import dead_letter_admin

    try:
        done = dead_letter_admin.discard(engine(), dead_letter_id, reason)
    except DeadLetterError as exc:
        _fail(str(exc), as_json)
    if as_json:
        print_json(done)
    else:
        console.print(f"dead letter {dead_letter_id} discarded: {reason}", highlight=False)

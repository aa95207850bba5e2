"""The ``orderonce`` command line: every command is registered here, and lives in the module
named beside it (run, orders, operate, dev, dead_letters)."""

from __future__ import annotations

import typer

from orderonce.cli import dev, operate, orders, run
from orderonce.cli.common import console
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


# Running the system.
app.command()(run.worker)
app.command()(run.relay)
app.command()(run.publish)
app.command()(run.ingest)
# Orders.
order_app.command("show")(orders.order_show)
order_app.command("release")(orders.order_release)
order_app.command("cancel")(orders.order_cancel)
app.command()(orders.inventory)
app.command()(orders.stats)
app.command()(orders.verify)
# Operations.
db_app.command("upgrade")(operate.db_upgrade)
app.command()(operate.health)
app.command()(operate.prune)
# Development and demonstration.
app.command()(dev.demo)
app.command()(dev.chaos)
app.command()(dev.down)

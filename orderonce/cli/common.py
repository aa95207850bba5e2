"""What every command shares: the console, ``--json``, and the servers this process uses.

Commands import the rest of orderonce inside their bodies: the worker's modules take about half
a second to import, which ``orderonce --help`` and the small commands should not pay.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from orderonce.config import Urls

console = Console()
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@cache
def urls() -> Urls:
    """The configured servers; where none is configured, the embedded ones (started, or reused
    when already running under the state directory): every command works on a fresh machine."""
    from orderonce.config import settings
    from orderonce.dev.embedded import urls_or_embedded

    return urls_or_embedded(settings())


def engine() -> Engine:
    from orderonce.config import settings
    from worker.store.db import make_engine

    return make_engine(urls().database_url, settings())


def table(title: str, rows: list[dict[str, Any]]) -> Table:
    out = Table(title=title)
    for column in rows[0] if rows else []:
        out.add_column(column)
    for row in rows:
        out.add_row(*(str(v) for v in row.values()))
    return out

"""Write the JSON Schema files in ``schemas/json/`` from the pydantic models, and the API
documents (OpenAPI, AsyncAPI) in ``schemas/api/``.

The pydantic models in ``schemas.events`` are the source of truth; these files are for producers
written in other languages. Output is deterministic (sorted keys, two-space indent, one trailing
newline), so a test can tell when the committed files have gone stale::

    python -m schemas.generate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from schemas import api
from schemas.events import (
    CLOUD_EVENT,
    InventoryRestockedEvent,
    OrderCancelledEvent,
    OrderCreatedEvent,
    OrderPaidEvent,
    OrderRefundedEvent,
    OrderReleasedEvent,
    OrderShippedEvent,
)

JSON_DIR = Path(__file__).resolve().parent / "json"
UNION_FILE = "cloudevent.schema.json"
SUFFIX = ".schema.json"

ENVELOPES: tuple[type[BaseModel], ...] = (
    InventoryRestockedEvent,
    OrderCreatedEvent,
    OrderPaidEvent,
    OrderCancelledEvent,
    OrderShippedEvent,
    OrderRefundedEvent,
    OrderReleasedEvent,
)


def _event_type(envelope: type[BaseModel]) -> str:
    """The CloudEvents ``type`` an envelope class accepts (its ``type`` field's one literal)."""
    annotation = envelope.model_fields["type"].annotation
    values = get_args(annotation)
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{envelope.__name__}.type is not a single string literal")
    return values[0]


def _dump(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


DIALECT = "https://json-schema.org/draft/2020-12/schema"


def standard(schema: Any) -> Any:
    """A pydantic schema with only standard JSON Schema 2020-12 keywords: pydantic's
    ``discriminator`` (an OpenAPI keyword, which strict validators such as Ajv refuse) goes;
    ``oneOf`` on the ``type`` constants says the same."""
    if isinstance(schema, dict):
        return {k: standard(v) for k, v in schema.items() if k != "discriminator"}
    if isinstance(schema, list):
        return [standard(v) for v in schema]
    return schema


def schema_of(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The published form of a schema: standard keywords, its dialect and its id declared."""
    return {"$schema": DIALECT, "$id": name, **standard(schema)}


def render() -> dict[str, str]:
    """File name → file text, for every schema file that belongs in ``schemas/json/``."""
    files = {UNION_FILE: _dump(schema_of(UNION_FILE, CLOUD_EVENT.json_schema()))}
    for envelope in ENVELOPES:
        name = _event_type(envelope) + SUFFIX
        files[name] = _dump(schema_of(name, envelope.model_json_schema()))
    return dict(sorted(files.items()))


def write(directory: Path = JSON_DIR) -> list[Path]:
    """Write every rendered file (only those whose text changed) and return all their paths.

    ``.json`` files that ``render()`` no longer produces are removed, so the directory ends up
    holding exactly the generated set (other files, a README say, are left alone).
    """
    directory.mkdir(parents=True, exist_ok=True)
    rendered = render()
    paths = []
    for name, text in rendered.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    for path in directory.glob("*.json"):
        if path.name not in rendered:
            path.unlink()
    return paths


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Names of files that are missing, differ from ``render()``, or should not be there.

    "Should not be there" means a ``.json`` file that ``render()`` does not produce; ``write()``
    removes exactly those, so running it always leaves nothing stale.
    """
    rendered = render()
    problems = []
    for name, text in rendered.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            problems.append(name)
    if directory.is_dir():
        problems.extend(
            p.name for p in directory.glob("*.json") if p.is_file() and p.name not in rendered
        )
    return sorted(problems)


API_DIR = Path(__file__).resolve().parent / "api"


def render_api() -> dict[str, str]:
    """The API documents (schemas/api.py): OpenAPI for HTTP, AsyncAPI for the broker."""
    return {"asyncapi.json": _dump(api.asyncapi()), "openapi.json": _dump(api.openapi())}


def stale_api(directory: Path = API_DIR) -> list[str]:
    return sorted(
        name
        for name, text in render_api().items()
        if not (directory / name).is_file() or (directory / name).read_text("utf-8") != text
    )


def write_api(directory: Path = API_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_api().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


def main() -> int:
    for path in [*write(), *write_api()]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

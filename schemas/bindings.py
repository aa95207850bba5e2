"""The CloudEvents protocol bindings, as pure functions: what arrives over HTTP or AMQP, in
structured, binary or batched content mode, becomes events in the structured JSON form (a dict
per event), ready for ``schemas.parsing.validate_event``. Or a ``BadEvent`` saying why not, with
the attribute at fault.

- HTTP (CloudEvents HTTP protocol binding 1.0): ``application/cloudevents+json`` (structured),
  ``application/cloudevents-batch+json`` (batched: a JSON array of structured events), or binary:
  attributes in ``ce-*`` headers (percent-encoded), ``Content-Type`` is ``datacontenttype``, the
  body is ``data``.
- AMQP (the AMQP binding, as RabbitMQ hands AMQP 1.0 application properties to an AMQP 0-9-1
  consumer): structured with content type ``application/cloudevents+json``; binary with the
  attributes in headers prefixed ``cloudEvents_`` or ``cloudEvents:`` (and ``ce-``, which the
  CloudEvents SDKs' RabbitMQ bindings use), ``content_type`` is ``datacontenttype``.

Only JSON data is accepted (``datacontenttype`` ``application/json``, with parameters or
without, or none at all): the order events are JSON. A binary-mode attribute keeps the string it
arrived as, so a signature computed over the structured form verifies (schemas/signing.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from orderonce.errors import BadEvent
from schemas.parsing import strict_json
from schemas.vocabulary import DeadLetterReason

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"
Mode = Literal["structured", "binary", "batch"]

HTTP_PREFIX = "ce-"
AMQP_PREFIXES = ("cloudEvents_", "cloudEvents:", "ce-")


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type value, lower-cased, without its parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """JSON data: ``application/json`` or a ``+json`` type, with any parameters."""
    kind = media_type(content_type)
    return kind == JSON or kind.endswith("+json")


def http_mode(headers: Mapping[str, str]) -> Mode | None:
    """Which content mode an HTTP request uses; None when it is not a CloudEvent at all.
    ``headers`` has lower-case names."""
    kind = media_type(headers.get("content-type"))
    if kind == STRUCTURED:
        return "structured"
    if kind == BATCH:
        return "batch"
    if "ce-specversion" in headers:
        return "binary"
    return None


def from_http_binary(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The event of a binary-mode HTTP request (``headers`` with lower-case names)."""
    attributes: dict[str, Any] = {}
    for name, value in headers.items():
        if name.startswith(HTTP_PREFIX) and len(name) > len(HTTP_PREFIX):
            attributes[name[len(HTTP_PREFIX) :]] = _percent_decoded(name, value)
    return _with_data(attributes, headers.get("content-type"), body)


def from_amqp(
    headers: Mapping[str, Any] | None, content_type: str | None, body: bytes
) -> list[dict[str, Any]]:
    """The event(s) of an AMQP message: structured, batched, or binary mode."""
    kind = media_type(content_type)
    if kind == STRUCTURED:
        return [structured(body)]
    if kind == BATCH:
        return batch(body)
    attributes: dict[str, Any] = {}
    for name, value in (headers or {}).items():
        for prefix in AMQP_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                attributes[name[len(prefix) :]] = _amqp_value(name, value)
                break
    if "specversion" not in attributes:
        raise BadEvent(
            DeadLetterReason.BAD_ENVELOPE,
            f"not a CloudEvent: content type {content_type!r} and no cloudEvents_specversion"
            " (or cloudEvents:specversion) header",
            "specversion",
        )
    return [_with_data(attributes, content_type, body)]


def structured(body: bytes) -> dict[str, Any]:
    """The event of a structured-mode body."""
    return _object(strict_json(body), "the body")


def batch(body: bytes) -> list[dict[str, Any]]:
    """The events of a batched-mode body: a JSON array of structured events."""
    value = strict_json(body)
    if not isinstance(value, list):
        raise BadEvent(DeadLetterReason.BAD_ENVELOPE, "a batch is a JSON array of events")
    return [_object(item, f"batch item {i}") for i, item in enumerate(value)]


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadEvent(DeadLetterReason.BAD_ENVELOPE, f"{what} is not a JSON object")
    return value


def _with_data(attributes: dict[str, Any], content_type: str | None, body: bytes) -> dict[str, Any]:
    for reserved in ("data", "data_base64", "datacontenttype"):
        if reserved in attributes:
            raise BadEvent(
                DeadLetterReason.BAD_ENVELOPE,
                f"{reserved} cannot be an attribute header in binary mode",
                reserved,
            )
    event = dict(attributes)
    # No content type at all (an SDK's event without datacontenttype): the data is read as
    # JSON, which is all orderonce's data can be, and datacontenttype keeps its default.
    if content_type is not None and content_type.strip():
        if not is_json(content_type):
            raise BadEvent(
                DeadLetterReason.CONTENT_TYPE_REFUSED,
                f"data must be JSON (application/json), not {content_type!r}",
                "datacontenttype",
            )
        event["datacontenttype"] = content_type.strip()
    if body:
        event["data"] = strict_json(body)
    return event


def _percent_decoded(name: str, value: str) -> str:
    try:
        decoded = unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        decoded = "\x00"
    if "\x00" in decoded:  # PostgreSQL text cannot hold NUL: no event may (parsing.py)
        raise BadEvent(
            DeadLetterReason.BAD_ENVELOPE,
            f"header {name} is not percent-encoded UTF-8 text",
            name.removeprefix(HTTP_PREFIX),
        )
    return decoded


def _amqp_value(name: str, value: Any) -> Any:
    """An AMQP header value as the structured form holds it: text, integer or boolean. An AMQP
    timestamp (a datetime, or for ``time`` the milliseconds since the epoch that AMQP 1.0
    clients such as the CloudEvents SDKs send) becomes an RFC 3339 string."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadEvent(
                DeadLetterReason.BAD_ENVELOPE, f"header {name} is not UTF-8", name
            ) from None
    if _attribute(name) == "time" and isinstance(value, int) and not isinstance(value, bool):
        value = datetime.fromtimestamp(value / 1000, UTC)
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
        return stamp.isoformat().replace("+00:00", "Z")
    if isinstance(value, str) and "\x00" in value:
        raise BadEvent(DeadLetterReason.BAD_ENVELOPE, f"header {name} holds NUL", name)
    return value


def _attribute(header: str) -> str:
    for prefix in AMQP_PREFIXES:
        if header.startswith(prefix):
            return header[len(prefix) :]
    return header

"""The HTTP front door: ``POST /events`` in the CloudEvents HTTP protocol binding 1.0.

A request's events are read (structured, binary or batched mode: schemas/bindings.py),
validated as the worker will (schemas/parsing.py), checked against the token's allowed sources,
and committed to the outbox with other requests' in one transaction (producers/ingest/writer.py)
before the response: **a 2xx means durable**. The relay and the workers take them from there,
each exactly once. Refusals are RFC 9457 problems (producers/ingest/problems.py).

    202  stored now, or stored before (an exact resend: idempotent)
    400  invalid (the parser's reason, the field; a batch lists each bad event)
    401  no valid token (when ORDERONCE_INGEST_TOKENS is set)    403  a source the token may not
    409  the (source, id) is taken by other content              413  too large
    415  not a CloudEvent, or data that is not JSON              429  workers too far behind
    503  database unreachable (``stored`` says whether anything was stored)

Built with Starlette on uvicorn: the endpoint reads raw bodies in three content modes, where a
framework's request models would only add work per request (docs/producers.md, figures in
docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from orderonce.config import Settings, Urls
from orderonce.errors import BadEvent, StoreUnavailable
from producers.ingest import auth
from producers.ingest.problems import problem
from producers.ingest.writer import GroupCommit, Publish, Submission, Verdict
from schemas import api, bindings
from schemas.parsing import validate_event
from schemas.signing import verify
from schemas.vocabulary import DeadLetterReason
from worker.messaging.broker import backlog, task_queue_names
from worker.store.db import libpq_url, send_lists_in_binary

log = logging.getLogger(__name__)

BACKLOG_CHECK_S = 1.0
RETRY_AFTER_BACKLOG_S = 5
RETRY_AFTER_UNAVAILABLE_S = 2


@dataclass
class FrontDoor:
    """What every request of one server shares."""

    settings: Settings
    urls: Urls
    grants: tuple[auth.Grant, ...]
    verify_keys: tuple[bytes, ...]
    publish: Publish | None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    pool: AsyncConnectionPool[Any] | None = None
    writer: GroupCommit | None = None
    backlog: int = 0  # messages waiting on the broker, at the last look
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "orderonce_ingest_requests",
            "Requests to POST /events, by content mode and status.",
            ["mode", "status"],
            registry=self.registry,
        )
        self.events = Counter(
            "orderonce_ingest_events",
            "Events received, by what became of them.",
            ["result"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "orderonce_ingest_request_seconds",
            "Time to answer POST /events, commit included.",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.backlog_gauge = Gauge(
            "orderonce_ingest_broker_backlog",
            "Messages waiting on the broker at the last look.",
            registry=self.registry,
        )


def create_app(settings: Settings, urls: Urls, *, publish: Publish | None = None) -> Starlette:
    """The front door's ASGI app. ``publish`` sends committed events to the broker at once
    (else the relay does, within a second)."""
    door = FrontDoor(
        settings,
        urls,
        auth.parse_tokens(
            settings.ingest_tokens.get_secret_value() if settings.ingest_tokens else None
        ),
        settings.verification_keys(),
        publish,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        door.pool = AsyncConnectionPool(
            libpq_url(urls.database_url),
            min_size=1,
            max_size=settings.ingest_writers + 1,
            timeout=5.0,
            open=False,
            configure=_configure,
            kwargs={
                "connect_timeout": 5,
                "options": f"-c statement_timeout={settings.statement_timeout_ms}"
                " -c application_name=orderonce-ingest",
            },
        )
        await door.pool.open(wait=False)
        door.writer = GroupCommit(
            door.pool,
            max_events=settings.ingest_group_max_events,
            writers=settings.ingest_writers,
            publish=publish,
            resend_after_s=settings.relay_resend_after_s,
        )
        door.writer.start()
        door.tasks.append(asyncio.create_task(_watch_backlog(door)))
        try:
            yield
        finally:
            for task in door.tasks:
                task.cancel()
            await door.writer.stop()
            await door.pool.close()

    app = Starlette(
        routes=[
            Route("/events", _handler(door, post_events), methods=["POST"]),
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/readyz", _handler(door, readyz), methods=["GET"]),
            Route("/metrics", _handler(door, metrics), methods=["GET"]),
            Route("/openapi.json", _openapi, methods=["GET"]),
            Route("/docs", _docs, methods=["GET"]),
            Route("/problems/{reason}", _problem_page, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.door = door
    return app


async def _configure(conn: Any) -> None:
    # Lists (the group's columns) in binary format: psycopg's text format writes them element
    # by element in Python, a sixth of the front door's CPU with batches of 100.
    send_lists_in_binary(conn)


def _handler(
    door: FrontDoor, endpoint: Callable[[FrontDoor, Request], Any]
) -> Callable[[Request], Any]:
    async def handle(request: Request) -> Response:
        response: Response = await endpoint(door, request)
        return response

    return handle


async def post_events(door: FrontDoor, request: Request) -> Response:
    started = time.perf_counter()
    mode = "unknown"
    response: Response
    try:
        mode, response = await _post_events(door, request)
    finally:
        door.seconds.observe(time.perf_counter() - started)
    door.requests.labels(mode, str(response.status_code)).inc()
    return response


async def _post_events(door: FrontDoor, request: Request) -> tuple[str, Response]:
    s = door.settings
    headers = {k.lower(): v for k, v in request.headers.items()}
    grant = None
    if door.grants:
        grant = auth.grant_for(headers, door.grants)
        if grant is None:
            return "unknown", problem(
                "unauthorized",
                "send Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="orderonce"'},
            )
    body = await _body(request, s.ingest_max_request_bytes)
    if body is None:
        return "unknown", problem(
            "oversized", f"the request is over {s.ingest_max_request_bytes} bytes"
        )
    mode = bindings.http_mode(headers) or _plain_json(headers, body)
    if mode is None:
        return "unknown", problem(
            "not_a_cloudevent",
            f"Content-Type {headers.get('content-type')!r} with no ce-specversion header is not"
            " a CloudEvent: send application/cloudevents+json (structured),"
            " application/cloudevents-batch+json (batched) or ce-* headers (binary)",
        )
    try:
        objects = _objects(mode, headers, body)
    except BadEvent as bad:
        return mode, _refused(bad)
    if len(objects) > s.ingest_max_batch_events:
        return mode, problem(
            "oversized", f"{len(objects)} events, at most {s.ingest_max_batch_events} per batch"
        )
    submissions, errors = _validated(door, mode, body, objects)
    if errors:
        door.events.labels("refused").inc(len(objects))
        if mode != "batch":
            only = errors[0]
            return mode, problem(
                only["reason"], only["detail"], field=only.get("field"), errors=errors
            )
        return mode, problem(
            "invalid_batch", f"{len(errors)} of {len(objects)} events are invalid", errors=errors
        )
    if grant is not None and (denied := _denied(grant, submissions)):
        door.events.labels("refused").inc(len(objects))
        return mode, problem(
            "source_not_allowed",
            f"this token may publish sources starting with {grant.source_prefix!r} only",
            errors=denied,
        )
    if not submissions:
        return mode, _accepted([], [])
    if door.backlog > s.ingest_max_backlog:
        return mode, problem(
            "backlog",
            f"{door.backlog} messages wait on the broker (the limit is {s.ingest_max_backlog})",
            headers={"Retry-After": str(RETRY_AFTER_BACKLOG_S)},
        )
    assert door.writer is not None
    try:
        verdicts = await door.writer.submit(submissions)
    except StoreUnavailable as down:
        log.warning("ingest: %s", down)
        stored = "nothing was stored" if down.stored is False else "the outcome is unknown"
        return mode, problem(
            "unavailable",
            f"{down} ({stored}: sending the same events again is safe)",
            headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
            stored=down.stored,
        )
    conflicts = [
        {"index": i, "source": s.event.source, "id": s.event.id, "reason": "id_conflict"}
        for i, (s, v) in enumerate(zip(submissions, verdicts, strict=True))
        if v is Verdict.CONFLICT
    ]
    if conflicts:
        door.events.labels("refused").inc(len(submissions))
        return mode, problem(
            "id_conflict",
            f"{len(conflicts)} event(s) reuse a (source, id) accepted before with other content",
            errors=conflicts,
        )
    for verdict in (Verdict.ACCEPTED, Verdict.DUPLICATE):
        if n := verdicts.count(verdict):
            door.events.labels(verdict.value).inc(n)
    return mode, _accepted(submissions, verdicts)


async def _body(request: Request, limit: int) -> bytes | None:
    """The request body; None past ``limit`` bytes (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _plain_json(headers: dict[str, str], body: bytes) -> str | None:
    """A structured event sent as plain application/json, as ``curl -d @event.json`` does:
    taken as structured mode when it is a JSON object with ``specversion``."""
    if bindings.media_type(headers.get("content-type")) != bindings.JSON:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return "structured" if isinstance(value, dict) and "specversion" in value else None


def _objects(mode: str, headers: dict[str, str], body: bytes) -> list[Any]:
    if mode == "binary":
        return [bindings.from_http_binary(headers, body)]
    if mode == "batch":
        return bindings.batch(body)
    return [bindings.structured(body)]


def _validated(
    door: FrontDoor, mode: str, body: bytes, objects: list[Any]
) -> tuple[list[Submission], list[dict[str, Any]]]:
    """Each event as it will be stored, or why it cannot be."""
    max_bytes = door.settings.max_body_bytes
    submissions: list[Submission] = []
    errors: list[dict[str, Any]] = []
    for index, value in enumerate(objects):
        ids = {k: value[k] for k in ("source", "id") if isinstance(value, dict) and k in value}
        try:
            # Structured mode keeps the body byte for byte (its signature, its hash on a
            # resend); the others are stored in the structured form they were read into.
            text = body.decode("utf-8") if mode == "structured" else orjson.dumps(value).decode()
            if len(text.encode("utf-8")) > max_bytes:
                raise BadEvent(DeadLetterReason.OVERSIZED, f"an event is at most {max_bytes} bytes")
            event = validate_event(value)
            if door.verify_keys and not verify(value, event, door.verify_keys):
                raise BadEvent(
                    DeadLetterReason.BAD_SIGNATURE,
                    "no signature" if event.signature is None else "no key matches it",
                    "signature",
                )
        except BadEvent as bad:
            errors.append(_error(index, ids, bad))
            continue
        submissions.append(Submission.of(event, text))
    return submissions, errors


def _error(index: int, ids: dict[str, Any], bad: BadEvent) -> dict[str, Any]:
    error: dict[str, Any] = {"index": index, **ids, "reason": str(bad.reason)}
    if bad.field is not None:
        error["field"] = bad.field
    error["detail"] = bad.detail
    return error


def _refused(bad: BadEvent) -> Response:
    reason = str(bad.reason)
    return problem(reason, bad.detail, field=bad.field)


def _denied(grant: auth.Grant, submissions: list[Submission]) -> list[dict[str, Any]]:
    return [
        {"index": i, "source": s.event.source, "id": s.event.id, "reason": "source_not_allowed"}
        for i, s in enumerate(submissions)
        if not grant.allows(s.event.source)
    ]


def _accepted(submissions: list[Submission], verdicts: list[Verdict]) -> Response:
    events = [
        {"source": s.event.source, "id": s.event.id, "status": v.value}
        for s, v in zip(submissions, verdicts, strict=True)
    ]
    body = {
        "accepted": verdicts.count(Verdict.ACCEPTED),
        "duplicates": verdicts.count(Verdict.DUPLICATE),
        "events": events,
    }
    return Response(orjson.dumps(body), 202, media_type="application/json")


async def _watch_backlog(door: FrontDoor) -> None:
    """How many messages wait on the broker, once a second (off the event loop)."""
    queues = task_queue_names(door.settings)
    loop = asyncio.get_running_loop()
    while True:
        try:
            waiting = await loop.run_in_executor(None, backlog, door.urls.broker_url, queues)
            door.backlog = waiting.messages
            door.backlog_gauge.set(door.backlog)
        except Exception as exc:  # the broker is down: the relay keeps events meanwhile
            log.debug("ingest: could not read the broker's backlog: %s", exc)
        await asyncio.sleep(BACKLOG_CHECK_S)


async def _healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def readyz(door: FrontDoor, request: Request) -> Response:
    """Ready when the database answers within two seconds."""
    assert door.pool is not None
    try:
        async with asyncio.timeout(2.0), door.pool.connection(timeout=2.0) as conn:
            await conn.execute("SELECT 1")
    except Exception as exc:
        return JSONResponse({"ready": False, "database": str(exc)}, 503)
    return JSONResponse({"ready": True, "broker_backlog": door.backlog})


async def metrics(door: FrontDoor, request: Request) -> Response:
    return Response(generate_latest(door.registry), media_type=CONTENT_TYPE_LATEST)


_OPENAPI = orjson.dumps(api.openapi())


async def _openapi(request: Request) -> Response:
    return Response(_OPENAPI, media_type="application/json")


_DOCS = """<!doctype html>
<html><head><meta charset="utf-8"><title>orderonce front door</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
</body></html>"""


async def _docs(request: Request) -> Response:
    return HTMLResponse(_DOCS)


async def _problem_page(request: Request) -> Response:
    reason = request.path_params["reason"]
    if reason not in api.PROBLEMS:
        return PlainTextResponse("no such problem type", 404)
    status, title, meaning = api.PROBLEMS[reason]
    return PlainTextResponse(f"{reason} ({status}): {title}.\n\n{meaning}\n")

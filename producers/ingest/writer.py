"""Group commit into the outbox: the durability behind the front door's 2xx.

Requests hand their validated events to ``GroupCommit.submit`` and wait. A few writer tasks take
whatever has queued up while their previous transaction ran, and settle all of it in one
PostgreSQL transaction: many clients share one commit (one fsync) instead of each paying its
own. In that transaction each event's (source, id) is locked, what is on record for it is read
(the outbox, processed events, pruned ones), and only the events not seen before are inserted.
So a request learns, before it is answered:

- ``accepted``: new, and committed to the outbox; the relay (or the publish right after the
  commit) takes it to the broker, and the worker applies it exactly once;
- ``duplicate``: this very event (the same content: schemas.parsing.content_hash) was accepted
  or applied before; nothing was written;
- ``conflict``: another event with this (source, id) but other content is on record.

A request is settled whole: one conflict and none of its events is written (a batch is
accepted or refused whole). A failure says whether anything was stored (``StoreUnavailable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from orderonce.errors import BadEvent, StoreUnavailable
from schemas import CloudEvent, content_hash, parse_event, same_content
from worker.store import outbox

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Submission:
    """One validated event of a request, as it will be stored."""

    event: CloudEvent
    body: str  # its structured JSON, as the worker will read it
    content_hash: str

    @property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body.encode("utf-8")).hexdigest()

    @classmethod
    def of(cls, event: CloudEvent, body: str) -> Submission:
        return cls(event, body, content_hash(event))


@dataclass
class _Request:
    items: Sequence[Submission]
    done: asyncio.Future[list[Verdict]]


@dataclass(frozen=True)
class _Recorded:
    digest: str | None
    body: str | None


# Publishes bodies that were just committed (run in a thread: kombu is synchronous); raises
# when the broker refuses, and the relay then sends them.
Publish = Callable[[list[str]], None]


class GroupCommit:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        max_events: int = 500,
        writers: int = 2,
        publish: Publish | None = None,
        resend_after_s: float = 60.0,
    ) -> None:
        self._pool = pool
        self._max_events = max_events
        self._writers = writers
        self._publish = publish
        self._resend_after_s = resend_after_s
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._publishing: set[asyncio.Future[None]] = set()

    @property
    def waiting(self) -> int:
        """Requests queued for the next transactions."""
        return self._queue.qsize()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write()) for _ in range(self._writers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)

    async def submit(self, items: Sequence[Submission]) -> list[Verdict]:
        """Each event's verdict once the transaction holding them has committed; raises
        StoreUnavailable when it could not."""
        done: asyncio.Future[list[Verdict]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(items, done))
        return await done

    async def _write(self) -> None:
        while True:
            group = [await self._queue.get()]
            events = len(group[0].items)
            while events < self._max_events and not self._queue.empty():
                group.append(self._queue.get_nowait())
                events += len(group[-1].items)
            try:
                verdicts, new = await self._commit(group)
            except Exception as exc:
                failure = (
                    exc
                    if isinstance(exc, StoreUnavailable)
                    else StoreUnavailable(f"{type(exc).__name__}: {exc}", stored=False)
                )
                if not isinstance(exc, StoreUnavailable):
                    log.exception("ingest: a group of %d requests failed", len(group))
                for request in group:
                    if not request.done.done():
                        request.done.set_exception(failure)
                continue
            for request, verdict in zip(group, verdicts, strict=True):
                if not request.done.done():
                    request.done.set_result(verdict)
            if new and self._publish is not None:
                self._start_publish(new)

    async def _commit(self, group: list[_Request]) -> tuple[list[list[Verdict]], list[Submission]]:
        keys = sorted({s.event.key for r in group for s in r.items})
        try:
            async with self._pool.connection() as conn:
                try:
                    await conn.execute(
                        outbox.ACCEPT_LOCK, {"keys": [outbox.accept_key(*k) for k in keys]}
                    )
                    recorded = await self._recorded(conn, keys)
                    verdicts, new = _settle(group, recorded)
                    if new:
                        await conn.execute(outbox.ACCEPT_INSERT, self._rows(new))
                except psycopg.Error as exc:
                    await _rollback_quietly(conn)
                    raise StoreUnavailable(f"database: {exc}", stored=False) from exc
                try:
                    await conn.commit()
                except psycopg.Error as exc:
                    # COMMIT was sent: it may have landed. A resend of the same events is a
                    # duplicate if it did and accepted if it did not; never a second effect.
                    raise StoreUnavailable(f"database during commit: {exc}", stored=None) from exc
        except PoolTimeout as exc:
            raise StoreUnavailable(f"no database connection: {exc}", stored=False) from exc
        except psycopg.OperationalError as exc:  # the connection could not even be had
            raise StoreUnavailable(f"database unreachable: {exc}", stored=False) from exc
        return verdicts, new

    async def _recorded(
        self, conn: psycopg.AsyncConnection[Any], keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], list[_Recorded]]:
        cursor = await conn.execute(
            outbox.ACCEPT_RECORDED,
            {"sources": [k[0] for k in keys], "ids": [k[1] for k in keys]},
        )
        found: dict[tuple[str, str], list[_Recorded]] = {}
        for source, event_id, digest, body, _kind in await cursor.fetchall():
            found.setdefault((source, event_id), []).append(_Recorded(digest, body))
        return found

    def _rows(self, new: list[Submission]) -> dict[str, Any]:
        publishing = self._publish is not None
        return {
            "body_sha256": [s.body_sha256 for s in new],
            "sources": [s.event.source for s in new],
            "ids": [s.event.id for s in new],
            "bodies": [s.body for s in new],
            "content_hashes": [s.content_hash for s in new],
            # Published right after the commit: the relay waits resend_after before it sends
            # again what has no outcome by then. Else the relay sends them at once.
            "sends": int(publishing),
            "due": self._resend_after_s if publishing else 0.0,
        }

    def _start_publish(self, new: list[Submission]) -> None:
        loop = asyncio.get_running_loop()
        bodies = [s.body for s in new]
        assert self._publish is not None
        sent = loop.run_in_executor(None, self._publish, bodies)
        future = asyncio.ensure_future(self._after_publish(sent, new))
        self._publishing.add(future)
        future.add_done_callback(self._publishing.discard)

    async def _after_publish(self, sent: asyncio.Future[None], new: list[Submission]) -> None:
        try:
            await sent
        except Exception as exc:
            log.warning("ingest: broker publish failed (%s); the relay sends them", exc)
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(
                        outbox.ACCEPT_SEND_NOW, {"keys": [s.body_sha256 for s in new]}
                    )
            except Exception as again:  # the relay still sends them once resend_after passed
                log.warning("ingest: could not mark them for the relay: %s", again)


def _settle(
    group: list[_Request], recorded: dict[tuple[str, str], list[_Recorded]]
) -> tuple[list[list[Verdict]], list[Submission]]:
    """Each request's verdicts, and the events to insert: those of requests with no conflict
    that nothing on record (or earlier in this group) already holds."""
    taken: dict[tuple[str, str], str] = {}  # key -> content hash, accepted in this group
    verdicts: list[list[Verdict]] = []
    new: list[Submission] = []
    for request in group:
        mine: dict[tuple[str, str], str] = {}
        decided: list[Verdict] = []
        fresh: list[Submission] = []
        for s in request.items:
            key = s.event.key
            earlier = mine.get(key) or taken.get(key)
            if earlier is not None:
                decided.append(Verdict.DUPLICATE if earlier == s.content_hash else Verdict.CONFLICT)
                continue
            on_record = [r for r in recorded.get(key, []) if _hash_of(r) is not None]
            if not on_record:
                decided.append(Verdict.ACCEPTED)
                mine[key] = s.content_hash
                fresh.append(s)
            elif any(same_content(str(_hash_of(r)), s.event, s.content_hash) for r in on_record):
                decided.append(Verdict.DUPLICATE)
            else:
                decided.append(Verdict.CONFLICT)
        verdicts.append(decided)
        if Verdict.CONFLICT not in decided:
            taken.update(mine)
            new += fresh
    return verdicts, new


def _hash_of(record: _Recorded) -> str | None:
    """The content hash on record; for an outbox row written without one, its body's (None
    when the body is no valid event: the worker dead-letters it, and it holds no id)."""
    if record.digest is not None:
        return record.digest
    if record.body is None:
        return None
    try:
        return content_hash(parse_event(record.body))
    except BadEvent:
        return None


async def _rollback_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):
        await conn.rollback()

"""The relay: sends outbox rows again until each has a terminal record (``orderonce relay``).

Terminal means the worker durably decided the event: a processed row (any outcome), its
tombstone after pruning, or a dead letter of the very body. Until then the relay sends the body
again every ``resend_after`` (doubling up to 8x), so a message the broker lost, or one a
producer committed but never sent, arrives in the end. The worker's claim protocol turns the
copies this creates into duplicates with no effect.

Several relays may run: each pass locks the rows it handles (SKIP LOCKED), so they share the
work instead of sending everything twice. A relay killed mid-pass has sent some bodies without
recording it: they are sent again on the next pass, which is harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

MAX_BACKOFF_DOUBLINGS = 3  # at most 8x resend_after between sends of one row

_DUE = text(
    """
    SELECT o.body_sha256, o.body,
           EXISTS (SELECT 1 FROM processed_messages p
                   WHERE p.source = o.source AND p.event_id = o.event_id)
        OR EXISTS (SELECT 1 FROM processed_tombstones t
                   WHERE t.source = o.source AND t.event_id = o.event_id)
        OR EXISTS (SELECT 1 FROM dead_letters d WHERE d.body_sha256 = o.body_sha256)
           AS terminal
    FROM outbox o
    WHERE o.settled_at IS NULL AND o.due_at <= now()
    ORDER BY o.due_at
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
    """
)
_SETTLE = text("UPDATE outbox SET settled_at = now() WHERE body_sha256 = ANY(:keys)")
_SENT = text(
    """
    UPDATE outbox
    SET sends = sends + 1,
        due_at = now() + :resend_after * power(2, least(sends, :doublings))
    WHERE body_sha256 = ANY(:keys)
    """
)


@dataclass(frozen=True)
class RelayPass:
    settled: int = 0
    sent: int = 0
    send_failed: bool = False

    @property
    def handled(self) -> int:
        return self.settled + self.sent


def relay_once(
    engine: Engine, send: Callable[[str], None], *, batch_size: int, resend_after: timedelta
) -> RelayPass:
    """One pass over the due rows: settle the terminal ones, send the others."""
    with engine.begin() as conn:
        rows = conn.execute(_DUE, {"limit": batch_size}).all()
        settled = [r.body_sha256 for r in rows if r.terminal]
        if settled:
            conn.execute(_SETTLE, {"keys": settled})
        sent: list[str] = []
        failed = False
        for row in rows:
            if row.terminal:
                continue
            try:
                send(row.body)
            except Exception as exc:  # the broker is down: the rest waits for the next pass
                log.warning("relay: broker send failed, will retry: %s", exc)
                failed = True
                break
            sent.append(row.body_sha256)
        if sent:
            conn.execute(
                _SENT,
                {"keys": sent, "resend_after": resend_after, "doublings": MAX_BACKOFF_DOUBLINGS},
            )
    if sent or settled:
        log.info("relay pass: %d sent, %d settled", len(sent), len(settled))
    return RelayPass(len(settled), len(sent), failed)


def run(
    engine: Engine,
    send: Callable[[str], None],
    *,
    batch_size: int,
    resend_after: timedelta,
    interval_s: float,
    stop: threading.Event,
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """Pass after pass until ``stop`` is set; a full batch goes straight on to the next."""
    while not stop.is_set():
        try:
            done = relay_once(engine, send, batch_size=batch_size, resend_after=resend_after)
        except Exception as exc:  # the database is down: try again after the interval
            log.warning("relay: pass failed, will retry: %s", exc)
            if on_error is not None:
                on_error(exc)
            done = RelayPass(send_failed=True)
        if done.handled < batch_size or done.send_failed:
            stop.wait(interval_s)
        else:
            time.sleep(0)  # let a signal handler run between full passes

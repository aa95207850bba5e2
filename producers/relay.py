"""The relay: sends outbox rows again until each has a terminal record (``orderonce relay``).

Terminal means the worker durably decided the event: a processed row (any outcome), its
tombstone after pruning, or a dead letter of the very body. Until then the relay sends the body
again every ``resend_after`` (doubling up to 8x), so a message the broker lost, or one a
producer committed but never sent, arrives in the end. The worker's claim protocol turns the
copies this creates into duplicates with no effect.

Several relays may run: each pass locks the rows it handles (SKIP LOCKED), so they share the
work instead of sending everything twice. A relay killed mid-pass has sent some bodies without
recording it: they are sent again on the next pass, which is harmless.

It does not send again what the broker still holds. While workers are behind, a row due for a
resend was most often sent after the oldest message still waiting in the queue, so it is
waiting too: sending it again would only add load when the system is already behind (a demo
under load resent 2,477 of 5,532 events before this). A row is sent again only if it was sent
before that oldest message (``horizon``, from the ``orderonce_sent_at`` header every orderonce
producer stamps on its messages, read on Redis), or longer ago than ``max_hold`` (RabbitMQ,
whose queues cannot be peeked, and messages without the stamp). The broker's clock is the
producers'; a skew of a few seconds only moves the line by as much.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

from worker.messaging.broker import Backlog

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
      -- sent after the oldest message the broker still holds: waiting too, not lost
      AND (o.sends = 0 OR o.sent_at IS NULL OR o.sent_at < :horizon)
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
        sent_at = now(),
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
    engine: Engine,
    send: Callable[[str], None],
    *,
    batch_size: int,
    resend_after: timedelta,
    horizon: datetime | None = None,
) -> RelayPass:
    """One pass over the due rows: settle the terminal ones, send the others; a row sent before
    and not before ``horizon`` is left for later (default: no horizon, send every due row)."""
    horizon = horizon or datetime.now(UTC) + timedelta(days=1)
    with engine.begin() as conn:
        rows = conn.execute(_DUE, {"limit": batch_size, "horizon": horizon}).all()
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


# A row's sent_at is written when it is committed (the publisher sends right after the commit;
# the relay right before its update), a moment before the message's own stamp; clocks of the
# database and the producers may differ by as much. Rows this close to the line are held too.
HOLD_MARGIN = timedelta(seconds=5)


def horizon(waiting: Backlog | None, max_hold: timedelta) -> datetime | None:
    """What a row must have been sent before to be sent again: just before the oldest waiting
    message's send time; ``max_hold`` ago when that is unknown; None (no limit) on an empty
    broker, or one that could not be asked."""
    now = datetime.now(UTC)
    if waiting is None or waiting.messages == 0:
        return None
    if waiting.oldest_sent_at is None:
        return now - max_hold
    oldest = datetime.fromtimestamp(waiting.oldest_sent_at, UTC) - HOLD_MARGIN
    return max(oldest, now - max_hold)


def run(
    engine: Engine,
    send: Callable[[str], None],
    *,
    batch_size: int,
    resend_after: timedelta,
    interval_s: float,
    stop: threading.Event,
    on_error: Callable[[Exception], None] | None = None,
    horizon: Callable[[], datetime | None] = lambda: None,
) -> None:
    """Pass after pass until ``stop`` is set; a full batch goes straight on to the next."""
    while not stop.is_set():
        try:
            done = relay_once(
                engine,
                send,
                batch_size=batch_size,
                resend_after=resend_after,
                horizon=horizon(),
            )
        except Exception as exc:  # the database is down: try again after the interval
            log.warning("relay: pass failed, will retry: %s", exc)
            if on_error is not None:
                on_error(exc)
            done = RelayPass(send_failed=True)
        if done.handled < batch_size or done.send_failed:
            stop.wait(interval_s)
        else:
            time.sleep(0)  # let a signal handler run between full passes

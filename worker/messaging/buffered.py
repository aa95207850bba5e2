"""Buffered consumption (the default pool of ``orderonce worker``, each of its processes an
``orderonce worker --pool solo --buffered N``): many single-event messages, one transaction.

Celery's pools (``--pool prefork|solo``) run one task, with one durable commit, per message.
Here the worker's consumer reserves up to N messages (its prefetch), keeps the plain ones in a
buffer, and applies them together when N are there or when the receive that brought them has
handed all of them over (so a lone message waits for nothing, and under load each transaction
carries what queued up during the previous one; with ``buffered_wait_ms`` > 0, some time after
the first arrived instead: as long as the previous batch took, between ``buffered_wait_ms`` and
``buffered_max_wait_ms``), with the batch protocol
(``worker.protocol.batch.apply_with_quick_tries``, given by the consumer): one pipelined Redis
round trip to lock, one transaction, one to unlock. Producers do not change.

Guarantee: that of the batch protocol, per event, and the message rule of default mode:

- A message is acked only after its event's outcome (applied, rejected, duplicate, dead
  letter) is committed. Until then it is unacked: a worker killed with a full buffer, or in the
  middle of the commit, gives every message back (visibility timeout; a warm shutdown applies
  and acks the buffer first, and a lost connection gives it back at once), and the
  redelivered copies are applied once (nothing was committed) or counted as redeliveries
  (everything was).
- Each event keeps its own message id (the Celery task id) on its processed row, as on the
  single path, so a redelivered message is told from a producer's copy.
- Only plain messages are buffered: task ``orderonce.process_event``, JSON, one string
  argument, no ETA/countdown, no retry budget used yet, not redelivered. Everything else (ETA
  retries, batch messages, redelivered messages, which need the durable poison count, and
  anything Celery or ``worker/messaging/consumer.py`` dead-letters) goes to Celery's usual
  handling, the default mode's code, unchanged.
- An event too early for its order, or whose lock another worker holds, is tried again at
  once, then stays in the buffer, unacked, ahead of the messages that came since, and is
  tried again in the next batches (up to ``batch_too_early_retries`` - 1 of them). What it waits
  for is most often another worker's batch committing right now; batch messages sleep between
  such tries (10, 20, 40, 80 ms), which would hold every message of this buffer back, and
  those still arriving. An order's later events in the buffer are handed back with it (the
  batch protocol keeps an order's events in sequence), so they stay behind it. The next batch
  comes with the next message, or, when none comes, after the same pauses (at most
  ``buffered_max_wait_ms``): tried again at once, alone, its tries were used up in a
  millisecond each, while the batch it waited for (tens of milliseconds under load) was still
  running, and it went down the single path, whose pauses are half a second and longer.
- An event the batch protocol hands back otherwise (still too early after those tries, a
  deferred or conflicting submission, a copy of a pruned event) is not republished: its own
  message is given to Celery's usual handling right after the commit, i.e. the default mode's
  single path, with its retries and budgets. So is every message of a buffer whose batch failed
  for a reason that is not a database outage (a bug): alone, each gets the poison limit. A
  database outage (transient error after the protocol's own retries) requeues every message of
  the buffer, after a pause; none is acked.

Why it needs ``--pool solo``: the buffer is applied in the consumer's own process, on its event
loop, as the solo pool runs its tasks. With prefork, the main process would apply events while
its children ran others, and prefetch would be N times the concurrency.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kombu.transport.virtual import QoS as VirtualQoS

from schemas.vocabulary import RetryCause
from worker.messaging.amqp_acks import Deliveries, ack_all
from worker.messaging.broker import TASK_NAME
from worker.messaging.fast_json import read_exactly
from worker.messaging.retry import ATTEMPTS_HEADER, count_handed_back
from worker.ops import metrics
from worker.protocol import HandedBack, Outcome
from worker.store.db import is_transient

log = logging.getLogger(__name__)

# bodies, their message ids, quick tries -> outcomes and what was handed back
ApplyBatch = Callable[..., tuple[list[Outcome], list[HandedBack]]]


@dataclass(frozen=True)
class Buffered:
    message: Any  # kombu Message, unacked
    body: bytes
    message_id: str | None
    tries: int = 0  # batches it was handed back from to be tried again soon


def plain_event(message: Any) -> Buffered | None:
    """The message as a buffered event, or None when it must take Celery's usual path."""
    headers = message.headers
    if not isinstance(headers, dict) or headers.get("task") != TASK_NAME:
        return None
    if headers.get("eta") is not None or headers.get("redelivered"):
        return None
    if (message.delivery_info or {}).get("redelivered"):
        return None
    if headers.get(ATTEMPTS_HEADER):
        return None  # a retry (with its budgets): the single path counts them
    try:
        decoded = decoded_body(message)
    except Exception:  # Celery's path decodes it again and dead-letters it for its reason
        return None
    if not isinstance(decoded, list | tuple) or len(decoded) != 3:
        return None
    args, kwargs = decoded[0], decoded[1]
    if not isinstance(args, list | tuple) or len(args) != 1 or not isinstance(kwargs, dict):
        return None
    if kwargs:
        return None
    body = args[0]
    if not isinstance(body, str):
        return None
    task_id = headers.get("id")
    return Buffered(
        message,
        body.encode("utf-8", "surrogatepass"),
        task_id if isinstance(task_id, str) else None,
    )


def decoded_body(message: Any) -> Any:
    """``message.decode()``, as kombu returns and caches it, for less CPU: a JSON body that
    the consumer accepts and that holds no kombu-typed value (``__type__``, the only thing
    kombu's object hook reads) is parsed by jiter (worker/messaging/fast_json.py) and cached
    on the message as kombu caches its own decode (Celery reads that cache). What jiter
    cannot read as Python's json does is decoded by kombu: same result, same errors."""
    cached = message._decoded_cache
    if cached:
        return cached
    body, accept = message.body, message.accept
    if (
        message.content_type == "application/json"
        and message.content_encoding == "utf-8"
        and (accept is None or "application/json" in accept)
        and isinstance(body, bytes)
        and b"__type__" not in body
    ):
        with contextlib.suppress(ValueError):
            message._decoded_cache = read_exactly(body)
            return message._decoded_cache
    return message.decode()


class Buffer:
    """Up to ``size`` plain messages; applied together when full, or once the current receive
    has handed over all its messages (``wait_s`` 0), or some time after the first: as long as
    the previous batch took (group commit), at least ``wait_s``, at most ``max_wait_s``.

    ``single`` hands one message to Celery's usual handling (the default mode's task);
    ``apply(bodies, message_ids=..., quick_tries=...)`` runs the batch protocol on them;
    ``call_later(delay, fn)`` schedules ``fn`` on the consumer's event loop (or None: no wait);
    ``tries_again``: an event too early for its order, or whose lock is busy, is tried again at
    once, then in up to ``tries_again`` - 1 of the next batches, before it goes to ``single``.
    """

    def __init__(
        self,
        size: int,
        wait_s: float,
        max_wait_s: float,
        single: Callable[[Any], None],
        apply: ApplyBatch,
        call_later: Callable[[float, Callable[[], None]], Any] | None,
        connection_errors: tuple[type[BaseException], ...] = (),
        tries_again: int = 0,
    ) -> None:
        self.size = size
        self.quick_tries = min(1, tries_again)
        # Without an event loop nothing would apply the buffer again: no carrying over.
        self.later_tries = tries_again - self.quick_tries if call_later is not None else 0
        self.wait_s = wait_s
        self.max_wait_s = max_wait_s
        self._last_s = 0.0  # how long the previous batch took
        self._single = single
        self._apply_batch = apply
        self._call_later = call_later
        self._connection_errors = connection_errors
        self._items: list[Buffered] = []
        self._timer: Any = None
        self._pausing = False  # the timer is a pause before handed-back events are tried again
        # On RabbitMQ, the consumer's channel and what was delivered on it (``delivered``).
        self._channel: Any = None
        self._deliveries: Deliveries | None = None

    def __len__(self) -> int:
        return len(self._items)

    def delivered(self, message: Any) -> None:
        """Told of every message delivered to the consumer, before anything else sees it:
        on RabbitMQ this is what lets ``_ack`` ack many messages with one frame
        (worker/messaging/amqp_acks.py). Redis channels need nothing of it."""
        channel = message.channel
        if channel is not self._channel:
            self._channel = channel
            virtual = isinstance(getattr(channel, "qos", None), VirtualQoS)
            self._deliveries = None if virtual else Deliveries()
        if self._deliveries is not None:
            self._deliveries.delivered(message)

    def offer(self, message: Any) -> bool:
        """Keep the message for the next batch; False when it must take Celery's usual path."""
        item = plain_event(message)
        if item is None:
            return False
        self._items.append(item)
        if len(self._items) >= self.size or self._call_later is None:
            self.flush()
        else:
            if self._pausing and self._timer is not None:
                self._timer.cancel()  # the handed-back events go with this message
                self._timer = None
            self._schedule()
        return True

    def _schedule(self) -> None:
        if self._timer is None and self._items and self._call_later is not None:
            # No wait asked for: apply what this receive brought, once it is all offered (the
            # transport hands a receive's messages over in one go, before timers run).
            wait = self.wait_s and min(max(self.wait_s, self._last_s), self.max_wait_s)
            tries = min(item.tries for item in self._items)
            if tries:  # only events handed back: a pause, cut short by the next message
                wait = min(max(wait, 0.005 * 2**tries), self.max_wait_s)
            self._timer = self._call_later(wait, self._on_timer)
            self._pausing = bool(tries)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self, *, last: bool = False) -> None:
        """Apply what is buffered; ``last``: nothing stays for a later batch (a shutdown)."""
        items = self._take()
        if items:
            self._apply(items, last)
        self._schedule()

    def discard(self) -> int:
        """Forget the buffered messages, unacked (the broker gives them back); how many."""
        self._channel, self._deliveries = None, None
        return len(self._take())

    def _take(self) -> list[Buffered]:
        items, self._items = self._items, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return items

    def _apply(self, items: list[Buffered], last: bool) -> None:
        started = time.perf_counter()
        try:
            outcomes, handed_back = self._apply_batch(
                [i.body for i in items],
                message_ids=[i.message_id for i in items],
                quick_tries=self.quick_tries,
            )
        except Exception as exc:
            if is_transient(exc):
                # Nothing committed. Give every message back to the broker, not acked.
                log.warning(
                    "database unavailable; requeueing %d buffered messages: %s", len(items), exc
                )
                metrics.observe_retry(RetryCause.DATABASE)
                time.sleep(0.5)  # don't spin on a database that is down
                for item in items:
                    item.message.reject_log_error(log, self._connection_errors, requeue=True)
                return
            # Nothing of it committed. Alone, each message gets the single path's retries and
            # poison limit, so one bad event cannot hold the others back.
            log.exception("buffered batch of %d failed; each message goes alone", len(items))
            for item in items:
                self._single(item.message)
            return
        self._last_s = time.perf_counter() - started
        back = sorted(handed_back, key=lambda h: h.position)
        returned = {h.position for h in back}
        # Committed: ack every message whose event has its outcome now.
        self._ack([item.message for p, item in enumerate(items) if p not in returned])
        elapsed = time.perf_counter() - started
        metrics.observe_outcomes(outcomes, elapsed)
        # Kept, unacked, for the next batch; messages arriving meanwhile go after them, so an
        # order's events stay in sequence (its later ones in this batch were handed back too).
        again: list[Buffered] = []
        alone: list[Any] = []
        for h in back:
            item = items[h.position]
            kept = h.worth_trying_again_soon and item.tries < self.later_tries and not last
            count_handed_back(h.why, put_off=kept)
            if kept:
                again.append(replace(item, tries=item.tries + 1))
            else:
                alone.append(item.message)
        self._items = again + self._items
        # Handed back otherwise: each message, still unacked, runs the default mode's task, in
        # order.
        for message in alone:
            self._single(message)

    def _ack(self, messages: list[Any]) -> None:
        """Ack these messages: on RabbitMQ with as few frames as is safe (amqp_acks), on
        kombu's Redis transport in one round trip of the two commands ``Message.ack`` sends
        (ZREM and HDEL), each naming every message; otherwise one by one. A failure leaves
        them unacked: the broker redelivers them and they are counted as redeliveries."""
        if not messages:
            return
        channel = messages[0].channel
        qos: Any = getattr(channel, "qos", None)
        index_key = getattr(qos, "unacked_index_key", None)
        unacked_key = getattr(qos, "unacked_key", None)
        try:
            if any(m.channel is not channel or m.acknowledged for m in messages):
                self._ack_each(messages)
            elif self._deliveries is not None and channel is self._channel:
                ack_all(self._deliveries, messages, lambda m: self._ack_each([m]))
            elif isinstance(qos, VirtualQoS) and index_key and unacked_key:
                tags = [m.delivery_tag for m in messages]
                with qos.pipe_or_acquire() as pipe:  # type: ignore[attr-defined]  # kombu's redis
                    pipe.zrem(index_key, *tags).hdel(unacked_key, *tags).execute()
                for m in messages:
                    # The rest of Message.ack: the channel's bookkeeping, the message's state.
                    VirtualQoS.ack(qos, m.delivery_tag)  # type: ignore[no-untyped-call]  # kombu
                    m._state = "ACK"
            else:
                self._ack_each(messages)
        except Exception as exc:
            log.warning(
                "could not ack %d messages (they will be redelivered): %s", len(messages), exc
            )

    def _ack_each(self, messages: list[Any]) -> None:
        for m in messages:
            m.ack_log_error(log, self._connection_errors)

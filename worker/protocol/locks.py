"""The Redis claim on an event: ``SET NX PX`` with a unique token, released only by its owner.

The lock is an optimisation, not the guarantee: it keeps two workers from doing the same work at
the same time. If Redis is unreachable, or a lock expires under a paused holder, two workers may
run one event and the processed-messages primary key lets exactly one of them commit.
"""

from __future__ import annotations

import logging
import uuid

import redis
from redis.backoff import NoBackoff
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock
from redis.retry import Retry

from orderonce.errors import LockBusy

log = logging.getLogger(__name__)


def lock_client(url: str) -> redis.Redis:
    """A client that gives up fast: with Redis down, each event should fall back to the
    database guarantee in a millisecond, not after redis-py's default retries (seconds)."""
    return redis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1)
    )


def lock_name(source: str, event_id: str) -> str:
    # Length-prefixed so ("a:b", "c") and ("a", "b:c") can never share a key.
    return f"orderonce:lock:{len(source)}:{source}:{event_id}"


class EventLocks:
    def __init__(self, client: redis.Redis, ttl_ms: int) -> None:
        self._client = client
        self._ttl_s = ttl_ms / 1000

    def acquire(self, source: str, event_id: str, order_id: str | None) -> Lock | None:
        """The held lock; None when Redis is unreachable (the database alone decides then).

        Raises LockBusy when another worker holds it: the caller retries later and never skips,
        because the holder may still crash before committing.
        """
        lock: Lock = self._client.lock(
            lock_name(source, event_id), timeout=self._ttl_s, blocking=False, thread_local=False
        )
        try:
            acquired = lock.acquire(blocking=False)
        except redis.RedisError as exc:
            log.warning(
                "redis unavailable, relying on the database guarantee alone: %s",
                exc,
                extra={"event_id": event_id, "order_id": order_id},
            )
            return None
        if not acquired:
            raise LockBusy(
                "event lock held by another worker", event_id=event_id, order_id=order_id
            )
        return lock

    def release(self, lock: Lock | None, event_id: str, order_id: str | None) -> None:
        if lock is None:
            return
        try:
            # redis-py compares the token and deletes in one Lua script: a lock that expired and
            # was taken by another worker is left alone.
            lock.release()
        except LockNotOwnedError:
            log.warning(
                "event lock expired before release; the new holder's lock was left alone",
                extra={"event_id": event_id, "order_id": order_id},
            )
        except (LockError, redis.RedisError) as exc:
            log.warning(
                "could not release event lock (it will expire): %s",
                exc,
                extra={"event_id": event_id, "order_id": order_id},
            )


# The batch forms of SET NX PX and of compare-and-delete: one command for all of a batch's keys
# instead of one each (redis-py's packing and parsing of hundreds of commands cost more CPU
# than the rest of the lock round trips). Each key is still its own lock with its own TTL,
# taken or released exactly as ``EventLocks`` does it; the script only saves the round trips.
# Its keys may hash to different slots, so this needs a single Redis (or a proxy in front of
# one), not Redis Cluster: the same as the rest of orderonce.
_ACQUIRE_MANY = """
local taken = {}
for i, key in ipairs(KEYS) do
  taken[i] = redis.call('set', key, ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
end
return taken
"""
_RELEASE_MANY = """
local freed = 0
for _, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then freed = freed + redis.call('del', key) end
end
return freed
"""


class BatchLocks:
    """The same locks as ``EventLocks`` (same key, ``SET NX PX`` with a random token,
    compare-and-delete), for many events at once: one round trip to take them all and one to
    release them, instead of two per event."""

    def __init__(self, client: redis.Redis, ttl_ms: int) -> None:
        self._ttl_ms = ttl_ms
        self._acquire = client.register_script(_ACQUIRE_MANY)
        self._release = client.register_script(_RELEASE_MANY)

    def acquire(
        self, keys: list[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], str], set[tuple[str, str]]]:
        """Take the lock of every (source, id) it can. Returns the tokens held and the keys
        another worker holds (those are retried later, never skipped). With Redis unreachable,
        nothing is held and nothing is busy: the database alone decides, as for one event."""
        if not keys:
            return {}, set()
        token = uuid.uuid4().hex
        ordered = sorted(set(keys))
        try:
            taken = self._acquire(
                keys=[lock_name(*key) for key in ordered], args=[token, self._ttl_ms]
            )
        except redis.RedisError as exc:
            log.warning("redis unavailable, relying on the database guarantee alone: %s", exc)
            return {}, set()
        held = {key: token for key, ok in zip(ordered, taken, strict=True) if ok}
        return held, {key for key, ok in zip(ordered, taken, strict=True) if not ok}

    def release(self, held: dict[tuple[str, str], str]) -> None:
        if not held:
            return
        by_token: dict[str, list[str]] = {}
        for key, token in held.items():
            by_token.setdefault(token, []).append(lock_name(*key))
        lost = 0
        try:
            for token, names in by_token.items():
                lost += len(names) - int(self._release(keys=names, args=[token]))
        except redis.RedisError as exc:
            log.warning("could not release %d event locks (they will expire): %s", len(held), exc)
            return
        if lost:
            log.warning("%d event locks expired before release; new holders' were left alone", lost)

"""Which queue an event goes to when per-order ordering is on: pure functions, no broker.

With ``ORDERONCE_ORDERED_QUEUES=N`` every event of one order (its CloudEvents ``subject``) goes
to the same one of N queues, and each queue has exactly one single-threaded consumer, so one
order's events are handled in the order they were published. The queue is picked by jump
consistent hashing (Lamping and Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm",
2014): no table to share between producers, keys spread evenly, and going from N to N + 1
queues moves only the keys that the new queue takes (about 1 / (N + 1) of them).
"""

from __future__ import annotations

import hashlib

import orjson

_MASK64 = (1 << 64) - 1
# The 64-bit linear congruential step of the paper.
_LCG_MULTIPLIER = 2862933555777941757


def key_hash(key: str) -> int:
    """A stable 64-bit hash of ``key``: the same in every process, machine and Python version
    (Python's own ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in ``range(buckets)`` of a 64-bit ``key``."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    key &= _MASK64
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * _LCG_MULTIPLIER + 1) & _MASK64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_queue(base: str, index: int) -> str:
    return f"{base}.{index}"


def shard_queues(base: str, count: int) -> list[str]:
    return [shard_queue(base, i) for i in range(count)]


def queue_for_key(base: str, count: int, key: str) -> str:
    """The queue of an ordering key; ``base`` itself when ordering is off (count 0)."""
    if count == 0:
        return base
    return shard_queue(base, jump_hash(key_hash(key), count))


def ordering_key(body: bytes | str) -> str:
    """What orders events: the order id (``subject``), else the event's own id, else the body.

    Events without a subject (a restock) are not ordered against anything, so any queue will
    do; their id spreads them evenly. A body that is not a readable event still goes somewhere
    definite, and the worker dead-letters it there.
    """
    raw = body.encode("utf-8") if isinstance(body, str) else body
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError:
        envelope = None
    if isinstance(envelope, dict):
        for field in ("subject", "id"):
            value = envelope.get(field)
            if isinstance(value, str) and value:
                return value
    return hashlib.sha256(raw).hexdigest()

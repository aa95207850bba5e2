"""What a worker process holds: settings, a database engine, a Redis client and the locks.

Built lazily and per process: prefork pool children must not share the parent's sockets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import redis
from sqlalchemy import Engine

from orderonce.config import Settings, resolve, settings
from worker.db import make_engine
from worker.locks import EventLocks, lock_client


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    redis: redis.Redis
    locks: EventLocks


_runtime: tuple[int, Runtime] | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        s = settings()
        urls = resolve()
        client = lock_client(urls.redis_url)
        rt = Runtime(
            s, make_engine(urls.database_url, s), client, EventLocks(client, s.lock_ttl_ms)
        )
        _runtime = (os.getpid(), rt)
    return _runtime[1]

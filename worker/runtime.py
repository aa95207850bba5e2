"""What a worker process holds: settings, a database engine, a Redis client and the locks.

Built lazily and per process: prefork pool children must not share the parent's sockets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import redis
from sqlalchemy import Engine

from orderonce.config import Settings, resolve, settings
from worker.db import make_engine
from worker.exactly_once import Config
from worker.locks import BatchLocks, EventLocks, lock_client


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    redis: redis.Redis
    locks: EventLocks
    batch_locks: BatchLocks
    config: Config


_runtime: tuple[int, Runtime] | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        s = settings()
        urls = resolve()
        client = lock_client(urls.redis_url)
        config = Config(
            max_body_bytes=s.max_body_bytes,
            db_attempts=s.db_retry_attempts,
            duplicate_policy=s.duplicate_policy,
            duplicate_window=timedelta(seconds=s.duplicate_window_s),
            verify_keys=s.verification_keys(),
        )
        engine = make_engine(urls.database_url, s)
        rt = Runtime(
            s,
            engine,
            client,
            EventLocks(client, s.lock_ttl_ms),
            BatchLocks(client, s.lock_ttl_ms),
            config,
        )
        _runtime = (os.getpid(), rt)
    return _runtime[1]

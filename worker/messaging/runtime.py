"""What a worker process holds: settings, URLs, a database engine, a Redis client and the locks.

Built lazily and per process, from the settings and URLs ``create_app`` was given: prefork pool
children must not share the parent's sockets, so a child builds its own on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import Engine

from orderonce.config import Settings, Urls
from worker.protocol import Config
from worker.protocol.locks import BatchLocks, EventLocks, lock_client
from worker.store.db import make_engine


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    urls: Urls
    engine: Engine
    redis: redis.Redis
    locks: EventLocks
    batch_locks: BatchLocks
    config: Config


def protocol_config(s: Settings) -> Config:
    return Config(
        max_body_bytes=s.max_body_bytes,
        db_attempts=s.db_retry_attempts,
        duplicate_policy=s.duplicate_policy,
        duplicate_window=timedelta(seconds=s.duplicate_window_s),
        verify_keys=s.verification_keys(),
    )


class Runtimes:
    """The runtime of this process, for one app: built on first use in each process."""

    def __init__(self, settings: Settings, urls: Urls) -> None:
        self.settings = settings
        self.urls = urls
        self._built: tuple[int, Runtime] | None = None

    def get(self) -> Runtime:
        if self._built is None or self._built[0] != os.getpid():
            s = self.settings
            client = lock_client(self.urls.redis_url)
            rt = Runtime(
                s,
                self.urls,
                make_engine(self.urls.database_url, s),
                client,
                EventLocks(client, s.lock_ttl_ms),
                BatchLocks(client, s.lock_ttl_ms),
                protocol_config(s),
            )
            self._built = (os.getpid(), rt)
        return self._built[1]


def runtime_of(app: Any) -> Runtime:
    """The runtime of the process running ``app`` (an app built by ``create_app``)."""
    runtimes: Runtimes = app.orderonce_runtimes
    return runtimes.get()

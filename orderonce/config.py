"""Settings, read from ``ORDERONCE_*`` environment variables (secrets never live in files here).

Reading them does nothing else: which servers a command uses is decided by the command (the CLI
starts embedded ones when no URLs are configured, orderonce/dev/embedded.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from orderonce.errors import MissingUrls, UnsafeSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERONCE_", frozen=True)

    database_url: str | None = None
    redis_url: str | None = None
    broker_url: str | None = None  # defaults to redis_url
    state_dir: Path = Path(".orderonce")

    queue: str = "orderonce.events"
    # Redis brokers: orderonce's transport (atomic receive, many messages per round trip:
    # worker/messaging/transport.py) or kombu's own, the fallback. Both share queues.
    redis_transport: Literal["orderonce", "kombu"] = "orderonce"
    # RabbitMQ: the queue of plain CloudEvents (the AMQP binding) the workers also consume
    # (worker/messaging/amqp_ingest.py).
    ingest_queue: str = "orderonce.ingest"
    # Per-order ordering (docs/operations.md#per-order-ordering): 0 is off. N > 0 routes each
    # event by its order id (subject) to one of the queues ``{queue}.0`` .. ``{queue}.{N-1}``,
    # each consumed by one single-threaded worker (``orderonce worker --shard I``).
    ordered_queues: int = 0
    # RabbitMQ only: a message returned to its queue (a worker died or rejected it) more often
    # than this goes to the dead-letter exchange and from there to the dead_letters table.
    delivery_limit: int = 10
    max_body_bytes: int = 256 * 1024

    # Time budget of one delivery. The lock must outlive any live holder (ttl > hard limit), and
    # the broker must not hand a message to a second worker while the first may still run it
    # (visibility timeout > hard limit), or the lock would be the only thing left between two
    # concurrent runs. The database still decides, but we want contention to be rare.
    task_soft_time_limit_s: float = 20.0
    task_time_limit_s: float = 30.0
    lock_ttl_ms: int = 40_000
    visibility_timeout_s: int = 90
    restore_interval_s: int = 5
    # A session left idle inside a transaction (its worker paused or wedged) would hold the
    # processed-messages row and block the worker taking over; PostgreSQL ends it after this.
    idle_in_transaction_timeout_ms: int = 10_000
    statement_timeout_ms: int = 15_000

    # Retries of one delivery before Celery takes over with a redelivery.
    db_retry_attempts: int = 5
    # Backoff for events that arrive before the state they need, and their budget before parking.
    too_early_max_retries: int = 12
    too_early_backoff_s: float = 0.5
    too_early_backoff_max_s: float = 30.0
    # Longest wait before retrying after a database error or a failing handler.
    retry_backoff_max_s: float = 30.0
    lock_busy_countdown_s: float = 1.0
    poison_max_retries: int = 5
    # Batch mode: a batch message with more events than this is split into single-event
    # messages rather than held in one transaction for too long.
    batch_max_events: int = 1000
    # Events of a batch too early for it (their order is being created by a batch still in
    # flight on another worker, most often), or whose lock another worker holds (a copy in
    # that worker's batch, most often), are tried again this many times before they go to the
    # single-event path's backoff: batch messages within the task (at once, then 10, 20, 40,
    # 80 ms apart); buffered mode at once, then in the worker's next batches, so that the
    # worker does not sleep while the rest of its buffer waits (with nothing else buffered, the
    # next batch comes with the next message or after 10, 20, 40 ms, buffered_max_wait_ms at
    # most).
    batch_too_early_retries: int = 5
    # Buffered consumption (worker/messaging/buffered.py): a worker process (the default pool,
    # or ``--pool solo``) takes up to this many single-event messages at a time (its prefetch)
    # and applies them with the batch protocol in one transaction, acking each message after
    # the commit. 0 here: the buffered pool's own default (orderonce.cli.run.DEFAULT_BUFFER),
    # and no buffer for ``--pool solo``. With buffered_wait_ms 0 (the default) the buffer is
    # applied as soon as the broker has nothing more to give right now (the messages of one
    # receive), so a lone event waits for nothing; under load each receive brings what queued up
    # during the previous transaction. With buffered_wait_ms > 0 it waits after the first
    # message as long as the previous transaction took (group commit), at least
    # buffered_wait_ms and at most buffered_max_wait_ms.
    buffered: int = 0
    buffered_wait_ms: float = 0.0
    buffered_max_wait_ms: float = 50.0

    # The relay sends outbox rows that have no terminal record this long after their last
    # send (backing off up to 8x on each further send), checking every relay_interval_s.
    relay_resend_after_s: float = 60.0
    # ... except what was sent after the oldest message still waiting on the broker (it waits
    # too), unless it was sent longer ago than this (producers/relay.py, horizon).
    relay_max_hold_s: float = 600.0
    relay_interval_s: float = 1.0
    relay_batch_size: int = 500

    # A new order matching another live order of the same customer (same lines, total,
    # currency and address) submitted within this window is a suspected duplicate, and is
    # held for a person (hold), refused (reject) or taken as it is (allow).
    duplicate_policy: Literal["hold", "reject", "allow"] = "hold"
    duplicate_window_s: int = 600

    # The HTTP front door (``orderonce ingest``, producers/ingest/). Bearer tokens and the
    # sources each may publish, "token:source-prefix,...": with none, the front door serves
    # loopback addresses only. From the environment only.
    ingest_tokens: SecretStr | None = None
    ingest_max_request_bytes: int = 4 * 1024 * 1024
    ingest_max_batch_events: int = 1000
    # Backpressure: requests are refused (429) while the broker holds more messages than this.
    ingest_max_backlog: int = 100_000
    # Group commit: at most this many events per transaction, this many transactions at once.
    ingest_group_max_events: int = 500
    ingest_writers: int = 4

    # Message authentication (schemas/signing.py). Producers sign with signing_key; workers
    # accept events signed with any of verify_keys (comma-separated: rotation), and, when any
    # key is set, dead-letter unsigned or forged events. From the environment only.
    signing_key: SecretStr | None = None
    verify_keys: SecretStr | None = None

    def verification_keys(self) -> tuple[bytes, ...]:
        keys = self.verify_keys.get_secret_value().split(",") if self.verify_keys else []
        if self.signing_key:
            keys.append(self.signing_key.get_secret_value())
        return tuple(k.strip().encode() for k in keys if k.strip())


def check_safety(s: Settings) -> None:
    problems = []
    if s.task_soft_time_limit_s >= s.task_time_limit_s:
        problems.append("task_soft_time_limit_s must be below task_time_limit_s")
    if s.lock_ttl_ms / 1000 <= s.task_time_limit_s:
        problems.append("lock_ttl_ms must exceed task_time_limit_s, or a live holder loses it")
    # A retried message waits out its countdown unacknowledged in the worker, then runs.
    longest_hold = s.task_time_limit_s + max(s.too_early_backoff_max_s, s.retry_backoff_max_s)
    if s.visibility_timeout_s <= longest_hold:
        problems.append(
            "visibility_timeout_s must exceed task_time_limit_s plus the longest retry "
            "countdown, or the broker redelivers messages that a live worker still holds"
        )
    if not 0 <= s.buffered <= s.batch_max_events:
        problems.append("buffered must be between 0 (off) and batch_max_events")
    if not 0 <= s.buffered_wait_ms <= s.buffered_max_wait_ms <= 1000:
        problems.append("buffered_wait_ms must be between 0 and buffered_max_wait_ms (<= 1000)")
    if s.idle_in_transaction_timeout_ms / 1000 >= s.lock_ttl_ms / 1000:
        problems.append("idle_in_transaction_timeout_ms must be shorter than lock_ttl_ms")
    if s.delivery_limit < 1:
        problems.append("delivery_limit must be at least 1, or RabbitMQ never redelivers")
    if not 1 <= s.ingest_group_max_events <= s.batch_max_events:
        problems.append("ingest_group_max_events must be between 1 and batch_max_events")
    if not 1 <= s.ingest_max_batch_events <= s.batch_max_events:
        problems.append("ingest_max_batch_events must be between 1 and batch_max_events")
    if s.ordered_queues < 0:
        problems.append("ordered_queues must be 0 (off) or a number of queues")
    if problems:
        raise UnsafeSettings("; ".join(problems))


@cache
def settings() -> Settings:
    """This process's settings; raises UnsafeSettings rather than run with unsafe ones."""
    loaded = Settings()
    check_safety(loaded)
    return loaded


@dataclass(frozen=True)
class Urls:
    """The servers of this process."""

    database_url: str
    redis_url: str  # the event locks
    broker_url: str


def configured_urls(s: Settings) -> Urls:
    """The servers the settings name; MissingUrls when the database or Redis URL is not set
    (the CLI then starts the embedded ones: orderonce.dev.embedded.urls_or_embedded)."""
    if s.database_url is None or s.redis_url is None:
        missing = [n for n, v in (("DATABASE", s.database_url), ("REDIS", s.redis_url)) if not v]
        raise MissingUrls(", ".join(f"ORDERONCE_{n}_URL" for n in missing) + " not set")
    return Urls(s.database_url, s.redis_url, s.broker_url or s.redis_url)

"""Prometheus metrics of a worker, prefork-safe (prometheus-client's multiprocess mode).

Every process of a worker (the main one and each prefork pool child) writes its samples to
memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR``; the main process serves their sum over
HTTP. Metrics are on in a process exactly when that variable is set: ``orderonce worker
--metrics-port N`` sets it, to a fresh directory of its own unless the user chose one, before
Celery forks its pool, so the children inherit it.

The ``observe_*`` functions are what the task calls. Off, each is one flag test; on, a few set
look-ups and an mmap write. None of them ever raises: a metrics failure must not turn an event
whose outcome is already committed into a failed task (which would retry it).

Label values are bounded: anything outside the known outcomes, causes, reasons and event types
is counted as "other", so a producer sending odd types cannot blow up the series count.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec

from schemas import EVENT_TYPES
from schemas.vocabulary import (
    HELD_AS_SUSPECTED_DUPLICATE,
    SUSPECTED_DUPLICATE,
    DeadLetterReason,
    DuplicateCause,
    OutcomeKind,
    RetryCause,
)

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram
    from prometheus_client.metrics_core import Metric
    from sqlalchemy import Engine

    from worker.protocol.single import Outcome

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_DIR_PREFIX = "orderonce-metrics-"
OTHER = "other"

OUTCOMES = frozenset(OutcomeKind)
DUPLICATE_CAUSES = frozenset(DuplicateCause)
# A suspected duplicate order caught by its content (docs/duplicates.md) is applied and held,
# or rejected, rather than counted as a duplicate outcome; its reason says so.
_FINGERPRINT_REASONS = (HELD_AS_SUSPECTED_DUPLICATE, SUSPECTED_DUPLICATE)
RETRY_REASONS = frozenset(RetryCause)
DEAD_LETTER_REASONS = frozenset(DeadLetterReason)
_TYPES = frozenset(EVENT_TYPES)

BACKLOG = "orderonce_dead_letter_backlog"
# Seconds to minutes is normal; hours mean a stuck queue or a replayed batch.
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)


def enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


@dataclass(frozen=True)
class _Metrics:
    events: Counter
    lock_contention: Counter
    retries: Counter
    dead_letters: Counter
    processing: Histogram
    lag: Histogram


_metrics: _Metrics | None = None
_disabled = False  # set once creating the metrics failed: do not try again on every event
_create_lock = threading.Lock()


def _get() -> _Metrics | None:
    global _metrics, _disabled
    if _metrics is not None or _disabled or not enabled():
        return _metrics
    with _create_lock:
        if _metrics is None and not _disabled:
            try:
                _metrics = _create()
            except Exception:
                _disabled = True
                log.warning("metrics disabled: could not create them", exc_info=True)
    return _metrics


def _create() -> _Metrics:
    from prometheus_client import Counter, Histogram, values

    # prometheus-client picks its value class when first imported. Imported before the
    # variable was set, it would count in this process's memory, which nobody serves.
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set")
    return _Metrics(
        events=Counter(
            "orderonce_events",
            "Events processed, by outcome, duplicate cause and event type.",
            ["outcome", "cause", "type"],
        ),
        lock_contention=Counter(
            "orderonce_lock_contention", "Event locks found held by another worker."
        ),
        retries=Counter(
            "orderonce_retries",
            "Deliveries, or events of a batch, put off for later, by why.",
            ["reason"],
        ),
        dead_letters=Counter(
            "orderonce_dead_letters", "Dead letters recorded, by reason.", ["reason"]
        ),
        processing=Histogram(
            "orderonce_processing_seconds", "Time to process one event, parse to commit."
        ),
        lag=Histogram(
            "orderonce_lag_seconds",
            "End-to-end lag: from the event's time to the end of its processing.",
            buckets=_LAG_BUCKETS,
        ),
    )


P = ParamSpec("P")


def _never_raises(func: Callable[P, None]) -> Callable[P, None]:
    @wraps(func)
    def safe(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            func(*args, **kwargs)
        except Exception:
            log.debug("metric not recorded", exc_info=True)

    return safe


def _bounded(value: str | None, known: frozenset[str]) -> str:
    if not value:
        return ""
    # Reasons may carry a detail after a colon ("parked: order unknown"): the code is the label.
    code = value.split(":", 1)[0].strip()
    return code if code in known else OTHER


def _labels(outcome: str, reason: str | None, event_type: str | None) -> tuple[str, str, str]:
    """The events counter's labels: outcome, duplicate cause, event type (all bounded)."""
    type_label = "" if not event_type else event_type if event_type in _TYPES else OTHER
    return (outcome if outcome in OUTCOMES else OTHER, _cause(outcome, reason), type_label)


def _cause(outcome: str, reason: str | None) -> str:
    if outcome == OutcomeKind.DUPLICATE:
        return reason if reason in DUPLICATE_CAUSES else OTHER
    if reason and reason.startswith(_FINGERPRINT_REASONS):
        return "fingerprint"
    return ""


@_never_raises
def observe_event(
    outcome: str,
    reason: str | None,
    event_type: str | None,
    seconds: float,
    lag_seconds: float | None,
) -> None:
    """One message processed to a final outcome; ``lag_seconds`` is now minus the event's
    time (None when the event could not be read)."""
    m = _get()
    if m is None:
        return
    m.events.labels(*_labels(outcome, reason, event_type)).inc()
    m.processing.observe(max(seconds, 0.0))
    if lag_seconds is not None:
        # A producer's clock ahead of ours gives a negative lag: count it as none at all.
        m.lag.observe(max(lag_seconds, 0.0))


def lag_since(event_time: datetime | None, now: datetime | None = None) -> float | None:
    """Seconds from an event's time to now, for ``observe_event``; None if unknown. Never
    raises (a naive time is taken as UTC), so the task can call it after its commit."""
    if event_time is None:
        return None
    try:
        if event_time.tzinfo is None:
            event_time = event_time.replace(tzinfo=UTC)
        return ((now or datetime.now(UTC)) - event_time).total_seconds()
    except Exception:
        return None


@_never_raises
def observe_outcome(outcome: Outcome, elapsed_s: float) -> None:
    """An event's outcome as the task (or the buffer) recorded it."""
    observe_outcomes([outcome], elapsed_s)


@_never_raises
def observe_outcomes(outcomes: list[Outcome], elapsed_s: float) -> None:
    """The outcomes of one delivery (a batch, a buffer) as ``observe_event`` counts each; the
    counter goes up once per label set (in multiprocess mode every increment is a locked write
    to a shared file, and a batch's hundred events share a handful of label sets)."""
    m = _get()
    if m is None:
        return
    counts: dict[tuple[str, str, str], int] = {}
    now = datetime.now(UTC)
    lags: list[float] = []
    for o in outcomes:
        key = _labels(o.kind, o.reason, o.event_type)
        counts[key] = counts.get(key, 0) + 1
        if (lag := lag_since(o.event_time, now)) is not None:
            lags.append(max(lag, 0.0))  # a producer's clock ahead of ours: no lag at all
        if o.kind == OutcomeKind.DEAD_LETTERED:
            observe_dead_letter(o.reason or "other")
    for key, n in counts.items():
        m.events.labels(*key).inc(n)
    observe_many(m.processing, [max(elapsed_s, 0.0)] * len(outcomes))
    observe_many(m.lag, lags)


def observe_many(histogram: Histogram, amounts: list[float]) -> None:
    """``histogram.observe(a)`` for each amount, with one write per bucket it touches and
    one to the sum, instead of two writes per amount: in multiprocess mode each write takes a
    lock and writes the shared file (measured: 6.4 µs of a consumer's CPU per event for the
    two histograms, one write each per bucket and sum here). Reads the histogram as its own
    ``observe`` does (``_upper_bounds``, ``_buckets``, ``_sum``); a prometheus-client without
    them gets ``observe`` for each amount. NaN is not an amount (it is never observed)."""
    amounts = [a for a in amounts if not math.isnan(a)]
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for a in amounts:
            histogram.observe(a)
        return
    if not amounts:
        return
    per_bucket: dict[int, int] = {}
    for a in amounts:
        i = bisect.bisect_left(bounds, a)  # the first bound >= a, as observe finds it
        per_bucket[i] = per_bucket.get(i, 0) + 1
    total.inc(sum(amounts))
    for i, n in per_bucket.items():
        buckets[i].inc(n)


@_never_raises
def observe_lock_busy() -> None:
    m = _get()
    if m is not None:
        m.lock_contention.inc()


@_never_raises
def observe_retry(reason: str) -> None:
    """A delivery, or an event of a batch, put off for later: lock_busy, too_early, database or
    error."""
    m = _get()
    if m is not None:
        m.retries.labels(_bounded(reason, RETRY_REASONS) or OTHER).inc()


@_never_raises
def observe_dead_letter(reason: str) -> None:
    m = _get()
    if m is not None:
        m.dead_letters.labels(_bounded(reason, DEAD_LETTER_REASONS) or OTHER).inc()


# --- the multiprocess directory -------------------------------------------------------------

_owned: tuple[int, Path] | None = None  # (pid of the owner, the directory it created)


def setup_multiprocess_dir() -> Path:
    """Make sure PROMETHEUS_MULTIPROC_DIR names a directory; call before Celery forks.

    A directory the user chose is created if missing and otherwise left alone (it may be
    shared, and emptying it between runs is then theirs to do, as prometheus-client asks). Else
    a fresh one is made under the system temp directory and removed at exit; ones left by
    killed workers are swept first, so SIGKILLs do not pile them up."""
    global _owned
    chosen = os.environ.get(MULTIPROC_ENV)
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    _sweep_stale(Path(tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
    os.environ[MULTIPROC_ENV] = str(path)
    _owned = (os.getpid(), path)
    atexit.register(_remove_owned)
    return path


def _remove_owned() -> None:
    # Forked pool children inherit atexit handlers; only the process that made it removes it.
    if _owned is not None and _owned[0] == os.getpid():
        shutil.rmtree(_owned[1], ignore_errors=True)


def _sweep_stale(parent: Path) -> None:
    for path in parent.glob(f"{_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# --- serving ---------------------------------------------------------------------------------


class DeadLetterBacklog:
    """The open dead letters, counted by the database at scrape time, in the serving process
    only: a per-process gauge file could not know the total, and the table already does."""

    def __init__(self, database_url: str, timeout_s: int = 2) -> None:
        self._url = database_url
        self._timeout_s = timeout_s
        self._engine: Engine | None = None

    def describe(self) -> Iterable[Metric]:
        # Declared without touching the database, so registering never blocks on it.
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        try:
            count = self._count()
        except Exception as exc:
            # Skip the sample, not the scrape: every other metric is still worth having.
            log.warning("dead-letter backlog not sampled: %s", exc)
            return []
        family = self._family()
        family.add_metric([], count)
        return [family]

    @staticmethod
    def _family() -> Any:
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(BACKLOG, "Dead letters waiting for a person (status open).")

    def _count(self) -> int:
        from sqlalchemy import text

        with self._engine_().connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM dead_letters WHERE status = 'open'")
                ).scalar_one()
            )

    def _engine_(self) -> Engine:
        if self._engine is None:
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool

            # No pool: a scrape every few seconds can afford a connection, and no pooled
            # socket is then inherited by pool children forked after a scrape.
            self._engine = create_engine(
                self._url,
                poolclass=NullPool,
                connect_args={
                    "connect_timeout": self._timeout_s,
                    "options": f"-c statement_timeout={self._timeout_s * 1000}"
                    " -c application_name=orderonce-metrics",
                },
            )
        return self._engine


def serve(port: int, database_url: str) -> None:
    """Serve /metrics on ``port`` (all interfaces, for a scraper in another container) from a
    background thread of this process: the sum over every process's files plus the backlog."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    setup_multiprocess_dir()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    registry.register(DeadLetterBacklog(database_url))
    start_http_server(port, registry=registry)
    log.info("serving metrics on port %d from %s", port, os.environ[MULTIPROC_ENV])


def install_celery_hooks() -> None:
    """Mark each pool child dead as it exits, as multiprocess mode asks (drops its live-gauge
    files; its counters stay in the sums). Idempotent; harmless with metrics off."""
    from celery.signals import worker_process_shutdown

    worker_process_shutdown.connect(_on_child_exit, weak=False, dispatch_uid="orderonce.metrics")


def _on_child_exit(pid: int | None = None, **_: Any) -> None:
    process_exited(pid or os.getpid())


def process_exited(pid: int) -> None:
    """Drop a finished process's live-gauge files (multiprocess mode); harmless with metrics
    off."""
    if not enabled():
        return
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

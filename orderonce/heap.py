"""Garbage collection for long-running processes that load a large heap at start.

CPython's full (generation 2) collection walks every object the collector tracks. A worker or
the front door holds hundreds of thousands of them from what it imported (Celery, kombu,
SQLAlchemy, pydantic, Starlette), all alive until the process exits, so each full collection
rescans them for nothing: in bench.throughput's latency phase a buffered consumer paused 40 to
65 ms for one, a few times a minute (about 2 ms frozen); the front door's p99 for single events
fell from about 60 to 25 ms when frozen. Frozen (``gc.freeze``), what was loaded at start is
left out of every later collection; a higher first threshold runs the young collection less
often over the many short-lived dicts and lists each event makes. Cycles created later are
still collected.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Call once the process has loaded what it keeps (before it serves)."""
    gc.collect()  # garbage of the start-up itself is freed, not frozen for good
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)

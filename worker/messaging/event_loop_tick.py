"""A short tick in the worker's event loop on RabbitMQ, so a delivery never waits there.

py-amqp may read the next delivery's frames into its own buffer while handling the previous
one; the socket then has nothing left to read, and Celery's event loop sleeps in ``poll`` for
as long as its next timer allows, up to 10 s, before it looks at that buffer again (seen with
a solo worker and plain Celery on a classic queue as well: two messages published back to
back, the second ran 10 s after the first). A timer every ``TICK_S`` caps that wait.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from worker.messaging.broker import is_amqp

TICK_S = 0.2


def _nothing() -> None:
    """The tick itself: waking the loop is all it is for."""


class EventLoopTick(bootsteps.StartStopStep):  # type: ignore[misc]  # celery ships no hints
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._entry: Any = None

    def include_if(self, c: Any) -> bool:
        return is_amqp(str(c.app.conf.broker_url))

    def start(self, c: Any) -> None:
        if c.hub is not None and self._entry is None:
            self._entry = c.hub.call_repeatedly(TICK_S, _nothing)

    def shutdown(self, c: Any) -> None:
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None

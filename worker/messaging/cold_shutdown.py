"""How a worker stops cold (SIGQUIT): in-flight work abandoned, its messages unacked, so the
broker hands them out again and the processed-messages table keeps any second try from taking
effect twice. Celery's own cold shutdown runs inside the signal handler, wherever the signal
landed; two places where that goes wrong are handled here, one per pool.

``create_app`` connects ``solo_exits_at_once`` to ``worker_ready`` and adds
``PreforkColdShutdownFromTheLoop`` to the consumer's steps; both act in the worker's main
process, after Celery has installed its signal handlers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from types import FrameType
from typing import Any

from celery import bootsteps
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.worker.loops import asynloop

log = logging.getLogger(__name__)


def solo_exits_at_once(sender: Any, **_: Any) -> None:
    """A solo worker told to stop cold (SIGQUIT, Ctrl+C) exits at once, acking nothing.

    Celery's own cold shutdown cancels the active requests through the pool, and the solo pool
    cannot: it raises NotImplementedError from the signal handler, inside the running task.
    Landing outside our task body (between Celery's own steps), that error fails the task and
    Celery acks the failed message: an event lost without an outcome. Seen once in the
    shutdown test on RabbitMQ. Exiting is what a cold shutdown means anyway: in-flight work
    is abandoned and the broker hands it out again.
    """
    if isinstance(getattr(sender, "pool", None), SoloPool):
        for sig in (signal.SIGQUIT, signal.SIGINT):
            signal.signal(sig, lambda *_: os._exit(1))


class PreforkColdShutdownFromTheLoop(bootsteps.StartStopStep):  # type: ignore[misc]  # no hints
    """A prefork worker told to stop cold while its event loop runs starts Celery's cold
    shutdown from the loop, not from inside whatever the signal interrupted.

    Celery's cold shutdown cancels the active requests, then joins the pool until every job it
    has handed to a pool process is done. When the signal lands while the main process is
    writing a job to a pool process, the rest of that job is never written: the join waits
    for it for good and the worker hangs (the shutdown test, 1 run in 40; py-spy showed the
    main process in ``_flush_outqueue`` under the handler, under ``_write_job``). So while the
    loop is on the interrupted stack, the handler only writes a byte to a pipe the loop
    watches, and the loop runs Celery's handler between two of its callbacks. Anywhere else
    (starting, a warm shutdown under way) Celery's handler runs at once, as before; once it has
    run, a further SIGQUIT is Celery's (it installs its own "hard" handlers). One gap: a
    SIGQUIT in the same turn of the loop as a SIGTERM the loop has not acted on yet may not
    be read before the loop leaves for the warm shutdown; that shutdown finishes the events in
    hand and exits, and a further SIGQUIT reaches Celery's handler.

    Setting Celery's terminate flag from the handler instead (the loop raises WorkerTerminate)
    was tried and is worse: that path terminates the pool processes without reading their
    last results, and each waits 30 s for them to be read before it exits.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._celery_handler: Any = None
        self._wake_read, self._wake_write = -1, -1

    def include_if(self, c: Any) -> bool:
        return isinstance(c.pool, PreforkPool)

    def register_with_event_loop(self, c: Any, hub: Any) -> None:
        # Called each time the loop starts: a reconnect resets the hub, readers included.
        if self._celery_handler is None:
            handler = signal.getsignal(signal.SIGQUIT)
            if not callable(handler):
                return
            self._celery_handler = handler
            self._wake_read, self._wake_write = os.pipe()
            os.set_blocking(self._wake_read, False)
            os.set_blocking(self._wake_write, False)
            signal.signal(signal.SIGQUIT, self._on_sigquit)
        hub.add_reader(self._wake_read, self._on_wakeup, hub)

    def _on_sigquit(self, signum: int, frame: FrameType | None) -> None:
        if _in_event_loop(frame):
            with contextlib.suppress(OSError):  # a full pipe: a wakeup is already pending
                os.write(self._wake_write, b"q")
        else:
            self._celery_handler(signum, frame)

    def _on_wakeup(self, hub: Any) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_read, 64)
        hub.remove_reader(self._wake_read)
        log.info("SIGQUIT: cold shutdown, started from the event loop")
        self._celery_handler(signal.SIGQUIT, None)


def _in_event_loop(frame: FrameType | None) -> bool:
    """Whether Celery's event loop is on the interrupted stack: it polls again, and sees the
    pipe, once the callback it is in returns."""
    while frame is not None:
        if frame.f_code is asynloop.__code__:
            return True
        frame = frame.f_back
    return False

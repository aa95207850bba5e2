"""A queue consumed beside Celery's: a worker bootstep that runs a kombu consumer in a thread of
the worker's main process, on a connection of its own, reconnecting until the worker stops
(RabbitMQ only). What to consume and what to do with each message is the subclass's.

On a connection of its own: a second consumer on the worker's task connection made task
deliveries wait (seen: 10 s stalls between two messages on a solo worker), since Celery's event
loop reads that connection for its own consumer only. It starts after the pool, so the pool's
first processes are forked before the thread exists.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps
from kombu.connection import Connection
from kombu.messaging import Consumer

from worker.messaging.broker import is_amqp

log = logging.getLogger(__name__)

HEARTBEAT_S = 30
RECONNECT_PAUSE_S = 2.0


class QueueThread(bootsteps.StartStopStep):  # type: ignore[misc]  # celery: no hints
    requires = ("celery.worker.components:Pool",)
    thread_name = "queue-thread"
    prefetch = 4

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def queue(self, app: Any) -> Any:
        """The kombu Queue to consume (declared on connecting)."""
        raise NotImplementedError

    def on_message(self, app: Any, message: Any) -> None:
        """Handle one raw message (its body never deserialised by kombu) and ack, reject or
        requeue it."""
        raise NotImplementedError

    def include_if(self, w: Any) -> bool:
        return is_amqp(str(w.app.conf.broker_url))

    def start(self, w: Any) -> None:
        self._declare(w.app)
        self._thread = threading.Thread(
            target=self._run, args=(w.app,), name=self.name, daemon=True
        )
        self._thread.start()

    def _declare(self, app: Any) -> None:
        """Declare the queue before the worker says it is ready: a producer that publishes as
        soon as the worker is up must find it (the default exchange drops a message for a queue
        that does not exist yet)."""
        try:
            with Connection(str(app.conf.broker_url), connect_timeout=5) as conn:  # type: ignore[no-untyped-call]  # kombu
                self.queue(app)(conn.default_channel).declare()
        except Exception:  # the broker is down: the thread declares it once it connects
            log.warning("%s: could not declare its queue yet", self.thread_name, exc_info=True)

    def stop(self, w: Any) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, app: Any) -> None:
        broker_url = str(app.conf.broker_url)
        queue = self.queue(app)
        while not self._stopping.is_set():
            try:
                connection = Connection(  # type: ignore[no-untyped-call]  # kombu: no hints
                    broker_url, heartbeat=HEARTBEAT_S, connect_timeout=5
                )
                with connection as conn:
                    consumer = Consumer(  # type: ignore[no-untyped-call]  # kombu: no hints
                        conn.channel(),
                        queues=[queue],
                        on_message=lambda message: self.on_message(app, message),
                        prefetch_count=self.prefetch,
                    )
                    with consumer:
                        self._drain(conn)
            except Exception:
                if self._stopping.is_set():
                    return
                log.exception("%s: consumer failed; reconnecting", self.thread_name)
                self._stopping.wait(RECONNECT_PAUSE_S)

    def _drain(self, conn: Any) -> None:
        while not self._stopping.is_set():
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                conn.heartbeat_check()

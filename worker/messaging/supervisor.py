"""The default worker (``orderonce worker``): N buffered consumers, one process per core, kept
running by one supervising process.

Why processes of their own and not Celery's prefork pool: buffered mode applies its buffer in
the consumer's process, on its event loop (worker/messaging/buffered.py), so each consumer is a
single-threaded ``orderonce worker --pool solo --buffered B`` of its own. This module is what
prefork's main process did for its children, and no more:

- it starts them, each with its own node name (``NAME-I@HOST``);
- SIGTERM or SIGINT is passed on to every child as SIGTERM (a warm shutdown: each applies and
  acks its buffer first); SIGQUIT as SIGQUIT (cold); it exits once they all have;
- a child that exits while nothing asked it to is started again, after a pause that doubles
  while children keep dying young (1 s up to 30 s), as a crashed pool child is replaced. Its
  unacked messages come back through the broker (visibility timeout), to it or another one;
- a child that refuses its settings (exit code 2) stops them all: starting it again would only
  repeat the refusal;
- each child exits if the supervisor dies first (``PR_SET_PDEATHSIG``), so a SIGKILLed
  supervisor leaves no consumer behind that nobody stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Set in each child's environment: the pid it must not outlive.
SUPERVISOR_ENV = "ORDERONCE_SUPERVISOR_PID"
REFUSED = 2  # orderonce worker's exit code for settings it refuses
_PR_SET_PDEATHSIG = 1


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes]
    started: float


class Supervisor:
    def __init__(
        self,
        argvs: list[list[str]],
        *,
        on_exit: Callable[[int], None] = lambda pid: None,
        young_s: float = 10.0,
        max_pause_s: float = 30.0,
    ) -> None:
        self._argvs = argvs
        self._on_exit = on_exit  # given each child's pid once it is gone (metrics' files)
        self._young_s = young_s
        self._max_pause_s = max_pause_s
        self._children: dict[int, _Child] = {}
        self._stopping: signal.Signals | None = None
        self._pause_s = 1.0
        self._code = 0

    def run(self) -> int:
        """Start the children and keep them running until a signal stops them; the exit code."""
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
        before = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            return self._supervise()
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        for index in range(len(self._argvs)):
            self._start(index)
        log.info("supervising %d worker processes", len(self._children))
        while self._children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            child = self._children.pop(pid, None)
            if child is None:
                continue
            self._on_exit(pid)
            code = os.waitstatus_to_exitcode(status)
            if self._stopping is not None:
                continue
            if code == REFUSED:
                log.error("worker process %d refused its settings; stopping", child.index)
                self._code = REFUSED
                self._stop(signal.SIGTERM)
                continue
            self._restart(child, code)
        return self._code

    def _start(self, index: int) -> None:
        env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
        proc = subprocess.Popen(self._argvs[index], env=env)
        self._children[proc.pid] = _Child(index, proc, time.monotonic())

    def _restart(self, child: _Child, code: int) -> None:
        young = time.monotonic() - child.started < self._young_s
        pause = self._pause_s if young else 1.0
        self._pause_s = min(pause * 2, self._max_pause_s) if young else 1.0
        log.warning(
            "worker process %d (pid %d) exited with %s; starting a new one in %.0f s",
            child.index,
            child.proc.pid,
            code,
            pause,
        )
        deadline = time.monotonic() + pause
        while self._stopping is None and time.monotonic() < deadline:
            time.sleep(0.1)  # a signal meanwhile: nothing to start again
        if self._stopping is None:
            self._start(child.index)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop(signal.SIGQUIT if signum == signal.SIGQUIT else signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> None:
        if self._stopping == sig:
            return
        self._stopping = sig
        for child in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)


def follow_supervisor() -> None:
    """In a child: receive SIGTERM when the supervisor dies (Linux), and exit at once if it is
    already gone. No-op when not started by a supervisor."""
    expected = os.environ.get(SUPERVISOR_ENV)
    if not expected:
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if str(os.getppid()) != expected:  # died before prctl took hold
        sys.exit(0)

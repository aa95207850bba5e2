"""Real Celery worker processes for the tests, and the helpers to drive and watch them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll until ``check()`` is truthy; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerProcess:
    """One ``orderonce worker`` in its own process group (main process plus pool children)."""

    def __init__(
        self, name: str, env: dict[str, str], log: Path, pool: str, concurrency: int
    ) -> None:
        self.name = name
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orderonce",
                "worker",
                f"--pool={pool}",
                f"--concurrency={concurrency}",
                f"--name={name}@%h",
            ],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def outcomes(self, event_id: str) -> list[str]:
        """The outcomes this worker logged for an event (from its JSON log lines)."""
        found = []
        for line in self.text().splitlines():
            if line.startswith("{") and event_id in line:
                entry = json.loads(line)
                if entry.get("event_id") == event_id and "outcome" in entry:
                    found.append(entry["outcome"])
        return found

    def wait_ready(self, timeout: float = 30) -> None:
        wait_until(
            lambda: " ready." in self.text() or self.proc.poll() is not None,
            timeout,
            f"worker {self.name} to start",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited at start:\n{self.text()[-3000:]}")

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal_group(signal.SIGCONT)  # a stopped process group must not outlive the test
        self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._out.close()

    def terminate(self, timeout: float = 20) -> None:
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._out.close()


class WorkerFactory:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self._env = env
        self._tmp = tmp
        self.started: list[WorkerProcess] = []

    def start(
        self,
        name: str = "w",
        *,
        pool: str = "solo",
        concurrency: int = 1,
        ready: bool = True,
        **env: str,
    ) -> WorkerProcess:
        full_env = {**os.environ, **self._env, **env}
        n = len(self.started)
        worker = WorkerProcess(
            f"{name}{n}", full_env, self._tmp / f"{name}{n}.log", pool, concurrency
        )
        self.started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.proc.poll() is None:
                worker.kill()

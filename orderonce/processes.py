"""Worker processes started by orderonce itself (the demo, the tests): start, watch, kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class WorkerDidNotStart(RuntimeError):
    pass


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll until ``check()`` is truthy; raise TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerProcess:
    """One ``orderonce worker`` in its own process group (main process plus pool children)."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log: Path,
        pool: str = "solo",
        concurrency: int = 1,
        args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.log = log
        self._out = log.open("ab")
        self._offset = self._out.tell()  # a restarted worker may append to an earlier log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orderonce",
                "worker",
                f"--pool={pool}",
                f"--concurrency={concurrency}",
                f"--name={name}@%h",
                *args,
            ],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        with self.log.open("rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

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
            lambda: " ready." in self.text() or not self.alive(),
            timeout,
            f"worker {self.name} to start",
        )
        if not self.alive():
            raise WorkerDidNotStart(f"worker {self.name} exited at start:\n{self.text()[-3000:]}")

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def signal_main(self, sig: signal.Signals) -> None:
        """Signal the main process only, as an init system or container runtime would."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal_group(signal.SIGCONT)  # a stopped process group must not outlive us
        self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._out.close()

    def terminate(self, timeout: float = 20) -> None:
        """Warm shutdown: Celery finishes the event in hand, then exits."""
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._out.close()

"""Processes started by orderonce itself (the demo, the chaos harness, the tests): workers and
relays, each in its own process group; start, watch, signal, kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from orderonce.errors import WorkerDidNotStart

T = TypeVar("T")


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


class OrderonceProcess:
    """One ``orderonce`` command in its own process group (main process plus any children)."""

    ready_marker = ""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log: Path,
        argv: Sequence[str],
        entry: Sequence[str] = ("-m", "orderonce"),
    ) -> None:
        self.name = name
        self.env = env
        self.log = log
        self._out = log.open("ab")
        self._offset = self._out.tell()  # a restarted process may append to an earlier log
        self.proc = subprocess.Popen(
            [sys.executable, *entry, *argv],
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
            lambda: self.ready_marker in self.text() or not self.alive(),
            timeout,
            f"{self.name} to start",
        )
        if not self.alive():
            raise WorkerDidNotStart(f"{self.name} exited at start:\n{self.text()[-3000:]}")

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
        """Warm shutdown (a worker finishes the event in hand), then exit; killed if it takes
        longer than ``timeout``."""
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._out.close()


class WorkerProcess(OrderonceProcess):
    """One ``orderonce worker`` (a Celery worker: main process plus pool children)."""

    ready_marker = " ready."

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log: Path,
        pool: str = "solo",
        concurrency: int = 1,
        args: Sequence[str] = (),
        entry: Sequence[str] = ("-m", "orderonce"),
    ) -> None:
        self.pool = pool
        self.concurrency = concurrency
        self.args = tuple(args)
        self.entry = tuple(entry)
        argv = ["worker", f"--pool={pool}", f"--concurrency={concurrency}", f"--name={name}@%h"]
        super().__init__(name, env, log, [*argv, *args], entry)

    def wait_ready(self, timeout: float = 30) -> None:
        """Ready once every consumer process is (the buffered pool starts ``concurrency``)."""
        wanted = self.concurrency if self.pool == "buffered" else 1
        wait_until(
            lambda: self.text().count(self.ready_marker) >= wanted or not self.alive(),
            timeout,
            f"{self.name} to start",
        )
        if not self.alive():
            raise WorkerDidNotStart(f"{self.name} exited at start:\n{self.text()[-3000:]}")

    def restarted(self) -> WorkerProcess:
        """A new worker with the same name, settings and log (after this one died)."""
        return WorkerProcess(
            self.name, self.env, self.log, self.pool, self.concurrency, self.args, self.entry
        )

    def children(self) -> list[int]:
        """Pids of the pool processes (prefork) or consumer processes (buffered), from /proc."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    found.append(int(stat.parent.name))
        return found


class RelayProcess(OrderonceProcess):
    """One ``orderonce relay``."""

    ready_marker = "relay running"

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        super().__init__(name, env, log, ["relay"])


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class IngestProcess(OrderonceProcess):
    """One ``orderonce ingest`` (the HTTP front door) on a port of 127.0.0.1; ready once it
    answers ``GET /healthz``, whatever its log level."""

    def __init__(
        self, name: str, env: dict[str, str], log: Path, port: int, args: Sequence[str] = ()
    ) -> None:
        self.port = port
        super().__init__(name, env, log, ["ingest", f"--port={port}", *args])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        def answers() -> bool:
            if not self.alive():
                return True
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(answers, timeout, f"{self.name} to answer", 0.05)
        if not self.alive():
            raise WorkerDidNotStart(f"{self.name} exited at start:\n{self.text()[-3000:]}")
